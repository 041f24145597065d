"""The CUDA kernels vs the NumPy reference: on the CPU emulator everywhere, on a GPU where there is one.

Each test runs on two backends of ``CupyRenderer``: ``emulated`` (render/emulator.py: the same kernel
source, every CUDA thread a fiber on the CPU; runs in CI) and ``cuda`` (marker ``gpu``; skipped without
CUDA and CuPy; run on the device machine with ``python3 -m pytest -q -m gpu tests``).

Agreement measure: both renderers run the same float32 operations in the same order (NVRTC with
--fmad=false; the emulator with -ffp-contract=off), so for the same keys we expect bit-identical results.
Asserted here:
  * plans (systems, jitter, windows draws, masks, flips, colours, placement) equal exactly;
  * the recorded point count of every item equals the reference's (degenerate items included);
  * images: identical on the emulator; on the GPU at least 99.9% of pixels identical and none more than
    1 grey level off, slack kept only for a libm difference never observed (a real pipeline bug moves
    far more pixels).
Also: the shared-memory and global-memory histograms give the same images, layouts and dtypes agree,
every output pixel is written (GPU: the allocator is poisoned first; emulator: shared memory starts
poisoned and threads resume in reverse order, and neither may change an image).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fractal_pretrain.recipes import get_recipe, list_recipes
from fractal_pretrain.render import emulator, make_renderer
from fractal_pretrain.render.cupy_renderer import CupyRenderer

SMALL = {"num_classes": 20, "num_points": 20_000}
INDICES = np.array([0, 1, 2, 5, 8, 13, 21, 2**33 + 7])

needs_compiler = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler for the CUDA emulator")
BACKENDS = [pytest.param("emulated", marks=needs_compiler), pytest.param("cuda", marks=pytest.mark.gpu)]


def kernel_renderer(backend: str, recipe, **kwargs) -> CupyRenderer:
    return CupyRenderer(recipe, emulate=backend == "emulated", **kwargs)


def assert_images_agree(got: np.ndarray, want: np.ndarray, backend: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    if backend == "emulated":
        np.testing.assert_array_equal(got, want)
        return
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert (diff == 0).mean() >= 0.999, f"only {(diff == 0).mean():.5f} of pixels identical"


@pytest.mark.parametrize("force_global", [False, True], ids=["auto-histogram", "global-histogram"])
@pytest.mark.parametrize("name", list(list_recipes("ifs")))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_match_reference(backend, name, force_global):
    recipe = get_recipe(name, SMALL)
    cpu = make_renderer(recipe, size=64, seed=3)
    kernels = kernel_renderer(backend, recipe, size=64, seed=3, bank=cpu.bank, force_global_histogram=force_global)
    want, got = cpu.render(INDICES, epoch=4), kernels.render(INDICES, epoch=4)
    plan = got.extra["device_plan"]
    np.testing.assert_array_equal(plan.label.cpu().numpy(), want.samples.label)
    np.testing.assert_array_equal(plan.num_objects.cpu().numpy(), want.samples.num_objects)
    item_i = plan.item_i.cpu().numpy()
    np.testing.assert_array_equal(item_i[:, 1], want.items.system)
    np.testing.assert_array_equal(item_i[:, 4], want.items.jitter_try)
    np.testing.assert_array_equal(item_i[:, 5], want.items.mask)
    np.testing.assert_array_equal(item_i[:, 6], want.items.flips)
    item_f = plan.item_f.cpu().numpy()
    np.testing.assert_array_equal(item_f[:, :48].reshape(-1, 8, 6), want.items.maps)
    np.testing.assert_array_equal(item_f[:, 48:56], want.items.cum)
    np.testing.assert_array_equal(got.points, want.points)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert_images_agree(got.images, want.images, backend)


@pytest.mark.parametrize("size,chains", [(64, 32), (70, 256), (48, 40)],
                         ids=["columns-per-thread", "uneven-row-bands", "partial-warp"])
@pytest.mark.parametrize("name", ["anderson", "fractaldb", "multiinstance"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_match_reference_for_any_block_and_image_size(backend, name, size, chains):
    # The per-pixel pass splits an item into (column, row band) runs over the block's threads: items
    # wider than the block, bands that do not divide the height, and warps that are not full.
    recipe = get_recipe(name, {**SMALL, "chains": chains, "num_points": 5_000})
    cpu = make_renderer(recipe, size=size, seed=5)
    kernels = kernel_renderer(backend, recipe, size=size, seed=5, bank=cpu.bank)
    want, got = cpu.render(INDICES[:4], epoch=1), kernels.render(INDICES[:4], epoch=1)
    np.testing.assert_array_equal(got.points, want.points)
    assert_images_agree(got.images, want.images, backend)


@pytest.mark.parametrize("name", ["anderson", "fractaldb"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_match_reference_for_systems_of_up_to_eight_maps(backend, name):
    # The chaos kernel specialises its map choice on systems of at most 4 maps (3 thresholds, 2 bits per
    # stored step) and more (7 thresholds, 4 bits); a bank of 2 to 8 maps takes both paths in one batch.
    recipe = get_recipe(name, {**SMALL, "min_maps": 2, "max_maps": 8, "num_points": 5_000})
    cpu = make_renderer(recipe, size=48, seed=9)
    kernels = kernel_renderer(backend, recipe, size=48, seed=9, bank=cpu.bank)
    indices = np.arange(24)
    want, got = cpu.render(indices, epoch=1), kernels.render(indices, epoch=1)
    assert (want.items.num_maps <= 4).any() and (want.items.num_maps > 4).any()
    np.testing.assert_array_equal(got.points, want.points)
    assert_images_agree(got.images, want.images, backend)


@pytest.mark.parametrize("patch", ["point", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_match_reference_on_escaping_systems(backend, hand_bank, patch):
    # Orbits that overflow float32 early (x3 maps) or late, at different steps in different chains (x0.5 /
    # x2 maps; 28,300 points = 131 steps, the last one recorded in 140 of 256 chains: some items escape in
    # their last few steps, some do not), and an all-zero system: the same degenerate items, point counts
    # and images.
    recipe = get_recipe("fractaldb", {"num_classes": 4, "num_points": 28_300, "jitter": "none", "patch": patch})
    bank = hand_bank(recipe, late_escape=True)
    cpu = make_renderer(recipe, size=48, seed=7, bank=bank)
    kernels = kernel_renderer(backend, recipe, size=48, seed=7, bank=bank)
    indices = np.arange(32)
    want, got = cpu.render(indices, epoch=2), kernels.render(indices, epoch=2)
    late = indices % 4 == 3
    assert 0 < (want.points[late] == 0).sum() < late.sum(), "some, not all, late-escape items must escape"
    assert (want.points[indices % 4 == 0] == 0).all() and (want.points[indices % 4 == 1] > 0).all()
    np.testing.assert_array_equal(got.points, want.points)
    assert_images_agree(got.images, want.images, backend)


@pytest.mark.parametrize("size", [256, 300], ids=["plasma-lattice-in-shared-memory", "plasma-grid-in-global-memory"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_plasma_background_matches_reference_on_both_paths(backend, size):
    # Up to 256 px the plasma's even lattice fits in shared memory (grid 257 x 257); at 300 px (513 x 513)
    # the kernel keeps the whole grid in global memory.
    recipe = get_recipe("anderson", {**SMALL, "num_points": 2_000})
    cpu = make_renderer(recipe, size=size, seed=6)
    kernels = kernel_renderer(backend, recipe, size=size, seed=6, bank=cpu.bank)
    assert kernels.plasma_in_shared_memory == (size <= 256)
    assert_images_agree(kernels.render(INDICES[:3]).images, cpu.render(INDICES[:3]).images, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_and_global_histograms_agree(backend):
    recipe = get_recipe("anderson", SMALL)
    shared = kernel_renderer(backend, recipe, size=96, seed=1)
    glob = kernel_renderer(backend, recipe, size=96, seed=1, bank=shared.bank, force_global_histogram=True)
    assert shared.use_shared and not glob.use_shared
    np.testing.assert_array_equal(shared.render(np.arange(16)).images, glob.render(np.arange(16)).images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_dtypes_and_labels_on_device(backend):
    recipe = get_recipe("multiinstance", SMALL)
    kernels = kernel_renderer(backend, recipe, size=64, seed=0)
    nchw, labels = kernels.render_tensor(np.arange(8), dtype="uint8")
    nhwc, _ = kernels.render_tensor(np.arange(8), dtype="uint8", channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, nhwc.contiguous())
    floats, _ = kernels.render_tensor(np.arange(8), dtype="float32", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(floats, nchw.float() / 127.5 - 1.0, atol=1e-5, rtol=0)
    imagenet, _ = kernels.render_tensor(np.arange(8), dtype="float32", channels_last=True)
    bf16, _ = kernels.render_tensor(np.arange(8), dtype="bfloat16", channels_last=True)
    assert bf16.dtype == torch.bfloat16 and bf16.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bf16, imagenet.to(torch.bfloat16))  # the kernel rounds like torch: to nearest even
    assert labels.shape == (8, recipe.num_classes) and labels.device == kernels.torch_device
    host = make_renderer(recipe, size=64, seed=0, bank=kernels.bank).render(np.arange(8))
    np.testing.assert_array_equal(labels.cpu().numpy(), host.labels)


@needs_compiler
@pytest.mark.parametrize("force_global", [False, True], ids=["auto-histogram", "global-histogram"])
@pytest.mark.parametrize("name", ["anderson", "multiinstance"])
def test_emulated_images_do_not_depend_on_thread_order_or_unwritten_shared_memory(name, force_global):
    recipe = get_recipe(name, SMALL)
    kernels = kernel_renderer("emulated", recipe, size=64, seed=2, force_global_histogram=force_global)
    base = kernels.render(np.arange(6)).images
    with emulator.launch_options(reverse=True, poison=0x00):
        np.testing.assert_array_equal(kernels.render(np.arange(6)).images, base)


@needs_compiler
@pytest.mark.parametrize("name", list(list_recipes("ifs")))
def test_emulated_images_do_not_change_when_denormals_flush_to_zero(name):
    # CuPy builds every kernel with -ftz=true (render/backend.py CUPY_APPENDED_OPTIONS); the reference does not
    # flush. Bit-identical GPU images need kernels whose results do not depend on it.
    kernels = kernel_renderer("emulated", get_recipe(name, SMALL), size=64, seed=3)
    base = kernels.render(INDICES, epoch=4)
    with emulator.launch_options(ftz=True):
        flushed = kernels.render(INDICES, epoch=4)
    np.testing.assert_array_equal(flushed.images, base.images)
    np.testing.assert_array_equal(flushed.points, base.points)


@pytest.mark.gpu
def test_every_output_pixel_is_written():
    recipe = get_recipe("multiinstance", SMALL)
    gpu = CupyRenderer(recipe, size=64, seed=0)
    torch.cuda.empty_cache()
    poison = torch.full((64 * 1024 * 1024,), 0xAB, dtype=torch.uint8, device="cuda")  # dirty the allocator
    del poison
    a = gpu.render(np.arange(12)).images
    poison = torch.full((64 * 1024 * 1024,), 0x11, dtype=torch.uint8, device="cuda")
    del poison
    b = gpu.render(np.arange(12)).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(list_recipes("ifs")))
def test_render_tensor_never_synchronises_the_host(name):
    """Training renders a batch on a side stream while the step runs: a host sync inside render_tensor (a pageable
    copy, an index list, .item()) would stall the loop. After a warm-up call (compiles, caches), none may occur."""
    gpu = CupyRenderer(get_recipe(name, SMALL), size=64, seed=0)
    gpu.render_tensor(np.arange(8), dtype="bfloat16", channels_last=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, labels = gpu.render_tensor(np.arange(8, 16), dtype="bfloat16", channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and labels.is_cuda
