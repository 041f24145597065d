"""The CUDA emulator's runtime (render/emulator.py): the semantics the kernel tests rely on.

Kernels from tests/fractal_pretrain/cuda/emulator_check.cu run on CPU tensors; each test asserts what
a GPU would give, or that a bug the emulator exists to expose is exposed.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from fractal_pretrain.render import emulator

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler for the CUDA emulator")

CHECKS = Path(__file__).parent / "cuda" / "emulator_check.cu"


@pytest.fixture(scope="module")
def kernels():
    return emulator.build_module(CHECKS)


def ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def test_syncthreads_and_reduces_over_the_block_per_block(kernels):
    out = torch.full((3 * 96,), -1, dtype=torch.int32)
    kernels.get_function("barrier_and")((3,), (96,), (np.int32(0), ptr(out)))
    assert out.tolist() == [1] * 288
    kernels.get_function("barrier_and")((3,), (96,), (np.int32(5), ptr(out)))
    assert out.tolist() == [0] * 288


def test_two_dimensional_grids(kernels):
    out = torch.full((3 * 2 * 4,), -1, dtype=torch.int32)
    kernels.get_function("block_coordinates")((3, 2), (4,), (ptr(out),))
    assert out.tolist() == [by * 100 + bx * 10 + t for by in range(2) for bx in range(3) for t in range(4)]


def test_warp_collectives(kernels):
    n = 64
    masks, maxes, shuffled = (torch.zeros(n, dtype=torch.int64).to(torch.int32) for _ in range(3))
    kernels.get_function("warp_ops")((1,), (n,), (np.int32(8), ptr(masks), ptr(maxes), ptr(shuffled)))
    masks = masks.numpy().view(np.uint32)
    for t in range(n):
        group = (t % 32) // 8
        assert masks[t] == sum(1 << lane for lane in range(32) if lane // 8 == group)
    assert set(maxes.numpy().view(np.uint32)) == {max(t * 7 % 32 for t in range(32))}
    warp_base = np.arange(n) // 32 * 32
    np.testing.assert_array_equal(shuffled.numpy(), (warp_base + 31 - np.arange(n) % 32) * 10)


def test_thread_order_exposes_a_race(kernels):
    out = torch.zeros(2, dtype=torch.int32)
    kernels.get_function("racy")((2,), (128,), (ptr(out),))
    forward = out.tolist()
    with emulator.launch_options(reverse=True):
        kernels.get_function("racy")((2,), (128,), (ptr(out),))
    assert forward == [127, 127] and out.tolist() == [0, 0]


def test_shared_memory_starts_poisoned(kernels):
    out = torch.zeros(8, dtype=torch.int32)
    fn = kernels.get_function("uninitialised")
    for poison in (0xCD, 0x11):
        with emulator.launch_options(poison=poison):
            fn((1,), (8,), (ptr(out),), shared_mem=16)
        assert set(out.numpy().view(np.uint32).tolist()) == {poison * 0x01010101}


def test_deadlock_is_an_error_not_a_hang(kernels):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(emulator.EmulatorError, match=r"deadlock in block \(0, 0\)"):
        kernels.get_function("deadlock")((1,), (32,), (ptr(out),))


def test_threads_that_return_do_not_hold_up_a_barrier(kernels):
    out = torch.zeros(40, dtype=torch.int32)
    kernels.get_function("early_exit")((1,), (40,), (ptr(out),))
    assert out.tolist() == [2, 0] * 20


def test_a_returned_lane_does_not_hold_up_a_collective_of_other_lanes(kernels):
    out = torch.zeros(8, dtype=torch.int32)
    kernels.get_function("vote_without_a_returned_lane")((1,), (8,), (ptr(out),))
    assert out.tolist()[:3] == [0b0111] * 3  # lanes 0-2 voted; 3 had returned; 4-7 were never asked


def test_bad_launches_are_clear_errors(kernels):
    out = torch.zeros(4, dtype=torch.int32)
    fn = kernels.get_function("barrier_and")
    with pytest.raises(emulator.EmulatorError, match="argument first .int. is int64 .8 bytes., expected 4"):
        fn((1,), (4,), (np.int64(0), ptr(out)))
    with pytest.raises(emulator.EmulatorError, match="takes 2 arguments, got 1"):
        fn((1,), (4,), (ptr(out),))
    with pytest.raises(emulator.EmulatorError, match="block size 2000 is not in 1..1024"):
        fn((1,), (2000,), (np.int32(0), ptr(out)))
    with pytest.raises(emulator.EmulatorError, match="blocks of one dimension and grids of at most two"):
        fn((1,), (4, 2), (np.int32(0), ptr(out)))
    with pytest.raises(emulator.EmulatorError, match="max_dynamic_shared_size_bytes"):
        fn((1,), (4,), (np.int32(0), ptr(out)), shared_mem=64 * 1024)
    with pytest.raises(emulator.EmulatorError, match="no kernel 'nope'; kernels: barrier_and"):
        kernels.get_function("nope")


def test_arguments_cupy_would_pass_with_other_bytes_are_errors(kernels):
    # CuPy packs a Python int as int64, a Python float as float64 and a NumPy scalar as its own dtype, whatever
    # the kernel's signature: the emulator must not accept what would reach a GPU kernel as other bytes.
    out = torch.zeros(4, dtype=torch.int32)
    fn = kernels.get_function("barrier_and")
    for bad, what in ((0, "a Python int"), (True, "a Python bool"), (np.float32(0), "float32")):
        with pytest.raises(emulator.EmulatorError, match=f"argument first .int. is {what}, which CuPy would not"):
            fn((1,), (4,), (bad, ptr(out)))
    fn((1,), (4,), (np.uint32(0), ptr(out)))  # the same 4 bytes: allowed
    assert out.tolist() == [1] * 4
    value = torch.zeros(1, dtype=torch.float32)
    store = kernels.get_function("store_float")
    for bad in (1.5, np.int32(1)):
        with pytest.raises(emulator.EmulatorError, match="argument value .float. .*pass np.float32 of 4 bytes"):
            store((1,), (1,), (bad, ptr(value)))
    store((1,), (1,), (np.float32(1.5), value.data_ptr()))  # a pointer may be a Python int (int64 for CuPy too)
    assert value.item() == 1.5


def test_grids_beyond_cuda_limits_are_errors(kernels):
    out = torch.zeros(4, dtype=torch.int32)
    fn = kernels.get_function("barrier_and")
    with pytest.raises(emulator.EmulatorError, match=r"gridDim.y=65536 is not in 1..65535"):
        fn((1, 65536), (4,), (np.int32(0), ptr(out)))
    with pytest.raises(emulator.EmulatorError, match=r"gridDim.x=0 is not in 1..2147483647"):
        fn((0,), (4,), (np.int32(0), ptr(out)))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "i686"), reason="ftz: x86 MXCSR only")
def test_ftz_flushes_denormals_for_the_launch_only(kernels):
    # CuPy's GPU builds flush float32 denormals (-ftz=true); launch_options(ftz=True) does the same on the CPU.
    out = torch.zeros(4, dtype=torch.float32)
    product = kernels.get_function("product")
    args = (np.float32(1e-30), np.float32(1e-10), ptr(out))
    product((1,), (4,), args)
    denormal = out[0].item()
    assert 0.0 < denormal < np.finfo(np.float32).tiny
    with emulator.launch_options(ftz=True):
        product((1,), (4,), args)
    assert out.tolist() == [0.0] * 4
    product((1,), (4,), args)  # the thread's own floating-point mode is back
    assert out.tolist() == [denormal] * 4 and np.float32(1e-30) * np.float32(1e-10) == np.float32(denormal)


def test_translate_rewrites_shared_declarations_and_reads_signatures():
    source, kernels = emulator.translate(
        'extern "C" __global__ void k(const long long *indices, u32 seed, void *out) {\n'
        "  extern __shared__ unsigned int hist[];\n  __shared__ float grid[4][8];\n}\n")
    assert "unsigned int *hist = (unsigned int *)emu::dynamic_shared();" in source
    assert "auto &grid = *emu::static_shared<float[4][8]>(0u);" in source
    assert [(p.ctype, p.name, p.fmt) for p in kernels["k"]] == [
        ("const long long *", "indices", "Q"), ("u32", "seed", "I"), ("void *", "out", "Q")]
    _, bounded = emulator.translate('extern "C" __global__ void __launch_bounds__(1024, 2) k(int n) {}\n'
                                    'extern "C" __global__ void none() {}')
    assert [p.name for p in bounded["k"]] == ["n"] and bounded["none"] == []
    with pytest.raises(emulator.EmulatorError, match="parameter type 'half' is not supported"):
        emulator.translate('extern "C" __global__ void k(half x) {}')


def test_a_kernel_that_does_not_compile_names_the_file(tmp_path):
    bad = tmp_path / "broken.cu"
    bad.write_text('extern "C" __global__ void k(int *out) { out[0] = undefined_name; }\n')
    with pytest.raises(emulator.EmulatorError, match="broken.cu for the CPU failed(.|\\n)*undefined_name"):
        emulator.build_module(bad)
