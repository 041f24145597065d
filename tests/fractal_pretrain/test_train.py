"""Pre-training on CPU: sample keys per rank, exact resume, preemption, backbone export, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from fit_helpers import assert_split_run_equals_straight_run, fit_command, weights

from fractal_pretrain.cli import main
from fractal_pretrain.config import ConfigError
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer
from fractal_pretrain.train.backbone import BackboneExportError, export_checkpoint
from fractal_pretrain.train.cli import check_same_run
from fractal_pretrain.train.data import KeyBatches, rank_slice, steps_per_epoch
from fractal_pretrain.train.model import FractalClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # on 2 shared cores, 2 threads took twice as long

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "jobs" / "pretrain" / "smoke.yaml")


fit_args = partial(fit_command, SMOKE)


@pytest.mark.parametrize("total,batch,world", [(64, 8, 1), (64, 8, 2), (64, 8, 4), (70, 8, 3), (1000, 7, 5)])
def test_ranks_see_disjoint_samples_whose_union_is_the_epoch(total, batch, world):
    steps = steps_per_epoch(total, batch, world)
    seen = [rank_slice(s, total, batch, r, world) for s in range(steps) for r in range(world)]
    assert all(len(part) > 0 for part in seen)
    everything = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(everything), np.arange(total))


def test_a_last_step_too_small_for_the_ranks_is_an_error():
    with pytest.raises(ConfigError, match="samples_per_epoch=17.*1 sample"):
        steps_per_epoch(17, 4, 4)


def test_same_key_same_image_whatever_the_world_size():
    renderer = make_renderer(get_recipe("anderson", {"num_classes": 10, "num_points": 2000}), size=32, seed=5)
    single = renderer.render_tensor(rank_slice(1, 48, 8, 0, 1), epoch=2, dtype="float32")[0]
    # step 1 of world 1 (batch 8) = indices 8..15 = step 1 of world 2 (batch 4 each): ranks 0 and 1
    parts = [renderer.render_tensor(rank_slice(1, 48, 4, r, 2), epoch=2, dtype="float32")[0] for r in range(2)]
    assert torch.equal(single, torch.cat(parts))


def test_key_batches_resume_mid_epoch_from_consumed_not_prefetched():
    epoch = {"value": 3}
    keys = KeyBatches("train", 40, 4, 0, 2, lambda: epoch["value"])
    it = iter(keys)
    first, second = next(it), next(it)  # the second one is only prefetched
    keys.mark_consumed(first["step"])
    state = keys.state_dict()
    assert state == {"epoch": 3, "consumed": 1, "world": 2}  # the world size: a resume under another is refused
    resumed = KeyBatches("train", 40, 4, 0, 2, lambda: epoch["value"])
    resumed.load_state_dict(state)
    steps = [b["step"] for b in resumed]
    assert steps == list(range(1, 5)) and second["step"] == 1
    epoch["value"] = 4  # the next epoch starts at step 0 again
    assert [b["step"] for b in resumed][0] == 0


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # 4 steps per epoch: stop mid-epoch 0 at step 3, resume across the epoch boundary (lr decays there).
    common = ("--data.samples_per_epoch", "32", "--model.schedule", "multistep", "--model.milestones", "[1]",
              "--checkpoint_every_n_steps", "1", "--data.val_samples", "0")
    a = assert_split_run_equals_straight_run(fit_args, tmp_path, 3, ("--trainer.max_steps", "6"), common)
    meta = json.loads((tmp_path / "split" / "backbone.json").read_text())
    assert meta["steps"] == 6 and meta["epoch"] == 2  # 1.5 epochs: the second one started
    # and the stream really matters: a resume that restarted the epoch would differ
    assert main(fit_args(tmp_path / "other", "--trainer.max_steps", "6", "--data.seed", "1", *common)) == 0
    c = weights(tmp_path / "other" / "backbone.pt")
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_backbone_has_exactly_the_torchvision_keys_and_loads(tmp_path):
    assert main(fit_args(tmp_path, "--trainer.max_steps", "2", "--data.val_samples", "0")) == 0
    state = weights(tmp_path / "backbone.pt")
    net = torchvision.models.resnet18()
    expected = {k for k in net.state_dict() if not k.startswith("fc.")}
    assert set(state) == expected
    net.fc = torch.nn.Identity()
    net.load_state_dict(state, strict=True)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == "resnet18" and meta["image_size"] == 64 and meta["recipe"] == "anderson"
    assert meta["recipe_config"]["num_classes"] == 10 and len(meta["mean"]) == len(meta["std"]) == 3
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs").is_dir()
    # export-backbone from the checkpoint gives the same weights
    out = tmp_path / "exported"
    assert main(["export-backbone", str(tmp_path / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    again = weights(out / "backbone.pt")
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_export_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneExportError, match="broken.ckpt: not a readable checkpoint"):
        export_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, foreign)
    with pytest.raises(BackboneExportError, match="foreign.ckpt: not a fractal-pretrain checkpoint"):
        export_checkpoint(foreign)
    assert main(["export-backbone", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    assert main(fit_args(tmp_path, "--data.batch_sise", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractal-pretrain: error: ") and "batch_sise" in err[0], err


def test_bad_matmul_precision_is_an_error_naming_the_allowed_values(tmp_path, capsys):
    assert main(fit_args(tmp_path, "--float32_matmul_precision", "tf32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32_matmul_precision" in err[0] and "highest" in err[0], err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("below", ["", "run"])
def test_a_run_directory_that_is_a_file_is_one_line(tmp_path, capsys, below):
    # was NotADirectoryError's traceback from the loggers
    (tmp_path / "file").write_text("x")
    assert main(fit_args(tmp_path / "file" / below)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fractal-pretrain: error: trainer.default_root_dir ") and "file" in err[-1], err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_config_on_a_machine_without_one_is_one_line(tmp_path, capsys):
    # was Lightning's MisconfigurationException traceback, status 1
    assert main(fit_args(tmp_path, "--trainer.accelerator", "gpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fractal-pretrain: error: trainer.accelerator: No supported gpu backend found! (no usable GPU "
                   "here: --trainer.accelerator cpu, or auto)"], err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bad_value_names_the_key(tmp_path, capsys):
    assert main(fit_args(tmp_path, "--data.size", "3")) == 2
    assert "data.size=3" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "named"), [
    (("--data.recipe", "mandelbulbvar", "--data.recipe_overrides", "{powers: [10, 10], num_classes: 61}"),
     "data.recipe='mandelbulbvar'"),
    (("--data.recipe_overrides", "{num_classes: 10, num_points: 4000}"), "data.recipe_overrides="),
    (("--model.arch", "resnet34"), "model.arch='resnet34'"),
    (("--model.decay_norm_and_bias", "false"), "model.decay_norm_and_bias=False"),  # other optimiser groups
])
def test_resuming_a_checkpoint_of_another_run_is_one_line_naming_the_key(tmp_path, capsys, change, named):
    common = ("--data.size", "16", "--data.batch_size", "2", "--data.samples_per_epoch", "8", "--data.val_samples",
              "0", "--checkpoint_every_n_steps", "1")
    assert main(fit_args(tmp_path, "--trainer.max_steps", "1", *common)) == 0
    config = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(fit_args(tmp_path, "--trainer.max_steps", "2", *common, *change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "last.ckpt" in err[0]
    assert (tmp_path / "config.yaml").read_bytes() == config  # the run directory still describes its checkpoint


def test_bfloat16_batches_train_under_bf16_precision_only(tmp_path, capsys):
    # bfloat16 batches (the CUDA default under bf16 precision, rendered as the float32 values rounded to
    # nearest even) feed a bf16 autocast; with float32 weights and no autocast they could not run.
    assert main(fit_args(tmp_path / "bad", "--data.dtype", "bfloat16")) == 2
    assert "data.dtype=bfloat16" in capsys.readouterr().err
    args = fit_args(tmp_path, "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed", "--data.dtype",
                    "bfloat16", "--data.val_samples", "8", "--trainer.val_check_interval", "2")
    assert main(args) == 0
    header, *rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "val/top1" in header and rows


@pytest.mark.parametrize("dtype,precision,expected", [("auto", "bf16-mixed", torch.float32),
                                                      ("bfloat16", "bf16-mixed", torch.bfloat16),
                                                      ("float32", "bf16-mixed", torch.float32)])
def test_batch_dtype_on_cpu(dtype, precision, expected):
    import lightning.pytorch as pl

    from fractal_pretrain.train.data import FractalDataModule

    data = FractalDataModule("anderson", {"num_classes": 10, "num_points": 500}, size=16, batch_size=2, dtype=dtype)
    data.trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    data.setup("fit")
    images, _ = data._render(np.arange(2), 0)  # auto: bfloat16 only on CUDA
    assert images.dtype == expected
    torch.testing.assert_close(images.float(), data.renderer.render_tensor(np.arange(2), 0, dtype="float32")[0],
                               atol=0.02, rtol=0.01)


def test_multi_label_recipe_trains_and_reports_map(tmp_path):
    args = fit_args(tmp_path, "--trainer.max_steps", "2", "--data.recipe", "multiinstance",
                    "--data.recipe_overrides", "{num_classes: 10, num_points: 2000}", "--data.val_samples", "8",
                    "--trainer.val_check_interval", "2")
    assert main(args) == 0
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/mAP" in header and "train/loss" in header


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_NTASKS", None)
    return subprocess.Popen([sys.executable, "-m", "fractal_pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path) -> None:
    """Until the run started by ``proc`` has written last.ckpt (or ended, or 2 minutes passed)."""
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)


def test_signal_checkpoints_stops_and_resume_matches_uninterrupted(tmp_path):
    # 10 steps, 4 per epoch: last.ckpt exists from step 2, so the stop comes early and the resumed run crosses
    # an epoch start
    common = ("--trainer.max_steps", "10", "--data.samples_per_epoch", "32", "--data.val_samples", "0",
              "--data.recipe_overrides", "{num_classes: 10, num_points: 1000}", "--requeue_check_every", "1",
              "--checkpoint_every_n_steps", "2")
    proc = _run_cli(fit_args(tmp_path / "run", *common))
    _wait_for_checkpoint(proc, tmp_path / "run")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "requeue requested" in out
    marker = tmp_path / "run" / "REQUEUE"
    assert marker.is_file() and (tmp_path / "run" / "requeue.ckpt").is_file()
    assert not (tmp_path / "run" / "backbone.pt").exists()  # not finished: no backbone yet
    stopped_at = int(marker.read_text().split()[1])
    assert 0 < stopped_at < 10
    marker.unlink()  # what the batch script does before `scontrol requeue`
    assert main(fit_args(tmp_path / "run", *common)) == 0
    assert main(fit_args(tmp_path / "straight", *common)) == 0
    a, b = weights(tmp_path / "run" / "backbone.pt"), weights(tmp_path / "straight" / "backbone.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["steps"] == 10


def test_sigterm_stops_with_status_143_and_the_same_command_resumes(tmp_path):
    common = ("--trainer.max_steps", "10", "--data.samples_per_epoch", "32", "--data.val_samples", "0",
              "--data.recipe_overrides", "{num_classes: 10, num_points: 1000}", "--checkpoint_every_n_steps", "1")
    proc = _run_cli(fit_args(tmp_path / "run", *common))
    _wait_for_checkpoint(proc, tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # Lightning's SIGTERMException is a SystemExit(None): it exited 0
    assert "stopped by SIGTERM" in out and not (tmp_path / "run" / "backbone.pt").exists()
    assert main(fit_args(tmp_path / "run", *common)) == 0
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["steps"] == 10


def test_ddp_on_two_cpu_processes(tmp_path):
    proc = _run_cli(fit_args(tmp_path, "--trainer.max_steps", "3", "--trainer.devices", "2",
                             "--trainer.strategy", "ddp", "--data.val_samples", "16"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "GLOBAL_RANK: 1" in out or "MEMBER: 2/2" in out
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["steps"] == 3


def test_byol_ddp_on_two_cpu_processes_keeps_its_target_out_of_the_gradient_sync(tmp_path):
    # the target's parameters take no gradient: DDP must neither wait for them nor fail on them
    selfsup = str(REPO / "jobs" / "pretrain" / "selfsup_smoke.yaml")
    proc = _run_cli(fit_command(selfsup, tmp_path, "--model.objective", "byol", "--trainer.max_steps", "3",
                                "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.val_samples", "0",
                                "--model.knn_classes", "0"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    online, target = state["net.conv1.weight"], state["objective.target_backbone.conv1.weight"]
    assert not torch.equal(online, target)  # three steps of an EMA at 0.996: behind the online network
    assert json.loads((tmp_path / "backbone.json").read_text())["objective"] == "byol"


@pytest.mark.gpu
def test_fit_on_gpu_renders_on_the_device(tmp_path):
    args = fit_args(tmp_path, "--trainer.max_steps", "3", "--trainer.accelerator", "gpu", "--trainer.precision",
                    "bf16-mixed", "--trainer.deterministic", "false", "--data.recipe", "multiinstance",
                    "--data.recipe_overrides", "{num_classes: 10, num_points: 5000}", "--data.val_samples", "16",
                    "--trainer.val_check_interval", "3")
    assert main(args) == 0
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/mAP" in header
    assert json.loads((tmp_path / "backbone.json").read_text())["steps"] == 3
    assert torch.get_float32_matmul_precision() == "high"  # the default lets float32 products use TF32


@pytest.mark.parametrize("config", sorted((REPO / "jobs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretrain_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "arch:" in printed and "recipe:" in printed


@pytest.mark.gpu
def test_side_stream_prefetch_gives_the_same_batches():
    from fractal_pretrain.train.data import SideStreamPrefetch

    renderer = make_renderer(get_recipe("multiinstance", {"num_classes": 10, "num_points": 5000}), size=64, seed=2,
                             device="cuda")

    def render(indices, epoch):
        return renderer.render_tensor(indices, epoch, dtype="float32", channels_last=True)

    prefetch = SideStreamPrefetch(render, torch.device("cuda"))
    prefetch.schedule(("train", 3, 7), np.arange(56, 64), 3)
    assert prefetch.take(("train", 3, 6)) is None  # another batch: not handed out
    prefetch.schedule(("train", 3, 7), np.arange(56, 64), 3)
    images, labels = prefetch.take(("train", 3, 7))
    want_images, want_labels = render(np.arange(56, 64), 3)
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    cpu_images, cpu_labels = make_renderer(renderer.recipe, size=64, seed=2).render_tensor(
        np.arange(56, 64), 3, dtype="float32")
    torch.testing.assert_close(images.cpu().contiguous(), cpu_images, atol=0.05, rtol=0)  # <= 1 grey level
    assert torch.equal(labels.cpu(), cpu_labels)


def test_slurm_layout_must_match_the_trainer(monkeypatch):
    from fractal_pretrain.train.cli import check_slurm_layout

    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "2")
    check_slurm_layout(2, 2)
    check_slurm_layout("auto", 2)  # Lightning resolves and checks it
    check_slurm_layout("2", 2)  # jsonargparse may hand over command-line devices as a string
    for devices in (1, "1"):
        with pytest.raises(ConfigError, match=r"devices=1.*--ntasks-per-node=2"):
            check_slurm_layout(devices, 2)
    with pytest.raises(ConfigError, match=r"num_nodes=1.*--nodes=2"):
        check_slurm_layout(2, 1)


@pytest.mark.parametrize("bound,caption", [(("--trainer.max_steps", "2"), "Epoch 0 (max_steps 2)"),
                                           (("--trainer.max_epochs", "1", "--data.samples_per_epoch", "16"),
                                            "Epoch 0/0")])
def test_the_progress_bar_caption_names_the_runs_bound(tmp_path, capsys, bound, caption):
    # Lightning's bar read "Epoch 0/-2" for a run bounded by steps (max_epochs -1)
    args = ["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path), "--data.batch_size", "8",
            "--data.size", "32", "--data.val_samples", "0", *bound]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert caption in out and "/-2" not in out


def test_a_config_error_found_after_the_trainer_is_built_is_the_only_line_on_stderr(tmp_path, capfd, caplog):
    # Lightning's start-up lines (GPU available..., tips) came first; a passing config still shows them.
    # As in the whole suite (anomalib): the standalone package has taken Lightning's shared rank_zero logger.
    pytest.importorskip("pytorch_lightning")
    caplog.set_level(logging.INFO)
    assert main(fit_args(tmp_path / "bad", "--trainer.val_check_interval", "100000")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractal-pretrain: error: trainer.val_check_interval=100000"), err
    assert not any("GPU available" in r.getMessage() for r in caplog.records)
    assert main(fit_args(tmp_path / "good", "--trainer.max_steps", "1", "--data.val_samples", "0")) == 0
    assert any("GPU available: False" in r.getMessage() for r in caplog.records)


TWO_VIEW = {"objective": "simsiam", "views": 2, "projector_dim": 32, "predictor_dim": 8}


def param_ids(groups) -> list[int]:
    return [id(p) for group in groups for p in group["params"]]


@pytest.mark.parametrize("kwargs", [{}, TWO_VIEW, {**TWO_VIEW, "objective": "byol"}],
                         ids=["classification", "simsiam", "byol"])
def test_sparing_norms_and_biases_splits_the_groups_and_decays_exactly_the_rest(kwargs):
    spare = FractalClassifier(arch="resnet18", num_classes=4, weight_decay=1e-3, decay_norm_and_bias=False, **kwargs)
    groups = spare.build_optimizer(0.1).param_groups
    ids = param_ids(groups)
    trained = {id(p) for p in spare.parameters() if p.requires_grad}  # not BYOL's momentum target
    assert len(ids) == len(set(ids)) and set(ids) == trained  # each exactly once
    # in a ResNet and these heads the 1-D parameters are exactly the norm weights and the biases
    for group in groups:
        assert all(group["weight_decay"] == (0.0 if p.ndim == 1 else 1e-3) for p in group["params"])
    names = {id(p): name for name, p in spare.named_parameters()}
    spared = {names[id(p)] for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    head_bias = "objective.predictor.3.bias" if kwargs else "net.fc.bias"
    assert {head_bias, "net.bn1.weight", "net.layer1.0.bn2.bias"} <= spared
    if kwargs:
        assert "objective.projector.1.weight" in spared

    decay = FractalClassifier(arch="resnet18", num_classes=4, weight_decay=1e-3, **kwargs)  # default: as before
    groups = decay.build_optimizer(0.1).param_groups
    before = (decay.objective.param_groups(decay.net, 0.1) if kwargs else [{"params": list(decay.parameters())}])
    assert [param_ids([g]) for g in groups] == [param_ids([g]) for g in before]
    assert all(group["weight_decay"] == 1e-3 for group in groups)


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_one_sgd_step_with_zero_gradients_leaves_spared_parameters_unchanged(decay_norm_and_bias):
    model = FractalClassifier(arch="resnet18", num_classes=4, momentum=0.9, weight_decay=0.01,
                              decay_norm_and_bias=decay_norm_and_bias)
    net = model.net
    with torch.no_grad():
        net.fc.bias.fill_(0.5)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = model.build_optimizer(0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    shrunk = 1 - 0.1 * 0.01  # the first momentum step is lr x weight_decay x p
    torch.testing.assert_close(net.conv1.weight, before["conv1.weight"] * shrunk)
    for name in ("fc.bias", "bn1.weight"):
        now = net.get_parameter(name)
        if decay_norm_and_bias:
            torch.testing.assert_close(now, before[name] * shrunk, msg=name)
            assert not torch.equal(now, before[name]), name
        else:
            assert torch.equal(now, before[name]), name


def test_decay_norm_and_bias_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"model.decay_norm_and_bias='no': must be true or false"):
        FractalClassifier(arch="resnet18", num_classes=4, decay_norm_and_bias="no")


def test_a_checkpoint_from_before_decay_norm_and_bias_resumes_only_with_it_true():
    # checkpoints written before the key existed decayed every parameter: one optimiser group layout
    old = {"hyper_parameters": {"arch": "resnet18", "num_classes": 4}, "datamodule_hyper_parameters": {}}
    data = SimpleNamespace(hparams={})
    check_same_run(old, "old.ckpt", FractalClassifier(arch="resnet18", num_classes=4), data)
    with pytest.raises(ConfigError, match=r"^model.decay_norm_and_bias=False: old.ckpt was written by a run with True"):
        check_same_run(old, "old.ckpt", FractalClassifier(arch="resnet18", num_classes=4, decay_norm_and_bias=False),
                       data)


@pytest.mark.parametrize("device,objective", [("cuda", None), ("cuda", "byol"), ("cpu", None)])
def test_channels_last_follows_the_strategy_device_before_the_module_is_moved(device, objective):
    # Lightning calls configure_model before the strategy moves the module: self.device is still the CPU there,
    # so asking it never converted anything on a GPU. The CUDA device is only named (nothing runs on it).
    extra = {"objective": objective, "views": 2} if objective else {}
    model = FractalClassifier(arch="resnet18", num_classes=4, **extra)
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    model.configure_model()
    nets = [model.net, model.objective.target_backbone] if objective else [model.net]
    for net in nets:
        weight = net.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == (device == "cuda")
