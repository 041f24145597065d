"""Tests of ad_eval.report: the paper's tables (Markdown, CSV, LaTeX), figures and summary from cell records.

The fixture is a hand-written results folder: MVTec carpet and bottle x PatchCore and PaDiM x ImageNet and
Fractals, with PaDiM/bottle/Fractals missing, PatchCore/carpet/ImageNet run with two seeds, a PatchCore layer
study (2+3, the reference set, and 1+2), one failure record, one file that is not JSON, one record with the
anomalib AUPRO bug of the paper (1.21) and files the report must ignore.

Run: ``python -m pytest -q tests/ad_eval/test_report.py``
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from ad_eval.report import build_report, load_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (method, category, backbone, layers, seed) -> (image_AUROC, pixel_AUROC, pixel_AUPRO)
VALUES = {
    ("patchcore", "carpet", "ImageNet", ("layer2", "layer3"), 0): (0.981, 0.987, 0.927),
    ("patchcore", "carpet", "ImageNet", ("layer2", "layer3"), 1): (0.987, 0.989, 0.921),
    ("patchcore", "carpet", "Fractals", ("layer2", "layer3"), 0): (0.654, 0.727, 0.314),
    ("patchcore", "bottle", "ImageNet", None, 0): (1.0, 0.980, 0.928),  # null = the reference set 2+3
    ("patchcore", "bottle", "Fractals", None, 0): (0.882, 0.844, 0.648),
    ("padim", "carpet", "ImageNet", None, 0): (0.990, 0.988, 0.953),
    ("padim", "carpet", "Fractals", None, 0): (0.425, 0.732, 0.396),
    ("padim", "bottle", "ImageNet", None, 0): (0.998, 0.983, 0.951),
    # padim / bottle / Fractals: missing
    ("patchcore", "carpet", "ImageNet", ("layer1", "layer2"), 0): (0.970, 0.975, 0.901),
    ("patchcore", "carpet", "Fractals", ("layer1", "layer2"), 0): (0.702, 0.781, 0.402),
    ("patchcore", "bottle", "ImageNet", ("layer1", "layer2"), 0): (0.991, 0.978, 0.912),
    ("patchcore", "bottle", "Fractals", ("layer1", "layer2"), 0): (0.903, 0.861, 0.688),
}

# Bold (as the paper's red/blue): the best value of each row per backbone.
EXPECTED_IMAGE_MD = """\
MVTec image-level AUROC (%). Each cell carries the results for ImageNet/Fractals. Bold: the best value of its \
row per backbone.

