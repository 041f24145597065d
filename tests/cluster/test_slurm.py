"""The cluster paths on a real Slurm: DDP pre-training on 2 nodes x 2 tasks, preemption + requeue, eval arrays.

Needs a running Slurm whose config is in ``SLURM_CONF`` (``eval "$(bash tests/cluster/slurm-up.sh)"``: a
single host emulating nodes n1 and n2, see tests/cluster/README.md); every test skips otherwise. Jobs run
as the current user with the repo as working directory and the repo's ``.venv/bin`` first on PATH (sbatch
exports the submitting environment). Jobs are polled with ``squeue -t all`` rather than ``sbatch --wait``,
whose back-off (2, 4, 8, ... s) adds up to ~20 s per job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
SBATCH_SCRIPT = REPO / "slurm" / "pretrain.sbatch"
SMOKE = "jobs/pretrain/smoke.yaml"  # relative to --chdir, as a user would write it
CATEGORIES = ["hazelnut_reduced", "transistor_reduced"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 12  # the preempted run and its reference: 6 epochs of 2 global steps (64 samples / (8 x 4 ranks))


def _slurm_unavailable() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        return "no Slurm: SLURM_CONF is unset (start one with: eval \"$(bash tests/cluster/slurm-up.sh)\")"
    if shutil.which("sinfo") is None:
        return "no Slurm: sinfo not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"no Slurm: sinfo timed out (SLURM_CONF={os.environ['SLURM_CONF']})"
    if out.returncode != 0:
        return f"no Slurm: sinfo failed (SLURM_CONF={os.environ['SLURM_CONF']}): {' '.join(out.stderr.split())[:200]}"
    return None


_UNAVAILABLE = _slurm_unavailable()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")]


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment: venv first on PATH, the sacct stand-in next, no inherited job settings."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF")}
    env.pop("MASTER_PORT", None)
    sacct_dir = Path(os.environ.get("SLURM_CONF", "/nonexistent")).parent / "bin"
    path = [str(VENV_BIN)] + ([str(sacct_dir)] if (sacct_dir / "sacct").is_file() else []) + [env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONPATH"] = str(REPO)
    env["MASTER_ADDR"] = "127.0.0.1"  # the emulated node names n1, n2 do not resolve
    env.update(extra)
    return env


def submit(log: Path, *fit_args: str, nodes: int = 2, tasks: int = 2, wait: bool = False,
           env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """sbatch slurm/pretrain.sbatch smoke.yaml FIT_ARGS; stdout is the job id (``--parsable``)."""
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks}", f"--chdir={REPO}",
           f"--output={log}", "--time=15", *(["--wait"] if wait else []), str(SBATCH_SCRIPT), SMOKE, *fit_args]
    # cwd = the log's folder: SLURM_SUBMIT_DIR, where the batch script puts its requeue marker
    return subprocess.run(cmd, cwd=log.parent, env=env or job_env(), capture_output=True, text=True,
                          timeout=timeout)


def job_id_of(submitted: subprocess.CompletedProcess) -> str:
    lines = submitted.stdout.split()
    assert lines, f"sbatch printed no job id (exit {submitted.returncode}): {submitted.stderr}"
    return lines[0].split(";")[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_for_job(job_id: str, timeout: float = 300) -> tuple[str, int]:
    """Polls until the job reaches a final state; returns it and the batch script's exit status."""
    deadline = time.time() + timeout
    state = job_state(job_id)
    while state not in TERMINAL:
        if time.time() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s (cancelled)")
        time.sleep(0.5)
        state = job_state(job_id)
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(r"\bExitCode=(\d+):(\d+)", info)
    assert match, info
    return state, int(match.group(1))


def run_job(log: Path, *fit_args: str, timeout: float = 300, **kwargs) -> tuple[str, int, str]:
    """Submit, wait; returns (final state, exit status, log text)."""
    job_id = job_id_of(submit(log, *fit_args, **kwargs))
    state, status = wait_for_job(job_id, timeout)
    return state, status, log.read_text() if log.exists() else ""


