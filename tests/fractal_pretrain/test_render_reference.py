"""Tests of the NumPy reference renderer (fractal_pretrain.render.reference / renderer).

Tests of whole images run on both CPU backends (fixture ``device``: the compiled ``cpu`` renderer and
``cpu-reference``); tests of the pipeline's stages call ``reference`` directly. Covers, for every recipe at
small sizes:

* determinism: the same (seed, epoch, indices) renders byte-identical images, labels and metadata
  across renderer instances, batch splits (1x8, 2x4, 8x1) and shuffled orders; a different index,
  epoch or seed renders a different image;
* output contract: (B, H, W, 3) uint8 images with fractal pixels, labels in range (multi-hot rows
  consistent with the objects), JSON-serialisable metadata with the key fields, odd sizes;
* semantics spot checks: plasma or black background outside the fractal (and under the black
  pixels of pasted objects), grey colouring, the 8 dihedral flips, the 3x3 patch stamp offsets,
  graded max == 1, ``hsv_to_rgb`` against ``colorsys``, the blur kernel, bilinear taps;
* degenerate systems (expanding, all-zero maps) in a hand-built bank: no exception or warning,
  counted by ``batch.degenerate``, background-only images;
* the chaos game: points inside the bounding box, exact point counts, the chains x steps layout
  (first point = map k of the fixed point of map 0);
* fill statistics of the Anderson settings against the published numbers (fractal_anchors.md 1.10;
  marked slow).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import warnings

import numpy as np
import pytest

from fractal_pretrain import rng
from fractal_pretrain.ifs.sample import singular_values
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer, reference
from fractal_pretrain.render.params import object_size, plan_samples, slots_per_sample

NAMES = ("anderson", "fractal4ad", "multiformula", "multiinstance", "fractaldb")
SMALL = {"num_classes": 10, "num_points": 5000}
SIZE = 32
SEED = 0
B = 8


# ----------------------------------------------------------------------------- helpers

def small_recipe(name, **overrides):
    return get_recipe(name, {**SMALL, **overrides})


def render_plan(renderer, indices, epoch=0, plan=None):
    """Per-item (rgb, density, points) of the reference pipeline, plus the plan."""
    idx, samples, items = renderer.plan(indices, epoch)
    if plan is not None:
        items = plan
    side = object_size(renderer.recipe, renderer.size)
    rgb, dens, pts = reference.render_items(renderer.recipe, renderer.seed, epoch, items, side)
    return rgb, dens, pts, samples, items


def assert_batches_equal(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.dtype == b.images.dtype and a.labels.dtype == b.labels.dtype
    for i in range(len(a.images)):
        assert a.metadata(i) == b.metadata(i)


# ----------------------------------------------------------------------------- fixtures

# Every test that renders whole images runs on both CPU backends: the compiled renderer (device "cpu",
# render/fast_cpu.py) and the NumPy reference ("cpu-reference"); they must give the same bytes
# (tests/fractal_pretrain/test_render_fast_cpu.py checks that directly, at full size).
BACKENDS = ("cpu", "cpu-reference")


@pytest.fixture(scope="session", params=BACKENDS)
def device(request):
    return request.param


def make(device, recipe, **kwargs):
    return make_renderer(recipe, device=device, **kwargs)


@pytest.fixture(scope="session")
def banks():
    """name -> system bank of the small recipe (seed 0), built once."""
    return {name: make_renderer(small_recipe(name), size=SIZE, seed=SEED, device="cpu-reference").bank
            for name in NAMES}


@pytest.fixture(scope="session")
def renderers(device, banks):
    """name -> renderer of the small recipe (size 32, seed 0) on the backend under test."""
    return {name: make(device, small_recipe(name), size=SIZE, seed=SEED, bank=banks[name]) for name in NAMES}


@pytest.fixture(scope="session")
def batches(renderers):
    """name -> batch of indices 0..7, epoch 0."""
    return {name: r.render(np.arange(B), 0) for name, r in renderers.items()}


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_bytes_across_instances(name, batches, device):
    other = make(device, small_recipe(name), size=SIZE, seed=SEED)  # loads the cached bank
    assert_batches_equal(batches[name], other.render(np.arange(B), 0))


@pytest.mark.parametrize("name", NAMES)
def test_batch_split_and_order_do_not_matter(name, renderers, batches):
    r, full = renderers[name], batches[name]
    halves = [r.render(np.arange(4), 0), r.render(np.arange(4, 8), 0)]
    singles = [r.render([i], 0) for i in range(B)]
    for parts in (halves, singles):
        np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), full.images)
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), full.labels)
        metas = [p.metadata(i) for p in parts for i in range(len(p.images))]
        assert metas == [full.metadata(i) for i in range(B)]
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = r.render(perm, 0)
    np.testing.assert_array_equal(shuffled.images, full.images[perm])
    np.testing.assert_array_equal(shuffled.labels, full.labels[perm])
    assert [shuffled.metadata(i) for i in range(B)] == [full.metadata(int(p)) for p in perm]
    # Repeated indices in one batch render identically too.
    again = r.render([3, 3], 0)
    np.testing.assert_array_equal(again.images[0], again.images[1])
    np.testing.assert_array_equal(again.images[0], full.images[3])


@pytest.mark.parametrize("name", NAMES)
def test_different_key_different_image(name, renderers, batches, device):
    r, full = renderers[name], batches[name]
    base = full.images[0]
    assert not np.array_equal(base, full.images[1])  # index
    assert not np.array_equal(base, r.render([0], 1).images[0])  # epoch
    other_seed = make(device, small_recipe(name), size=SIZE, seed=SEED + 1)
    assert not np.array_equal(base, other_seed.render([0], 0).images[0])  # seed
    # The high word of the index matters: i and i + 2**32 differ, and huge indices render.
    far = r.render([2**32], 0)
    assert far.images.shape == (1, SIZE, SIZE, 3)
    assert not np.array_equal(base, far.images[0])


# ----------------------------------------------------------------------------- output contract

KEY_FIELDS = {"seed", "epoch", "index", "recipe", "size", "label", "blur_sigma", "objects"}
OBJECT_FIELDS = {"system", "class", "jitter", "shift", "scale", "patch_mask", "flips",
                 "hue_shift", "saturation", "value", "points"}


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_renders(name, renderers, batches):
    r, batch = renderers[name], batches[name]
    rec = r.recipe
    assert batch.images.shape == (B, SIZE, SIZE, 3)
    assert batch.images.dtype == np.uint8
    assert batch.degenerate == 0
    # Every active item recorded exactly num_points points; inactive ones none.
    np.testing.assert_array_equal(batch.points[batch.items.active], rec.num_points)
    assert (batch.points[~batch.items.active] == 0).all()
    # Fractal pixels are present: every active item has a non-empty density.
    _, dens, _, _, items = render_plan(r, np.arange(B))
    assert ((dens > 0).sum(axis=(1, 2))[items.active] > 0).all()
    for i in range(B):
        assert batch.images[i].max() > 0
        assert len(np.unique(batch.images[i].reshape(-1, 3), axis=0)) > 1
    # Labels.
    if rec.multi_label:
        assert batch.labels.shape == (B, rec.num_classes)
        assert batch.labels.dtype == np.uint8
        assert set(np.unique(batch.labels)) <= {0, 1}
        ones = batch.labels.sum(axis=1)
        assert (ones >= max(1, rec.objects[0])).all() and (ones <= rec.objects[1]).all()
        assert (ones <= batch.samples.num_objects).all()
    else:
        assert batch.labels.shape == (B,)
        assert batch.labels.dtype == np.int64
        assert ((batch.labels >= 0) & (batch.labels < rec.num_classes)).all()
        np.testing.assert_array_equal(batch.labels, np.arange(B) % rec.num_classes)
    # Metadata.
    for i in range(B):
        meta = batch.metadata(i)
        text = json.dumps(meta)
        assert json.loads(text) == meta
        assert KEY_FIELDS <= set(meta)
        assert (meta["seed"], meta["epoch"], meta["index"]) == (SEED, 0, i)
        assert meta["recipe"] == name and meta["size"] == SIZE
        objects = meta["objects"]
        assert rec.objects[0] <= len(objects) <= rec.objects[1]
        assert len(objects) == int(batch.samples.num_objects[i])
        for obj in objects:
            assert OBJECT_FIELDS <= set(obj)
            assert obj["points"] == rec.num_points
            assert 0 <= obj["system"] < rec.num_systems
            assert obj["system"] // rec.systems_per_class == obj["class"]
            assert 1 <= obj["patch_mask"] <= 511
            if rec.multi_object:
                assert {"side", "top", "left"} <= set(obj)
        classes = sorted({obj["class"] for obj in objects})
        if rec.multi_label:
            assert meta["label"] == classes
        else:
            assert meta["label"] == i % rec.num_classes
            if rec.object_source == "class":
                assert classes == [meta["label"]]


@pytest.mark.parametrize("size", [33, 50])
@pytest.mark.parametrize("name", NAMES)
def test_odd_sizes_render(name, size, renderers, device):
    r = make(device, renderers[name].recipe, size=size, seed=SEED, bank=renderers[name].bank)
    batch = r.render(np.arange(3), 0)
    assert batch.images.shape == (3, size, size, 3)
    assert batch.images.dtype == np.uint8
    assert batch.degenerate == 0
    assert all(batch.images[i].max() > 0 for i in range(3))


# ----------------------------------------------------------------------------- semantics

def test_black_background_outside_the_fractal(renderers, device):
    bank = renderers["anderson"].bank
    r = make(device, small_recipe("anderson", background=False, blur_p=0.0), size=SIZE, seed=SEED,
                      bank=bank)
    batch = r.render(np.arange(B), 0)
    rgb, dens, _, _, items = render_plan(r, np.arange(B))
    outside = dens == 0
    assert outside.any() and (~outside).any()
    assert (batch.images[outside] == 0).all()
    np.testing.assert_array_equal(batch.images[~outside], rgb[~outside])
    # Colour: V is the item's value for every fractal pixel (max channel == val8 within rounding).
    peak = batch.images.max(axis=-1).astype(np.int64)
    val = np.broadcast_to(items.val8[:, None, None], peak.shape)
    assert (np.abs(peak - val)[~outside] <= 1).all()


def test_plasma_background_outside_the_fractal(renderers, device):
    """Single-object, no blur: fractal pixels overwrite the plasma, every other pixel is plasma."""
    r = make(device, small_recipe("anderson", blur_p=0.0), size=SIZE, seed=SEED,
                      bank=renderers["anderson"].bank)
    batch = r.render(np.arange(B), 0)
    rgb, dens, _, samples, _ = render_plan(r, np.arange(B))
    bg = reference.background(r.recipe, SEED, 0, samples, SIZE)
    assert bg.shape == (B, SIZE, SIZE, 3) and bg.dtype == np.uint8
    for i in range(B):
        assert len(np.unique(bg[i].reshape(-1, 3), axis=0)) > 8  # a textured plasma, not flat
    fractal = dens > 0
    np.testing.assert_array_equal(batch.images[~fractal], bg[~fractal])
    np.testing.assert_array_equal(batch.images[fractal], rgb[fractal])
    # The plasma depends on the sample's key only, not on its batch position.
    _, later, _ = r.plan(np.arange(B)[::-1], 0)
    np.testing.assert_array_equal(reference.background(r.recipe, SEED, 0, later, SIZE), bg[::-1])


def test_black_background_outside_pasted_objects(renderers, device):
    bank = renderers["multiformula"].bank
    rec = small_recipe("multiformula", blur_p=0.0)
    assert not rec.background
    r = make(device, rec, size=64, seed=SEED, bank=bank)
    batch = r.render(np.arange(4), 0)
    covered = _object_cover(batch, 64)
    assert (batch.images[~covered] == 0).all()
    assert all(batch.images[b][covered[b]].max() > 0 for b in range(4))


def _object_cover(batch, size):
    """(B, size, size) bool: pixels inside some active object's pasted square."""
    it, slots = batch.items, slots_per_sample(batch.recipe)
    covered = np.zeros((len(batch.images), size, size), dtype=bool)
    for item in np.flatnonzero(it.active):
        b, top, left, side = item // slots, it.top[item], it.left[item], it.side[item]
        covered[b, max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = True
    return covered


def test_pasted_objects_keep_the_plasma_under_black_pixels(renderers, device):
    """Multi-instance, no blur: outside the objects the plasma is untouched, and an object's black
    (empty) pixels do not cover it, so no pixel is black (the plasma's V is >= 0.4 * 255)."""
    rec = small_recipe("multiinstance", blur_p=0.0)
    r = make(device, rec, size=64, seed=SEED, bank=renderers["multiinstance"].bank)
    batch = r.render(np.arange(4), 0)
    bg = reference.background(rec, SEED, 0, batch.samples, 64)
    covered = _object_cover(batch, 64)
    np.testing.assert_array_equal(batch.images[~covered], bg[~covered])
    assert (batch.images.max(axis=-1) > 0).all()
    changed = (batch.images != bg).any(axis=-1)
    assert all(changed[b].any() for b in range(4))  # some object pixels were pasted
    assert not changed[~covered].any()


def test_blur_kernel():
    """The blur is a normalised separable 3x3 Gaussian: flat images stay flat, an impulse spreads
    to k1*k1 / k0*k1 / k0*k0 weights, and only flagged samples are blurred."""
    rec = small_recipe("anderson", blur_p=1.0, blur_sigma=(1.0, 1.0))
    samples = plan_samples(rec, SEED, 0, np.arange(2))
    samples.blur[1] = False
    k0, k1 = float(samples.blur_k0[0]), float(samples.blur_k1[0])
    assert abs(k0 + 2 * k1 - 1) < 1e-6
    assert abs(k1 / k0 - np.exp(-0.5)) < 1e-6  # sigma = 1: w(1) / w(0) = exp(-1 / 2)
    img = np.zeros((2, 9, 9, 3), dtype=np.uint8)
    img[:, 2, 5] = 200
    img[:, :, :, 2] = 90
    out = reference.blur(img, samples)
    np.testing.assert_array_equal(out[1], img[1])
    assert (out[0, :, :, 2] == 90).all()
    want = np.rint(200 * np.outer([k1, k0, k1], [k1, k0, k1]))
    np.testing.assert_allclose(out[0, 1:4, 4:7, 0], want, atol=1)
    assert out[0, :, :, 0].sum() - out[0, 1:4, 4:7, 0].sum() == 0


def test_bilinear_taps():
    """Half-pixel-centre taps: ratio 1 is the identity, ratio 2 averages pixel pairs, and
    upscaling clamps at both borders."""
    lower, upper, frac = reference.bilinear_taps(np.arange(5), np.float32(1.0), 5)
    np.testing.assert_array_equal(lower, np.arange(5))
    np.testing.assert_array_equal(frac, 0)
    lower, upper, frac = reference.bilinear_taps(np.arange(4), np.float32(2.0), 8)
    np.testing.assert_array_equal(lower, [0, 2, 4, 6])
    np.testing.assert_array_equal(upper, [1, 3, 5, 7])
    np.testing.assert_array_equal(frac, 0.5)
    lower, upper, frac = reference.bilinear_taps(np.arange(8), np.float32(0.5), 4)
    assert lower[0] == 0 and frac[0] == 0  # (0 + 0.5) * 0.5 - 0.5 < 0 -> clamped to 0
    np.testing.assert_array_equal(frac[1:7], [0.25, 0.75] * 3)
    assert lower[-1] == 3 and upper[-1] == 3


def test_grey_colouring(renderers, device):
    bank = renderers["anderson"].bank
    rec = small_recipe("anderson", color=False, background=False, blur_p=0.0)
    r = make(device, rec, size=SIZE, seed=SEED, bank=bank)
    batch = r.render(np.arange(B), 0)
    _, dens, _, _, _ = render_plan(r, np.arange(B))
    img = batch.images
    fractal = dens > 0
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    grey = (dens * np.float32(rec.grey_level)).astype(np.uint8)
    np.testing.assert_array_equal(img[..., 0], grey)
    assert img[fractal].max() == rec.grey_level  # density 1 -> grey_level
    assert (img[~fractal] == 0).all()


def _dihedral(a, bits):
    if bits & 1:
        a = np.transpose(a)
    if bits & 2:
        a = np.flip(a, axis=0)
    if bits & 4:
        a = np.flip(a, axis=1)
    return a


def test_flip_matches_numpy_for_all_8_patterns():
    g = np.random.default_rng(0).random((8, 7, 7)).astype(np.float32)
    flips = np.arange(8)
    out = reference.flip(g, flips)
    results = []
    for bits in range(8):
        np.testing.assert_array_equal(out[bits], _dihedral(g[bits], bits))
        results.append(reference.flip(g[:1], np.array([bits]))[0].tobytes())
    assert len(set(results)) == 8  # the 8 patterns are 8 different symmetries
    np.testing.assert_array_equal(g, np.random.default_rng(0).random((8, 7, 7)).astype(np.float32))


def test_rendered_item_flips(banks):
    """An item rendered with flip bits equals the unflipped render transformed by numpy."""
    bank = banks["anderson"]
    r = make_renderer(small_recipe("anderson", flips="none"), size=SIZE, seed=SEED, bank=bank)
    _, base, _, _, items = render_plan(r, [3])
    assert (items.flips == 0).all()
    assert base[0].max() > 0
    for bits in range(8):
        plan = dataclasses.replace(items, flips=np.array([bits]))
        _, dens, _, _, _ = render_plan(r, [3], plan=plan)
        np.testing.assert_array_equal(dens[0], _dihedral(base[0], bits))


@pytest.mark.parametrize("mode, allowed", [("none", {0}), ("hv", {0, 2, 4, 6}),
                                           ("dihedral", set(range(8)))])
def test_planned_flip_bits(banks, mode, allowed):
    r = make_renderer(small_recipe("anderson", flips=mode), size=SIZE, seed=SEED,
                      bank=banks["anderson"])
    _, _, items = r.plan(np.arange(256), 0)
    assert set(items.flips.tolist()) == allowed


@pytest.mark.parametrize("bit", range(9))
def test_stamp_offsets_image_patch(bit):
    rec = small_recipe("anderson")  # graded, image patch
    r0, c0 = 5, 9
    hist = np.zeros((1, 16, 16), dtype=np.uint32)
    hist[0, r0, c0] = 1
    g = reference.stamp(rec, hist, np.array([1 << bit]))
    dr, dc = divmod(bit, 3)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[r0 + dr - 1, c0 + dc - 1] = 1.0
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g[0], expected)
    # Binary mode stamps the same cell.
    binary = dataclasses.replace(rec, render_mode="binary")
    np.testing.assert_array_equal(reference.stamp(binary, hist, np.array([1 << bit]))[0], expected)


