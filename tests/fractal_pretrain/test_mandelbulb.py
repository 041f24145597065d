"""Mandelbulb-variation recipes: the NumPy reference's published statistics, the kernel vs the reference
(bit-identical on the CPU emulator in CI and, marker ``gpu``, on a device), determinism, early exit,
the class construction and bad input.

Agreement measure: none needed. Reference and kernel use only float32 +, -, *, /, sqrt and comparisons in
one order (mandelbulb/reference.py explains how the shader's acos/atan2/pow/sin/cos/log are avoided or
written out), so images must be equal byte for byte, on the emulator and on a GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fractal_pretrain.config import ConfigError
from fractal_pretrain.mandelbulb import params as P
from fractal_pretrain.mandelbulb import reference as R
from fractal_pretrain.mandelbulb.recipe import MANDELBULBVAR_1K_RULES, MandelbulbRecipe
from fractal_pretrain.mandelbulb.renderer import (
    MandelbulbCpuRenderer,
    MandelbulbKernelRenderer,
    MandelbulbReferenceRenderer,
)
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import emulator, make_renderer

needs_compiler = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler for the CUDA emulator")
BACKENDS = [pytest.param("emulated", marks=needs_compiler), pytest.param("cuda", marks=pytest.mark.gpu)]


def class_of(power: int, rule: int) -> int:
    return (power - 2) * len(MANDELBULBVAR_1K_RULES) + MANDELBULBVAR_1K_RULES.index(rule)


def object_mask(images: np.ndarray) -> np.ndarray:
    return ~(images == 255).all(axis=-1)


# ----------------------------------------------------------------------------- fidelity (reference)

# strong_recipes.md section 3: hit fractions per ray measured on the shader's arithmetic.
PUBLISHED_HIT = {(10, 42): 0.61, (2, 42): 0.27, (7, 506): 0.54, (18, 413): 0.61}


def test_published_statistics_at_a_small_size():
    recipe = get_recipe("mandelbulbvar")
    size, views = 24, 2
    classes = [class_of(p, r) for p, r in PUBLISHED_HIT]
    indices = np.array([c + v * recipe.num_classes for c in classes for v in range(views)])
    batch = make_renderer(recipe, size=size, seed=0).render(indices)
    assert (batch.labels == np.repeat(classes, views)).all()
    mask = object_mask(batch.images)
    per_view = mask.mean(axis=(1, 2)).reshape(len(classes), views)
    fraction = per_view.mean(axis=1)
    # The same shape in every view of a class: the class, not the view, sets the coverage (0.27 vs ~0.6 here).
    assert (np.abs(per_view - fraction[:, None]) < 0.1).all()
    for (key, want), got in zip(PUBLISHED_HIT.items(), fraction, strict=True):
        assert abs(got - want) < 0.08, f"power {key[0]} rule {key[1]}: hit fraction {got:.3f}, published ~{want}"
    # The published samples' classes (not power 2) cover 52-64% of the frame at 512 px with 2x AA.
    assert 0.45 <= fraction[[0, 2, 3]].mean() <= 0.68
    # Centred: the object's centroid is near the image centre.
    rows, cols = np.indices((size, size))
    for m in mask:
        centre = np.array([(rows * m).sum(), (cols * m).sum()]) / m.sum()
        assert np.abs(centre - (size - 1) / 2).max() < 0.2 * size
    # Same class, another view: another colouring (three fresh colours per sample).
    means = np.array([batch.images[i][mask[i]].mean(axis=0) for i in range(len(indices))])
    assert (np.abs(means[0::2] - means[1::2]).max(axis=1) > 5).all()
    # Background is exactly white.
    assert (batch.images[~mask] == 255).all()


def test_early_exit_changes_no_pixel():
    recipe = get_recipe("mandelbulbvar", FLY)
    indices = np.array([class_of(2, 42), class_of(10, 42) + 1037])
    fast = make_renderer(recipe, size=10, seed=1).render(indices)
    slow = make_renderer(dataclasses.replace(recipe, early_exit=False), size=10, seed=1).render(indices)
    np.testing.assert_array_equal(fast.images, slow.images)
    assert object_mask(fast.images).any() and (~object_mask(fast.images)).any()


def test_same_key_same_image_in_any_batch_split():
    recipe = get_recipe("multimandelbulb", {**FLY, "supersample": 2})
    renderer = make_renderer(recipe, size=12, seed=7)
    indices = np.array([3, 10, 2**33 + 1])
    together = renderer.render(indices, epoch=2).images
    apart = np.concatenate([renderer.render(indices[i:i + 1], epoch=2).images for i in range(3)])
    np.testing.assert_array_equal(together, apart)
    assert not np.array_equal(renderer.render(indices, epoch=3).images, together)


# ----------------------------------------------------------------------------- kernels vs reference

FLY = {"mode": "on_the_fly"}
BANK = {"mode": "view_bank", "bank_views": 3}  # with a few rules: a bank the emulator renders in a second
KERNEL_CASES = {
    "mandelbulbvar": ("mandelbulbvar", FLY),
    "var-supersample-degrees-outward-textbook": (
        "mandelbulbvar", {**FLY, "supersample": 2, "view_angles": "degrees", "diffuse_normal": "outward",
                          "derivative": "r^(p-1)"}),
    "var-no-shadow-black": ("mandelbulbvar", {**FLY, "shadow": False, "background": "black"}),
    "var-no-early-exit": ("mandelbulbvar", {**FLY, "early_exit": False}),
    "multimandelbulb": ("multimandelbulb", FLY),
    "multimandelbulb-back-supersample": ("multimandelbulb", {**FLY, "background": "plasma", "supersample": 2}),
    "var-bank": ("mandelbulbvar", {**BANK, "rules": [42, 506], "num_classes": 34}),
    "multi-bank-back-supersample": ("multimandelbulb", {**BANK, "rules": [42, 506, 413], "num_classes": 10,
                                                        "background": "plasma", "supersample": 2}),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_images_equal_the_reference(backend, case):
    name, overrides = KERNEL_CASES[case]
    recipe = get_recipe(name, overrides)
    indices = np.array([61 * 8 + 20, 1036, 2**33 + 5])
    want = MandelbulbReferenceRenderer(recipe, size=12, seed=3).render(indices, epoch=4)
    kernels = MandelbulbKernelRenderer(recipe, size=12, seed=3, emulate=backend == "emulated")
    got = kernels.render(indices, epoch=4)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    images, labels = kernels.render_tensor(indices, epoch=4, dtype="float32")
    ref_images, ref_labels = make_renderer(recipe, size=12, seed=3).render_tensor(indices, epoch=4, dtype="float32")
    torch.testing.assert_close(images.cpu(), ref_images, rtol=0, atol=0)
    assert (labels.cpu() == ref_labels).all()


@needs_compiler
@pytest.mark.parametrize("case", ["mandelbulbvar", "var-supersample-degrees-outward-textbook",
                                  "multimandelbulb-back-supersample", "multi-bank-back-supersample"])
def test_compiled_cpu_march_equals_the_reference_on_any_thread_count(case):
    name, overrides = KERNEL_CASES[case]
    recipe = get_recipe(name, overrides)
    indices = np.array([61 * 8 + 20, 1036, 2**33 + 5])
    want = MandelbulbReferenceRenderer(recipe, size=12, seed=3).render(indices, epoch=4)
    for threads in (1, 3):
        got = MandelbulbCpuRenderer(recipe, size=12, seed=3, num_threads=threads).render(indices, epoch=4)
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)
    assert isinstance(make_renderer(recipe, size=12), MandelbulbCpuRenderer)  # what device: cpu renders with


@needs_compiler
def test_compiled_cpu_march_rebuilds_a_cached_library_that_does_not_load(monkeypatch, tmp_path):
    """Garbage where the marcher's build is cached (as one built against a newer glibc on another node of a
    shared $HOME): a new process rebuilds it once in place and marches the reference's bytes, not the
    ~10x slower reference."""
    import os
    import subprocess
    import sys

    from fractal_pretrain.mandelbulb import cpu

    monkeypatch.setenv("FRACTAL_PRETRAIN_CACHE", str(tmp_path))  # the subprocess's cache too
    path = cpu.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF\x01 not a loadable library " * 64)
    code = (
        "import sys, numpy as np\n"
        "from fractal_pretrain.mandelbulb.renderer import MandelbulbCpuRenderer, make_mandelbulb_renderer\n"
        "from fractal_pretrain.recipes import get_recipe\n"
        f"recipe = get_recipe('mandelbulbvar', {FLY!r})\n"
        "fast = make_mandelbulb_renderer(recipe, size=12, seed=3)\n"
        "ref = make_mandelbulb_renderer(recipe, size=12, seed=3, device='cpu-reference')\n"
        "assert isinstance(fast, MandelbulbCpuRenderer), type(fast)\n"
        "assert (fast.render(np.arange(3)).images == ref.render(np.arange(3)).images).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "unavailable" not in result.stderr, result.stderr
    assert path.read_bytes()[:5] == b"\x7fELF\x02" and b"not a loadable" not in path.read_bytes()


@needs_compiler
def test_emulated_kernels_do_not_depend_on_thread_order():
    recipe = get_recipe("multimandelbulb", {**FLY, "background": "plasma"})
    kernels = MandelbulbKernelRenderer(recipe, size=16, seed=0, emulate=True)
    base = kernels.render(np.arange(3)).images
    with emulator.launch_options(reverse=True, poison=0x00):
        np.testing.assert_array_equal(kernels.render(np.arange(3)).images, base)


# The textbook estimator (derivative r^(p-1)) meets denormals: dr <- p r^(p-1) dr + 1 underflows for small r
# and high powers, and with them flushed a few pixels change (5 of 6912 here, by up to 54 grey levels; none
# at test_kernel_images_equal_the_reference's 12 px). On a GPU that option therefore differs from the reference
# at such pixels. strict: once the marcher no longer depends on denormals this passes and must be moved up.
TEXTBOOK_FTZ = pytest.mark.xfail(strict=True, reason="r^(p-1) meets float32 denormals, which the GPU build flushes")


@needs_compiler
@pytest.mark.parametrize("case", ["mandelbulbvar", "multi-bank-back-supersample", "multimandelbulb-back-supersample",
                                  pytest.param("var-supersample-degrees-outward-textbook", marks=TEXTBOOK_FTZ)])
def test_emulated_kernels_do_not_change_when_denormals_flush_to_zero(case):
    # CuPy builds the marcher with -ftz=true (render/backend.py CUPY_APPENDED_OPTIONS); the reference does not
    # flush, and test_kernel_images_equal_the_reference asserts equal bytes on the GPU too
    name, overrides = KERNEL_CASES[case]
    kernels = MandelbulbKernelRenderer(get_recipe(name, overrides), size=24, seed=3, emulate=True)
    indices = np.arange(0, 12) * 97
    base = kernels.render(indices, epoch=4).images
    with emulator.launch_options(ftz=True):
        flushed = MandelbulbKernelRenderer(get_recipe(name, overrides), size=24, seed=3, emulate=True).render(
            indices, epoch=4).images  # a new renderer: a view bank is marched under the option too
    np.testing.assert_array_equal(flushed, base)


@pytest.mark.gpu
def test_every_output_pixel_is_written_on_the_gpu():
    kernels = MandelbulbKernelRenderer(get_recipe("multimandelbulb", FLY), size=32, seed=0)
    images = []
    for byte in (0xAB, 0x11):
        torch.cuda.empty_cache()
        poison = torch.full((64 * 1024 * 1024,), byte, dtype=torch.uint8, device="cuda")  # dirty the allocator
        del poison
        images.append(kernels.render(np.arange(8)).images)
    np.testing.assert_array_equal(*images)


# ----------------------------------------------------------------------------- float32 helpers

def test_float32_sin_cos_and_log_are_accurate():
    x = np.linspace(-400.0, 400.0, 200_001, dtype=np.float32)
    s, c = P.sincos(x)
    assert np.abs(s - np.sin(x.astype(np.float64))).max() < 2e-7
    assert np.abs(c - np.cos(x.astype(np.float64))).max() < 2e-7
    r = np.geomspace(1e-30, 5.0, 100_001).astype(np.float32)
    assert np.abs(R.log32(r) - np.log(r.astype(np.float64))).max() < 1e-5
    assert R.log32(np.float32([0.0]))[0] == -np.inf


def test_trig_free_powers_equal_the_angle_formulas():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, np.pi, 1000).astype(np.float32)
    for p in (2, 7, 18):
        cp, sp = R.cpow(np.cos(t), np.sin(t), p)
        assert np.abs(cp - np.cos(p * t.astype(np.float64))).max() < 1e-5
        assert np.abs(sp - np.sin(p * t.astype(np.float64))).max() < 1e-5
        np.testing.assert_allclose(R.ipow(np.float32([1.3]), p), np.float32(1.3) ** p, rtol=1e-6)


# ----------------------------------------------------------------------------- classes and draws

def test_mandelbulbvar_classes_are_power_major_over_the_published_rules():
    recipe = get_recipe("mandelbulbvar")
    assert recipe.num_classes == 1037 == recipe.num_formulas and recipe.members_per_class == 1
    assert len(set(MANDELBULBVAR_1K_RULES)) == 61
    power, rule = recipe.formula(np.array([0, 60, 61, 1036]))
    assert power.tolist() == [2, 2, 3, 18] and rule.tolist() == [107, 297, 107, 297]
    samples, items = MandelbulbReferenceRenderer(recipe, size=16).plan(np.arange(2000), 0)
    assert (items.formula == samples.label).all() and items.active.all()
    assert (items.side == 16).all() and (items.top == 0).all() and (items.left == 0).all()
    # Latitude and longitude as drawn (degrees), used as radians by default: the published quirk.
    assert -90 <= items.lat.min() and items.lat.max() < 90 and 0 <= items.lng.min() and items.lng.max() < 360
    direction = items.camera[:, 3]
    np.testing.assert_allclose(np.linalg.norm(direction, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(items.camera[:, 0], -2.5 * direction, atol=1e-6)
    lat = items.lat.astype(np.float64)  # direction = rotZ(lng) rotX(lat) (0, -1, 0): z = -sin(lat)
    np.testing.assert_allclose(direction[:, 2], -np.sin(lat), atol=1e-5)
    assert 0.2 < np.mean(direction[:, 2] > 0.5) < 0.45  # radians: latitude wraps, near-uniform directions
    degrees = MandelbulbReferenceRenderer(dataclasses.replace(recipe, view_angles="degrees"), size=16)
    np.testing.assert_allclose(degrees.plan(np.arange(5), 0)[1].camera[:, 3, 2], -np.sin(np.radians(lat[:5])),
                               atol=1e-5)
    assert (items.colours >= 0).all() and (items.colours < 1).all()


def test_multimandelbulb_groups_counts_and_placement():
    recipe = get_recipe("multimandelbulb")
    assert recipe.num_classes == 200 and recipe.members_per_class == 5
    renderer = MandelbulbReferenceRenderer(recipe, size=100, seed=0)
    members = renderer.members
    assert members.shape == (200, 5) and len(np.unique(members)) == 1000 and members.max() < 1037
    assert not np.array_equal(members, MandelbulbReferenceRenderer(recipe, size=100, seed=1).members)
    samples, items = renderer.plan(np.arange(7000), 0)
    counts = np.bincount(samples.num_objects)
    assert set(np.flatnonzero(counts)) == {4, 5}  # min(U{4..10}, 5)
    assert abs(counts[4] / 7000 - 1 / 7) < 0.02
    klass = np.repeat(samples.label, P.slots_per_sample(recipe))
    assert all(f in members[k] for f, k in zip(items.formula, klass, strict=True))
    assert (items.side >= 15).all() and (items.side < 60).all()
    assert (items.top >= -items.side // 2).all() and (items.top < 100 - items.side // 2).all()


@pytest.mark.parametrize(("overrides", "key"), [
    ({"powers": [1, 18]}, "powers"), ({"powers": [2, 19]}, "powers"), ({"rules": [42, 512]}, "rules"),
    ({"rules": "mandelbulbvar-2k"}, "rules"), ({"supersample": 0}, "supersample"),
    ({"rules": [42, 506]}, "num_classes"), ({"background": "grey"}, "background"),
    ({"view_angles": "gradians"}, "view_angles"), ({"objects": [4, 10]}, "objects"),
])
def test_bad_input_is_a_one_line_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        get_recipe("mandelbulbvar", overrides)
    assert str(err.value).startswith(f"{key}") and "\n" not in str(err.value)


@pytest.mark.parametrize("rules", ["mandelbulbvar-2k", []])
def test_bad_rules_name_every_allowed_form(rules):
    # A rule list name or explicit rule numbers are both allowed: the message says so, in the user's own terms.
    with pytest.raises(ConfigError) as err:
        get_recipe("mandelbulbvar", {"rules": rules})
    message = str(err.value)
    assert message.startswith(f"rules={rules!r}: ") and "mandelbulbvar-1k" in message and "0..511" in message


def test_rule_list_overrides_are_stored_as_tuples():
    recipe = get_recipe("mandelbulbvar", {"rules": [42, 506], "num_classes": 34})
    assert recipe.rules == (42, 506) and recipe.num_formulas == 34 and hash(recipe)
    assert isinstance(MandelbulbRecipe(**recipe.to_dict()), MandelbulbRecipe)


# ----------------------------------------------------------------------------- the command line and training

@pytest.mark.parametrize("name", ["mandelbulbvar", "multimandelbulb"])
def test_recipes_render_export_and_read_back(name, tmp_path, capsys):
    from fractal_pretrain.cli import main
    from fractal_pretrain.export import load_manifest, read_shards

    assert main(["render", "--recipe", name, "--num", "2", "--size", "12", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    out = tmp_path / "shards"
    assert main(["export", "--recipe", name, "--num", "3", "--size", "12", "--start", "5", "--out", str(out),
                 "--shard-size", "2", "--no-progress", "--set", "shadow=false"]) == 0
    manifest = load_manifest(out)
    assert manifest["count"] == 3 and manifest["resolved_recipe"]["shadow"] is False
    samples = list(read_shards(out))
    want = make_renderer(get_recipe(name, {"shadow": False}), size=12).render(np.arange(5, 8))
    for j, sample in enumerate(samples):
        np.testing.assert_array_equal(sample.image, want.images[j])
        assert sample.label == want.labels[j] and sample.meta["objects"][0]["power"] in range(2, 19)


def test_bad_recipe_value_on_the_command_line_is_one_line(tmp_path, capsys):
    from fractal_pretrain.cli import main

    assert main(["render", "--recipe", "mandelbulbvar", "--num", "1", "--out", str(tmp_path / "x.png"),
                 "--set", "powers=[2, 30]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fractal-pretrain: error: powers=") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["mandelbulbvar", "multimandelbulb"])
def test_recipes_train_a_few_steps(name, tmp_path):
    from pathlib import Path

    from fractal_pretrain.cli import main

    smoke = Path(__file__).resolve().parents[2] / "jobs" / "pretrain" / "smoke.yaml"
    args = ["fit", "--config", str(smoke), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2", "--data.recipe", name,
            "--data.recipe_overrides", "{shadow: false}", "--data.size", "16", "--data.batch_size", "2",
            "--data.samples_per_epoch", "4", "--data.val_samples", "0"]
    assert main(args) == 0
    meta = __import__("json").loads((tmp_path / "backbone.json").read_text())
    assert meta["recipe"] == name and meta["steps"] == 2
    assert meta["recipe_config"]["num_classes"] == get_recipe(name).num_classes


# ----------------------------------------------------------------------------- view bank

def test_view_bank_shows_the_same_view_for_the_same_row_and_fresh_placements():
    recipe = get_recipe("mandelbulbvar", {**BANK, "rules": [42], "num_classes": 17, "bank_views": 2})
    renderer = make_renderer(recipe, size=12, seed=0)
    samples, items = renderer.plan(np.arange(0, 17 * 40, 17), 0)  # class 0 (power 2), 40 samples
    assert set(items.view.tolist()) == {0, 1}
    images = renderer.render(np.arange(0, 17 * 8, 17)).images
    views = renderer.plan(np.arange(0, 17 * 8, 17), 0)[1].view
    for v in (0, 1):
        same = images[views == v]
        assert len(same) >= 2 and all(np.array_equal(same[0], other) for other in same[1:])
    assert not np.array_equal(images[views == 0][0], images[views == 1][0])


def test_view_bank_memory_is_stated_and_checked():
    from fractal_pretrain.mandelbulb.renderer import bank_bytes, check_bank_memory

    var = get_recipe("mandelbulbvar")
    assert bank_bytes(var, 256) == 1037 * 64 * 256 * 256 * 4  # 17.4 GB
    assert bank_bytes(get_recipe("multimandelbulb"), 256) == 1000 * 64 * 153 * 153 * 4  # views at 0.6 x 256
    check_bank_memory(var, 256, 20 * 2**30)
    with pytest.raises(ConfigError) as err:
        check_bank_memory(var, 256, 8 * 2**30)
    message = str(err.value)
    assert message.startswith("bank_views=64: ") and "16.20 GiB" in message and "8.00 GiB free" in message


def test_a_view_bank_too_large_for_the_device_stops_fit_before_it_writes(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from fractal_pretrain.cli import main
    from fractal_pretrain.render import backend
    from fractal_pretrain.train.data import FractalDataModule

    assert backend.device_free_memory("cpu") is None  # nothing is kept resident on the CPU: nothing to check
    FractalDataModule(recipe="mandelbulbvar", size=256).check_device_memory("cpu")
    # No GPU here: only the free-memory query is replaced, by one answering 1 GiB for any device (the CPU too),
    # so the check fit runs before Lightning creates logs/version_N (where setup would build the bank) is seen.
    queried = []

    def one_gib_free(device):
        queried.append(str(device))
        return 2**30

    monkeypatch.setattr(backend, "device_free_memory", one_gib_free)
    smoke = Path(__file__).resolve().parents[2] / "jobs" / "pretrain" / "smoke.yaml"
    root = tmp_path / "run"
    args = ["fit", "--config", str(smoke), "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--trainer.max_steps", "1", "--data.recipe", "mandelbulbvar", "--data.recipe_overrides", "{}",
            "--data.size", "64",
            "--data.batch_size", "2", "--data.samples_per_epoch", "2", "--data.val_samples", "0"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fractal-pretrain: error: bank_views=64: the view bank needs 1.01 GiB at 64 px") and \
        "1.00 GiB free" in err and err.count("\n") == 1
    assert queried == ["cpu"] and not root.exists()
    # The same bank fits in 2 GiB; on_the_fly keeps no bank at all.
    monkeypatch.setattr(backend, "device_free_memory", lambda device: 2**31)
    FractalDataModule(recipe="mandelbulbvar", size=64).check_device_memory("cuda:0")
    monkeypatch.setattr(backend, "device_free_memory", one_gib_free)
    on_the_fly = FractalDataModule(recipe="mandelbulbvar", recipe_overrides={"mode": "on_the_fly"}, size=64)
    on_the_fly.check_device_memory("cuda:0")
    assert queried == ["cpu"]
