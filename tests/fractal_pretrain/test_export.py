"""WebDataset export round trip: what comes back from the shards is exactly what the renderer made.

Run: bash scripts/test.sh tests/fractal_pretrain/test_export.py
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from fractal_pretrain.config import ConfigError
from fractal_pretrain.export import (
    MANIFEST_NAME,
    decode_png,
    encode_png,
    export_shards,
    load_manifest,
    read_shards,
    sample_key,
)
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer

OVERRIDES = {"num_points": 5000}  # few points: fast on 2 cores
SIZE = 32
SEED = 3
EPOCH = 1
START = 5  # a non-zero start and epoch, so ignoring either would show
NUM = 10
SHARD_SIZE = 4  # 10 samples -> shards of 4, 4, 2
BATCH_SIZE = 3  # render batches that straddle shard boundaries


def _direct(recipe_name: str, indices: np.ndarray):
    recipe = get_recipe(recipe_name, dict(OVERRIDES))
    return make_renderer(recipe, size=SIZE, seed=SEED, device="cpu").render(indices, epoch=EPOCH)


@pytest.fixture(scope="module")
def anderson(tmp_path_factory):
    out = tmp_path_factory.mktemp("anderson")
    manifest = export_shards(
        "anderson",
        out_dir=out,
        num=NUM,
        seed=SEED,
        size=SIZE,
        shard_size=SHARD_SIZE,
        overrides=dict(OVERRIDES),
        epoch=EPOCH,
        start=START,
        batch_size=BATCH_SIZE,
        progress=False,
    )
    return out, manifest


def test_shards_and_manifest(anderson):
    out, manifest = anderson
    names = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == names
    assert load_manifest(out) == json.loads((out / MANIFEST_NAME).read_text())
    on_disk = load_manifest(out)
    assert on_disk["shards"] == names
    assert on_disk["count"] == NUM
    assert {
        k: on_disk[k] for k in ("recipe", "overrides", "seed", "epoch", "start", "num", "size")
    } == {
        "recipe": "anderson",
        "overrides": OVERRIDES,
        "seed": SEED,
        "epoch": EPOCH,
        "start": START,
        "num": NUM,
        "size": SIZE,
    }
    assert on_disk["multi_label"] is False
    assert manifest == on_disk
    # samples per shard, 3 files (png, cls, json) per sample
    for name, n in zip(names, (4, 4, 2), strict=True):
        with tarfile.open(out / name) as tar:
            assert len(tar.getnames()) == 3 * n


def test_round_trip_is_exact(anderson):
    out, _ = anderson
    indices = np.arange(START, START + NUM, dtype=np.int64)
    direct = _direct("anderson", indices)
    samples = list(read_shards(out))

    assert [s.key for s in samples] == [f"{i:09d}" for i in indices]
    assert [s.index for s in samples] == indices.tolist()
    for j, s in enumerate(samples):
        assert s.image.dtype == np.uint8 and s.image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(s.image, direct.images[j])
        assert isinstance(s.label, int) and s.label == int(direct.labels[j])
        assert s.meta["index"] == indices[j]
        assert s.meta["seed"] == SEED
        assert s.meta["epoch"] == EPOCH
        assert s.meta["recipe"] == "anderson"
        assert s.meta == json.loads(json.dumps(direct.metadata(j)))
    # a blank image would make the comparison vacuous
    assert any(s.image.any() for s in samples)


def test_webdataset_reads_the_same_shards(anderson):
    import webdataset as wds

    out, manifest = anderson
    urls = [str(out / name) for name in manifest["shards"]]
    ours = list(read_shards(out))
    theirs = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s.key for s in ours]
    for mine, raw in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(decode_png(raw["png"]), mine.image)
        assert int(raw["cls"]) == mine.label
        assert json.loads(raw["json"]) == mine.meta


def test_multi_label_round_trip(tmp_path):
    recipe = get_recipe("multiinstance", dict(OVERRIDES))
    assert recipe.multi_label
    export_shards(
        "multiinstance",
        out_dir=tmp_path,
        num=4,
        seed=SEED,
        size=SIZE,
        shard_size=2,
        overrides=dict(OVERRIDES),
        epoch=EPOCH,
        start=START,
        progress=False,
    )
    direct = _direct("multiinstance", np.arange(START, START + 4, dtype=np.int64))
    samples = list(read_shards(tmp_path))
    assert len(samples) == 4
    assert load_manifest(tmp_path)["multi_label"] is True
    for j, s in enumerate(samples):
        assert isinstance(s.label, np.ndarray)
        assert s.label.dtype == np.uint8 and s.label.shape == (recipe.num_classes,)
        np.testing.assert_array_equal(s.label, direct.labels[j])
        assert s.label.sum() >= 1  # multi-hot: at least one class present
        np.testing.assert_array_equal(s.image, direct.images[j])
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{sample_key(START + k)}.{ext}"
            for k in range(2)
            for ext in ("json", "multihot.npy", "png")
        )


def test_re_export_replaces_stale_shards(tmp_path):
    common = dict(seed=SEED, size=SIZE, overrides=dict(OVERRIDES), progress=False)
    export_shards("anderson", out_dir=tmp_path, num=5, shard_size=2, **common)
    assert len(list(tmp_path.glob("shard-*.tar"))) == 3
    export_shards("anderson", out_dir=tmp_path, num=2, shard_size=2, **common)
    assert [p.name for p in tmp_path.glob("shard-*.tar")] == ["shard-000000.tar"]
    assert [s.index for s in read_shards(tmp_path)] == [0, 1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        export_shards("anderson", out_dir=tmp_path, num=2, seed=0, size=SIZE, shard_size=0)
    with pytest.raises(FileNotFoundError):
        list(read_shards(tmp_path / "missing"))
    for key in ("start", "epoch"):
        with pytest.raises(ValueError, match=f"{key} must be >= 0, got -1"):
            export_shards("anderson", out_dir=tmp_path, num=2, seed=0, size=SIZE, shard_size=2, **{key: -1})


def test_two_view_recipe_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="'selfsup' has views=2: shards hold one image per sample"):
        export_shards("selfsup", out_dir=out, num=2, seed=0, size=SIZE, shard_size=2, progress=False)
    assert not out.exists()


def test_png_round_trip_any_shape_and_readable_by_pillow():
    """encode_png (zlib, 'Up' filter) is a standard PNG: Pillow reads back the exact pixels."""
    rng = np.random.default_rng(0)
    for shape in ((1, 1, 3), (7, 5, 3), (33, 64, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        data = encode_png(image)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        np.testing.assert_array_equal(decode_png(data), image)


def test_progress_bar_shows_images_per_second(tmp_path, capsys):
    export_shards("anderson", out_dir=tmp_path, num=4, seed=SEED, size=SIZE, shard_size=4,
                  overrides=dict(OVERRIDES), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "render " in err


def test_an_epoch_past_32_bits_is_refused_before_an_existing_export_is_cleared(tmp_path):
    export_shards("anderson", out_dir=tmp_path, num=2, seed=0, size=SIZE, shard_size=1, progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=f"epoch must be <= {2**32 - 1}, got {2**32}"):
        export_shards("anderson", out_dir=tmp_path, num=2, seed=0, size=SIZE, shard_size=1, epoch=2**32)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and len(list(read_shards(tmp_path))) == 2
