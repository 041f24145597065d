"""Anomaly-detection datasets: MVTec AD and VisA layouts, checked before any model is built.

Layouts, all read in place (nothing is copied):

- MVTec AD: ``<root>/<category>/{train/good, test/<defect>,
  ground_truth/<defect>/<stem>_mask.png}``; good test images have no mask.
- VisA raw (the official tarball): ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG`` and
  ``<root>/<category>/Data/Masks/Anomaly/*.png`` (values = defect id), split by the official
  ``<root>/split_csv/1cls.csv`` (header ``object,split,label,image,mask``, paths relative to
  ``<root>``).
- VisA already split by anomalib (``<root>/visa_pytorch/<category>``) or by spot-diff's
  ``prepare_data.py`` (``<root>/1cls/<category>``): ``{train/good, test/good, test/bad,
  ground_truth/bad/<stem>.png}``, i.e. MVTec-like but without the ``_mask`` suffix.

``scan(dataset, root, category)`` validates a layout and returns a ``Split`` of ``Sample`` records.
A missing or orphan mask, an empty folder, an unknown category or a bad CSV row raises a one-line
``DatasetError`` naming the path. ``ADImageDataset`` then loads samples: images as RGB, resized
(bilinear, antialiased) to ``size``, optionally centre-cropped to ``crop`` and normalised; masks
binarised (> 0), resized with nearest neighbour and cropped the same way. Paper protocol: 256 px,
no crop (PatchCore-style: ``size=256, crop=224``).

Example::

    split = scan("mvtec", "/data/mvtec_anomaly_detection", "bottle")
    test_set = ADImageDataset(split.test, size=256)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
DATASETS = ("mvtec", "visa")
# Category groups of the paper's section 5.2 (its spider charts); MVTec's tables list textures, then objects.
CATEGORY_GROUPS = {
    "mvtec": {
        "textures": ("carpet", "grid", "leather", "tile", "wood"),
        "objects": ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                    "transistor", "zipper"),
    },
    "visa": {
        "pcb": ("pcb1", "pcb2", "pcb3", "pcb4"),
        "multi-in": ("candle", "capsules", "macaroni1", "macaroni2"),
        "single-in": ("cashew", "chewinggum", "fryum", "pipe_fryum"),
    },
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # compared lower-cased: VisA images are .JPG
GOOD = "good"  # folder / defect name of normal images
VISA_DEFECT = "bad"  # defect name of every VisA anomaly, as in the split layouts
MVTEC_MASK_SUFFIX = "_mask"  # test/<d>/000.png <-> ground_truth/<d>/000_mask.png
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_HEADER = ("object", "split", "label", "image", "mask")
VISA_SPLIT_DIRS = ("visa_pytorch", "1cls")  # anomalib, spot-diff prepare_data.py

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A bad dataset layout or file. The message is one line naming the offending path."""


@dataclass(frozen=True)
class Sample:
    """One image: label 0 = good, 1 = anomalous; ``mask_path`` is None exactly for good images."""

    path: Path
    label: int
    defect: str  # "good", an MVTec defect folder, or "bad" for VisA
    mask_path: Path | None = None


@dataclass(frozen=True)
class Split:
    """Train (good only) and test (good and anomalous) samples of one category, in sorted order."""

    train: list[Sample]
    test: list[Sample]


# ----------------------------------------------------------------------------- scanning


def scan(dataset: str, root: str | Path, category: str) -> Split:
    """Validate and list one category of ``dataset`` ("mvtec" or "visa") under ``root``.

    For VisA, ``root`` may be the raw VisA folder (with ``split_csv/1cls.csv``, preferred), a folder
    holding ``visa_pytorch/`` or ``1cls/``, or one of those folders itself.
    """
    if dataset == "mvtec":
        return scan_mvtec(root, category)
    if dataset == "visa":
        return scan_visa(root, category)
    raise DatasetError(f"unknown dataset {dataset!r}: must be one of {', '.join(DATASETS)}")