| Class     |          PatchCore |         PaDiM |
|:----------|-------------------:|--------------:|
| carpet    |      98.4/**65.4** | **99.0**/42.5 |
| bottle    | **100.0**/**88.2** |        99.8/- |
| Model Avg |      99.2/**76.8** |    **99.4**/- |
"""

EXPECTED_AUPRO_CSV = """\
Class,PatchCore,PaDiM
carpet,92.4/31.4,95.3/39.6
bottle,92.8/64.8,95.1/-
Model Avg,92.6/48.1,95.2/-
"""


def make_record(method, category, backbone, layers, seed, metrics, dataset="mvtec"):
    label = "+".join(name[-1] for name in layers) if layers else "default"
    cell_id = f"{method}_{dataset}_{category}_{backbone}_L{label}_s{seed}"
    image, pixel, pro = metrics
    return {
        "cell_id": cell_id, "method": method, "dataset": dataset, "category": category, "backbone": backbone,
        "backbone_spec": f"/weights/{backbone}.pt", "arch": "wide_resnet50_2", "layers": layers and list(layers),
        "size": 256, "crop": None, "seed": seed, "config": {}, "image_AUROC": image, "pixel_AUROC": pixel,
        "pixel_AUPRO": pro, "wall_time_s": 12.5, "peak_memory_mb": 2048.0, "device": "cpu",
        "versions": {"anomalib": "2.7.0"}, "finished_at": "2025-01-01T00:00:00+00:00",
    }


def md_row(path, name) -> list[str]:
    """The cells of row ``name`` of a Markdown table file, stripped."""
    (row,) = [line for line in path.read_text().splitlines() if line.startswith(f"| {name} ")]
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def write_records(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['cell_id']}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    write_records(folder, [make_record(*key, metrics) for key, metrics in VALUES.items()])
    failed = make_record("patchcore", "grid", "Fractals", None, 0, (None, None, None))
    (folder / "patchcore_mvtec_grid_Fractals_Ldefault_s0.failed.json").write_text(json.dumps({
        "cell_id": failed["cell_id"], "method": "patchcore", "dataset": "mvtec", "category": "grid",
        "error": "RuntimeError: CUDA out of memory", "traceback": "Traceback (most recent call last):\n  ...",
    }))
    (folder / "broken.json").write_text('{"cell_id": "patchcore_mvtec_tile_ImageNet", "image_AUROC": 0.9')
    bug = make_record("fastflow", "carpet", "ImageNet", None, 0, (0.986, 0.982, 1.21))  # the paper's anomalib bug
    (folder / "fastflow_bug.json").write_text(json.dumps(bug))
    (folder / "notes.txt").write_text("not a record")
    (folder / ".padim_mvtec_bottle_Fractals.json.tmp").write_text("{")  # half-written, hidden
    return folder


@pytest.fixture
def report(results, tmp_path):
    return build_report(results, tmp_path / "report")


def test_image_table_markdown_exact(report, tmp_path):
    assert (tmp_path / "report" / "table_mvtec_image_AUROC.md").read_text() == EXPECTED_IMAGE_MD


def test_aupro_table_csv_exact(report, tmp_path):
    # Model Avg PatchCore ImageNet: (0.924 + 0.928) / 2 -> 92.6, carpet being the mean of two seeds (0.927, 0.921).
    assert (tmp_path / "report" / "table_mvtec_pixel_AUPRO.csv").read_text() == EXPECTED_AUPRO_CSV


def test_all_tables_written(report, tmp_path):
    names = {p.name for p in report["tables"]}
    assert names == {f"table_mvtec_{m}.{ext}" for m in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
                     for ext in ("md", "csv", "tex")}
    assert all((tmp_path / "report" / name).stat().st_size > 0 for name in names)


def test_missing_cell_and_incomplete_average_are_dashes(report, tmp_path):
    table = pd.read_csv(tmp_path / "report" / "table_mvtec_pixel_AUROC.csv", index_col=0)
    assert table.loc["bottle", "PaDiM"] == "98.3/-"
    assert table.loc["Model Avg", "PaDiM"] == "98.6/-"  # ImageNet complete, Fractals lacks bottle
    assert report["missing"] == [("mvtec", "padim", "bottle", "Fractals")]
    assert "MVTec: PaDiM / bottle / Fractals" in report["summary"].read_text()


def test_latex(report, tmp_path):
    tex = (tmp_path / "report" / "table_mvtec_image_AUROC.tex").read_text()
    assert r"\begin{tabular}{lcc}" in tex
    assert r"Class & PatchCore & PaDiM \\" in tex
    assert r"Model Avg & 99.2/\textbf{76.8} & \textbf{99.4}/- \\" in tex
    assert r"image-level AUROC (\%)" in tex


def test_corrupt_files_reported_by_name_and_skipped(results, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ad_eval.report"):
        out = build_report(results, tmp_path / "report")
    assert [p.split(":")[0] for p in out["problems"]] == ["broken.json", "fastflow_bug.json"]
    assert "pixel_AUPRO=1.21" in out["problems"][1]
    assert "broken.json" in caplog.text and "fastflow_bug.json" in caplog.text
    summary = out["summary"].read_text()
    assert "- corrupt files skipped: 2" in summary and "`broken.json`: not valid JSON" in summary
    # the bug record is not a result: FastFlow has no column anywhere, nor does anything read notes.txt
    assert all("FastFlow" not in p.read_text() for p in out["tables"])
    assert "notes.txt" not in summary and ".tmp" not in summary


def test_failures_listed_not_used(report):
    assert [f["file"] for f in report["failures"]] == ["patchcore_mvtec_grid_Fractals_Ldefault_s0.failed.json"]
    summary = report["summary"].read_text()
    assert "- failures: 1" in summary and "RuntimeError: CUDA out of memory" in summary
    table = report["tables"][0].read_text()
    assert "grid" not in table


def test_seeds_averaged_in_long_csv(report):
    long = pd.read_csv(report["results_long"], dtype={"seeds": str})
    row = long[(long.method == "patchcore") & (long.category == "carpet") & (long.backbone == "ImageNet")
               & (long.layer_set == "2+3") & (long.metric == "image_AUROC")].iloc[0]
    assert row["n"] == 2 and row["seeds"] == "0,1"
    assert row["mean"] == pytest.approx(0.984) and row["std"] == pytest.approx(0.0042426, abs=1e-6)
    assert bool(row["in_tables"])
    study = long[(long.layer_set == "1+2")]
    assert len(study) == 4 * 3 and not study["in_tables"].any()


def test_layer_set_of_tables(results, tmp_path):
    default = build_report(results, tmp_path / "a")  # 2+3 and 1+2 have 4 cells each: the reference set wins
    assert md_row(default["tables"][0], "carpet")[0] == "98.4/**65.4**"
    chosen = build_report(results, tmp_path / "b", layers={"patchcore": "1,2"})
    assert md_row(chosen["tables"][0], "carpet")[0] == "97.0/**70.2**"


def test_figures_are_pngs(report, tmp_path):
    names = sorted(p.name for p in report["figures"])
    assert names == ["layers_mvtec_image_AUROC.png", "layers_mvtec_pixel_AUPRO.png", "layers_mvtec_pixel_AUROC.png",
                     "spider_mvtec_image_AUROC.png"]
    for path in report["figures"]:
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    # PaDiM lacks bottle for Fractals: left out of the spider chart, and the summary says so
    assert "spider_mvtec_image_AUROC.png: PaDiM left out" in report["summary"].read_text()


def test_layer_study_on_fewer_categories(results, tmp_path):
    (results / "patchcore_mvtec_bottle_Fractals_L1+2_s0.json").unlink()
    out = build_report(results, tmp_path / "report", metrics="image_AUROC")
    assert "layers_mvtec_image_AUROC.png" in [p.name for p in out["figures"]]
    assert ("layers_mvtec_image_AUROC.png: PatchCore: bars average the 1 of 2 categories with a value for every "
            "layer set and backbone (carpet)") in out["summary"].read_text()
    # the main table (layer set 2+3) is unaffected
    assert md_row(out["tables"][0], "bottle")[0] == "**100.0**/**88.2**"


def test_backbone_order_and_selection(results, tmp_path):
    out = build_report(results, tmp_path / "r", backbones="Fractals,ImageNet", metrics=["image_AUROC"])
    assert md_row(out["tables"][0], "carpet") == ["**65.4**/98.4", "42.5/**99.0**"]
    only = build_report(results, tmp_path / "s", backbones=["ImageNet"], metrics=["image_AUROC"])
    assert md_row(only["tables"][0], "bottle") == ["**100.0**", "99.8"]
    assert only["missing"] == []
    assert any("Fractals left out" in w for w in only["warnings"])


def test_image_level_method_has_no_pixel_column(tmp_path):
    folder = tmp_path / "results"
    write_records(folder, [make_record("panda", "candle", b, None, 0, (v, None, None), dataset="visa")
                           for b, v in (("ImageNet", 0.884), ("Fractals", 0.679))]
                  + [make_record("rd", "pcb1", "ImageNet", None, 0, (0.970, 0.996, 0.956), dataset="visa")])
    out = build_report(folder, tmp_path / "report")
    image = (tmp_path / "report" / "table_visa_image_AUROC.md").read_text().splitlines()
    assert image[2:] == ["| Class     |         RD |             PANDA |",
                         "|:----------|-----------:|------------------:|",
                         "| candle    |        -/- | **88.4**/**67.9** |",
                         "| pcb1      | **97.0**/- |               -/- |",
                         "| Model Avg |        -/- |               -/- |"]
    assert "PANDA" not in (tmp_path / "report" / "table_visa_pixel_AUROC.md").read_text()
    assert any(s.startswith("layers_visa_image_AUROC.png: no method") for s in out["skipped"])
    # neither method has a value in every group (pcb, multi-in) for every backbone: no spider chart, and why
    assert "spider_visa_image_AUROC.png: RD left out (a group lacks a value for some backbone); PANDA left out" \
        in "\n".join(out["skipped"])
    assert not (tmp_path / "report" / "spider_visa_image_AUROC.png").exists()


def test_duplicate_seed_keeps_latest(results, tmp_path):
    older = make_record("padim", "carpet", "Fractals", None, 0, (0.111, 0.222, 0.333))
    older["finished_at"] = "2024-01-01T00:00:00+00:00"
    (results / "padim_old.json").write_text(json.dumps(older))
    out = build_report(results, tmp_path / "report", metrics="image_AUROC")
    assert md_row(out["tables"][0], "carpet") == ["98.4/**65.4**", "**99.0**/42.5"]
    assert any(w.startswith("padim_old.json: same cell and seed") for w in out["warnings"])


def test_load_records_resolves_null_layers(results):
    records, problems, failures = load_records(results)
    assert len(records) == len(VALUES) and len(problems) == 2 and len(failures) == 1
    bottle = records[(records.method == "patchcore") & (records.category == "bottle")
                     & (records.backbone == "ImageNet")]
    assert sorted(bottle["layer_set"]) == ["1+2", "2+3"]
    assert set(records.loc[records.method == "padim", "layers"]) == {("layer1", "layer2", "layer3")}


def test_empty_folder(tmp_path):
    (tmp_path / "results").mkdir()
    out = build_report(tmp_path / "results", tmp_path / "report")
    assert out["tables"] == [] and out["figures"] == []
    assert "- records read: 0;" in out["summary"].read_text()
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nowhere", tmp_path / "report")


def test_cli_prints_the_warnings(results, tmp_path, capsys):
    """A --backbones typo, an empty results folder and failed cells are said on stderr, not only in summary.md."""
    from ad_eval.cli import main

    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r1"),
                 "--backbones", "ImageNet,Fractal"]) == 0
    err = capsys.readouterr().err
    assert "warning: backbone 'Fractal' has no record" in err
    assert "warning: 1 failed cell(s)" in err and "broken.json" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")]) == 0
    assert f"warning: no cell record (<cell_id>.json) in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_summary_names_what_is_absent_or_unusable(results, tmp_path):
    """The summary's lines for an unknown layer set of the tables, a method left without a column, categories
    without a record, a failed cell that also has a result, and a record with a null metric."""
    done = make_record("patchcore", "grid", "Fractals", None, 0, (0.9, 0.9, None))  # the failed cell, run again
    (results / f"{done['cell_id']}.json").write_text(json.dumps(done))
    out = build_report(results, tmp_path / "report", metrics="pixel_AUPRO", layers={"padim": "1,2"})
    assert out["warnings"] == ["layers['padim'] = 1+2: no record of padim with that layer set",
                               "MVTec: PaDiM has records but none with the tables' layer set 1+2: no column"]
    summary = out["summary"].read_text()
    absent = next(line for line in summary.splitlines() if line.startswith("- MVTec: no record for"))
    assert absent.startswith("- MVTec: no record for 12 of 15 categories (") and "leather" in absent
    assert not any(c in absent for c in ("carpet", "grid", "bottle"))
    assert "`patchcore_mvtec_grid_Fractals_Ldefault_s0` (patchcore_mvtec_grid_Fractals_Ldefault_s0.failed.json): " \
           "RuntimeError: CUDA out of memory (a result exists too)" in summary
    assert "## Missing values (a record with a null metric) (1)\n\n- MVTec AUPRO: PatchCore / grid / Fractals\n" \
        in summary


def test_best_of_each_row_per_backbone_is_bold_in_markdown_and_latex_only():
    from ad_eval.report.stats import Stat
    from ad_eval.report.tables import make_table, to_latex, to_markdown

    stats = {("a", "m1", "I"): Stat({0: 0.9804}), ("a", "m2", "I"): Stat({0: 0.9796}),  # both print 98.0: a tie
             ("a", "m1", "F"): Stat({0: 0.5}), ("b", "m1", "I"): Stat({0: 0.7}), ("b", "m2", "I"): Stat({0: 0.8}),
             ("b", "m1", "F"): Stat({0: 0.6}), ("b", "m2", "F"): Stat({0: 0.4})}
    table, note = make_table(stats, ["a", "b"], ["m1", "m2"], ["I", "F"])
    assert note == " Bold: the best value of its row per backbone."
    assert table.loc["a"].tolist() == ["98.0/50.0", "98.0/-"]  # the CSV's cells stay plain
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in to_markdown(table, "t").splitlines()[4:]}
    assert rows == {"a": ["**98.0**/**50.0**", "**98.0**/-"], "b": ["70.0/**60.0**", "**80.0**/40.0"],
                    "Model Avg": ["84.0/**55.0**", "**89.0**/-"]}  # a missing value never wins
    assert r"b & 70.0/\textbf{60.0} & \textbf{80.0}/40.0 \\" in to_latex(table, "t", "tab:t")
    single, note = make_table(stats, ["a", "b"], ["m1"], ["I", "F"])  # one method: nothing to compare
    assert note == "" and "**" not in to_markdown(single, "t") and r"\textbf" not in to_latex(single, "t", "tab:t")


def test_cli_layers_choose_the_tables_layer_set(results, tmp_path, capsys):
    """``--layers METHOD=SET`` is build_report's ``layers``: the table of PatchCore on layers 1+2 (the layer study)."""
    from ad_eval.cli import main

    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r"), "--layers", "patchcore=1+2"]) == 0
    assert md_row(tmp_path / "r" / "table_mvtec_image_AUROC.md", "carpet")[0] == "97.0/**70.2**"
    capsys.readouterr()
    for bad, message in (("patchcore", "--layers 'patchcore': expected METHOD=SET"),
                         ("patchcor=1,2", "unknown method 'patchcor'"),
                         ("fastflow=2", "fastflow only supports layers layer1, layer2, layer3, not layer2"),
                         ("padim=5", "'5' is not one of 1, 2, 3, 4")):
        assert main(["report", "--results", str(results), "--out", str(tmp_path / "bad"), "--layers", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ad-eval: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_projected_variant_is_its_own_backbone(tmp_path):
    """Issue 14: records of ``--projector`` cells carry the label ``<backbone>+adapt`` and the report shows them
    beside the raw backbone, not averaged into it."""
    folder = tmp_path / "results"
    write_records(folder, [make_record("patchcore", "carpet", "Fractals", None, 0, (0.654, 0.727, 0.314)),
                           make_record("patchcore", "carpet", "Fractals+adapt", None, 0, (0.702, 0.741, 0.355))])
    out = build_report(folder, tmp_path / "r", backbones="Fractals,Fractals+adapt", metrics=["image_AUROC"])
    table = out["tables"][0].read_text()
    assert "Fractals/Fractals+adapt" in table and "65.4/70.2" in table