@pytest.mark.parametrize("bit", range(9))
def test_stamp_offsets_point_patch(bit):
    rec = small_recipe("fractaldb")  # binary, per-point masks: the histogram holds mask bits
    r0, c0 = 7, 3
    hist = np.zeros((1, 16, 16), dtype=np.uint32)
    hist[0, r0, c0] = 1 << bit
    g = reference.stamp(rec, hist, np.array([16]))
    dr, dc = divmod(bit, 3)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[r0 + dr - 1, c0 + dc - 1] = 1.0
    np.testing.assert_array_equal(g[0], expected)


def test_stamp_graded_sums_and_edges():
    rec = small_recipe("anderson")
    hist = np.zeros((2, 16, 16), dtype=np.uint32)
    hist[0, 5, 5], hist[0, 5, 6] = 3, 1
    hist[1, 0, 0] = 2
    mask = np.array([(1 << 4) | (1 << 5), 1])  # centre + right; item 1: up-left only
    g = reference.stamp(rec, hist, mask)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[5, 5], expected[5, 6], expected[5, 7] = 0.75, 1.0, 0.25
    np.testing.assert_array_equal(g[0], expected)
    # A point at the corner stamped off the image leaves an empty (all-zero, finite) density.
    assert (g[1] == 0).all() and np.isfinite(g[1]).all()
    # An empty histogram stays empty (no division by a zero peak).
    empty = reference.stamp(rec, np.zeros((1, 16, 16), dtype=np.uint32), np.array([511]))
    assert (empty == 0).all() and np.isfinite(empty).all()
    one = np.zeros((1, 16, 16), dtype=np.uint32)
    one[0, 8, 8] = 1
    block = reference.stamp(rec, one, np.array([511]))[0]
    assert (block[7:10, 7:10] == 1).all() and block.sum() == 9