def scan_mvtec(root: str | Path, category: str) -> Split:
    """MVTec AD: ``<root>/<category>/{train/good, test/<d>, ground_truth/<d>/<stem>_mask.png}``.

    Any category folder in that layout is accepted, not only ``MVTEC_CATEGORIES``: the error for a
    missing one lists the category folders found under ``root``.
    """
    root = _existing_root(root)
    category_dir = root / category
    if not category_dir.is_dir():
        raise _unknown_category(category, category_dir, _category_dirs(root))
    return scan_folder_layout(category_dir, mask_suffix=MVTEC_MASK_SUFFIX)


def scan_visa(root: str | Path, category: str) -> Split:
    """VisA, raw (``split_csv/1cls.csv`` under ``root``) or already split (anomalib / spot-diff)."""
    root = _existing_root(root)
    if (root / VISA_SPLIT_CSV).is_file():
        return scan_visa_raw(root, category)
    bases = [root / name for name in VISA_SPLIT_DIRS] + [root]
    for base in bases:  # a split copy beside raw folders without their csv (anomalib writes visa_pytorch/ there)
        if (base / category / "train").is_dir():
            return scan_visa_split(base, category)
    if (root / category / "Data").is_dir():
        raise DatasetError(
            f"raw VisA category {root / category} needs the split file {root / VISA_SPLIT_CSV}"
        )
    available = sorted({name for base in bases for name in _category_dirs(base)})
    raise _unknown_category(category, root / category, available)


def scan_visa_split(root: str | Path, category: str) -> Split:
    """Split VisA: ``<root>/<category>/{train/good, test/{good,bad}, ground_truth/bad/<stem>.png}``.

    ``root`` is anomalib's ``visa_pytorch`` or spot-diff's ``1cls`` folder.
    """
    root = _existing_root(root)
    category_dir = root / category
    if not category_dir.is_dir():
        raise _unknown_category(category, category_dir, _category_dirs(root))
    return scan_folder_layout(category_dir, mask_suffix="")


def scan_folder_layout(category_dir: str | Path, *, mask_suffix: str) -> Split:
    """The MVTec-like layout shared by MVTec AD and split VisA.

    Args:
        category_dir: folder holding ``train/good``, ``test/<d>`` and ``ground_truth/<d>``.
        mask_suffix: the mask of ``test/<d>/X.<ext>`` is ``ground_truth/<d>/X<mask_suffix>.<ext>``.

    Returns:
        The validated split: every anomalous image has exactly one mask, every mask has an image.
    """
    category_dir = Path(category_dir)
    train = [Sample(path, 0, GOOD) for path in _images(category_dir / "train" / GOOD)]
    test_dir, gt_dir = category_dir / "test", category_dir / "ground_truth"
    if not test_dir.is_dir():
        raise DatasetError(f"missing test folder {test_dir}")
    test: list[Sample] = []
    used_masks: set[Path] = set()
    for defect in _subdirs(test_dir):
        images = _images(test_dir / defect)
        if defect == GOOD:
            test += [Sample(path, 0, GOOD) for path in images]
            continue
        masks = {path.stem: path for path in _image_files(gt_dir / defect, missing_ok=True)}
        for path in images:
            mask = masks.get(path.stem + mask_suffix)
            if mask is None:
                expected = gt_dir / defect / f"{path.stem}{mask_suffix}.png"
                raise DatasetError(f"missing mask for {path}: expected {expected}")
            used_masks.add(mask)
            test.append(Sample(path, 1, defect, mask))
    if gt_dir.is_dir():
        for defect in _subdirs(gt_dir):
            for mask in _image_files(gt_dir / defect):
                if mask not in used_masks:
                    stem = mask.stem.removesuffix(mask_suffix) if mask_suffix else mask.stem
                    raise DatasetError(
                        f"orphan mask {mask}: no anomalous test image {test_dir / defect / stem}.*"
                    )
    _check_test(test, test_dir)
    return Split(train=train, test=test)


