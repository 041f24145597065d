"""Tests of ``ad-eval report --control``: each backbone minus a control, paired by seed (ad_eval.report.control).

The fixture: MVTec carpet and bottle x seeds 0-2, PatchCore on a random-init control ("random") and on
"Fractals" = control + a known difference per (category, seed); PANDA (no pixel metrics) on both backbones.

Run: ``python -m pytest -q tests/ad_eval/test_report_control.py``
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report import PNG_MAGIC, make_record, md_row, write_records

from ad_eval.cli import main
from ad_eval.report import build_report

BASE = (0.5, 0.6, 0.4)  # the control's (image_AUROC, pixel_AUROC, pixel_AUPRO) in every cell
# Fractals - control, image AUROC, per (category, seed); pixel AUROC is +0.05 and AUPRO -0.02 everywhere.
IMAGE_DIFF = {("carpet", 0): 0.10, ("carpet", 1): 0.20, ("carpet", 2): -0.06,
              ("bottle", 0): 0.04, ("bottle", 1): 0.00, ("bottle", 2): 0.12}
# per-seed means 0.07, 0.10, 0.03: mean 0.2/3, sd sqrt(0.00246667/2) = 0.0351188, se = sd/sqrt(3)
MEAN_3_SEEDS, SE_3_SEEDS = 0.0666667, 0.0202759
PATCHCORE_ROW = "PatchCore · Fractals"


def control_record(method, category, seed, layers=None, metrics=BASE):
    record = make_record(method, category, "random", layers, seed, metrics)
    record["backbone_spec"] = "random"  # `ad-eval run --backbone random`
    return record


def fractals_metrics(category, seed, offset=0.0):
    image, pixel, pro = BASE
    return image + IMAGE_DIFF[category, seed] + offset, pixel + 0.05, pro - 0.02


def study_records(seeds=(0, 1, 2)):
    records = []
    for category in ("carpet", "bottle"):
        for seed in seeds:
            records += [control_record("patchcore", category, seed),
                        make_record("patchcore", category, "Fractals", None, seed, fractals_metrics(category, seed)),
                        control_record("panda", category, seed, metrics=(0.7, None, None)),
                        make_record("panda", category, "Fractals", None, seed, (0.8, None, None))]
    return records


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    write_records(folder, study_records())
    return folder


def csv_row(out_dir, backbone="Fractals", method="patchcore", name="control_mvtec"):
    table = pd.read_csv(out_dir / f"{name}.csv", dtype=str)
    (row,) = table[(table["method"] == method) & (table["backbone"] == backbone)].to_dict("records")
    return row


def test_three_seeds_mean_and_se_over_seeds(results, tmp_path):
    out = build_report(results, tmp_path / "r", control="random")
    row = csv_row(tmp_path / "r")
    assert float(row["image_AUROC_diff"]) == pytest.approx(MEAN_3_SEEDS, abs=1e-6)
    assert float(row["image_AUROC_se"]) == pytest.approx(SE_3_SEEDS, abs=1e-6)
    assert float(row["pixel_AUROC_diff"]) == pytest.approx(0.05) and float(row["pixel_AUROC_se"]) == pytest.approx(0)
    assert float(row["pixel_AUPRO_diff"]) == pytest.approx(-0.02)
    assert (row["n_seeds"], row["n_categories"], row["se_over"]) == ("3", "2", "seeds")
    # wins / losses: carpet s0, s1 and bottle s0, s2 above the control, carpet s2 below, bottle s1 a tie
    assert (row["image_AUROC_wins"], row["image_AUROC_losses"]) == ("4", "1")
    assert (row["pixel_AUROC_wins"], row["pixel_AUPRO_losses"]) == ("6", "6")
    md = tmp_path / "r" / "control_mvtec.md"
    assert md_row(md, PATCHCORE_ROW) == ["+6.7 ± 2.0", "4/1", "+5.0 ± 0.0", "6/0", "-2.0 ± 0.0", "0/6", "3", "2",
                                         "seeds"]
    caption = md.read_text().splitlines()[0]
    assert "paired by seed" in caption and "standard error over n=3 seeds" in caption and "2 categories" in caption
    assert "random init whose init seed is the cell seed" in caption
    assert {"control_mvtec.md", "control_mvtec.csv"} <= {p.name for p in out["tables"]}


def test_one_seed_se_over_categories(tmp_path):
    write_records(tmp_path / "results", study_records(seeds=(0,)))
    build_report(tmp_path / "results", tmp_path / "r", control="random")
    row = csv_row(tmp_path / "r")
    # carpet +0.10, bottle +0.04: mean 0.07, sd over categories 0.0424264, se = sd / sqrt(2) = 0.03
    assert float(row["image_AUROC_diff"]) == pytest.approx(0.07)
    assert float(row["image_AUROC_se"]) == pytest.approx(0.03)
    assert (row["n_seeds"], row["n_categories"], row["se_over"]) == ("1", "2", "categories")
    md = tmp_path / "r" / "control_mvtec.md"
    assert md_row(md, PATCHCORE_ROW)[:2] == ["+7.0 ± 3.0", "2/0"]
    assert "one seed: standard error over n=2 categories" in md.read_text().splitlines()[0]


def test_seed_missing_a_category_is_dropped(results, tmp_path):
    (results / "patchcore_mvtec_bottle_Fractals_Ldefault_s2.json").unlink()
    build_report(results, tmp_path / "r", control="random")
    row = csv_row(tmp_path / "r")
    # seeds 0 and 1 only (per-seed means 0.07, 0.10): mean 0.085, se = sd / sqrt(2) = 0.015
    assert float(row["image_AUROC_diff"]) == pytest.approx(0.085)
    assert float(row["image_AUROC_se"]) == pytest.approx(0.015)
    assert (row["n_seeds"], row["image_AUROC_wins"], row["image_AUROC_losses"]) == ("2", "3", "0")
    assert csv_row(tmp_path / "r", method="panda")["n_seeds"] == "3"  # the other method keeps its seeds


def test_null_metric_is_a_dash(results, tmp_path):
    build_report(results, tmp_path / "r", control="random")
    assert md_row(tmp_path / "r" / "control_mvtec.md", "PANDA · Fractals") == ["+10.0 ± 0.0", "6/0", "-", "-", "-",
                                                                                "-", "3", "2", "seeds"]
    row = csv_row(tmp_path / "r", method="panda")
    assert row["pixel_AUROC_diff"] == "-" and row["pixel_AUPRO_wins"] == "-"


def test_layer_set_chosen_like_the_tables(results, tmp_path):
    """A PatchCore layer study on 1+2 (Fractals 0.3 higher there): the tables' set 2+3 (reference, tie in cells)
    by default, 1+2 with ``layers``."""
    study = [control_record("patchcore", c, s, layers=("layer1", "layer2")) for c in ("carpet", "bottle")
             for s in (0, 1, 2)]
    study += [make_record("patchcore", c, "Fractals", ("layer1", "layer2"), s, fractals_metrics(c, s, offset=0.3))
              for c in ("carpet", "bottle") for s in (0, 1, 2)]
    write_records(results, study)
    build_report(results, tmp_path / "a", control="random")
    assert float(csv_row(tmp_path / "a")["image_AUROC_diff"]) == pytest.approx(MEAN_3_SEEDS, abs=1e-6)
    build_report(results, tmp_path / "b", control="random", layers={"patchcore": "1,2"})
    assert float(csv_row(tmp_path / "b")["image_AUROC_diff"]) == pytest.approx(MEAN_3_SEEDS + 0.3, abs=1e-6)


def test_forest_plot_written_and_listed(results, tmp_path):
    out = build_report(results, tmp_path / "r", control="random")
    path = tmp_path / "r" / "control_mvtec.png"
    assert path in out["figures"]
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    summary = out["summary"].read_text()
    assert "- control_mvtec.png" in summary and "- control: random;" in summary


def test_fewshot_cells_get_their_own_control_file(tmp_path):
    records = study_records(seeds=(0, 1))
    for record in records:
        record["shots"], record["cell_id"] = 4, record["cell_id"] + "_k4"
    write_records(tmp_path / "results", records)
    out = build_report(tmp_path / "results", tmp_path / "r", control="random")
    names = {p.name for p in out["tables"] + out["figures"]}
    assert {"control_mvtec_4shot.md", "control_mvtec_4shot.csv", "control_mvtec_4shot.png"} <= names
    assert not (tmp_path / "r" / "control_mvtec.md").exists()
    assert float(csv_row(tmp_path / "r", name="control_mvtec_4shot")["image_AUROC_diff"]) == pytest.approx(0.085)
    assert (tmp_path / "r" / "control_mvtec_4shot.md").read_text().startswith("MVTec K=4: difference to the control")


def test_backbone_without_a_pair_is_left_out_with_a_line(results, tmp_path):
    write_records(results, [make_record("patchcore", c, "ImageNet", None, 7, (0.9, 0.9, 0.9))
                            for c in ("carpet", "bottle")])
    out = build_report(results, tmp_path / "r", control="random")
    assert "ImageNet" not in (tmp_path / "r" / "control_mvtec.md").read_text()
    assert "## Not compared with the control (1)\n\n- MVTec: PatchCore / ImageNet: no (category, seed) pair with " \
           "random\n" in out["summary"].read_text()


def test_without_control_nothing_changes(results, tmp_path):
    """No control: no control_* file nor line; with one, every other file but summary.md is the same bytes."""
    out = build_report(results, tmp_path / "r")
    assert not list((tmp_path / "r").glob("control_*"))
    summary = out["summary"].read_text()
    assert "- control:" not in summary and "Not compared" not in summary
    build_report(results, tmp_path / "c", control="random")
    others = sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith("control_"))
    assert others == sorted(p.name for p in (tmp_path / "r").iterdir())
    assert [n for n in others if (tmp_path / "r" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()] == \
        ["summary.md"]


def test_unknown_control_is_one_line_and_writes_nothing(results, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", "--results", str(results), "--out", str(out), "--control", "Random"]) == 2
    err = capsys.readouterr().err
    assert err == "ad-eval: error: control 'Random': no record of that backbone (backbones found: Fractals, random)\n"
    assert main(["report", "--results", str(results), "--out", str(out), "--backbones", "Fractals",
                 "--control", "random"]) == 2
    assert "control 'random': not among the backbones asked for (Fractals)" in capsys.readouterr().err
    assert not out.exists()


def test_cli_control(results, tmp_path):
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r"), "--control", "random"]) == 0
    assert md_row(tmp_path / "r" / "control_mvtec.md", PATCHCORE_ROW)[:2] == ["+6.7 ± 2.0", "4/1"]


def test_interval_factor_is_students_t_on_the_units_of_the_se():
    from ad_eval.report.control import Comparison

    def comparison(seeds, categories):
        return Comparison("patchcore", "Fractals", tuple(range(seeds)), tuple("abcdef"[:categories]), {})

    assert comparison(3, 2).t95 == pytest.approx(4.303, abs=1e-3)  # over 3 seeds: 2 degrees of freedom
    assert comparison(6, 1).t95 == pytest.approx(2.571, abs=1e-3)
    assert comparison(1, 5).t95 == pytest.approx(2.776, abs=1e-3)  # one seed: over 5 categories
    assert math.isnan(comparison(1, 1).t95)
