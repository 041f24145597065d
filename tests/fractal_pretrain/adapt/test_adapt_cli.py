"""``fractal-pretrain adapt``: the CPU smoke config to projector.pt/json, exact resume, bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fractal_pretrain.adapt.export import read_projector, weights_digest
from fractal_pretrain.cli import main

SMOKE = "jobs/adapt/smoke.yaml"
ADAPT_JOBS = Path(__file__).resolve().parents[3] / "jobs" / "adapt"


def adapt(tmp_path, name, *extra):
    root = tmp_path / name
    status = main(["adapt", "--config", SMOKE, "--trainer.default_root_dir", str(root),
                   "--trainer.enable_progress_bar", "false", *extra])
    return status, root


def test_smoke_writes_the_projector_of_its_backbone(tmp_path):
    from ad_eval.backbones import load_backbone

    status, root = adapt(tmp_path, "run", "--trainer.max_steps", "2")
    assert status == 0
    data, meta = read_projector(root)
    assert meta["backbone_digest"] == weights_digest(load_backbone("random", "resnet18", seed=0).state_dict)
    assert meta["layers"] == ["layer2", "layer3"] and meta["steps"] == 2 and meta["shots"] == 2
    assert set(data["centers"]) == {"layer2", "layer3"} and data["centers"]["layer3"].shape == (256,)
    assert meta["recipe"] == "anderson" and meta["seed"] == 0


@pytest.mark.parametrize("config", sorted(ADAPT_JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_adapt_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "backbone:" in printed and "projector:" in printed and "batches_per_epoch:" in printed


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    status, straight = adapt(tmp_path, "straight", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2")
    assert status == 0
    assert adapt(tmp_path, "split", "--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2")[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, resumed = adapt(tmp_path, "split", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2")
    assert status == 0
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning's "unreliable results"
    a, b = torch.load(straight / "projector.pt"), torch.load(resumed / "projector.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert json.loads((resumed / "projector.json").read_text())["batches"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--model.recipe", "multiinstance"], "no classes usable as normal classes"),
    (["--model.anomalies", "{fractal_paste: 0, scar: 0, blur: 0, contrast: 0, colour: 0}"],
     "must sum to something positive"),
    (["--model.anomalies", "{speckle: 1}"], "model.anomalies: unknown key 'speckle'"),
    (["--model.anomalies", "{anomaly_p: 0}"], "model.anomalies: anomaly_p=0"),  # wrote an untrained projector
    (["--model.anomalies", "{scar: .nan}"], "model.anomalies: scar=nan: must be a finite number"),  # was accepted
    (["--model.anomalies", "{fractal_paste: .inf}"], "model.anomalies: fractal_paste=inf: must be a finite"),
    (["--model.val_classes", "12"], "val_classes=12"),
    (["--model.backbone", "/nonexistent/backbone.pt"], "model.backbone"),
    (["--model.layerz", "[layer2]"], "Unrecognized arguments: --model.layerz"),  # was the 75-line usage
    (["--model.size", "abc"], 'Parser key "model.size"'),
    (["--model.render_device", "gpu"],  # was checked in setup, after config.yaml and logs were written
     "model.render_device='gpu': must be auto, cpu, cpu-reference, cuda or cuda:N"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, extra, message):
    status, root = adapt(tmp_path, "bad", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0] and err[0].startswith("fractal-pretrain: error:")
    assert not root.exists()


def test_a_typo_in_the_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(open(SMOKE).read().replace("  batch_size: 4", "  batch_sise: 4"))
    status = main(["adapt", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["fractal-pretrain: error: Group 'model' does not accept option 'batch_sise'"]
    assert not (tmp_path / "run").exists()


def test_skipped_is_logged_on_every_step(tmp_path):
    """With anomaly_p 0.3 batch 2 of seed 0 has no defect (its loss is skipped) and batches 3-4 have one:
    metrics.csv must say skipped 1 and loss NaN on that step only (Lightning repeats a step metric's last
    value on rows where it was not logged, so before the fix every row after the first skip read 1)."""
    import csv

    status, root = adapt(tmp_path, "skips", "--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1",
                         "--trainer.val_check_interval", "5",
                         "--model.anomalies", "{anomaly_p: 0.3, mask_systems: 32, mask_points: 3000}")
    assert status == 0
    (metrics,) = root.glob("logs/*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r["train/skipped"] != ""]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["train/skipped"]) for r in rows] == [0, 0, 1, 0, 0]
    assert [float(r["train/anomalous_fraction"]) == 0 for r in rows] == [False, False, True, False, False]
    losses = [float(r["train/loss"]) for r in rows]
    assert np.isnan(losses[2]) and all(np.isfinite(v) for i, v in enumerate(losses) if i != 2)


def test_a_run_resumed_at_max_steps_still_writes_its_projector(tmp_path):
    """Killed after its last checkpoint (at max_steps) but before the export, e.g. during the final
    validation: re-running the command must write the projector (before the fix it exited 0 with none)."""
    status, root = adapt(tmp_path, "run", "--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2")
    assert status == 0
    first = read_projector(root)[0]["state_dict"]
    for name in ("projector.pt", "projector.json"):
        (root / name).unlink()
    assert adapt(tmp_path, "run", "--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2")[0] == 0
    data, meta = read_projector(root)
    assert meta["steps"] == 2 and all(torch.equal(first[k], data["state_dict"][k]) for k in first)


def test_a_requeue_stop_writes_no_projector(tmp_path, monkeypatch):
    """A requeue signal stops the run early: no projector.pt of a half-trained run (before the fix one of
    step 1 of 3 was written); after the requeue the run finishes and writes it."""
    from fractal_pretrain.train.callbacks import RequeueOnSignal

    setup = RequeueOnSignal.setup

    def signalled(self, trainer, pl_module, stage):  # as if Slurm had sent USR1 before the first step
        setup(self, trainer, pl_module, stage)
        self.requested = True

    monkeypatch.setattr(RequeueOnSignal, "setup", signalled)
    extra = ("--trainer.max_steps", "3", "--requeue_check_every", "1", "--trainer.val_check_interval", "3")
    status, root = adapt(tmp_path, "run", *extra)
    assert status == 0 and (root / "requeue.ckpt").is_file() and (root / "REQUEUE").is_file()
    assert not (root / "projector.pt").exists() and not (root / "projector.json").exists()
    monkeypatch.setattr(RequeueOnSignal, "setup", setup)
    (root / "REQUEUE").unlink()  # what slurm/pretrain.sbatch does before requeueing
    assert adapt(tmp_path, "run", *extra)[0] == 0
    assert read_projector(root)[1]["steps"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--model.backbone_seed", "1"], "model.backbone_seed: 0 there, 1 here"),
    (["--model.anomalies", "{anomaly_p: 0.5}"], "model.anomalies:"),
    # step s drew batches s * W + r: under another world size batches would repeat or be skipped
    (["--trainer.devices", "2", "--trainer.strategy", "ddp"],
     "world size (trainer.devices x trainer.num_nodes): 1 there, 2 here"),
])
def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, capsys, extra, message):
    """Re-running into a run directory with another config used to continue the old checkpoint (or, at
    max_steps, keep the old projector) and rewrite config.yaml: now one line naming the checkpoint and key."""
    status, root = adapt(tmp_path, "run", "--trainer.max_steps", "1", "--checkpoint_every_n_steps", "1")
    assert status == 0
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    capsys.readouterr()
    status, _ = adapt(tmp_path, "run", "--trainer.max_steps", "2", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("fractal-pretrain: error: checkpoint ") and message in err[-1]
    assert "last.ckpt" in err[-1] and "--ckpt_path none" in err[-1]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files  # nothing touched


def test_resume_refuses_other_backbone_weights_at_the_same_path(tmp_path, capsys):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    extra = ("--model.backbone", f"imagenet:{weights}", "--checkpoint_every_n_steps", "1")
    assert adapt(tmp_path, "run", "--trainer.max_steps", "1", *extra)[0] == 0
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # other weights, same file name
    capsys.readouterr()
    assert adapt(tmp_path, "run", "--trainer.max_steps", "2", *extra)[0] == 2
    assert "model.backbone weights: digest" in capsys.readouterr().err.strip().splitlines()[-1]


def test_sigterm_stops_with_status_143_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's kill, Ctrl-\\ of a wrapper) stopped the run with status 0 and no projector:
    `adapt && ad-eval ...` went on as if it had finished. Now 143 and a line saying how to resume."""
    import os
    import signal

    from fractal_pretrain.adapt.model import AdaptModule

    step = AdaptModule.training_step

    def terminated_at_step_1(self, batch, batch_idx):
        if int(self.batches_seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch
        return step(self, batch, batch_idx)

    monkeypatch.setattr(AdaptModule, "training_step", terminated_at_step_1)
    extra = ("--trainer.max_steps", "3", "--checkpoint_every_n_steps", "1")
    status, root = adapt(tmp_path, "run", *extra)
    assert status == 143 and not (root / "projector.pt").exists()
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().err
    monkeypatch.setattr(AdaptModule, "training_step", step)
    assert adapt(tmp_path, "run", *extra)[0] == 0
    assert read_projector(root)[1]["steps"] == 3


def test_ckpt_path_that_is_not_an_adapt_checkpoint(tmp_path, capsys):
    """A projector.pt (or any file) as --ckpt_path: one line saying so (it listed every key as 'None there')."""
    status, root = adapt(tmp_path, "run", "--trainer.max_steps", "1")
    assert status == 0
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    for path, message in ((root / "projector.pt", "not a checkpoint of fractal-pretrain adapt"),
                          (tmp_path / "junk.ckpt", "not a readable checkpoint")):
        capsys.readouterr()
        assert adapt(tmp_path, "other", "--ckpt_path", str(path))[0] == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"fractal-pretrain: error: ckpt_path={str(path)!r}: {message}"), err
        assert not (tmp_path / "other").exists()