def scan_visa_raw(
    root: str | Path, category: str, *, split_csv: str | Path = VISA_SPLIT_CSV
) -> Split:
    """Raw VisA read through the 1-class split CSV (``split_csv`` is relative to ``root``).

    Rows of ``category`` give train (normal only) and test images; anomaly rows must name an
    existing mask; a mask file next to the referenced ones that no row names is an orphan.
    """
    root = _existing_root(root)
    csv_path = root / split_csv
    rows = _read_visa_csv(csv_path)
    mine = [(line, row) for line, row in rows if row["object"] == category]
    if not mine:
        objects = sorted({row["object"] for _, row in rows})
        raise _unknown_category(category, csv_path, objects, what="no rows in")
    train: list[Sample] = []
    test: list[Sample] = []
    seen: set[Path] = set()
    for line, row in mine:
        where = f"{csv_path} line {line}"
        split, label = row["split"], row["label"]
        if split not in ("train", "test"):
            raise DatasetError(f"{where}: split {split!r} must be train or test")
        if label not in ("normal", "anomaly"):
            raise DatasetError(f"{where}: label {label!r} must be normal or anomaly")
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist")
        if image in seen:
            raise DatasetError(f"{where}: image {image} is listed twice")
        seen.add(image)
        if label == "normal":
            if row["mask"]:
                raise DatasetError(f"{where}: normal image {image} has a mask {root / row['mask']}")
            sample = Sample(image, 0, GOOD)
        else:
            if split == "train":
                raise DatasetError(f"{where}: anomalous image {image} in the train split")
            if not row["mask"]:
                raise DatasetError(f"{where}: missing mask for anomalous image {image}")
            mask = root / row["mask"]
            if not mask.is_file():
                raise DatasetError(f"{where}: mask {mask} of {image} does not exist")
            sample = Sample(image, 1, VISA_DEFECT, mask)
        (train if split == "train" else test).append(sample)
    used_masks = {s.mask_path for s in test if s.mask_path is not None}
    for mask_dir in sorted({mask.parent for mask in used_masks}):
        for mask in _image_files(mask_dir):
            if mask not in used_masks:
                raise DatasetError(
                    f"orphan mask {mask}: no anomaly row of {category!r} in {csv_path}"
                )
    if not train:
        raise DatasetError(f"no train rows for {category!r} in {csv_path}")
    _check_test(test, csv_path)
    return Split(train=sorted(train, key=_order), test=sorted(test, key=_order))


def _order(sample: Sample) -> tuple[str, str]:
    return sample.defect, str(sample.path)