def test_graded_density_max_is_one(banks):
    bank = banks["anderson"]
    for overrides in ({}, {"window_translate": 0.0, "window_scale": (1.0, 1.0)}):
        r = make_renderer(small_recipe("anderson", **overrides), size=SIZE, seed=SEED, bank=bank)
        _, dens, pts, _, _ = render_plan(r, np.arange(16))
        assert (pts > 0).all()
        assert dens.dtype == np.float32
        assert (dens >= 0).all() and (dens <= 1).all()
        np.testing.assert_array_equal(dens.reshape(16, -1).max(axis=1), np.float32(1.0))


def test_hsv_to_rgb_matches_colorsys():
    h8, s8, v8 = np.meshgrid(np.arange(256), np.array([0, 1, 37, 64, 127, 128, 200, 254, 255]),
                             np.array([0, 1, 50, 127, 128, 199, 255]), indexing="ij")
    got = reference.hsv_to_rgb(h8, s8, v8).astype(np.int64)
    assert got.shape == h8.shape + (3,)
    want = np.array([
        colorsys.hsv_to_rgb(((2 * h) % 360) / 360.0, s / 255.0, v / 255.0)
        for h, s, v in zip(h8.ravel(), s8.ravel(), v8.ravel(), strict=False)
    ]).reshape(got.shape) * 255.0
    assert np.abs(got - want).max() <= 1.0


