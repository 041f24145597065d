"""Small generated anomaly-detection datasets in the MVTec AD and raw VisA layouts.

They let the evaluation pipeline (``ad_eval.datasets.scan`` -> a method -> metrics) run on a fresh
machine without the real data. Everything is drawn from ``numpy.random.default_rng`` streams keyed
by ``(seed, category name, group, index)``, so the same arguments give byte-identical files and
changing a count does not change the other images.

Categories (``CATEGORIES``; any of them may be used in either layout):

- ``texture`` (RGB): a smooth periodic texture, the sum of four oriented sinusoids with fixed
  per-category frequencies and colours, random per-image phases and small orientation/frequency
  jitter, plus pixel noise.
- ``object`` (grayscale, saved as 8-bit ``L`` images to exercise RGB conversion): a shaded ellipse
  on a plain background with a slightly random position, size, rotation and brightness.
- ``pcbx`` (RGB): a green circuit board with copper traces, chips and pads, slightly shifted and
  relit per image.

Defect types (two per category), drawn inside the object / board / texture area:

- ``scratch``: a thin straight segment darkened to 35-55 % of the clean value;
- ``spot``: a small irregular blob blended (60-85 %) towards a colour about 90 levels away per
  channel.

Masks are exact: a pixel is in the mask iff the defect changed it (before JPEG compression for
VisA). MVTec-like masks are 0/255 ``L`` PNGs named ``<stem>_mask.png``. VisA-like masks are named
``<stem>.png`` like the image and, as in the real VisA, hold the defect id (1 = scratch, 2 = spot)
rather than 255; ``ad_eval.datasets.load_mask`` binarises them (> 0).

Layouts written (``n_test_defect`` images per defect type):

- MVTec AD: ``<root>/<cat>/train/good/NNN.png``, ``test/{good,scratch,spot}/NNN.png``,
  ``ground_truth/{scratch,spot}/NNN_mask.png``; square ``size`` x ``size`` images.
- raw VisA: ``<root>/<cat>/Data/Images/Normal/NNNN.JPG`` (train and test normals, the test ones
  picked at random), ``Data/Images/Anomaly/NNN.JPG``, ``Data/Masks/Anomaly/NNN.png`` and
  ``<root>/split_csv/1cls.csv``; images are ``size`` high and ``round(1.25 * size)`` wide (VisA
  images are not square).

Both write ``<root>/synthetic.json`` (the generation arguments). A category folder that already
exists is replaced only when that marker is present; otherwise ``FileExistsError`` is raised, so a
real dataset is never overwritten.

Usage::

    ad-eval synthetic --out /tmp/synth_mvtec               # prints the root
    ad-eval synthetic --out /tmp/synth_visa --layout visa --size 128 --seed 0
    ad-eval run --method patchcore --dataset mvtec --root /tmp/synth_mvtec --category texture ...
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("mvtec", "visa")
DEFECTS = ("scratch", "spot")  # VisA mask value = 1 + index
GROUPS = ("train", "good", *DEFECTS)  # rng key of an image: (seed, category, group, index)
MARKER = "synthetic.json"
VISA_ASPECT = 1.25  # width / height of the VisA-like images
VISA_JPEG_QUALITY = 95


@dataclass(frozen=True)
class CategorySpec:
    """How a category looks: ``kind`` is texture, object or board; ``grayscale`` saves 8-bit L."""

    kind: str
    grayscale: bool = False


CATEGORIES: dict[str, CategorySpec] = {
    "texture": CategorySpec("texture"),
    "object": CategorySpec("object", grayscale=True),
    "pcbx": CategorySpec("board"),
}


@dataclass(frozen=True)
class Rendered:
    """One generated image: ``image`` and ``clean`` uint8 (H, W, C) with C = 1 (grayscale) or 3;
    ``mask`` bool (H, W), None for good images (then ``image`` is ``clean``)."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None


