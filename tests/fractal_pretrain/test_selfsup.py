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
from fractal_pretrain.train.objectives import BYOL, SimSiam, effective_rank, normalised_std, pair_gap

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


def test_byol_loss_targets_the_momentum_copy_and_trains_only_the_online_side():
    torch.manual_seed(2)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.BatchNorm1d(12))
    objective = BYOL(features=12, dim=6, pred_dim=10, backbone=backbone).train()
    x1, x2 = torch.randn(7, 5), torch.randn(7, 5)
    loss, stats = objective(backbone, x1, x2, diagnostics=True)
    # at the start the target equals the online network: its projections are the online z, without gradient
    z1, z2 = objective.projector(backbone(x1)), objective.projector(backbone(x2))
    p1, p2 = objective.predictor(z1), objective.predictor(z2)

    def d(p, z):
        return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()

    torch.testing.assert_close(loss, d(p1, z2) / 2 + d(p2, z1) / 2)
    assert set(stats) == {"z_std", "z_rank", "pair_gap"}
    loss.backward()
    target = [*objective.target_backbone.parameters(), *objective.target_projector.parameters()]
    assert target and all(p.grad is None and not p.requires_grad for p in target)
    assert all(p.grad is not None for p in [*backbone.parameters(), *objective.predictor.parameters()])
    grouped = {id(p) for g in objective.param_groups(backbone, 0.1) for p in g["params"]}
    assert not grouped & {id(p) for p in target}  # the optimiser never sees the target
    assert len(grouped) == len([*backbone.parameters(), *objective.projector.parameters(),
                                *objective.predictor.parameters()])


@pytest.mark.parametrize("progress,tau", [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0)])
def test_byol_target_moves_toward_the_online_network_by_the_cosine_momentum(progress, tau):
    torch.manual_seed(3)
    backbone = torch.nn.Linear(4, 8)
    objective = BYOL(features=8, dim=3, pred_dim=5, backbone=backbone)
    before = [p.clone() for p in objective.target_backbone.parameters()]
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p))  # an optimiser step
    objective.after_step(backbone, progress)
    for old, new, online in zip(before, objective.target_backbone.parameters(), backbone.parameters(), strict=True):
        torch.testing.assert_close(new, tau * old + (1 - tau) * online)
    assert BYOL.BASE_MOMENTUM == 0.996  # BYOL's tau_base


def test_byol_needs_the_backbone():
    with pytest.raises(ValueError, match="BYOL needs the backbone"):
        BYOL(features=8)


def test_head_widths_default_to_each_objective_s_own():
    from fractal_pretrain.train.model import FractalClassifier

    def widths(**kwargs):
        predictor = FractalClassifier(arch="resnet18", views=2, **kwargs).objective.predictor
        return predictor[-1].out_features, predictor[0].out_features  # (output, hidden) of either objective

    assert widths(objective="simsiam") == (2048, 512)
    assert widths(objective="byol") == (256, 4096)  # BYOL's paper, not SimSiam's
    assert widths(objective="byol", projector_dim=64) == (64, 4096)  # one given, the other the objective's


def test_effective_rank_of_non_finite_outputs_is_nan_not_a_linalg_error():
    z = torch.randn(8, 4)
    z[3, 1] = float("inf")
    assert torch.isnan(effective_rank(z))


def test_a_byol_run_stopped_and_resumed_equals_the_straight_run_target_included(tmp_path):
    common = ("--model.objective", "byol", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "1",
              "--data.val_samples", "0", "--model.knn_classes", "0")
    assert main(fit_args(tmp_path / "straight", *common)) == 0
    split = fit_args(tmp_path / "split", *common)
    assert main([*split, "--trainer.callbacks+=fit_helpers.SignalAtStep"]) == 143  # SIGTERM at step 2
    assert main(split) == 0
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            for run in ("straight", "split"))
    assert any(k.startswith("objective.target_backbone.") for k in a)
    for key in a:  # backbone, heads and the momentum target
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    exported = torch.load(tmp_path / "split" / "backbone.pt", map_location="cpu", weights_only=True)
    assert not any("target" in k or k.startswith("objective.") for k in exported)
    online = {k.removeprefix("net."): v for k, v in a.items() if k.startswith("net.") and not k.startswith("net.fc")}
    assert exported.keys() == online.keys()  # the online backbone, not the target
    assert json.loads((tmp_path / "split" / "backbone.json").read_text())["objective"] == "byol"


def test_effective_rank_sees_the_dimensional_collapse_normalised_std_misses():
    g = torch.Generator().manual_seed(0)
    # three heavy-tailed directions, each output dimension standardised over the batch like the projector's last BN
    z = torch.empty(512, 3).exponential_(generator=g) ** 2 @ torch.randn(3, 64, generator=g)
    z = (z - z.mean(0)) / z.std(0)
    assert normalised_std(z).item() > 0.85 * 64 ** -0.5  # reads nearly healthy
    assert effective_rank(z).item() < 3.0  # three directions at most
    assert effective_rank(torch.randn(512, 64, generator=g)).item() > 60  # isotropic: close to min(512, 64)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    equal = torch.cat([basis[:5], -basis[:5]])  # centred, five equal singular values
    assert effective_rank(equal).item() == pytest.approx(5.0, rel=1e-5)
    assert effective_rank(torch.ones(8, 64)).item() == pytest.approx(1.0)  # no variance at all: no nan


def test_pair_gap_is_zero_without_pair_information_and_large_with_it():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 32, generator=g)
    assert pair_gap(z + 0.1 * torch.randn(64, 32, generator=g), z).item() > 0.9  # each points at its own target
    shared = torch.randn(1, 32, generator=g)
    assert pair_gap(shared.expand(64, 32), z + 3 * shared).item() == pytest.approx(0.0, abs=1e-6)
    # a high mean cosine from what every sample shares is no pair information
    assert F.cosine_similarity(shared.expand(64, 32), z + 3 * shared).mean() > 0.8


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
    # the validation diagnostics, one each per validation; the batch (8 pairs) bounds the rank
    z_rank = [float(r["val/z_rank"]) for r in rows if r.get("val/z_rank")]
    gap = [float(r["val/pair_gap"]) for r in rows if r.get("val/pair_gap")]
    assert len(z_rank) == 1 and 1.0 <= z_rank[0] <= 8.0 and len(gap) == 1 and -2.0 <= gap[0] <= 2.0
    assert not any(r.get("train/z_rank") for r in rows)  # no SVD in training steps
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
    (("--model.objective", "dino"),
     "model.objective='dino': must be one of classification, multilabel, simsiam, byol"),
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
    # a rank's validation batch of one pair has no pair_gap, and the ranks would log different keys (DDP hang)
    (("--data.val_samples", "9"), "val_samples=9: the last step would hold 1 sample(s) for 1 ranks; "
                                  "two-view validation needs 2 per rank"),
    # BYOL's momentum target: the run's length, and no half-precision weights
    (("--model.objective", "byol", "--model.schedule", "constant", "--trainer.max_steps", "-1",
      "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:01:00"),
     "model.objective=byol: its momentum schedule needs the run's length"),
    (("--model.objective", "byol", "--trainer.precision", "bf16-true"),
     "trainer.precision=bf16-true: model.objective=byol would keep its momentum target in half precision"),
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
