"""Tests of ad_eval.datasets: MVTec AD / VisA layout checks and the image+mask Dataset.

Real data: MVTec AD samples under ``../shared/realdata`` (relative to the repository root), read
in place; those tests skip if the folder is absent. Everything else uses tiny synthetic trees in
tmp_path.

Run: ``python -m pytest -q tests/ad_eval/test_datasets.py``
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ad_eval.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    ADImageDataset,
    DatasetError,
    Sample,
    load_mask,
    scan,
    scan_mvtec,
    scan_visa,
    scan_visa_raw,
)


def _png(path: Path, size: int = 16, mode: str = "RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def _mask(path: Path, size: int = 16, value: int = 255) -> Path:
    array = np.zeros((size, size), np.uint8)
    array[4:8, 4:8] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _make_mvtec(root: Path, category: str = "widget") -> Path:
    """train/good 3 (one grayscale, one .JPG); test good 2, scratch 2, dent 1, with masks."""
    cat = root / category
    _png(cat / "train/good/000.png")
    _png(cat / "train/good/001.png", mode="L", value=90)
    _png(cat / "train/good/002.JPG")
    (cat / "train/good/readme.txt").write_text("not an image")
    for i in range(2):
        _png(cat / f"test/good/{i:03d}.png")
        _png(cat / f"test/scratch/{i:03d}.png")
        _mask(cat / f"ground_truth/scratch/{i:03d}_mask.png")
    _png(cat / "test/dent/000.png")
    _mask(cat / "ground_truth/dent/000_mask.png")
    return cat


def _error(call, *args) -> str:
    with pytest.raises(DatasetError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- real MVTec AD


@pytest.mark.parametrize("category", ["hazelnut_reduced", "transistor_reduced"])
def test_real_mvtec_counts_match_filesystem(realdata: Path, category: str) -> None:
    cat = realdata / category
    split = scan("mvtec", realdata, category)
    n_train = len(list((cat / "train/good").glob("*.png")))
    n_test = len(list((cat / "test").glob("*/*.png")))
    n_bad = n_test - len(list((cat / "test/good").glob("*.png")))
    assert (len(split.train), len(split.test)) == (n_train, n_test) == (50, 10)
    assert sum(s.label for s in split.test) == n_bad == 8
    assert all(s.label == 0 and s.mask_path is None for s in split.train)
    for s in split.test:
        if s.label == 1:
            assert s.mask_path == cat / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
            assert s.path.parent.name == s.defect
        else:
            assert s.mask_path is None and s.defect == "good"


def test_real_mvtec_items(realdata: Path) -> None:
    split = scan_mvtec(realdata, "hazelnut_reduced")
    data = ADImageDataset(split.test, size=256)
    for item, sample in zip(data, split.test, strict=True):
        assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 256, 256) and item["mask"].dtype == torch.bool
        assert item["label"] == sample.label and item["path"] == str(sample.path)
        if sample.label == 1:
            assert item["mask"].any(), sample.mask_path
            source = np.asarray(Image.open(sample.mask_path)) > 0  # 256 px: no resize needed
            assert torch.equal(item["mask"][0], torch.from_numpy(source))
        else:
            assert not item["mask"].any()
    # 256 px in, 256 px out: the image is the file, normalised with ImageNet statistics.
    raw = np.asarray(Image.open(split.test[0].path).convert("RGB"), np.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    restored = data[0]["image"] * std[:, None, None] + mean[:, None, None]
    torch.testing.assert_close(restored, torch.from_numpy(raw).permute(2, 0, 1))


def test_real_mvtec_crop_and_loader(realdata: Path) -> None:
    split = scan_mvtec(realdata, "hazelnut_reduced")
    data = ADImageDataset(split.test, size=256, crop=224)
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["mask"].shape == (4, 1, 224, 224)
    assert batch["label"].tolist() == [s.label for s in split.test[:4]]


# ----------------------------------------------------------------------------- synthetic MVTec


def test_mvtec_valid_tree(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    split = scan("mvtec", tmp_path, "widget")
    assert [s.path.name for s in split.train] == ["000.png", "001.png", "002.JPG"]  # .txt ignored
    assert [(s.defect, s.label) for s in split.test] == [
        ("dent", 1), ("good", 0), ("good", 0), ("scratch", 1), ("scratch", 1),
    ]  # fmt: skip
    assert split.test[0] == Sample(
        cat / "test/dent/000.png", 1, "dent", cat / "ground_truth/dent/000_mask.png"
    )


def test_mvtec_missing_mask(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    (cat / "ground_truth/scratch/001_mask.png").unlink()
    message = _error(scan_mvtec, tmp_path, "widget")
    assert str(cat / "test/scratch/001.png") in message
    assert str(cat / "ground_truth/scratch/001_mask.png") in message


def test_mvtec_missing_mask_folder(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    (cat / "ground_truth/dent/000_mask.png").unlink()
    (cat / "ground_truth/dent").rmdir()
    assert str(cat / "ground_truth/dent/000_mask.png") in _error(scan_mvtec, tmp_path, "widget")


@pytest.mark.parametrize(
    "orphan", ["ground_truth/scratch/007_mask.png", "ground_truth/crack/000_mask.png"]
)
def test_mvtec_orphan_mask(tmp_path: Path, orphan: str) -> None:
    cat = _make_mvtec(tmp_path)
    _mask(cat / orphan)
    message = _error(scan_mvtec, tmp_path, "widget")
    assert "orphan" in message and str(cat / orphan) in message


def test_mvtec_mask_for_good_image_is_orphan(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    _mask(cat / "ground_truth/good/000_mask.png")
    assert str(cat / "ground_truth/good/000_mask.png") in _error(scan_mvtec, tmp_path, "widget")


def test_mvtec_empty_train(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    for path in (cat / "train/good").glob("*.*"):
        if path.suffix != ".txt":  # a non-image file does not count
            path.unlink()
    message = _error(scan_mvtec, tmp_path, "widget")
    assert "no images" in message and str(cat / "train/good") in message


def test_mvtec_empty_defect_folder(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    (cat / "test/bent").mkdir()
    assert str(cat / "test/bent") in _error(scan_mvtec, tmp_path, "widget")


def test_mvtec_missing_train_folder(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    for path in (cat / "train/good").iterdir():
        path.unlink()
    (cat / "train/good").rmdir()
    assert str(cat / "train/good") in _error(scan_mvtec, tmp_path, "widget")


def test_mvtec_test_needs_good_and_anomalous(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    for path in (cat / "test/good").iterdir():
        path.unlink()
    (cat / "test/good").rmdir()
    message = _error(scan_mvtec, tmp_path, "widget")
    assert "no good test images" in message and str(cat / "test") in message


def test_mvtec_duplicate_stem(tmp_path: Path) -> None:
    cat = _make_mvtec(tmp_path)
    _png(cat / "test/scratch/001.jpg")
    assert str(cat / "test/scratch/001.jpg") in _error(scan_mvtec, tmp_path, "widget")


def test_mvtec_unknown_category_lists_available(tmp_path: Path) -> None:
    _make_mvtec(tmp_path, "widget")
    _make_mvtec(tmp_path, "gadget")
    (tmp_path / "notes").mkdir()  # not a category: no train/
    message = _error(scan_mvtec, tmp_path, "bottle")
    assert str(tmp_path / "bottle") in message
    assert message.endswith("available: gadget, widget")


def test_missing_root_and_unknown_dataset(tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in _error(scan_mvtec, tmp_path / "nope", "widget")
    assert "mvtec, visa" in _error(scan, "btad", tmp_path, "widget")


def test_category_lists() -> None:
    assert len(MVTEC_CATEGORIES) == len(set(MVTEC_CATEGORIES)) == 15
    assert len(VISA_CATEGORIES) == len(set(VISA_CATEGORIES)) == 12
    assert {"hazelnut", "transistor"} <= set(MVTEC_CATEGORIES)
    assert {"candle", "pcb4", "pipe_fryum"} <= set(VISA_CATEGORIES)


# ----------------------------------------------------------------------------- synthetic VisA

CSV_HEADER = ["object", "split", "label", "image", "mask"]


def _jpg(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (10, 200, 30)).save(path)
    return path.as_posix()


def _make_visa_raw(root: Path) -> list[list[str]]:
    """Raw VisA for candle (3 train, 2 test normal, 2 anomalies) and pcb1 (rows only matter)."""
    rows = []
    for category in ("candle", "pcb1"):
        data = root / category / "Data"
        for i in range(5):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _jpg(root / rel)
            rows.append([category, "train" if i < 3 else "test", "normal", rel, ""])
        for i in range(2):  # stems 000/001 also exist as normals in other categories
            rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
            _jpg(root / rel)
            mask = np.zeros((12, 20), np.uint8)
            mask[2:5, 3:9] = 2 + i  # multi-class: value = defect id
            (data / "Masks/Anomaly").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(data / f"Masks/Anomaly/{i:03d}.png")
            mask_rel = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            rows.append([category, "test", "anomaly", rel, mask_rel])
    _write_csv(root, rows)
    return rows


def _write_csv(root: Path, rows: list[list[str]], header=CSV_HEADER) -> Path:
    path = root / "split_csv/1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_visa_raw_split(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    split = scan("visa", tmp_path, "candle")
    images = tmp_path / "candle/Data/Images"
    assert [s.path for s in split.train] == [images / f"Normal/{i:04d}.JPG" for i in range(3)]
    assert [(s.path, s.label, s.defect) for s in split.test] == [
        (images / "Anomaly/000.JPG", 1, "bad"),
        (images / "Anomaly/001.JPG", 1, "bad"),
        (images / "Normal/0003.JPG", 0, "good"),
        (images / "Normal/0004.JPG", 0, "good"),
    ]
    masks = tmp_path / "candle/Data/Masks/Anomaly"
    assert [s.mask_path for s in split.test] == [masks / "000.png", masks / "001.png", None, None]
    item = ADImageDataset(split.test, size=24)[1]  # defect id 3 -> True, resized 12x20 -> 24x24
    assert item["mask"].shape == (1, 24, 24) and item["mask"].dtype == torch.bool
    assert item["mask"].float().mean().item() == pytest.approx((3 * 6) / (12 * 20), abs=0.02)


def test_visa_raw_missing_image(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    missing = tmp_path / "candle/Data/Images/Normal/0004.JPG"
    missing.unlink()
    message = _error(scan_visa, tmp_path, "candle")
    assert str(missing) in message and str(tmp_path / "split_csv/1cls.csv") in message


def test_visa_raw_missing_mask(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    missing = tmp_path / "candle/Data/Masks/Anomaly/001.png"
    missing.unlink()
    assert str(missing) in _error(scan_visa, tmp_path, "candle")


def test_visa_raw_orphan_mask(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    orphan = _mask(tmp_path / "candle/Data/Masks/Anomaly/042.png")
    assert str(orphan) in _error(scan_visa, tmp_path, "candle")


def test_visa_raw_bad_rows(tmp_path: Path) -> None:
    rows = _make_visa_raw(tmp_path)
    extra = _jpg(tmp_path / "candle/Data/Images/Anomaly/002.JPG")
    mask = _mask(tmp_path / "candle/Data/Masks/Extra/002.png").as_posix()
    csv_path = _write_csv(tmp_path, [*rows, ["candle", "train", "anomaly", extra, mask]])
    assert "train split" in _error(scan_visa, tmp_path, "candle")
    _write_csv(tmp_path, [*rows, rows[0]])
    assert "listed twice" in _error(scan_visa, tmp_path, "candle")
    _write_csv(tmp_path, [*rows, ["candle", "val", "normal", rows[0][3], ""]])
    assert f"{csv_path} line {len(rows) + 2}" in _error(scan_visa, tmp_path, "candle")
    _write_csv(tmp_path, rows, header=["object", "split", "label", "image"])
    assert str(csv_path) in _error(scan_visa, tmp_path, "candle")


def test_visa_raw_unknown_category(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    message = _error(scan_visa_raw, tmp_path, "cashew")
    assert str(tmp_path / "split_csv/1cls.csv") in message
    assert message.endswith("available: candle, pcb1")


def test_visa_raw_needs_csv(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    (tmp_path / "split_csv/1cls.csv").unlink()
    assert str(tmp_path / "split_csv/1cls.csv") in _error(scan_visa, tmp_path, "candle")


def _make_visa_split(base: Path, category: str = "candle") -> Path:
    """anomalib's visa_pytorch/<cat>: masks ground_truth/bad/<stem>.png, no _mask suffix."""
    cat = base / category
    for i in range(3):
        _jpg(cat / f"train/good/{i:04d}.JPG")
    for i in range(2):
        _jpg(cat / f"test/good/{i + 3:04d}.JPG")
        _jpg(cat / f"test/bad/{i:03d}.JPG")
        _mask(cat / f"ground_truth/bad/{i:03d}.png")
    return cat


