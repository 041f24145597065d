"""The qualitative figure (the paper's figure 7): test images, their ground truth, and per backbone the
anomaly map over the image and the thresholded mask, backbones side by side.

Input: cells run with ``keep_maps`` leave ``<results>/maps/<cell_id>.npz`` (``anomaly_maps`` (N, H, W),
``masks``, ``image_scores``, ``image_labels``, in the order of ``ad_eval.datasets.scan(...).test``) and name it
in the record's ``maps``; it is looked for at that path relative to the results folder, so a moved folder
keeps its figures. The images are read again from the record's dataset root at the record's size and crop.

Fixed rules, so that a figure cannot be picked by hand:

- Cells: the tables' cells (all training images, each method's table layer set) with maps; the method with
  maps for the most backbones (ties: the paper's column order); per backbone its smallest seed.
- Rows: the defective test images with the highest and the lowest score rank averaged over the backbones,
  and the good image with the highest (the one that looks most anomalous).
- Threshold per backbone: the value that maximises pixel F1 over the category's test set (uses the ground
  truth: it shows what the map can separate, not an operating point); the mask is map >= t.
- Overlay colours span the backbone's min..max over the category's test set, so rows compare.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ad_eval.report.figures.common import DPI, new_figure
from ad_eval.report.order import dataset_name
from ad_eval.report.records import method_label

PANEL_INCHES = 1.6  # side of one image panel
HEADER_INCHES = 0.4  # column titles
CAPTION_INCHES = 1.0
OVERLAY_ALPHA = 0.5


@dataclass
class CellMaps:
    """One backbone's maps for the test set of a category."""

    backbone: str
    seed: int
    anomaly_maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray  # (N, H, W) bool
    image_scores: np.ndarray  # (N,)
    image_labels: np.ndarray  # (N,) 0/1


def maps_path(results_dir: Path, recorded: str | None) -> Path | None:
    """The maps file a record names (``<out>/maps/<cell_id>.npz`` when written), found beside the record."""
    if not isinstance(recorded, str) or not recorded:
        return None
    path = Path(recorded)
    found = Path(results_dir) / path.parent.name / path.name
    return found if found.is_file() else None


def load_maps(path: Path, backbone: str, seed: int) -> CellMaps:
    with np.load(path) as data:
        return CellMaps(backbone, seed, data["anomaly_maps"].astype(np.float32), data["masks"].astype(bool),
                        data["image_scores"].astype(np.float64), data["image_labels"].astype(int))


def choose_cells(records: pd.DataFrame, results_dir: Path, backbones: Sequence[str],
                 method_order: Sequence[str]) -> tuple[str, pd.DataFrame] | None:
    """(method, one record per backbone) of one (dataset, category) by the rule above; None without maps."""
    has_maps = np.array([maps_path(results_dir, m) is not None for m in records["maps"]], dtype=bool)
    with_maps = records[records["backbone"].isin(backbones).to_numpy() & has_maps]
    if with_maps.empty:
        return None
    counts = with_maps.groupby("method")["backbone"].nunique()
    method = min(counts.index, key=lambda m: (-counts[m], list(method_order).index(m)))
    chosen = with_maps[with_maps["method"] == method].sort_values(["seed", "file"]).drop_duplicates("backbone")
    return method, chosen.set_index("backbone").loc[[b for b in backbones if b in set(chosen["backbone"])]]


def pick_images(maps: Sequence[CellMaps]) -> list[tuple[str, int]]:
    """(row label, test index): highest- and lowest-ranked defect, highest-ranked good image (mean rank)."""
    from scipy.stats import rankdata

    rank = np.mean([rankdata(m.image_scores) for m in maps], axis=0)
    labels = maps[0].image_labels
    defects, goods = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rows = []
    if len(defects):
        rows.append(("defect, highest score", int(defects[np.argmax(rank[defects])])))
        low = int(defects[np.argmin(rank[defects])])
        if low != rows[0][1]:
            rows.append(("defect, lowest score", low))
    if len(goods):
        rows.append(("good, highest score", int(goods[np.argmax(rank[goods])])))
    return rows


