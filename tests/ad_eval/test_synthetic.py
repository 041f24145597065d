"""Tests of ad_eval.synthetic: generated MVTec-like / VisA-like trees pass ``scan``, their masks
are exact, generation is deterministic, and the anomalies are detectable by a trivial detector.

Run: ``python -m pytest -q tests/ad_eval/test_synthetic.py``
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ad_eval.datasets import ADImageDataset, load_image, load_mask, scan
from ad_eval.metrics import image_auroc
from ad_eval.synthetic import (
    CATEGORIES,
    DEFECTS,
    MARKER,
    main,
    make_mvtec_like,
    make_visa_like,
    render_sample,
)

N_TRAIN, N_GOOD, N_DEFECT = 20, 5, 5  # the defaults
VISA_CATEGORIES = ("pcbx", "object")  # object: grayscale JPGs


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec_like(tmp_path_factory.mktemp("mvtec") / "root")


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return make_visa_like(tmp_path_factory.mktemp("visa") / "root", categories=VISA_CATEGORIES)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask_values(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("category", ["texture", "object"])
def test_mvtec_like_passes_scan(mvtec_root, category):
    split = scan("mvtec", mvtec_root, category)
    assert len(split.train) == N_TRAIN and all(s.label == 0 and s.mask_path is None for s in split.train)
    defects = [s.defect for s in split.test]
    assert defects.count("good") == N_GOOD
    assert all(defects.count(d) == N_DEFECT for d in DEFECTS) and len(defects) == N_GOOD + 2 * N_DEFECT
    for sample in split.train + split.test:
        with Image.open(sample.path) as img:
            assert img.size == (128, 128) and img.format == "PNG"
            assert img.mode == ("L" if CATEGORIES[category].grayscale else "RGB")
        assert load_image(sample.path).shape == (3, 128, 128)
    for sample in split.test:
        if sample.label == 0:
            assert sample.mask_path is None
            continue
        assert sample.mask_path.name == sample.path.stem + "_mask.png"
        values = _mask_values(sample.mask_path)
        assert set(np.unique(values).tolist()) == {0, 255}  # binary and non-empty
        assert 0 < (values > 0).mean() < 0.05


@pytest.mark.parametrize("category", VISA_CATEGORIES)
def test_visa_like_passes_scan(visa_root, category):
    split = scan("visa", visa_root, category)
    assert len(split.train) == N_TRAIN and all(s.label == 0 for s in split.train)
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]
    assert len(good) == N_GOOD and len(bad) == 2 * N_DEFECT
    assert all(s.mask_path is None for s in good) and all(s.defect == "bad" for s in bad)
    normal_dir = visa_root / category / "Data/Images/Normal"
    assert sorted(p.name for p in normal_dir.iterdir()) == [f"{i:04d}.JPG" for i in range(N_TRAIN + N_GOOD)]
    assert {s.path.parent for s in split.train + good} == {normal_dir}
    for sample in split.train + split.test:
        with Image.open(sample.path) as img:
            assert img.size == (160, 128) and img.format == "JPEG"  # not square, as in VisA
            assert img.mode == ("L" if CATEGORIES[category].grayscale else "RGB")
    for sample in bad:
        assert sample.mask_path == visa_root / category / "Data/Masks/Anomaly" / f"{sample.path.stem}.png"
        values = _mask_values(sample.mask_path)
        ids = set(np.unique(values).tolist())
        assert ids in ({0, 1}, {0, 2})  # the defect id, as in the real VisA masks
        assert load_mask(sample.mask_path).any()
    ids = [int(_mask_values(s.mask_path).max()) for s in bad]
    assert ids == [1] * N_DEFECT + [2] * N_DEFECT  # scratches then spots
    with (visa_root / "split_csv/1cls.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["object", "split", "label", "image", "mask"]
    assert len(rows) == 1 + len(VISA_CATEGORIES) * (N_TRAIN + N_GOOD + 2 * N_DEFECT)


def test_dataset_loader_reads_generated_trees(mvtec_root, visa_root):
    for dataset, root, category in (("mvtec", mvtec_root, "object"), ("visa", visa_root, "pcbx")):
        test = scan(dataset, root, category).test
        index = next(i for i, s in enumerate(test) if s.label == 1)
        item = ADImageDataset(test, size=64)[index]
        assert item["image"].shape == (3, 64, 64) and item["label"] == 1 and item["mask"].any()


# ----------------------------------------------------------------------------- masks are exact


@pytest.mark.parametrize("category", list(CATEGORIES))
@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_changes_exactly_the_mask(category, defect):
    for index in range(4):
        sample = render_sample(category, defect, index, size=96, width=120)
        image, clean, mask = (a.astype(np.float64) for a in (sample.image, sample.clean, sample.mask))
        assert sample.image.shape == (96, 120, 1 if CATEGORIES[category].grayscale else 3)
        diff = np.abs(image - clean).mean(axis=-1)
        assert mask.any() and mask.mean() < 0.05
        assert (diff[mask == 0] == 0).all()
        assert diff[mask > 0].mean() > 30  # well above the pixel noise (sigma 2.5)
    good = render_sample(category, "good", 0)
    assert good.mask is None and good.image is good.clean


def test_files_match_renderer(mvtec_root):
    path = mvtec_root / "texture/test/spot/003.png"
    sample = render_sample("texture", "spot", 3)
    assert np.array_equal(np.asarray(Image.open(path)), sample.image)
    mask = np.asarray(Image.open(mvtec_root / "texture/ground_truth/spot/003_mask.png")) > 0
    assert np.array_equal(mask, sample.mask)


def test_defect_pixels_differ_from_normal_appearance(mvtec_root):
    """In the files: inside the mask, defect images are far from the train mean; outside, not."""
    for category in ("texture", "object"):
        split = scan("mvtec", mvtec_root, category)
        mean = np.stack([load_image(s.path).numpy() for s in split.train]).astype(np.float64).mean(0)
        for sample in split.test:
            if sample.label == 0:
                continue
            diff = np.abs(load_image(sample.path).numpy() - mean).mean(0)
            mask = load_mask(sample.mask_path)[0].numpy()
            assert diff[mask].mean() > diff[~mask].mean() + 20


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for make in (make_mvtec_like, make_visa_like):
        kwargs = {"n_train": 3, "n_test_good": 2, "n_test_defect": 2, "size": 48}
        a = _files(make(tmp_path / f"{make.__name__}_a", **kwargs))
        b = _files(make(tmp_path / f"{make.__name__}_b", **kwargs))
        c = _files(make(tmp_path / f"{make.__name__}_c", seed=1, **kwargs))
        assert a == b
        assert a.keys() == c.keys()
        images = [k for k in a if k.lower().endswith((".png", ".jpg")) and "mask" not in k.lower()]
        assert len(images) >= 9 and all(a[k] != c[k] for k in images)


def test_counts_do_not_change_other_images(tmp_path):
    small = make_mvtec_like(tmp_path / "small", categories=("object",), n_train=2, n_test_defect=1, size=32)
    large = make_mvtec_like(tmp_path / "large", categories=("object",), n_train=4, n_test_defect=3, size=32)
    for rel in ("object/train/good/001.png", "object/test/scratch/000.png", "object/ground_truth/spot/000_mask.png"):
        assert (small / rel).read_bytes() == (large / rel).read_bytes()


# ----------------------------------------------------------------------------- detectability


def _zscore_auroc(dataset: str, root: Path, category: str) -> float:
    """Per-pixel |z| against the train mean/std images, 3x3 box-smoothed, max over pixels."""
    split = scan(dataset, root, category)

    def stack(samples):
        return np.stack([load_image(s.path).numpy() for s in samples]).astype(np.float64)

    train = stack(split.train)
    mean, std = train.mean(0), train.std(0) + 1.0
    z = (np.abs(stack(split.test) - mean) / std).mean(1)  # (N, H, W)
    scores = [ndimage.uniform_filter(m, 3).max() for m in z]
    return image_auroc(scores, [s.label for s in split.test])


def test_trivial_detector_finds_the_anomalies(mvtec_root, visa_root):
    aurocs = {f"mvtec/{c}": _zscore_auroc("mvtec", mvtec_root, c) for c in ("texture", "object")}
    aurocs |= {f"visa/{c}": _zscore_auroc("visa", visa_root, c) for c in VISA_CATEGORIES}
    assert all(v > 0.8 for v in aurocs.values()), aurocs


# ----------------------------------------------------------------------------- CLI and guards


def test_cli_writes_and_prints_root(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--layout", "visa", "--size", "32", "--seed", "3", "--n-train", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(scan("visa", out, "pcbx").train) == 2 and (out / MARKER).is_file()
    # a generated root is regenerated in place: stale files of the old run do not survive
    assert main(["--out", str(out), "--layout", "visa", "--size", "32", "--n-train", "1"]) == 0
    assert len(scan("visa", out, "pcbx").train) == 1


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path, capsys):
    (tmp_path / "texture").mkdir()
    with pytest.raises(FileExistsError, match="synthetic.json"):
        make_mvtec_like(tmp_path, categories=("texture",))
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ad-eval: error: ") and "synthetic.json" in err and err.count("\n") == 1
    assert not any((tmp_path / "texture").iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"categories": ("bottle",)}, "unknown synthetic category"),
        ({"categories": "texture"}, "sequence"),
        ({"n_train": 0}, "n_train"),
        ({"size": 8}, "size"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_mvtec_like(tmp_path / "x", **kwargs)
