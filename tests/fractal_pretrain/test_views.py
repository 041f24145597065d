"""Two-view recipes (``selfsup``): views of one sample share the fractal and differ only in their own draws."""

from __future__ import annotations

import numpy as np
import pytest

from fractal_pretrain.config import ConfigError
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import emulator, make_renderer
from fractal_pretrain.render.params import VIEW_ITEM_FIELDS, view_keys
from fractal_pretrain.render.renderer import ReferenceRenderer

SMALL = {"num_classes": 10, "num_points": 4000, "chains": 64}
INDICES = np.array([0, 3, 7, 2**40 + 1])


@pytest.fixture(scope="module")
def renderer():
    return ReferenceRenderer(get_recipe("selfsup", SMALL), size=48, seed=2)


def test_views_share_the_fractal_and_differ_in_their_own_draws(renderer):
    batch = renderer.render(INDICES, epoch=1)
    b = len(INDICES)
    assert batch.images.shape == (2 * b, 48, 48, 3) and batch.labels.tolist() == (INDICES % 10).tolist()
    items = batch.items
    for field in ("index", "slot", "system", "maps", "cum", "start", "jitter_try", "shift", "scale", "mask"):
        values = getattr(items, field)
        np.testing.assert_array_equal(values[:b], values[b:], err_msg=field)  # the shared fractal
    np.testing.assert_array_equal(items.index[:b], INDICES)
    np.testing.assert_array_equal(batch.points[:b], batch.points[b:])  # the same chaos game
    differing = [f for f in VIEW_ITEM_FIELDS if not np.array_equal(getattr(items, f)[:b], getattr(items, f)[b:])]
    assert set(differing) >= {"hue_shift", "side", "top", "left"}
    canvases = batch.extra["view_samples"]
    np.testing.assert_array_equal(canvases.index, view_keys(INDICES, 2))
    assert not np.array_equal(canvases.corners[:b], canvases.corners[b:])  # own plasma
    assert not np.array_equal(batch.images[:b], batch.images[b:])
    sides = items.side / 48
    assert sides.min() >= 0.25 - 1 / 48 and sides.max() <= 1.25
    assert (items.top >= -items.side // 2).all() and (items.top < 48 - items.side // 2).all()


def test_a_view_is_a_pure_function_of_key_and_view(renderer):
    batch = renderer.render(INDICES, epoch=1)
    b = len(INDICES)
    # the same sample in another batch, at another position: the same two views
    alone = renderer.render(INDICES[[2]], epoch=1)
    np.testing.assert_array_equal(alone.images[0], batch.images[2])
    np.testing.assert_array_equal(alone.images[1], batch.images[b + 2])
    # another epoch: other views
    other = renderer.render(INDICES[[2]], epoch=2)
    assert not np.array_equal(other.images[0], alone.images[0])


def test_view_keys_never_meet_sample_keys():
    keys = view_keys(np.array([0, 5, 2**48 - 1]), 2)
    assert keys.min() >= 2**48 and len(set(keys.tolist())) == 6


def test_two_view_recipes_need_a_view_size_and_small_indices(renderer):
    with pytest.raises(ConfigError, match="views=2 needs objects"):
        get_recipe("anderson", {"views": 2})
    with pytest.raises(ConfigError, match="views=3: must be one of 0, 2"):
        get_recipe("selfsup", {"views": 3})
    with pytest.raises(ConfigError, match="indices < 2\\*\\*48"):
        renderer.render([2**48])


@pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler")
def test_cpu_device_renders_views_compiled_with_the_reference_bytes(renderer, capsys):
    from fractal_pretrain.render import fast_cpu

    fast_cpu._warned = False
    fast = make_renderer(renderer.recipe, size=48, seed=2, device="cpu", bank=renderer.bank)
    assert isinstance(fast, fast_cpu.FastCpuRenderer)
    assert "NumPy reference" not in capsys.readouterr().err
    want, got = renderer.render(INDICES, epoch=1), fast.render(INDICES, epoch=1)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.points, want.points)
    np.testing.assert_array_equal(got.extra["view_samples"].index, view_keys(INDICES, 2))


@pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler for the CUDA emulator")
def test_device_views_equal_the_reference_on_the_emulator(renderer):
    # The CuPy path (plan twice, merge the view looks, one full-size object per view, paste, plasma, finish),
    # run by the CPU emulator: bit-identical to the reference, plans included.
    from fractal_pretrain.render.cupy_renderer import CupyRenderer

    kernels = CupyRenderer(renderer.recipe, size=48, seed=2, bank=renderer.bank, emulate=True)
    want, got = renderer.render(INDICES, epoch=1), kernels.render(INDICES, epoch=1)
    plan = got.extra["device_plan"]
    item_i = plan.item_i.cpu().numpy()
    for column, field in ((1, "system"), (5, "mask"), (6, "flips"), (7, "sat8"), (8, "val8"), (9, "side"),
                          (10, "top"), (11, "left")):
        np.testing.assert_array_equal(item_i[:, column], getattr(want.items, field), err_msg=field)
    np.testing.assert_array_equal(plan.item_f.cpu().numpy()[:, -1], want.items.hue_shift)
    np.testing.assert_array_equal(plan.indices.cpu().numpy(), view_keys(INDICES, 2))
    np.testing.assert_array_equal(got.points, want.points)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.images, want.images)
    images, labels = kernels.render_tensor(INDICES, epoch=1, dtype="float32")
    assert images.shape == (2 * len(INDICES), 3, 48, 48) and labels.shape == (len(INDICES),)


def test_svd_jitter_rotates_a_or_shifts_b_of_one_map(renderer):
    from fractal_pretrain.render.params import plan_items, plan_samples

    recipe = renderer.recipe
    assert recipe.jitter == "svd"
    index = np.arange(200)
    items = plan_items(recipe, renderer.bank, 48, 2, 0, plan_samples(recipe, 2, 0, index))
    original = renderer.bank.maps[items.system].reshape(len(index), -1, 6).astype(np.float32)
    jittered = items.jitter_try >= 0
    assert jittered.mean() > 0.9
    kinds = set()
    for i in np.flatnonzero(jittered):
        changed = np.flatnonzero(np.any(items.maps[i] != original[i], axis=1))
        assert len(changed) <= 1
        if not len(changed):
            continue
        new, old = items.maps[i, changed[0]], original[i, changed[0]]
        a_new, a_old = new[[0, 1, 3, 4]].reshape(2, 2), old[[0, 1, 3, 4]].reshape(2, 2)
        if np.array_equal(a_new, a_old):  # translation shift
            assert np.all(np.abs(new[[2, 5]] - old[[2, 5]]) <= 0.5 + 1e-6)
            kinds.add("shift")
        else:  # rotation: singular values kept, translation untouched
            np.testing.assert_allclose(np.linalg.svd(a_new, compute_uv=False),
                                       np.linalg.svd(a_old, compute_uv=False), atol=1e-5)
            np.testing.assert_array_equal(new[[2, 5]], old[[2, 5]])
            kinds.add("rotation")
    assert kinds == {"shift", "rotation"}


@pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler")
def test_fast_cpu_renders_svd_jitter_like_the_reference():
    recipe = get_recipe("anderson", {**SMALL, "jitter": "svd"})
    fast = make_renderer(recipe, size=40, seed=1, device="cpu")
    assert type(fast).__name__ == "FastCpuRenderer"
    ref = ReferenceRenderer(recipe, size=40, seed=1, bank=fast.bank)
    np.testing.assert_array_equal(fast.render(INDICES, 3).images, ref.render(INDICES, 3).images)


def test_preview_shows_view_pairs_and_export_refuses_views(tmp_path, capsys):
    from PIL import Image

    from fractal_pretrain.cli import main

    out = tmp_path / "grid.png"
    assert main(["render", "--recipe", "selfsup", "--set", "num_classes=10", "--set", "num_points=2000",
                 "--num", "2", "--size", "32", "--device", "cpu-reference", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    capsys.readouterr()
    assert main(["export", "--recipe", "selfsup", "--num", "2", "--shard-size", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "views=2" in err[0]
    assert not (tmp_path / "s").exists()


def test_the_fractal_of_a_view_pair_is_rendered_at_its_bounding_box_as_in_ssfractal(renderer):
    # Anderson's SelfSupervisedGenerator renders the fractal over minmax(points), without IFSGenerator's window
    # zoom/shift: the object fills its square before each view resizes and places it.
    from fractal_pretrain.render import reference

    recipe = get_recipe("selfsup")
    assert recipe.window_translate == 0.0 and recipe.window_scale == (1.0, 1.0)
    indices = np.arange(24)
    _, _, _, items = renderer.plan_views(indices, 1)
    np.testing.assert_array_equal(items.shift, 0.0)
    np.testing.assert_array_equal(items.scale, 1.0)
    _, density, points = reference.render_items(renderer.recipe, renderer.seed, 1, items, 48)
    for g in density[points > 0]:
        rows, cols = np.flatnonzero(g.any(axis=1)), np.flatnonzero(g.any(axis=0))
        assert rows[0] <= 1 and rows[-1] >= 46 and cols[0] <= 1 and cols[-1] >= 46  # edge to edge
