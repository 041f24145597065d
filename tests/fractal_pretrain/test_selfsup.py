"""Two-view self-supervised pre-training (model.objective: simsiam) on CPU: the loss, the optimiser groups,
the smoke config end to end to a backbone ad_eval loads, exact resume, bad input."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import assert_split_run_equals_straight_run, fit_command

from fractal_pretrain.cli import main
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.train.knn import knn_top1
from fractal_pretrain.train.objectives import SimSiam, normalised_std

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "jobs" / "pretrain" / "selfsup_smoke.yaml")


fit_args = partial(fit_command, SMOKE)


def metrics(root: Path) -> list[dict[str, str]]:
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_simsiam_loss_equals_a_direct_transcription():
    torch.manual_seed(0)
    objective = SimSiam(features=12, dim=6, pred_dim=3).train()
    backbone = torch.nn.Linear(5, 12)
    x1, x2 = torch.randn(7, 5), torch.randn(7, 5)
    loss, stats = objective(backbone, x1, x2)
    # SimSiam paper, Algorithm 1: D(p, z) = -(normalize(p) * normalize(z.detach())).sum(1).mean()
    z1, z2 = objective.projector(backbone(x1)), objective.projector(backbone(x2))
    p1, p2 = objective.predictor(z1), objective.predictor(z2)

    def d(p, z):
        return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()

    torch.testing.assert_close(loss, d(p1, z2) / 2 + d(p2, z1) / 2)
    assert -1.0 <= loss.item() <= 1.0
    zn = z1 / z1.norm(dim=1, keepdim=True)
    torch.testing.assert_close(stats["z_std"], zn.std(dim=0).mean())


def test_no_gradient_flows_through_the_target_branch():
    torch.manual_seed(1)
    objective = SimSiam(features=8, dim=4, pred_dim=2).train()
    backbone = torch.nn.Linear(3, 8)
    x1, x2 = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    # Only the predicted branch D(p1, z2) of a one-sided loss: x2 enters through z2 alone, the target.
    z1, z2 = objective.projector(backbone(x1)), objective.projector(backbone(x2))
    from fractal_pretrain.train.objectives import negative_cosine

    negative_cosine(objective.predictor(z1), z2).backward()
    assert x2.grad is None or torch.count_nonzero(x2.grad) == 0
    assert torch.count_nonzero(x1.grad) > 0


def test_normalised_std_shows_collapse():
    healthy = torch.randn(512, 64)
    assert abs(normalised_std(healthy).item() - 64 ** -0.5) < 0.01
    collapsed = torch.ones(512, 64) + 1e-6 * torch.randn(512, 64)
    assert normalised_std(collapsed).item() < 1e-4


def test_knn_top1_on_separable_and_random_features():
    labels = torch.arange(4).repeat_interleave(5)
    clustered = F.one_hot(labels, 4).float() + 0.01 * torch.randn(20, 4)
    assert knn_top1(clustered, labels, k=3, classes=4) == 1.0
    same = torch.ones(20, 4)  # every neighbour equally close: no better than chance on average
    assert knn_top1(same, labels, k=3, classes=4) <= 0.5


def test_smoke_config_end_to_end_to_a_backbone_ad_eval_loads(tmp_path):
    from ad_eval.backbones import load_backbone

    assert main(fit_args(tmp_path)) == 0
    rows = metrics(tmp_path)
    # decay_norm_and_bias false (the anchor's): backbone + projector decayed, spared; predictor decayed, spared
    body = [float(r["lr-SGD/pg1"]) for r in rows if r.get("lr-SGD/pg1")]
    assert body == [float(r["lr-SGD/pg2"]) for r in rows if r.get("lr-SGD/pg2")]
    head = [float(r[f"lr-SGD/pg{g}"]) for g in (3, 4) for r in rows if r.get(f"lr-SGD/pg{g}")]
    scaled = 0.05 * 8 / 256  # model.lr x batch / 256
    assert len(body) >= 3 and body[0] > body[-1] and max(body) <= scaled + 1e-12  # one-cycle decay
    assert head == [pytest.approx(scaled)] * len(head)  # the predictor's lr is fixed
    z_std = [float(r["train/z_std"]) for r in rows if r.get("train/z_std")]
    assert z_std and all(0.02 < v < 0.2 for v in z_std)  # ~1/sqrt(256) = 0.0625, not collapsed
    knn = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 1.0
    state = torch.load(tmp_path / "backbone.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("fc.", "objective.", "projector", "predictor")) for k in state)
    backbone = load_backbone(str(tmp_path / "backbone.pt"))
    assert backbone.arch == "resnet18"
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["recipe"] == "selfsup" and meta["recipe_config"]["views"] == 2 and meta["objective"] == "simsiam"


def test_resumed_two_view_run_equals_uninterrupted_run(tmp_path):
    # one-cycle fixes its length at the start, so the split run uses a cosine of a set length
    common = ("--checkpoint_every_n_steps", "1", "--data.val_samples", "0", "--model.knn_classes", "0",
              "--model.schedule", "cosine", "--model.cosine_steps", "4")
    assert_split_run_equals_straight_run(fit_args, tmp_path, 2, ("--trainer.max_steps", "4"), common)
    ca = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    cb = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in (k for k in ca if k.startswith("objective.")):  # the heads resume too
        torch.testing.assert_close(ca[key], cb[key], rtol=1e-6, atol=1e-7, msg=key)
    # under the cosine too, the predictor keeps lr x batch / 256 while the rest decays
    groups = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    fixed = [g["lr"] for g in groups["param_groups"] if g.get("fixed_lr") is not None]
    scheduled = [g["lr"] for g in groups["param_groups"] if g.get("fixed_lr") is None]
    assert fixed == [pytest.approx(0.05 * 8 / 256)] * 2 and scheduled and max(scheduled) < fixed[0]


@pytest.mark.parametrize("extra,message", [
    (("--data.recipe", "anderson", "--data.recipe_overrides", "{num_classes: 4, num_points: 2000}"),
     "model.objective=simsiam: needs a two-view recipe"),
    (("--model.projector_dim", "0"), "model.projector_dim=0"),
    (("--model.objective", "byol"), "model.objective='byol': must be one of classification, multilabel, simsiam"),
    (("--model.objective", "classification"), "model.objective=classification: a two-view recipe"),
    (("--model.label_smoothing", "0.1"), "model.label_smoothing=0.1: model.objective=simsiam has no labels"),
    (("--data.source", "folder", "--data.path", "images"),  # was: simsiam 'needs a two-view recipe', of selfsup
     "data.recipe=selfsup: its 2 views are rendered on the fly; data.source=folder gives one image per sample"),
])
def test_bad_two_view_config_is_one_line(tmp_path, capsys, extra, message):
    assert main(fit_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "backbone.pt").exists()


@pytest.mark.parametrize("extra,message", [
    (("--data.batch_size", "1"), "data.batch_size=1: two-view training needs at least 2 samples per rank"),
    (("--data.samples_per_epoch", "9"), "samples_per_epoch=9: the last step would hold 1 sample(s) for 1 ranks; "
                                        "two-view training needs 2 per rank"),
])
def test_a_batch_of_one_pair_is_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    # the projector's BatchNorm cannot train on one sample: a traceback mid-run before this check
    root = tmp_path / "run"
    assert main(fit_args(root, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and sum(line.startswith("fractal-pretrain: error:") for line in err) == 1, err
    assert not root.exists()


def test_the_last_step_gives_every_rank_two_samples_of_a_two_view_epoch():
    from fractal_pretrain.config import ConfigError
    from fractal_pretrain.train.data import steps_per_epoch

    assert steps_per_epoch(20, 8, 2, per_rank=2) == 2  # last step: 4 samples, 2 per rank
    with pytest.raises(ConfigError, match="would hold 3 sample"):
        steps_per_epoch(19, 8, 2, per_rank=2)
    assert steps_per_epoch(19, 8, 2) == 2  # supervised: one sample per rank is enough


def test_a_sigterm_is_a_failure_status_and_the_same_command_finishes_the_run(tmp_path, capsys):
    # Lightning ends a SIGTERMed fit with a SystemExit without a code: status 0 and no backbone.pt looked
    # like a finished run to `fit ... && ad-eval run ...`.
    args = fit_args(tmp_path, "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "1",
                    "--data.val_samples", "0", "--model.knn_classes", "0")
    assert main([*args, "--trainer.callbacks+=fit_helpers.SignalAtStep"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fractal-pretrain fit: stopped by SIGTERM at step 2, not finished; the same command resumes "
                       f"from {tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert not (tmp_path / "backbone.pt").exists()
    assert main(args) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert json.loads((tmp_path / "backbone.json").read_text())["steps"] == 4


def test_the_short_gpu_config_shrunk_for_a_cpu_try_names_its_val_check_interval(tmp_path, capsys):
    # its val_check_interval (2000 steps) outlasts a shrunk epoch: Lightning's traceback after the run
    # directory was made, before this check
    short = str(REPO / "jobs" / "pretrain" / "selfsup_short_r50.yaml")
    root = tmp_path / "run"
    args = fit_command(short, root, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                       "--data.size", "32", "--data.batch_size", "4", "--data.samples_per_epoch", "8",
                       "--data.recipe_overrides", "{num_classes: 8}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fractal-pretrain: error: trainer.val_check_interval=2000: more than the 2 training "
                              "steps of an epoch"), err
    assert not root.exists()
    # counted across epochs, the same interval is fine (no error before training starts)
    from fractal_pretrain.train.cli import check_val_interval, make_cli
    cli = make_cli([*args[1:], "--trainer.check_val_every_n_epoch", "null"])
    check_val_interval(cli.trainer, 2)


def test_a_run_resumed_after_a_requeue_stop_writes_its_backbone(tmp_path, capsys):
    # SIGUSR1 (checkpoint and stop) leaves the REQUEUE marker; outside Slurm nothing removes it, so the resumed
    # run used to finish without backbone.pt and without a word
    args = fit_args(tmp_path, "--trainer.max_steps", "4", "--requeue_check_every", "1", "--data.val_samples", "0",
                    "--model.knn_classes", "0")
    assert main([*args, "--trainer.callbacks+=fit_helpers.SignalAtStep", "--trainer.callbacks.signame=SIGUSR1"]) == 0
    assert "requeue requested: checkpoint at step 2" in capsys.readouterr().out
    assert (tmp_path / "REQUEUE").is_file() and not (tmp_path / "backbone.pt").exists()
    assert main(args) == 0
    assert not (tmp_path / "REQUEUE").exists()
    assert json.loads((tmp_path / "backbone.json").read_text())["steps"] == 4


def test_the_fixed_lr_groups_hold_exactly_the_predictor_whether_norms_and_biases_decay_or_not():
    from fractal_pretrain.train.model import FractalClassifier

    for decay in (True, False):
        model = FractalClassifier(arch="resnet18", num_classes=4, objective="simsiam", views=2, projector_dim=32,
                                  predictor_dim=8, decay_norm_and_bias=decay)
        groups = model.build_optimizer(0.02).param_groups
        fixed = [id(p) for g in groups if g.get("fixed_lr") is not None for p in g["params"]]
        assert sorted(fixed) == sorted(id(p) for p in model.objective.predictor.parameters())
        assert all(g["fixed_lr"] == 0.02 for g in groups if g.get("fixed_lr") is not None)
        assert len(groups) == (2 if decay else 4)


def test_knn_probe_systems_are_held_out_from_the_training_bank():
    from fractal_pretrain.ifs.bank import cached_bank
    from fractal_pretrain.train.knn import probe_seed, render_probe_images

    spec = get_recipe("anderson", {"num_classes": 3, "num_points": 2000}).bank_spec()
    assert probe_seed(0) != 0 and probe_seed(2**32 - 1) != 2**32 - 1
    training, probe = cached_bank(spec, 0), cached_bank(spec, probe_seed(0))
    assert not any(np.array_equal(training.system(k), probe.system(j)) for k in range(3) for j in range(3))
    settings = dict(size=32, seed=0, device="cpu-reference", num_points=2000, chains=64, dtype="float32",
                    channels_last=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    images, labels = render_probe_images(3, 2, **settings)
    assert images.shape == (6, 3, 32, 32) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    again, _ = render_probe_images(3, 2, **settings)
    assert torch.equal(images, again)  # one fixed set per run seed
    other, _ = render_probe_images(3, 2, **{**settings, "seed": 1})
    assert not torch.equal(images, other)