def _read_visa_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a VisA split CSV, header checked."""
    if not path.is_file():
        raise DatasetError(f"missing VisA split file {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != VISA_CSV_HEADER:
            raise DatasetError(f"{path}: header {header!r} must be {','.join(VISA_CSV_HEADER)}")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(VISA_CSV_HEADER):
                raise DatasetError(f"{path} line {reader.line_num}: {len(values)} fields, not 5")
            row = dict(zip(VISA_CSV_HEADER, (v.strip() for v in values), strict=True))
            rows.append((reader.line_num, row))
    return rows


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    return root


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (none if ``folder`` is missing)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _category_dirs(root: Path) -> list[str]:
    """Sub-folders of ``root`` that look like a category (hold ``train/`` or VisA's ``Data/``)."""
    return [n for n in _subdirs(root) if any((root / n / d).is_dir() for d in ("train", "Data"))]


def _unknown_category(
    category: str, path: Path, available: Sequence[str], what: str = "no folder"
) -> DatasetError:
    listed = ", ".join(available) if available else "none"
    return DatasetError(f"unknown category {category!r}: {what} {path}; available: {listed}")


def _image_files(folder: Path, *, missing_ok: bool = False) -> list[Path]:
    """Sorted image files of ``folder``, other files ignored; a stem shared by two is an error."""
    if not folder.is_dir():
        if missing_ok:
            return []
        raise DatasetError(f"missing folder {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise DatasetError(f"two images with stem {path.stem!r}: {stems[path.stem]} and {path}")
        stems[path.stem] = path
    return files


def _images(folder: Path) -> list[Path]:
    """Like ``_image_files`` but an empty folder is an error."""
    files = _image_files(folder)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def _check_test(test: list[Sample], where: Path) -> None:
    if not any(s.label == 0 for s in test):
        raise DatasetError(f"no good test images in {where}")
    if not any(s.label == 1 for s in test):
        raise DatasetError(f"no anomalous test images in {where}")


# ----------------------------------------------------------------------------- loading


def load_image(path: str | Path) -> torch.Tensor:
    """An image as a uint8 RGB tensor (3, H, W); grayscale, palette and RGBA become RGB."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except OSError as err:
        raise DatasetError(f"cannot read image {path}: {err}".replace("\n", " ")) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def load_mask(path: str | Path) -> torch.Tensor:
    """A mask as a bool tensor (1, H, W): any non-zero pixel (any channel) is anomalous."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("1", "L", "P", "I", "I;16", "F", "RGB"):
                img = img.convert("RGB")  # drops alpha, which would otherwise mark every pixel
            array = np.asarray(img)
    except OSError as err:
        raise DatasetError(f"cannot read mask {path}: {err}".replace("\n", " ")) from None
    if array.ndim == 3:  # cv2-style 3-channel masks
        array = array.max(axis=2)
    return torch.from_numpy(array > 0)[None]


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int side or an (height, width) pair, each >= 1."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name}={value!r}: must be an int or an (height, width) pair of ints")
    if min(pair) < 1:
        raise ValueError(f"{name}={value!r}: must be >= 1")
    return pair  # type: ignore[return-value]


class ADImageDataset(Dataset):
    """Loads ``Sample`` records as normalised image tensors with pixel masks.

    Each item is a dict: ``image`` float32 (3, h, w) normalised with ``mean``/``std``; ``mask`` bool
    (1, h, w), all False for good images; ``label`` int; ``path`` str; ``defect`` str. (h, w) is
    ``crop`` if given, else ``size``.

    Args:
        samples: from ``scan`` (``Split.train`` or ``Split.test``).
        size: resize target, an int for a square (the aspect ratio is not kept, as in anomalib) or
            (height, width). Images use bilinear with antialiasing, masks nearest neighbour.
        crop: optional centre crop applied after resizing, identically to image and mask.
        mean, std: per-channel normalisation of [0, 1] images; ImageNet by default, but backbones
            may carry their own.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        size: int | Sequence[int] = 256,
        crop: int | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.samples = tuple(samples)
        self.size = _pair("size", size)
        self.crop = None if crop is None else _pair("crop", crop)
        if self.crop is not None and (self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise ValueError(f"crop={crop!r}: must not exceed size={size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={mean!r}, std={std!r}: need 3 values each, std > 0")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of the returned image and mask."""
        return self.crop or self.size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = load_image(sample.path).float().div_(255)  # (3, H, W) in [0, 1]
        source_hw = tuple(image.shape[-2:])
        image = TF.resize(image, list(self.size), InterpolationMode.BILINEAR, antialias=True)
        if sample.mask_path is None:
            mask = torch.zeros((1, *self.size), dtype=torch.bool)
        else:
            mask = load_mask(sample.mask_path)
            if tuple(mask.shape[-2:]) != source_hw:
                raise DatasetError(
                    f"mask {sample.mask_path} is {tuple(mask.shape[-2:])}, image is {source_hw}"
                )
            # NEAREST_EXACT: nearest neighbour at pixel centres, aligned with the image resize
            mask = TF.resize(mask.to(torch.uint8), list(self.size), InterpolationMode.NEAREST_EXACT)
            mask = mask > 0
        if self.crop is not None:
            image = TF.center_crop(image, list(self.crop))
            mask = TF.center_crop(mask, list(self.crop))
        image = TF.normalize(image, self.mean, self.std)
        return {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "path": str(sample.path),
            "defect": sample.defect,
        }