def test_hsv_to_rgb_dtype_and_greys():
    rgb = reference.hsv_to_rgb(np.array([0, 90, 179, 255]), np.zeros(4, int), np.full(4, 200))
    assert rgb.dtype == np.uint8
    assert (rgb == 200).all()


# ----------------------------------------------------------------------------- degenerate systems

@pytest.fixture(scope="session")
def degenerate_batch(hand_bank, device):
    # 20000 points: 99 steps of x3 overflow float32 (3**81 > 3.4e38), so the orbit escapes.
    rec = get_recipe("fractaldb", {"num_classes": 4, "num_points": 20000, "jitter": "none"})
    r = make(device, rec, size=SIZE, seed=SEED, bank=hand_bank(rec))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = r.render(np.arange(8), 0)  # systems 0, 1, 2, 3, 0, 1, 2, 3
    return rec, batch


def test_expanding_system_is_degenerate_and_background_only(degenerate_batch):
    rec, batch = degenerate_batch
    assert batch.images.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(batch.items.system, np.arange(8) % 4)
    expanding = np.arange(8) % 4 == 0
    assert batch.degenerate == 2
    assert (batch.points[expanding] == 0).all()
    assert (batch.points[~expanding] == rec.num_points).all()
    assert (batch.images[expanding] == 0).all()  # fractaldb: black background, no blur
    assert [batch.metadata(i)["objects"][0]["points"] for i in (0, 4)] == [0, 0]
    json.dumps(batch.metadata(0))
    # The contractive systems of the same batch still render.
    assert all(batch.images[i].max() > 0 for i in (2, 3, 6, 7))