def test_fit_and_adapt_report_a_cut_short_checkpoint_in_the_same_line(tmp_path, capsys):
    """Each command had its own words for a checkpoint it cannot read; now both say it alike, naming the path."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"backbone_seed": 0}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:1000])
    lines = []
    for command, config in (("fit", "jobs/pretrain/smoke.yaml"), ("adapt", SMOKE)):
        capsys.readouterr()
        assert main([command, "--config", config, "--trainer.default_root_dir", str(tmp_path / command),
                     "--ckpt_path", str(cut)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        lines.append(err[0])
        assert not (tmp_path / command).exists()
    assert lines[0] == lines[1], lines
    assert lines[0].startswith(f"fractal-pretrain: error: ckpt_path={str(cut)!r}: not a readable checkpoint (")


@pytest.mark.slow
def test_ddp_ranks_train_on_different_batches(tmp_path):
    """Every rank drew batch number ``step`` (the shared counter), so two DDP ranks trained on the same images
    and averaged identical gradients: the projector was bit for bit the one-device run's. Now step s of rank r
    is batch s * world_size + r (one device: batch s, as before)."""
    import os
    import subprocess
    import sys

    repo = ADAPT_JOBS.parents[1]
    steps = ("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_NTASKS", None)
    ddp = subprocess.run([sys.executable, "-m", "fractal_pretrain", "adapt", "--config", SMOKE,
                          "--trainer.default_root_dir", str(tmp_path / "ddp"), "--trainer.devices", "2",
                          "--trainer.strategy", "ddp", *steps], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    status, one = adapt(tmp_path, "one", *steps)
    assert status == 0
    a, b = read_projector(tmp_path / "ddp")[0]["state_dict"], read_projector(one)[0]["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert read_projector(tmp_path / "ddp")[1]["batches"] == 4 and read_projector(one)[1]["batches"] == 2


def test_the_backbone_stays_frozen(tmp_path):
    """Only the projector trains: the backbone's weights and BatchNorm statistics are untouched by training
    and validation (it is no submodule, so neither the optimiser nor Lightning's train() reaches it)."""
    from fractal_pretrain.adapt.cli import make_adapt_cli

    cli = make_adapt_cli(["--config", SMOKE, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
                          "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false"])
    backbone = {k: v.clone() for k, v in cli.model.backbone.state_dict().items()}
    projector = {k: v.clone() for k, v in cli.model.projector.state_dict().items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert all(torch.equal(backbone[k], v) for k, v in cli.model.backbone.state_dict().items())
    assert not cli.model.backbone.training and not any(p.requires_grad for p in cli.model.backbone.parameters())
    assert any(not torch.equal(projector[k], v) for k, v in cli.model.projector.state_dict().items())