def f1_threshold(anomaly_maps: np.ndarray, masks: np.ndarray) -> float:
    """The map value t for which "map >= t" has the highest pixel F1 against ``masks``."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(masks.ravel(), anomaly_maps.ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[np.argmax(f1[:-1])])


def read_test_images(record: pd.Series, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """The test images (N, H, W, 3) in [0, 1] at the cell's size and crop, and their paths; raises ValueError
    when the dataset is gone or differs from the maps."""
    from ad_eval.datasets import ADImageDataset, scan

    if not record.get("root"):
        raise ValueError("the record names no dataset root")
    split = scan(record["dataset"], record["root"], record["category"])
    crop = None if record["crop"] is None or pd.isna(record["crop"]) else int(record["crop"])
    images = ADImageDataset(split.test, size=int(record["size"]), crop=crop, mean=(0, 0, 0), std=(1, 1, 1))
    if (len(images), *images.out_size) != shape:
        raise ValueError(f"{record['root']}: {len(images)} test images of {images.out_size} now, the maps have "
                         f"{shape[0]} of {shape[1:]}")
    return images, [str(s.path) for s in split.test]


def qualitative_figure(records: pd.DataFrame, results_dir: Path, dataset: str, category: str,
                       backbones: Sequence[str], method_order: Sequence[str], path: Path) -> tuple[bool, list[str]]:
    """Writes the figure for one (dataset, category); ``records`` are the tables' records. Returns (written,
    notes); nothing is written without maps for the category."""
    rows = records[(records["dataset"] == dataset) & (records["category"] == category)]
    chosen = choose_cells(rows, results_dir, backbones, method_order)
    if chosen is None:
        return False, ["no cell with kept maps (keep_maps)"]
    method, cells = chosen
    maps = [load_maps(maps_path(results_dir, r.maps), b, int(r.seed)) for b, r in cells.iterrows()]
    shape = maps[0].anomaly_maps.shape
    if any(m.anomaly_maps.shape != shape or not np.array_equal(m.image_labels, maps[0].image_labels)
           for m in maps):
        return False, [f"the backbones' maps of {method_label(method)} differ in shape or labels"]
    try:
        images, paths = read_test_images(cells.iloc[0], shape)
    except (ValueError, OSError) as err:
        return False, [f"cannot read the test images again: {' '.join(str(err).split())}"]
    picked = pick_images(maps)
    thresholds = [f1_threshold(m.anomaly_maps, m.masks) for m in maps]
    _draw(images, paths, maps, picked, thresholds, method, cells, dataset, category, path)
    return True, []


def _draw(images, paths: list[str], maps: Sequence[CellMaps], picked: list[tuple[str, int]],
          thresholds: list[float], method: str, cells: pd.DataFrame, dataset: str, category: str,
          path: Path) -> None:
    """Fixed geometry: one PANEL_INCHES square per panel, titles above, caption below (columns: image, ground
    truth, then map and mask per backbone)."""
    n_cols, n_rows = 2 + 2 * len(maps), len(picked)
    width, height = n_cols * PANEL_INCHES, HEADER_INCHES + n_rows * PANEL_INCHES + CAPTION_INCHES
    fig = new_figure(width, height, layout=None)
    titles = ["image", "ground truth"] + [f"{m.backbone}: {kind}" for m in maps for kind in ("map", "mask")]
    pad = 0.03  # of a panel, each side
    for r, (label, index) in enumerate(picked):
        image = images[index]["image"].permute(1, 2, 0).numpy()
        top = height - HEADER_INCHES - r * PANEL_INCHES
        for c in range(n_cols):
            ax = fig.add_axes(((c + pad) * PANEL_INCHES / width, (top - (1 - pad) * PANEL_INCHES) / height,
                               (1 - 2 * pad) * PANEL_INCHES / width, (1 - 2 * pad) * PANEL_INCHES / height))
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
            if c == 0:
                ax.imshow(image)
                ax.text(0.02, 0.02, f"{label}\n{Path(paths[index]).parent.name}/{Path(paths[index]).name}",
                        transform=ax.transAxes, fontsize=5, va="bottom", bbox={"fc": "white", "alpha": 0.7, "lw": 0})
            elif c == 1:
                ax.imshow(maps[0].masks[index], cmap="gray", vmin=0, vmax=1)
            else:
                m, t = maps[(c - 2) // 2], thresholds[(c - 2) // 2]
                if c % 2 == 0:
                    ax.imshow(image)
                    ax.imshow(m.anomaly_maps[index], cmap="jet", alpha=OVERLAY_ALPHA,
                              vmin=float(m.anomaly_maps.min()), vmax=float(m.anomaly_maps.max()))
                else:
                    ax.imshow(m.anomaly_maps[index] >= t, cmap="gray", vmin=0, vmax=1)
    seeds = ", ".join(f"{m.backbone} seed {m.seed}" for m in maps)
    layers = cells.iloc[0]["layer_set"]
    caption = (f"{dataset_name(dataset)} {category}, {method_label(method)} (layers {layers}; {seeds}). Rows: the "
               "defective test images with the highest and lowest score rank averaged over the backbones, and the "
               "good image with the highest. Map: anomaly map over the image, colours spanning the backbone's "
               "min..max over the category's test set. Mask: map >= t, t maximising pixel F1 over the category's "
               "test set, per backbone (" + ", ".join(f"{m.backbone} t={t:.3g}" for m, t in
                                                      zip(maps, thresholds, strict=True)) + ").")
    fig.text(0.01, (CAPTION_INCHES - 0.05) / height, textwrap.fill(caption, int(width * 17)), fontsize=6,
             va="top", ha="left")
    fig.savefig(path, dpi=DPI)