def test_all_zero_system_renders_a_single_point(degenerate_batch):
    """All-zero maps send every point to (0, 0): a finite one-point attractor, so (as documented:
    degenerate = no finite point) it is not counted as degenerate; the zero-extent window puts it
    at pixel (0, 0), which the point patch and flips leave inside a 2x2 corner block."""
    rec, batch = degenerate_batch
    for i in (1, 5):
        assert batch.points[i] == rec.num_points
        on = np.argwhere(batch.images[i].max(axis=-1) > 0)
        assert 1 <= len(on) <= 4
        rows, cols = set(on[:, 0]), set(on[:, 1])
        assert rows <= {0, 1} or rows <= {SIZE - 2, SIZE - 1}
        assert cols <= {0, 1} or cols <= {SIZE - 2, SIZE - 1}


def test_degenerate_plan_is_finite(degenerate_batch):
    """The plan of an all-zero / expanding system is finite (uniform map choice, finite start)."""
    _, batch = degenerate_batch
    it = batch.items
    assert np.isfinite(it.cum).all() and np.isfinite(it.start).all()
    np.testing.assert_array_equal(it.cum[1, :2], np.float32([0.5, 1.0]))


# ----------------------------------------------------------------------------- chaos game

def _chaos(r, indices, epoch=0):
    _, _, items = r.plan(indices, epoch)
    map_words, mask_words = reference.chaos_words(r.recipe, r.seed, epoch, items.index, items.slot)
    x, y, recorded = reference.chaos_game(r.recipe, items, map_words)
    return items, map_words, x, y, recorded