@pytest.mark.parametrize("subdir", ["visa_pytorch", "1cls", ""])
def test_visa_split_layout(tmp_path: Path, subdir: str) -> None:
    cat = _make_visa_split(tmp_path / subdir if subdir else tmp_path)
    split = scan("visa", tmp_path, "candle")
    assert len(split.train) == 3
    assert [(s.path, s.label, s.mask_path) for s in split.test] == [
        (cat / "test/bad/000.JPG", 1, cat / "ground_truth/bad/000.png"),
        (cat / "test/bad/001.JPG", 1, cat / "ground_truth/bad/001.png"),
        (cat / "test/good/0003.JPG", 0, None),
        (cat / "test/good/0004.JPG", 0, None),
    ]


def test_visa_split_missing_mask_and_unknown(tmp_path: Path) -> None:
    cat = _make_visa_split(tmp_path / "visa_pytorch")
    (cat / "ground_truth/bad/001.png").unlink()
    assert str(cat / "ground_truth/bad/001.png") in _error(scan_visa, tmp_path, "candle")
    assert _error(scan_visa, tmp_path, "fryum").endswith("available: candle")


def test_visa_split_copy_is_used_when_the_raw_folders_lack_their_csv(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    (tmp_path / "split_csv/1cls.csv").unlink()
    cat = _make_visa_split(tmp_path / "visa_pytorch")
    assert all(cat in s.path.parents for s in scan("visa", tmp_path, "candle").test)


def test_visa_prefers_raw_when_both_exist(tmp_path: Path) -> None:
    _make_visa_raw(tmp_path)
    _make_visa_split(tmp_path / "visa_pytorch")
    assert all("Data" in s.path.parts for s in scan("visa", tmp_path, "candle").test)


# ----------------------------------------------------------------------------- transforms


def _sample(tmp_path: Path, image: np.ndarray, mask: np.ndarray | None = None) -> Sample:
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    if mask is None:
        return Sample(path, 0, "good")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return Sample(path, 1, "x", tmp_path / "mask.png")


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    item = ADImageDataset([_sample(tmp_path, gray)], size=8, mean=(0, 0, 0), std=(1, 1, 1))[0]
    assert item["image"].shape == (3, 8, 8)
    expected = torch.from_numpy(gray).float() / 255
    for channel in item["image"]:
        torch.testing.assert_close(channel, expected)


def test_mask_resize_is_nearest_and_image_is_antialiased(tmp_path: Path) -> None:
    # A one-pixel checkerboard halved: nearest neighbour keeps one parity (all False); a bilinear
    # mask thresholded at > 0 would be all True. The image averages to mid-grey and, on noise,
    # matches PIL's bilinear resize, which is antialiased (without antialiasing it would not).
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.uint8)
    sample = _sample(tmp_path, checker * 255, mask=checker * 255)
    item = ADImageDataset([sample], size=16, mean=(0, 0, 0), std=(1, 1, 1))[0]
    assert item["mask"].shape == (1, 16, 16) and not item["mask"].any()
    assert torch.allclose(item["image"], torch.full_like(item["image"], 0.5), atol=0.02)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    item = ADImageDataset([_sample(tmp_path, noise)], size=16, mean=(0, 0, 0), std=(1, 1, 1))[0]
    pil = np.asarray(Image.fromarray(noise).resize((16, 16), Image.BILINEAR), np.float32) / 255
    torch.testing.assert_close(
        item["image"], torch.from_numpy(pil).permute(2, 0, 1), atol=0.01, rtol=0
    )
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 7  # non-zero values other than 255 are anomalous too
    item = ADImageDataset([_sample(tmp_path, half, mask=half)], size=20)[0]
    assert item["mask"][0, :, :10].all() and not item["mask"][0, :, 10:].any()