def fit_args(root: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--data.samples_per_epoch", "64", "--data.batch_size", "8", "--data.val_samples", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.deterministic", "true",
            "--checkpoint_every_n_steps", "2", "--requeue_check_every", "1", *extra]


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# With more than 2 ranks, DDP's gradient buckets are rebuilt (in gradient-ready order) after the first
# backward of every process start; that first step after a resume therefore all-reduces in a different
# order than the uninterrupted run's step at the same point, the float sums of 4 ranks differ in the last
# bit and training amplifies that (~1e-2 after 10 steps). find_unused_parameters=True keeps the initial
# buckets for good, which makes a resumed 4-rank run bit-identical to an uninterrupted one (2 ranks are
# identical either way: a + b == b + a). Only the comparison runs use it.
STABLE_BUCKETS = ("--trainer.strategy", "ddp_find_unused_parameters_true")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run the preempted one must reproduce (2 nodes x 2 tasks, STEPS steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    state, status, log = run_job(tmp / "pretrain.out", *fit_args(tmp / "run"), *STABLE_BUCKETS)
    assert (state, status) == ("COMPLETED", 0), log[-3000:]
    return tmp / "run"


def test_ddp_pretraining_on_two_nodes_writes_a_torchvision_backbone(tmp_path):
    import torch
    import torchvision

    steps = 4
    state, status, log = run_job(tmp_path / "pretrain.out", *fit_args(tmp_path / "run", steps))
    assert (state, status) == ("COMPLETED", 0), log[-3000:]
    assert "(2 nodes x 2 tasks), master 127.0.0.1" in log
    for rank in range(4):  # every rank joined the 4-process group
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/4" in log, log[-3000:]
    assert "All distributed processes registered. Starting with 4 processes" in log
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(weights(tmp_path / "run" / "backbone.pt"), strict=True)
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["steps"] == steps and meta["arch"] == "resnet18"


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(tmp_path, reference_run):
    import torch

    log, run = tmp_path / "pretrain.out", tmp_path / "run"
    job_id = job_id_of(submit(log, *fit_args(run), *STABLE_BUCKETS))
    try:
        last = run / "checkpoints" / "last.ckpt"  # written at step 2: every rank has its handler by then
        deadline = time.time() + 180
        while not last.exists():
            state = job_state(job_id)
            assert state not in TERMINAL, f"job {job_id} ended ({state}) before its first checkpoint:\n{_tail(log)}"
            assert time.time() < deadline, f"no {last} after 180 s:\n{_tail(log)}"
            time.sleep(0.2)
        # USR1 to the job steps (the srun-launched ranks), not the batch shell: what --signal=USR1@90 does
        signalled = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True)
        assert signalled.returncode == 0, signalled.stderr
        state, status = wait_for_job(job_id, timeout=300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    assert (state, status) == ("COMPLETED", 0), text[-3000:]
    assert f"pretrain.sbatch: job {job_id} restart 0 " in text
    stopped = re.search(r"requeue requested: checkpoint at step (\d+)", text)
    assert stopped and 2 <= int(stopped.group(1)) < STEPS, text[-3000:]
    assert f"pretrain.sbatch: step {stopped.group(1)}, requeueing job {job_id}" in text
    assert f"pretrain.sbatch: job {job_id} restart 1 " in text
    assert f"resuming from {run / 'requeue.ckpt'}" in text
    assert text.index("requeue requested") < text.index("restart 1") < text.index("resuming from")
    assert not list(tmp_path.glob(".requeue-*"))  # the batch script removed its marker
    assert json.loads((run / "backbone.json").read_text())["steps"] == STEPS
    a, b = weights(run / "backbone.pt"), weights(reference_run / "backbone.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("nodes", [1, 2])
def test_devices_not_matching_ntasks_per_node_fails_with_lightnings_error(tmp_path, nodes):
    state, status, log = run_job(tmp_path / "pretrain.out", *fit_args(tmp_path / "run", 2), "--trainer.devices", "1",
                                 nodes=nodes, tasks=2, timeout=180)
    assert state == "FAILED" and status != 0, log[-3000:]
    # FractalCLI (every layout) or Lightning (multi-device): "You set `devices=1` ... --ntasks-per-node=2 ..."
    assert "You set `devices=1`" in log and "--ntasks-per-node=2" in log, log[-3000:]
    assert not (tmp_path / "run" / "backbone.pt").exists()


def test_missing_container_image_exits_2(tmp_path):
    log = tmp_path / "pretrain.out"
    done = submit(log, *fit_args(tmp_path / "run", 2), nodes=1, tasks=1, wait=True,
                  env=job_env(CONTAINER="/nonexistent.sif"), timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)  # sbatch --wait returns the job's exit status
    assert "CONTAINER=/nonexistent.sif: image not found" in log.read_text()


# ------------------------------------------------------------------------------------------------ eval arrays


def write_grid(path: Path, root: Path, **resources) -> Path:
    import yaml

    config = {
        "datasets": {"mvtec": {"root": str(root), "categories": CATEGORIES}},
        "backbones": {"Random": {"spec": "random", "arch": "resnet18"}},
        "methods": {"patchcore": {"layers": [[2, 3]]}},
        "size": 64, "seeds": [0], "cells_per_task": 1, "device": "cpu",
        "resources": {"timeout_min": 10, "mem_gb": 2, "cpus_per_task": 1, "gpus_per_node": 0, **resources},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def ad_eval(*args: str, cwd: Path, **kwargs):
    cmd = [sys.executable, "-m", "ad_eval", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def records(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.json") if not p.name.endswith(".failed.json"))


def array_tasks(name: str = "ad-eval") -> list[tuple[str, str]]:
    """(job id, state) of every job called ``name`` that Slurm still knows (ended ones for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"], capture_output=True,
                         text=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def test_eval_grid_as_slurm_arrays_survives_a_cancelled_task(tmp_path, realdata):
    config, out = write_grid(tmp_path / "grid.yaml", realdata), tmp_path / "results"
    grid = ["grid", "--config", str(config), "--cluster", "slurm", "--out", str(out), "--no-progress"]

    # 1. both cells as a 2-task array
    first = ad_eval(*grid, cwd=tmp_path)
    text, _ = first.communicate(timeout=300)
    assert first.returncode == 0, text
    assert "2 cells: 0 already done, 2 submitted in 2 task(s) on slurm" in text
    assert len(records(out)) == 2
    report = ad_eval("report", "--results", str(out), "--out", str(tmp_path / "report"), cwd=tmp_path)
    text, _ = report.communicate(timeout=120)
    assert report.returncode == 0, text
    assert any((tmp_path / "report").glob("table_mvtec_*.md"))

    # 2. lose one record; the re-run's task is cancelled: the grid reports it and exits 1 without hanging.
    # The task is submitted held (cell ids do not depend on resources), so it is cancelled before it can
    # run, whatever the timing.
    lost = records(out)[0]
    kept = {p.name: p.read_text() for p in records(out) if p != lost}
    lost.unlink()
    held = write_grid(tmp_path / "grid-held.yaml", realdata, slurm_additional_parameters={"hold": True})
    earlier = {job for job, _ in array_tasks()}  # the first run's tasks (some may still be completing)
    second = ad_eval("grid", "--config", str(held), "--cluster", "slurm", "--out", str(out), "--no-progress",
                     cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tasks := [t for t in array_tasks() if t[0] not in earlier]):
            assert second.poll() is None and time.time() < deadline, "the re-run submitted no task"
            time.sleep(0.2)
        assert len(tasks) == 1 and tasks[0][1] == "PENDING", tasks
        subprocess.run(["scancel", tasks[0][0]], check=True)
        text, _ = second.communicate(timeout=180)  # the sacct stand-in makes submitit see CANCELLED
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 1, text
    assert "2 cells: 1 already done, 1 submitted in 1 task(s) on slurm" in text
    assert "UncompletedJobError" in text and "1 cell(s) missing" in text
    assert job_state(tasks[0][0]) == "CANCELLED"
    assert [p.name for p in records(out)] == list(kept)

    # 3. the next re-run submits exactly the missing cell and finishes the grid
    third = ad_eval(*grid, cwd=tmp_path)
    text, _ = third.communicate(timeout=300)
    assert third.returncode == 0, text
    assert "2 cells: 1 already done, 1 submitted in 1 task(s) on slurm" in text
    assert "2/2 cells done" in text
    assert sorted(p.name for p in records(out)) == sorted([lost.name, *kept])
    assert all((out / name).read_text() == body for name, body in kept.items())  # the kept cell did not run again


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text()[-n:] if log.exists() else f"(no log {log})"