def test_recorded_points_inside_bounding_box(banks):
    r = make_renderer(small_recipe("anderson"), size=SIZE, seed=SEED, device="cpu-reference", bank=banks["anderson"])
    rec = r.recipe
    items, _, x, y, recorded = _chaos(r, np.arange(B))
    box, count = reference.bounding_box(x, y, recorded)
    np.testing.assert_array_equal(count, rec.num_points)
    for i in range(B):
        xs, ys = x[i][recorded[i]], y[i][recorded[i]]
        assert np.isfinite(xs).all() and np.isfinite(ys).all()
        assert xs.min() == box[i, 0] and xs.max() == box[i, 1]
        assert ys.min() == box[i, 2] and ys.max() == box[i, 3]
        assert box[i, 0] < box[i, 1] and box[i, 2] < box[i, 3]
    # Layout: point p = (step - burn_in) * chains + chain is recorded while p < num_points.
    steps = x.shape[2]
    assert x.shape[1] == rec.chains
    assert steps == rec.burn_in + -(-rec.num_points // rec.chains)
    p = (np.arange(steps)[None, :] - rec.burn_in) * rec.chains + np.arange(rec.chains)[:, None]
    layout = (np.arange(steps)[None, :] >= rec.burn_in) & (p < rec.num_points)
    for i in range(B):
        np.testing.assert_array_equal(recorded[i], layout)


def _map_choice(u, maps, num_maps):
    """Map index for uniform u with probabilities |det A_i| (float64)."""
    det = np.abs(maps[:num_maps, 0] * maps[:num_maps, 4] - maps[:num_maps, 1] * maps[:num_maps, 3])
    cum = np.cumsum(det / det.sum())
    return int((u >= cum[:-1]).sum())


@pytest.mark.parametrize("chains", [1, 4])
def test_first_point_is_map_k_of_the_fixed_point(banks, chains):
    bank = banks["anderson"]
    rec = small_recipe("anderson", burn_in=0, chains=chains, jitter="none", num_points=2000)
    r = make_renderer(rec, size=SIZE, seed=SEED, bank=bank)
    items, words, x, y, recorded = _chaos(r, np.arange(B))
    assert recorded[:, :, 0].all()
    for i in range(B):
        m = items.maps[i].astype(np.float64)  # rows [a b e c d f]
        a0 = np.array([[m[0, 0], m[0, 1]], [m[0, 3], m[0, 4]]])
        fixed = np.linalg.solve(np.eye(2) - a0, np.array([m[0, 2], m[0, 5]]))
        np.testing.assert_allclose(items.start[i], fixed, atol=1e-5)
        for c in range(chains):
            u = float(rng.to_uniform(words[i, c, 0]))
            k = _map_choice(u, m, int(items.num_maps[i]))
            want_x = m[k, 0] * fixed[0] + m[k, 1] * fixed[1] + m[k, 2]
            want_y = m[k, 3] * fixed[0] + m[k, 4] * fixed[1] + m[k, 5]
            assert abs(float(x[i, c, 0]) - want_x) < 1e-5
            assert abs(float(y[i, c, 0]) - want_y) < 1e-5


def test_map_choices_follow_determinant_weights(banks):
    """Over many steps the map frequencies match p_i ~ |det A_i| (jitter off)."""
    bank = banks["anderson"]
    rec = small_recipe("anderson", jitter="none", num_points=20000)
    r = make_renderer(rec, size=SIZE, seed=SEED, bank=bank)
    items, words, _, _, _ = _chaos(r, [0])
    m, n = items.maps[0].astype(np.float64), int(items.num_maps[0])
    u = rng.to_uniform(words[0]).ravel().astype(np.float64)
    det = np.abs(m[:n, 0] * m[:n, 4] - m[:n, 1] * m[:n, 3])
    cum = np.cumsum(det / det.sum())
    freq = np.bincount((u[:, None] >= cum[None, :-1]).sum(axis=1), minlength=n) / u.size
    np.testing.assert_allclose(freq, det / det.sum(), atol=0.02)


def test_identity_window_keeps_every_point(banks):
    bank = banks["anderson"]
    rec = small_recipe("anderson", window_translate=0.0, window_scale=(1.0, 1.0), patch="none",
                       render_mode="binary", flips="none")
    r = make_renderer(rec, size=64, seed=SEED, bank=bank)
    items, _, x, y, recorded = _chaos(r, np.arange(B))
    box, count = reference.bounding_box(x, y, recorded)
    lo, sc = reference.window(box, count, items, 64)
    hist = reference.histogram(rec, x, y, recorded, lo, sc, 64)
    np.testing.assert_array_equal(hist.reshape(B, -1).sum(axis=1), count)


# ----------------------------------------------------------------------------- fill statistics

@pytest.mark.slow
def test_fill_statistics_match_anderson():
    n, size, seed = 200, 224, 1
    base = dict(num_classes=n, jitter="none", window_translate=0.0, window_scale=(1.0, 1.0),
                flips="none")
    rec = get_recipe("anderson", base)
    assert rec.num_points == 100_000 and rec.patch == "image" and rec.render_mode == "graded"
    r = make_renderer(rec, size=size, seed=seed)

    # The bank: alpha in Anderson's band ((5 + N) / 2, (6 + N) / 2), every map contractive.
    bank = r.bank
    assert len(bank) == n
    for k in range(n):
        system = bank.system(k)
        sv = singular_values(system)
        alpha = float((sv[:, 0] + 2 * sv[:, 1]).sum())
        num = len(system)
        assert (5 + num) / 2 - 1e-9 <= alpha <= (6 + num) / 2 + 1e-9, (k, num, alpha)
        assert sv.max() < 1.0

    _, _, it = r.plan(np.arange(n), 0)
    _, dens, pts = reference.render_items(rec, seed, 0, it, size)
    assert (pts == rec.num_points).all()
    fill = (dens > 0).mean(axis=(1, 2))
    mask = it.mask
    assert abs(fill.mean() - 0.29) <= 0.03, fill.mean()
    assert abs(np.median(fill) - 0.26) <= 0.03, np.median(fill)

    rec_bin = get_recipe("anderson", {**base, "patch": "none", "render_mode": "binary"})
    r_bin = make_renderer(rec_bin, size=size, seed=seed, bank=bank)
    _, _, it = r_bin.plan(np.arange(n), 0)
    _, dens, _ = reference.render_items(rec_bin, seed, 0, it, size)
    fill_bin = (dens > 0).mean(axis=(1, 2))
    assert abs(fill_bin.mean() - 0.216) <= 0.03, fill_bin.mean()
    # A patch whose mask includes the centre cell only adds pixels (other masks shift the points).
    centre = (mask & 16) != 0
    assert centre.sum() > 50
    assert (fill_bin[centre] <= fill[centre]).all()
