"""Tests of the report's seed, few-shot and qualitative axes (ad_eval.report) from hand-written records and maps.

The qualitative figure reads the real MVTec AD hazelnut samples (the ``realdata`` fixture; skipped if absent).

Run: ``python -m pytest -q tests/ad_eval/test_report_axes.py``
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ad_eval.cell import MAPS_DIR
from ad_eval.datasets import ADImageDataset, scan
from ad_eval.report import build_report, load_records
from ad_eval.report.figures.common import DPI
from ad_eval.report.figures.qualitative import CAPTION_INCHES, HEADER_INCHES, PANEL_INCHES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(method, category, backbone, seed, metrics, shots=None, dataset="mvtec", **extra):
    image, pixel, pro = metrics
    record = {
        "cell_id": f"{method}_{dataset}_{category}_{backbone}_s{seed}_k{shots}", "method": method, "dataset": dataset,
        "category": category, "backbone": backbone, "layers": None, "size": 256, "crop": None, "seed": seed,
        "config": {}, "image_AUROC": image, "pixel_AUROC": pixel, "pixel_AUPRO": pro,
        "finished_at": "2025-01-01T00:00:00+00:00", **extra,
    }
    if shots is not None:
        record["shots"] = shots
    return record


def write_records(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['cell_id']}.json").write_text(json.dumps(record))


def table_rows(path):
    """{class: cell string} of a Markdown table with one method column."""
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    return {a.strip(): b.strip() for a, b in rows[1:]}


# ---------------------------------------------------------------- seeds

SEEDS = {  # (category, backbone) -> image AUROC per seed; Fractals/bottle lacks seed 2
    ("carpet", "ImageNet"): (0.90, 0.92, 0.94), ("carpet", "Fractals"): (0.60, 0.70, 0.80),
    ("bottle", "ImageNet"): (0.95, 0.96, 0.97), ("bottle", "Fractals"): (0.50, 0.50),
}


@pytest.fixture
def seeded(tmp_path):
    write_records(tmp_path / "results", [make_record("patchcore", c, b, s, (v, v, v))
                                         for (c, b), values in SEEDS.items() for s, v in enumerate(values)])
    return tmp_path / "results"


def test_several_seeds_show_mean_sd_and_n(seeded, tmp_path):
    out = build_report(seeded, tmp_path / "report", backbones="ImageNet,Fractals", metrics="image_AUROC")
    md = (tmp_path / "report" / "table_mvtec_image_AUROC.md").read_text()
    assert md.splitlines()[0].endswith("Mean±sd over n=3 seeds.")
    # Model Avg sd: of the per-seed averages over the seeds all categories have (Fractals: 0 and 1 only)
    assert table_rows(tmp_path / "report" / "table_mvtec_image_AUROC.md") == {
        "carpet": "92.0±2.0/70.0±10.0", "bottle": "96.0±1.0/50.0±0.0 (n=2)", "Model Avg": "94.0±1.5/60.0±3.5 (n=2)"}
    tex = (tmp_path / "report" / "table_mvtec_image_AUROC.tex").read_text()
    assert r"carpet & 92.0$\pm$2.0/70.0$\pm$10.0 \\" in tex and r"Mean$\pm$sd over n=3 seeds" in tex
    assert out["tables"][0].name == "table_mvtec_image_AUROC.md"


def test_one_seed_per_cell_stays_a_table_of_means(seeded, tmp_path):
    for path in seeded.glob("*_s[12]_*.json"):
        path.unlink()
    build_report(seeded, tmp_path / "report", backbones="ImageNet,Fractals", metrics="image_AUROC")
    assert table_rows(tmp_path / "report" / "table_mvtec_image_AUROC.md") == {
        "carpet": "90.0/60.0", "bottle": "95.0/50.0", "Model Avg": "92.5/55.0"}


# ---------------------------------------------------------------- few-shot

def shot_value(category, backbone, shots):
    """Rises with K; Fractals lower; all training images (None) the highest."""
    k = 64 if shots is None else shots
    return round(0.5 + 0.06 * np.log2(k) - (0.1 if backbone == "Fractals" else 0) + (0.02 if category == "bottle"
                                                                                      else 0), 4)


@pytest.fixture
def fewshot(tmp_path):
    records = [make_record(m, c, b, s, (v := shot_value(c, b, k), v if m == "patchcore" else None, None), shots=k)
               for m in ("patchcore", "panda") for c in ("carpet", "bottle") for b in ("ImageNet", "Fractals")
               for k in (1, 2, 4, None) for s in (0, 1)]
    write_records(tmp_path / "results", records)
    return tmp_path / "results"


def test_fewshot_tables_per_k_and_main_table_unmixed(fewshot, tmp_path):
    out = build_report(fewshot, tmp_path / "report", metrics="image_AUROC,pixel_AUROC")
    names = {p.name for p in out["tables"]}
    for k in ("", "_1shot", "_2shot", "_4shot"):
        assert f"table_mvtec_image_AUROC{k}.md" in names and f"table_mvtec_image_AUROC{k}.tex" in names
    one = pd.read_csv(tmp_path / "report" / "table_mvtec_image_AUROC_1shot.csv", index_col=0)
    assert one.loc["carpet", "PatchCore"] == "50.0±0.0/40.0±0.0"
    assert one.loc["bottle", "PANDA"] == "52.0±0.0/42.0±0.0"
    assert "K=1 normal training images" in (tmp_path / "report" / "table_mvtec_image_AUROC_1shot.md").read_text()
    main = pd.read_csv(tmp_path / "report" / "table_mvtec_image_AUROC.csv", index_col=0)
    assert main.loc["carpet", "PatchCore"] == "86.0±0.0/76.0±0.0"  # only the records without shots
    assert "PANDA" not in (tmp_path / "report" / "table_mvtec_pixel_AUROC_2shot.md").read_text()
    long = pd.read_csv(out["results_long"], dtype={"shots": str})
    assert sorted(set(long["shots"])) == ["1", "2", "4", "all"]
    image = long[long["metric"] == "image_AUROC"]
    assert len(image) == 2 * 2 * 2 * 4 and (image["n"] == 2).all()  # two seeds per (cell, K): none merged across K
    summary = out["summary"].read_text()
    assert "- few-shot K: 1, 2, 4" in summary and out["warnings"] == []


def test_fewshot_figure_per_metric(fewshot, tmp_path):
    out = build_report(fewshot, tmp_path / "report", metrics="image_AUROC,pixel_AUPRO")
    figures = {p.name: p for p in out["figures"]}
    data = figures["fewshot_mvtec_image_AUROC.png"].read_bytes()
    assert data[:8] == PNG_MAGIC
    width, _ = Image.open(figures["fewshot_mvtec_image_AUROC.png"]).size
    assert width == round(2 * 3.6 * DPI)  # two panels: PatchCore and PANDA
    assert any(s.startswith("fewshot_mvtec_pixel_AUPRO.png: no few-shot record") for s in out["skipped"])


def test_records_without_shots_have_no_shots_column(seeded, tmp_path):
    out = build_report(seeded, tmp_path / "report")
    assert "shots" not in pd.read_csv(out["results_long"]).columns


@pytest.mark.parametrize("shots", [0, -2, 1.5, "4", True])
def test_bad_shots_is_a_skipped_record(tmp_path, shots):
    write_records(tmp_path / "results", [make_record("patchcore", "carpet", "ImageNet", 0, (0.9, 0.9, 0.9), shots=1)])
    bad = make_record("patchcore", "carpet", "ImageNet", 1, (0.9, 0.9, 0.9))
    bad["shots"] = shots
    (tmp_path / "results" / "bad.json").write_text(json.dumps(bad))
    records, problems, _ = load_records(tmp_path / "results")
    assert len(records) == 1 and problems == [f"bad.json: shots={shots!r}: must be an integer >= 1 or null"]


# ---------------------------------------------------------------- qualitative

CATEGORY, SIZE = "hazelnut_reduced", 64


def write_maps(results, root, backbone, maps, masks, labels, seed=0):
    """A record and its npz as run_cell(keep_maps=True) writes them (float16 maps, scores = map maxima)."""
    record = make_record("patchcore", CATEGORY, backbone, seed, (0.9, 0.9, 0.9), root=str(root), size=SIZE)
    record["maps"] = f"/elsewhere/results/{MAPS_DIR}/{record['cell_id']}.npz"  # written there, the folder moved since
    write_records(results, [record])
    (results / MAPS_DIR).mkdir(exist_ok=True)
    np.savez_compressed(results / MAPS_DIR / f"{record['cell_id']}.npz", anomaly_maps=maps.astype(np.float16),
                        masks=masks, image_scores=maps.reshape(len(maps), -1).max(1), image_labels=labels)


@pytest.fixture
def kept_maps(tmp_path, realdata):
    test = ADImageDataset(scan("mvtec", realdata, CATEGORY).test, size=SIZE)
    masks = np.stack([item["mask"][0].numpy() for item in test])
    labels = np.array([item["label"] for item in test])
    rng = np.random.default_rng(0)
    good_map = masks * 0.8 + rng.uniform(0, 0.3, masks.shape)  # finds the defects
    poor_map = rng.uniform(0, 1, masks.shape)  # noise
    results = tmp_path / "results"
    write_maps(results, realdata, "ImageNet", good_map, masks, labels)
    write_maps(results, realdata, "Fractals", poor_map, masks, labels)
    write_maps(results, realdata, "Fractals", good_map, masks, labels, seed=1)  # not drawn: the smallest seed is
    return results, good_map


def panel(pixels, row, col):
    """The image area of panel (row, col) of the figure (titles and caption excluded)."""
    side, top = round(PANEL_INCHES * DPI), round(HEADER_INCHES * DPI)
    return pixels[top + row * side + 8: top + (row + 1) * side - 8, col * side + 8: (col + 1) * side - 8]


def test_qualitative_figure_panels(kept_maps, tmp_path):
    results, good_map = kept_maps
    out = build_report(results, tmp_path / "report", backbones="ImageNet,Fractals")
    path = tmp_path / "report" / f"qualitative_mvtec_{CATEGORY}.png"
    assert path in out["figures"]
    image = Image.open(path)
    rows, cols = 3, 2 + 2 * 2  # highest/lowest defect, good; image, truth, (map, mask) x 2 backbones
    assert image.size == (round(cols * PANEL_INCHES * DPI),
                          round((HEADER_INCHES + rows * PANEL_INCHES + CAPTION_INCHES) * DPI))
    pixels = np.asarray(image.convert("RGB")).astype(int)
    for row in range(rows):
        for a, b in ((2, 4), (3, 5)):  # ImageNet's map and mask against Fractals'
            assert np.abs(panel(pixels, row, a) - panel(pixels, row, b)).mean() > 5, (row, a)
    # the good image: ImageNet's thresholded mask is empty (black), Fractals' noise is not
    assert panel(pixels, 2, 3).max() < 30 and panel(pixels, 2, 5).mean() > 30


def test_qualitative_identical_maps_give_identical_columns(kept_maps, tmp_path, realdata):
    results, good_map = kept_maps
    test = scan("mvtec", realdata, CATEGORY).test
    labels = np.array([s.label for s in test])
    masks = good_map > 0.5
    write_maps(results, realdata, "Copy", good_map, masks, labels)  # the same maps as ImageNet under another label
    build_report(results, tmp_path / "report", backbones="ImageNet,Copy")
    pixels = np.asarray(Image.open(tmp_path / "report" / f"qualitative_mvtec_{CATEGORY}.png").convert("RGB"))
    for row in range(3):
        assert np.array_equal(panel(pixels, row, 2), panel(pixels, row, 4))


def test_qualitative_needs_the_dataset_again(kept_maps, tmp_path):
    results, _ = kept_maps
    for path in results.glob("*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "root": str(tmp_path / "moved")}))
    out = build_report(results, tmp_path / "report")
    assert not (tmp_path / "report" / f"qualitative_mvtec_{CATEGORY}.png").exists()
    assert any(s.startswith(f"qualitative_mvtec_{CATEGORY}.png: cannot read the test images again") and "moved" in s
               for s in out["skipped"])


def test_qualitative_figure_from_real_cells(realdata, tmp_path):
    # The maps' contract with ad_eval.cell: two real PatchCore cells (random ResNet-18s of two seeds) with keep_maps,
    # then the report: one figure whose map columns differ.
    from ad_eval.cell import Cell, run_cell

    results = tmp_path / "results"
    for label, seed in (("RandomA", 0), ("RandomB", 1)):
        run_cell(Cell(method="patchcore", dataset="mvtec", root=str(realdata), category=CATEGORY, backbone="random",
                      backbone_name=label, arch="resnet18", size=32, seed=seed), results, device="cpu",
                 keep_maps=True)
    out = build_report(results, tmp_path / "report", metrics="image_AUROC")
    path = tmp_path / "report" / f"qualitative_mvtec_{CATEGORY}.png"
    assert path in out["figures"], out["skipped"]
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape[1] == round(6 * PANEL_INCHES * DPI)
    assert all(np.abs(panel(pixels, row, 2) - panel(pixels, row, 4)).mean() > 1 for row in range(3))


@pytest.mark.parametrize("panels", [1, 3])
def test_figure_title_fits_the_figure(tmp_path, panels):
    """The layer-bar figure of one method is 4 inches wide; its title was cut off at both ends."""
    from ad_eval.report.figures.common import finish_figure, new_figure

    title = "MVTec: average image-level AUROC per layer set"  # layers_figure's title
    fig = new_figure(max(4.0, 3.2 * panels), 3.6)
    for i in range(panels):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.bar([0, 1], [80, 90], label="Fractals")
    finish_figure(fig, ax, title, tmp_path / "bars.png", ncols=1)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    box = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    assert " ".join(fig._suptitle.get_text().split()) == title  # wrapped, nothing dropped
    assert (tmp_path / "bars.png").stat().st_size > 0


@pytest.mark.parametrize("labels", [("ImageNet", "Fractals"),
                                    ("random", "anderson", "selfsup", "ofdb", "mandelbulbvar"),
                                    tuple(f"fractal backbone {i}" for i in range(8))])
def test_legend_fits_the_figure_in_as_few_rows_as_fit(tmp_path, labels):
    """A few-shot figure of one method is 4.5 inches wide: one row of five backbones was cut at both ends."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ad_eval.report.figures.common import finish_figure, new_figure

    fig = new_figure(4.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, label in enumerate(labels):
        ax.plot([0, 1], [i, i + 1], label=label)
    finish_figure(fig, ax, "MVTec: AUPRO against K", tmp_path / "fewshot.png", ncols=len(labels))
    (legend,) = fig.legends
    box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0
    assert [t.get_text() for t in legend.get_texts()] == list(labels)  # every backbone, once
    if len(labels) == 2:
        assert legend._ncols == 2  # short labels keep one row
