"""The hand-off the project exists for: ``fractal-pretrain fit`` -> ``backbone.pt`` -> ``ad-eval run``."""

from __future__ import annotations

import json
from pathlib import Path

from ad_eval.cli import main as ad_eval
from ad_eval.synthetic import make_mvtec_like
from fractal_pretrain.cli import main as fractal_pretrain
from fractal_pretrain.handoff import FORMAT, META_NAME, WEIGHTS_NAME

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "pretrain" / "smoke.yaml"


def test_pretrained_backbone_is_evaluated_and_the_record_names_its_pretraining(tmp_path):
    run = tmp_path / "pretrain"
    assert fractal_pretrain([
        "fit", "--config", str(SMOKE), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--data.size", "32", "--data.batch_size", "4",
        "--data.samples_per_epoch", "8", "--data.val_samples", "0", "--data.seed", "5",
        "--data.recipe_overrides", "{num_classes: 4, num_points: 2000}"]) == 0
    meta = json.loads((run / META_NAME).read_text())
    assert meta["format"] == FORMAT and meta["steps"] == 2 and meta["seed"] == 5

    data = make_mvtec_like(tmp_path / "data", categories=("object",), n_train=4, n_test_good=2, n_test_defect=1,
                           size=32)
    out = tmp_path / "results"
    assert ad_eval(["run", "--method", "panda", "--dataset", "mvtec", "--root", str(data), "--category", "object",
                    "--backbone", str(run / WEIGHTS_NAME), "--size", "32", "--device", "cpu", "--out", str(out)]) == 0
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["backbone"] == "pretrain" and record["arch"] is None  # the label comes from the folder
    assert (record["backbone_recipe"], record["backbone_seed"], record["backbone_steps"]) == ("anderson", 5, 2)
    assert 0.0 <= record["image_AUROC"] <= 1.0 and record["num_test"] == 4