def test_crop_is_identical_for_image_and_mask(tmp_path: Path) -> None:
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    image[12:16, 22:26, 0] = mask[12:16, 22:26] = 255  # marker inside the 20 px centre crop
    image[1:4, 1:4, 0] = mask[1:4, 1:4] = 255  # marker outside it
    data = ADImageDataset(
        [_sample(tmp_path, image, mask)], size=40, crop=20, mean=(0, 0, 0), std=(1, 1, 1)
    )
    item = data[0]
    assert data.out_size == (20, 20) and item["image"].shape == (3, 20, 20)
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[2:6, 12:16] = True  # crop starts at (10, 10)
    assert torch.equal(item["mask"][0], expected)
    assert torch.equal(item["image"][0] > 0.5, expected)


def test_good_sample_mask_is_zeros_after_crop(tmp_path: Path) -> None:
    sample = _sample(tmp_path, np.full((30, 30, 3), 200, np.uint8))
    item = ADImageDataset([sample], size=(32, 48), crop=(16, 24))[0]
    assert item["mask"].shape == (1, 16, 24) and item["mask"].dtype == torch.bool
    assert not item["mask"].any() and item["image"].shape == (3, 16, 24)


def test_mask_modes(tmp_path: Path) -> None:
    region = np.zeros((6, 6), bool)
    region[1:3, 2:5] = True
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[region] = 255  # cv2-style 3-channel mask, as anomalib writes for VisA
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(region).save(tmp_path / "binary.png")  # mode "1", as in the real MVTec samples
    for name in ("rgb.png", "binary.png"):
        mask = load_mask(tmp_path / name)
        assert mask.shape == (1, 6, 6) and torch.equal(mask[0], torch.from_numpy(region)), name


def test_mask_size_mismatch(tmp_path: Path) -> None:
    sample = _sample(tmp_path, np.zeros((8, 8, 3), np.uint8), mask=np.full((6, 8), 255, np.uint8))
    with pytest.raises(DatasetError, match="mask.png"):
        ADImageDataset([sample], size=8)[0]


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"size": 16, "crop": 32}, {"std": (1, 0, 1)}, {"size": (8, 8, 8)}]
)
def test_bad_transform_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ADImageDataset([], **kwargs)