# ----------------------------------------------------------------------------- rendering


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _category_params(category: str, spec: CategorySpec, seed: int) -> dict:
    """Per-category appearance, shared by all its images."""
    rng = np.random.default_rng([seed, _key(category), 1000])
    channels = 1 if spec.grayscale else 3
    if spec.kind == "texture":
        return {
            "base": rng.uniform(95, 155, channels),
            "colour": rng.uniform(30, 50, channels) * rng.choice([-1, 1], channels),
            "colour2": rng.uniform(10, 25, channels) * rng.choice([-1, 1], channels),
            "freq": rng.uniform(3.0, 9.0, 4),  # cycles per image side
            "theta": rng.uniform(0, np.pi, 4),
        }
    if spec.kind == "object":
        return {
            "background": rng.uniform(25, 55, channels),
            "colour": rng.uniform(150, 200, channels),
            "axes": (rng.uniform(0.30, 0.34), rng.uniform(0.22, 0.26)),  # semi-axes / side
        }
    if spec.kind == "board":
        chips = []
        for _ in range(4):
            chips.append(
                (rng.uniform(0.12, 0.75), rng.uniform(0.12, 0.75), rng.uniform(0.1, 0.2), rng.uniform(0.08, 0.16))
            )  # (x0, y0, w, h) relative
        traces = [(bool(rng.integers(2)), rng.uniform(0.08, 0.92)) for _ in range(6)]  # (vertical, pos)
        pads = rng.uniform(0.06, 0.94, (10, 2))
        return {"green": np.array([28.0, 105.0, 52.0]), "chips": chips, "traces": traces, "pads": pads}
    raise ValueError(f"unknown kind {spec.kind!r}")


def _texture(p: dict, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    side = min(yy.shape)
    theta = p["theta"] + rng.normal(0, 0.03, 4)
    freq = p["freq"] * (1 + rng.normal(0, 0.02, 4))
    phase = rng.uniform(0, 2 * np.pi, 4)
    waves = [
        np.cos(2 * np.pi * f * (xx * np.cos(t) + yy * np.sin(t)) / side + ph)
        for f, t, ph in zip(freq, theta, phase, strict=True)
    ]
    pattern = (waves[0] + waves[1] + waves[2] + waves[3]) / 4
    pattern2 = waves[0] * waves[2]
    image = p["base"] + pattern[..., None] * p["colour"] + pattern2[..., None] * p["colour2"]
    image = image + rng.normal(0, 3.0)  # per-image brightness
    h, w = yy.shape
    region = (yy > 0.05 * h) & (yy < 0.95 * h) & (xx > 0.05 * w) & (xx < 0.95 * w)
    return image, region


def _object(p: dict, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = yy.shape
    side = min(h, w)
    cy, cx = (h - 1) / 2 + rng.normal(0, 1.0), (w - 1) / 2 + rng.normal(0, 1.0)
    scale = 1 + rng.normal(0, 0.02)
    a, b = p["axes"][0] * side * scale, p["axes"][1] * side * scale
    angle = rng.uniform(-0.15, 0.15)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
    r = np.sqrt(u * u + v * v)
    alpha = np.clip((1 - r) * min(a, b) + 0.5, 0, 1)  # ~1 px anti-aliased edge
    shade = 1.0 - 0.22 * r * r + 0.12 * np.exp(-((u + 0.35) ** 2 + (v + 0.35) ** 2) / 0.05)
    colour = p["colour"] * (1 + rng.normal(0, 0.03))
    image = p["background"] + alpha[..., None] * (shade[..., None] * colour - p["background"])
    return image, r < 0.8


def _board(p: dict, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = yy.shape
    sy, sx = rng.normal(0, 0.006, 2)  # shift, relative
    v, u = yy / h - sy, xx / w - sx
    image = np.broadcast_to(p["green"], (h, w, 3)).copy()
    image *= (1 + 0.06 * (u - 0.5))[..., None]  # light gradient
    trace_half = 0.008
    for vertical, pos in p["traces"]:
        coord = u if vertical else v
        image[np.abs(coord - pos) < trace_half] = (185, 150, 75)
    for py, px in p["pads"]:
        image[(u - px) ** 2 + ((v - py) * h / w) ** 2 < 0.012**2] = (205, 200, 190)
    for x0, y0, cw, ch in p["chips"]:
        inside = (u > x0) & (u < x0 + cw) & (v > y0) & (v < y0 + ch)
        image[inside] = (38, 38, 44)
    image = image * (1 + rng.normal(0, 0.03))
    region = (u > 0.06) & (u < 0.94) & (v > 0.06) & (v < 0.94)
    return image, region


_KINDS = {"texture": _texture, "object": _object, "board": _board}


def _pick(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    flat = np.flatnonzero(region)
    y, x = np.unravel_index(flat[rng.integers(flat.size)], region.shape)
    return float(y), float(x)


def _scratch(image, region, rng, yy, xx) -> tuple[np.ndarray, np.ndarray]:
    side = min(yy.shape)
    cy, cx = _pick(region, rng)
    length = rng.uniform(0.15, 0.3) * side
    angle = rng.uniform(0, np.pi)
    half_width = max(0.75, rng.uniform(0.005, 0.009) * side)
    ey, ex = np.sin(angle), np.cos(angle)
    t = np.clip((yy - cy) * ey + (xx - cx) * ex, -length / 2, length / 2)
    dist = np.hypot(yy - (cy + t * ey), xx - (cx + t * ex))
    mask = (dist <= half_width) & region
    out = image.copy()
    out[mask] *= rng.uniform(0.35, 0.55)
    return out, mask


def _spot(image, region, rng, yy, xx) -> tuple[np.ndarray, np.ndarray]:
    side = min(yy.shape)
    cy, cx = _pick(region, rng)
    radius = rng.uniform(0.035, 0.06) * side
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    ph = rng.uniform(0, 2 * np.pi, 2)
    boundary = radius * (1 + 0.25 * np.cos(2 * theta + ph[0]) + 0.15 * np.cos(3 * theta + ph[1]))
    mask = (np.hypot(dy, dx) <= boundary) & region
    if not mask.any():  # region cut the blob away entirely (cannot happen for a centre in region)
        mask[int(cy), int(cx)] = True
    local = image[mask].mean(axis=0)
    target = np.where(local < 128, local + 90, local - 90)
    alpha = rng.uniform(0.6, 0.85)
    out = image.copy()
    out[mask] = (1 - alpha) * image[mask] + alpha * target
    return out, mask


_DEFECT_FNS = {"scratch": _scratch, "spot": _spot}


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_sample(
    category: str, group: str, index: int, *, size: int = 128, width: int | None = None, seed: int = 0
) -> Rendered:
    """Render image ``index`` of ``group`` ("train", "good", "scratch" or "spot") of ``category``.

    ``size`` is the height, ``width`` defaults to ``size``. The clean version of a defective image is
    returned too, so tests can check that the defect changes exactly the mask pixels.
    """
    spec = _spec(category)
    if group not in GROUPS:
        raise ValueError(f"group {group!r}: must be one of {', '.join(GROUPS)}")
    height, width = int(size), int(size if width is None else width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    params = _category_params(category, spec, seed)
    rng = np.random.default_rng([seed, _key(category), GROUPS.index(group), index])
    clean, region = _KINDS[spec.kind](params, rng, yy, xx)
    clean = clean + rng.normal(0, 2.5, clean.shape)  # sensor noise
    if spec.grayscale and clean.shape[-1] != 1:
        clean = clean.mean(axis=-1, keepdims=True)
    if group in ("train", "good"):
        image = _quantise(clean)
        return Rendered(image=image, clean=image, mask=None)
    defect_rng = np.random.default_rng([seed, _key(category), GROUPS.index(group), index, 1])
    defective, mask = _DEFECT_FNS[group](clean, region, defect_rng, yy, xx)
    return Rendered(image=_quantise(defective), clean=_quantise(clean), mask=mask)


# ----------------------------------------------------------------------------- writing


def _spec(category: str) -> CategorySpec:
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}: must be one of {', '.join(CATEGORIES)}")
    return CATEGORIES[category]


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _prepare(root: str | Path, categories: Sequence[str], extra: Sequence[Path] = ()) -> Path:
    """Create ``root``; replace existing category folders only if ``root`` holds our marker."""
    if isinstance(categories, str):
        raise TypeError("categories must be a sequence of names, not a string")
    for category in categories:
        _spec(category)
    if len(set(categories)) != len(categories) or not categories:
        raise ValueError(f"categories {list(categories)!r}: must be distinct and non-empty")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing = [root / c for c in categories if (root / c).exists()] + [p for p in extra if p.exists()]
    if existing and not (root / MARKER).is_file():
        raise FileExistsError(f"{existing[0]} exists and {root} has no {MARKER}: not a generated dataset")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return root


def _write_marker(root: Path, **params) -> None:
    (root / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if counts["size"] < 16:
        raise ValueError(f"size={counts['size']}: must be >= 16")


def make_mvtec_like(
    root: str | Path,
    categories: Sequence[str] = ("texture", "object"),
    n_train: int = 20,
    n_test_good: int = 5,
    n_test_defect: int = 5,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write an MVTec-AD-like dataset under ``root`` and return ``root``.

    Per category: ``n_train`` train/good, ``n_test_good`` test/good and ``n_test_defect`` images for
    each of test/scratch and test/spot, with their 0/255 masks; PNG, ``size`` x ``size``.
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size)
    root = _prepare(root, categories)
    counts = {"train": n_train, "good": n_test_good, **{d: n_test_defect for d in DEFECTS}}
    for category in categories:
        for group, count in counts.items():
            folder = root / category / ("train/good" if group == "train" else f"test/{group}")
            folder.mkdir(parents=True)
            for i in range(count):
                sample = render_sample(category, group, i, size=size, seed=seed)
                _to_pil(sample.image).save(folder / f"{i:03d}.png")
                if sample.mask is not None:
                    gt = root / category / "ground_truth" / group
                    gt.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(sample.mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png")
    _write_marker(
        root,
        layout="mvtec",
        categories=list(categories),
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        size=size,
        seed=seed,
    )
    return root


def make_visa_like(
    root: str | Path,
    categories: Sequence[str] = ("pcbx",),
    n_train: int = 20,
    n_test_good: int = 5,
    n_test_defect: int = 5,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a raw-VisA-like dataset (images, masks, ``split_csv/1cls.csv``) and return ``root``.

    Per category: ``n_train + n_test_good`` normal JPGs (``Data/Images/Normal/NNNN.JPG``, the test
    ones chosen at random), ``2 * n_test_defect`` anomalies (``Data/Images/Anomaly/NNN.JPG``, scratches
    then spots) with masks ``Data/Masks/Anomaly/NNN.png`` holding the defect id. Images are ``size``
    high and ``round(1.25 * size)`` wide.
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size)
    csv_path = Path(root) / "split_csv" / "1cls.csv"
    root = _prepare(root, categories, extra=[csv_path])
    width = round(VISA_ASPECT * size)
    rows: list[tuple[str, str, str, str, str]] = []
    for category in categories:
        data = Path(category) / "Data"
        normal_dir, anomaly_dir, mask_dir = (data / "Images/Normal", data / "Images/Anomaly", data / "Masks/Anomaly")
        for folder in (normal_dir, anomaly_dir, mask_dir):
            (root / folder).mkdir(parents=True)
        n_normal = n_train + n_test_good
        order = np.random.default_rng([seed, _key(category), 2000]).permutation(n_normal)  # file number -> slot
        train_rows, test_rows = [], []
        for number, slot in enumerate(order.tolist()):
            group, index = ("train", slot) if slot < n_train else ("good", slot - n_train)
            sample = render_sample(category, group, index, size=size, width=width, seed=seed)
            image = (normal_dir / f"{number:04d}.JPG").as_posix()
            _to_pil(sample.image).save(root / image, quality=VISA_JPEG_QUALITY)
            if group == "train":
                train_rows.append((category, "train", "normal", image, ""))
            else:
                test_rows.append((category, "test", "normal", image, ""))
        number = 0
        for defect_id, defect in enumerate(DEFECTS, start=1):
            for index in range(n_test_defect):
                sample = render_sample(category, defect, index, size=size, width=width, seed=seed)
                image = (anomaly_dir / f"{number:03d}.JPG").as_posix()
                mask = (mask_dir / f"{number:03d}.png").as_posix()
                _to_pil(sample.image).save(root / image, quality=VISA_JPEG_QUALITY)
                Image.fromarray(sample.mask.astype(np.uint8) * defect_id).save(root / mask)
                test_rows.append((category, "test", "anomaly", image, mask))
                number += 1
        rows += train_rows + test_rows
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("object", "split", "label", "image", "mask"))
        writer.writerows(rows)
    _write_marker(
        root,
        layout="visa",
        categories=list(categories),
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        size=size,
        width=width,
        seed=seed,
    )
    return root


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ad-eval synthetic``."""
    parser.add_argument("--out", required=True, help="dataset root to create")
    parser.add_argument("--layout", choices=LAYOUTS, default="mvtec")
    parser.add_argument(
        "--categories",
        nargs="+",
        choices=list(CATEGORIES),
        default=None,
        help="default: texture object (mvtec), pcbx (visa)",
    )
    parser.add_argument("--size", type=int, default=128, help="image height (and width for mvtec)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test-good", type=int, default=5)
    parser.add_argument("--n-test-defect", type=int, default=5, help="per defect type")


def run_from_args(args: argparse.Namespace) -> Path:
    """Writes the dataset ``args`` describe; returns its root (``ValueError``/``FileExistsError`` on bad input)."""
    make = make_mvtec_like if args.layout == "mvtec" else make_visa_like
    kwargs = {
        "n_train": args.n_train,
        "n_test_good": args.n_test_good,
        "n_test_defect": args.n_test_defect,
        "size": args.size,
        "seed": args.seed,
    }
    if args.categories is not None:
        kwargs["categories"] = tuple(args.categories)
    return make(args.out, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ad_eval.synthetic ...``: the same as ``ad-eval synthetic ...``."""
    from ad_eval.cli import main as ad_eval_main

    return ad_eval_main(["synthetic", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
