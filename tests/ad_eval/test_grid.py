"""Cells, the grid (submitit local/debug), the ad-eval CLI and the report on real MVTec samples."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ad_eval import cell as cell_module
from ad_eval.backbones import BACKBONE_FORMAT
from ad_eval.cell import Cell, read_record
from ad_eval.cli import main
from ad_eval.grid import GridError, load_grid, pending_cells, run_grid

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def write_grid(path: Path, root: Path, **changes) -> Path:
    config = {
        "datasets": {"mvtec": {"root": str(root), "categories": ["hazelnut_reduced", "transistor_reduced"]}},
        "backbones": {"Random": {"spec": "random", "arch": "resnet18"}},
        "methods": {"patchcore": {"layers": [[2, 3]]}},
        "size": 64, "seeds": [0], "cells_per_task": 4, "device": "cpu",
        "resources": {"timeout_min": 10, "mem_gb": 4, "cpus_per_task": 1, "gpus_per_node": 0},
    }
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.endswith(".failed.json")]


def test_cell_ids_are_stable_and_distinct():
    base = dict(method="patchcore", dataset="mvtec", root="/d", category="bottle", backbone="random", arch="resnet18")
    a, b = Cell(**base, layers="2,3"), Cell(**base, layers=("layer2", "layer3"))
    assert a.cell_id == b.cell_id and a.cell_id.startswith("patchcore_mvtec_bottle_random-resnet18_L2+3_s0_")
    others = {Cell(**base, layers="1,2").cell_id, Cell(**base, seed=1).cell_id, Cell(**base, size=128).cell_id,
              Cell(**{**base, "backbone": "imagenet:/w.pth"}).cell_id, a.cell_id}
    assert len(others) == 5


@pytest.mark.parametrize("spec,name", [
    ("runs/fractalA/backbone.pt", "fractalA"), ("runs/fractalA", "fractalA"), ("runs/fractalB/", "fractalB"),
    ("backbone.pt", "backbone"),
])
def test_a_backbone_folder_is_named_after_itself_not_its_parent(spec, name):
    """backbone.pt's folder names it, whether the spec is the file or the folder (runs/fractalA was 'runs',
    so every run under runs/ got one report label)."""
    base = dict(method="panda", dataset="mvtec", root="/d", category="bottle")
    assert Cell(**base, backbone=spec).backbone_name == name


def test_a_backbone_folder_with_a_dot_is_a_folder_where_it_exists(tmp_path):
    folder = tmp_path / "run.v2"
    folder.mkdir()
    cell = Cell(method="panda", dataset="mvtec", root="/d", category="c", backbone=str(folder))
    assert cell.backbone_name == "run.v2"


def test_switching_keep_maps_on_reruns_the_cells_without_maps(tmp_path, monkeypatch):
    """A grid first run without keep_maps left records without maps: with keep_maps on they are pending, and
    run_cells runs them (it skipped them as done, so no maps were ever written); cutpaste gives no maps."""
    from ad_eval.grid import expand, parse_grid

    data = {"datasets": {"mvtec": {"root": "/d", "categories": ["bottle"]}},
            "backbones": {"R": {"spec": "random", "arch": "resnet18"}}, "methods": {"patchcore": {}, "cutpaste": {}}}
    without = expand(parse_grid({**data, "keep_maps": False}, "g.yaml"), Path("/"), "g.yaml")
    for cell in without.cells:
        (tmp_path / f"{cell.cell_id}.json").write_text(json.dumps({"cell_id": cell.cell_id, "image_AUROC": 0.9}))
    assert pending_cells(without, tmp_path) == []
    keeping = expand(parse_grid({**data, "keep_maps": True}, "g.yaml"), Path("/"), "g.yaml")
    assert [c.method for c in pending_cells(keeping, tmp_path)] == ["patchcore"]
    ran = []
    monkeypatch.setattr(cell_module, "run_cell", lambda cell, out, device, keep_maps: ran.append(cell.method) or
                        {"image_AUROC": 0.5, "wall_time_s": 0.0})
    cell_module.run_cells(keeping.cells, tmp_path, keep_maps=True)
    assert ran == ["patchcore"]
    patchcore = next(c for c in keeping.cells if c.method == "patchcore")
    (tmp_path / f"{patchcore.cell_id}.json").write_text(json.dumps({"image_AUROC": 0.9, "maps": "m.npz"}))
    assert pending_cells(keeping, tmp_path) == []


@pytest.mark.parametrize("bad,message", [
    ({"method": "patchcorr"}, "method='patchcorr'"),
    ({"layers": "2,5"}, "'5' is not one of"),
    ({"method": "cutpaste", "layers": "2"}, "takes no layers"),
])
def test_bad_cells_are_one_line_errors(bad, message):
    base = dict(method="patchcore", dataset="mvtec", root="/d", category="c", backbone="random", arch="resnet18")
    with pytest.raises(ValueError, match=message):
        Cell(**{**base, **bad})


@pytest.mark.parametrize("changes,message", [
    ({"methodz": {}}, "unknown key 'methodz'"),
    ({"methods": {"patchcore": {"layerz": [[2]]}}}, r"methods.patchcore: unknown key 'layerz'"),
    ({"methods": {"bogus": {}}}, "methods.bogus: unknown method"),
    ({"backbones": {"X": {"arch": "resnet18"}}}, "backbones.X: needs 'spec'"),
    ({"cells_per_task": 0}, "cells_per_task=0"),
    ({"methods": {"patchcore": {"layers": [[7]]}}}, "7 is not one of"),
    ({"methods": {"patchcore": {"layers": [2, 3]}}}, r"patchcore: layers=\[2, 3\]: must be a list of layer sets"),
    ({"methods": {"patchcore": {"layers": "2,3"}}}, r"methods.patchcore: layers='2,3': must be a list of layer sets"),
    ({"methods": {"patchcore": {"layers": [[]]}}}, r"layers=\[\[\]\]: must be a list of layer sets"),
    ({"backbones": {"R": {"spec": "random", "arch": "resnet18", "bn_stats": "train"},
                    "R+adabn": {"spec": "random", "arch": "resnet34", "bn_stats": "train"}}},
     r"backbones\.R and backbones\.R\+adabn both give the report label 'R\+adabn'"),
    ({"backbones": {"R+adapt": {"spec": "random", "arch": "resnet18", "projector": "q/projector.pt"},
                    "R": {"spec": "random", "arch": "resnet18", "projector": "p/projector.pt"}}},
     r"backbones\.R and backbones\.R\+adapt both give the report label 'R\+adapt'"),
    # a label claiming what its cells do not do
    ({"backbones": {"R+adabn": {"spec": "random", "arch": "resnet18"}}},
     r"backbones\.R\+adabn.*'\+adabn' marks cells run with bn_stats='train', and these are not"),
    ({"backbones": {"R+adapt": {"spec": "random", "arch": "resnet18", "bn_stats": "train"}}},
     r"backbones\.R\+adapt.*'\+adapt' marks cells run with a projector, and these are not"),
    # equivalent entries of one axis: cells with one cell id, run twice (concurrently)
    ({"methods": {"panda": {"layers": [[3, 4], [4, 3], ["layer3", "layer4"]]}}},
     r"grid.yaml: methods\.panda\.layers: \[3, 4\] and \[4, 3\] are the same layer set: list it once"),
    ({"methods": {"patchcore": {"layers": [[2, 3], ["layer2", "layer3"]]}}},
     r"methods\.patchcore\.layers: \[2, 3\] and \['layer2', 'layer3'\] are the same layer set"),
    ({"seeds": [0, 1, 0]}, r"grid.yaml: seeds: 0 and 0 are the same seed: list it once"),
    ({"shots": [4, "all", None]}, r"grid.yaml: shots: 'all' and 'all' are the same K: list it once"),
    ({"datasets": {"mvtec": {"root": "/d", "categories": ["a", "b", "a"]}}},
     r"datasets\.mvtec\.categories: 'a' and 'a' are the same category"),
])
def test_grid_config_errors_name_file_and_key(tmp_path, changes, message):
    path = write_grid(tmp_path / "grid.yaml", tmp_path, **changes)
    with pytest.raises(GridError, match=message) as err:
        load_grid(path)
    assert "grid.yaml" in str(err.value)


@pytest.mark.parametrize("config", sorted((REPO / "jobs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_configs_load(config):
    grid = load_grid(config, base_dir=REPO)
    assert grid.cells and len({c.cell_id for c in grid.cells}) == len(grid.cells)


def test_grid_runs_every_cell_once_and_a_rerun_skips_them(tmp_path, realdata, monkeypatch):
    config = write_grid(tmp_path / "grid.yaml", realdata)
    out = tmp_path / "results"
    summary = run_grid(config, out, cluster="debug", progress=False)
    assert summary == {"cells": 2, "done": 2, "missing": []}
    got = records(out)
    assert sorted(r["category"] for r in got) == ["hazelnut_reduced", "transistor_reduced"]
    for r in got:
        assert all(0.0 <= r[k] <= 1.0 for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
        assert r["backbone"] == "Random" and r["layers"] == ["layer2", "layer3"] and r["wall_time_s"] > 0
    stamps = {r["cell_id"]: r["finished_at"] for r in got}
    reads = []
    monkeypatch.setattr(cell_module, "read_record", lambda path: reads.append(path) or read_record(path))
    assert run_grid(config, out, cluster="debug", progress=False)["done"] == 2
    assert {r["cell_id"]: r["finished_at"] for r in records(out)} == stamps  # nothing ran again
    assert len(reads) == 2 * 2  # each record read once before submitting and once for the summary (was 4 times)


def test_one_failing_cell_loses_nothing_and_is_retried(tmp_path, capsys, realdata):
    # A backbone.pt cut short (its json intact): the grid's up-front check reads the json only, so each cell
    # fails when it loads the weights, as a missing file does on Slurm (where the grid checks no files).
    (tmp_path / "cut.json").write_text(json.dumps(
        {"format": BACKBONE_FORMAT, "arch": "resnet18", "mean": [0.5] * 3, "std": [0.25] * 3}))
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    backbones = {"Random": {"spec": "random", "arch": "resnet18"}, "Broken": {"spec": str(tmp_path / "cut.pt")}}
    config = write_grid(tmp_path / "grid.yaml", realdata, backbones=backbones)
    out = tmp_path / "results"
    assert main(["grid", "--config", str(config), "--cluster", "debug", "--out", str(out), "--no-progress"]) == 1
    assert len(records(out)) == 2  # the Random cells
    failed = sorted(out.glob("*.failed.json"))
    assert len(failed) == 2 and "cut.pt" in json.loads(failed[0].read_text())["error"]
    assert "2 cell(s) missing" in capsys.readouterr().err
    # the report shows the failed backbone as "-", never a number
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "report"),
                 "--backbones", "Random,Broken"]) == 0
    table = (tmp_path / "report" / "table_mvtec_image_AUROC.md").read_text()
    assert "/-" in table


@pytest.mark.slow
def test_killed_grid_rerun_finishes_every_cell_exactly_once(tmp_path, realdata):
    # Four real PatchCore cells (32 px) in two local tasks of two cells each: the grid and its task processes
    # are killed when the first record appears, so every task dies inside its second cell. The re-run goes
    # through the same submit path in-process (debug executor: no second round of process start-ups).
    config = write_grid(tmp_path / "grid.yaml", realdata, cells_per_task=2, size=32,
                        methods={"patchcore": {"layers": [[2, 3], [1, 2]]}})
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the tasks inherit it
    log = tmp_path / "grid.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "ad_eval", "grid", "--config", str(config), "--cluster",
                                 "local", "--out", str(out), "--no-progress"], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not records(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the grid and every task it started
        proc.wait()
    first = {r["cell_id"]: r["finished_at"] for r in records(out)}
    assert 1 <= len(first) <= 2, log.read_text()[-3000:]  # each task was killed before its second record
    grid = load_grid(config)
    summary = run_grid(config, out, cluster="debug", progress=False)
    assert summary["done"] == 4 and not pending_cells(grid, out)
    final = records(out)
    assert sorted(r["cell_id"] for r in final) == sorted(c.cell_id for c in grid.cells)  # each exactly once
    assert all(read_record(out / f"{cid}.json")["finished_at"] == stamp for cid, stamp in first.items())
    assert not list(out.glob(".*.tmp"))  # no half-written record survived the kill


def test_patchcore_cell_on_cpu_stays_within_a_few_gigabytes(tmp_path, realdata):
    # Regression: glibc's growing mmap threshold let the coreset loop's freed 10 MB temporaries pile up in
    # a fragmented heap: this cell peaked at 12 GB resident (1.1 GB with cell.return_large_frees_to_the_os),
    # and parallel grid tasks were OOM-killed. A fresh process, so the peak is the cell's own.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # OpenMP spin-waits on shared cores
    subprocess.run([sys.executable, "-m", "ad_eval", "run", "--method", "patchcore", "--dataset", "mvtec", "--root",
                    str(realdata), "--category", "hazelnut_reduced", "--backbone", "random", "--arch", "resnet18",
                    "--layers", "1,2", "--size", "64", "--device", "cpu", "--out", str(tmp_path)],
                   env=env, check=True, capture_output=True)
    (record,) = records(tmp_path)
    # 1.04-1.09 GB in isolation and in parallel runs; one full CI run (2026-12-07) read 4.0 GB once (not
    # reproduced since, cause unknown). The bound separates the fix from the 11-12 GB regression with margin.
    assert record["peak_memory_mb"] < 6000, record["peak_memory_mb"]


def test_run_cli_writes_one_record(tmp_path, realdata):
    args = ["run", "--method", "padim", "--dataset", "mvtec", "--root", str(realdata), "--category",
            "hazelnut_reduced", "--backbone", "random", "--arch", "resnet18", "--layers", "1,2", "--size", "64",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    (record,) = records(tmp_path)
    assert record["method"] == "padim" and record["layers"] == ["layer1", "layer2"] and record["num_test"] == 10


def test_run_cli_errors_are_one_line(tmp_path, capsys):
    args = ["run", "--method", "patchcore", "--dataset", "mvtec", "--root", str(tmp_path / "nowhere"),
            "--category", "bottle", "--backbone", "random", "--arch", "resnet18", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ad-eval: error: ") and "nowhere" in err and err.count("\n") == 1


class FakeJob:
    def __init__(self, job_id: str):
        self.job_id = job_id


def test_jobs_gone_from_the_queue_without_a_result_are_lost():
    from ad_eval.grid import LostJobs

    now = {"t": 0.0}
    queue = {"ids": {"7_0", "7_1"}}
    lost = LostJobs(queue=lambda: set(queue["ids"]), lost_after_s=60, clock=lambda: now["t"])
    jobs = [FakeJob("7_0"), FakeJob("7_1")]
    assert lost.check(jobs) == []
    queue["ids"] = {"7_1"}  # 7_0 was cancelled; without sacct submitit would wait for it forever
    assert lost.check(jobs) == []
    now["t"] = 59.0
    assert lost.check(jobs) == []
    now["t"] = 61.0
    assert [j.job_id for j in lost.check(jobs)] == ["7_0"]
    assert LostJobs(queue=lambda: None).check(jobs) == []  # squeue unavailable: never declare a job lost


@pytest.mark.parametrize(("category", "root", "message"), [
    ("bottle", None, "unknown category 'bottle'"),
    ("hazelnut_reduced", "nowhere", "dataset root .*nowhere is not a folder"),
])
def test_grid_bad_dataset_is_one_line_before_submitting(tmp_path, capsys, realdata, category, root, message):
    """A typo in a root or category: one line, exit 2, nothing written (was: a failure record per cell)."""
    datasets = {"mvtec": {"root": str(tmp_path / root) if root else str(realdata), "categories": [category]}}
    config = write_grid(tmp_path / "grid.yaml", realdata, datasets=datasets)
    assert_refused_up_front(config, tmp_path / "results", capsys, "grid.yaml: datasets.mvtec: ", message)


def assert_refused_up_front(config: Path, out: Path, capsys, key: str, message: str) -> None:
    """``ad-eval grid`` (debug) stops before submitting: one line naming ``key``, exit 2, nothing written."""
    assert main(["grid", "--config", str(config), "--cluster", "debug", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(("backbone", "message"), [
    ({"spec": "{tmp}/run/backbone.pt"}, r"backbones\.Gone: backbone file .*run/backbone.pt not found"),
    ({"spec": "imagenet:{tmp}/wrn50.pth", "arch": "wide_resnet50_2"},
     r"backbones\.Gone: imagenet:.*wrn50.pth: file not found"),
    ({"spec": "random", "arch": "resnet18", "projector": "{tmp}/adapt/projector.pt"},  # the key, not Gone+adapt
     r"backbones\.Gone \(seed 0\): projector .*adapt/projector.pt: file not found"),
], ids=["backbone.pt", "imagenet", "projector"])
def test_grid_missing_backbone_file_is_one_line_before_submitting(tmp_path, capsys, realdata, backbone, message):
    """Off Slurm a missing weights file is one line, exit 2, nothing written (was: a failure record per cell)."""
    backbone = {key: value.replace("{tmp}", str(tmp_path)) for key, value in backbone.items()}
    config = write_grid(tmp_path / "grid.yaml", realdata, backbones={"Random": {"spec": "random", "arch": "resnet18"},
                                                                     "Gone": backbone})
    assert_refused_up_front(config, tmp_path / "results", capsys, "grid.yaml: backbones.Gone", message)


def _task_processes(folder: Path) -> list[int]:
    """Live processes whose command line names ``folder``: a local grid's submitit tasks (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"submitit" in cmdline and str(folder).encode() in cmdline:
            found.append(int(proc.name))
    return found


def start_local_grid(config: Path, out: Path, log: Path, sigint_ignored: bool = False, **env) -> subprocess.Popen:
    """``ad-eval grid --cluster local`` as a shell starts it, in a process group of its own (the test's SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}  # the tasks inherit it
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "ad_eval", "grid", "--config", str(config), "--cluster",
                                 "local", "--out", str(out), "--no-progress"], cwd=config.parent, env=env,
                                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
                                else None)


def assert_stopped_cleanly(proc: subprocess.Popen, status: int, out: Path, log: Path,
                           controllers_interrupted: bool = True) -> None:
    """The grid exits with ``status`` and one line, no traceback; its tasks are gone within seconds.
    ``controllers_interrupted``: submitit's controllers take SIGINT (not when started with it ignored, by `&`)."""
    assert proc.wait(timeout=60) == status
    deadline = time.time() + 5  # submitit stops a cancelled task with SIGINT, then SIGKILL after 1 s
    while _task_processes(out / "submitit") and time.time() < deadline:
        time.sleep(0.2)
    assert not _task_processes(out / "submitit")
    # one line, no traceback: submitit's controller (cancelled by SIGINT) writes its KeyboardInterrupt to a file
    text = log.read_text()
    assert "Traceback" not in text and text.count("grid stopped: 1 running task(s) cancelled") == 1, text[-3000:]
    controllers = (out / "submitit" / "controllers.err").read_text()  # exists: their stderr went there
    if controllers_interrupted:  # with SIGINT ignored they may end without a traceback: timing, not a defect
        assert "KeyboardInterrupt" in controllers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "started-with-&"])
def test_sigterm_to_a_local_grid_ends_its_tasks(tmp_path, realdata, sigint_ignored):
    # `kill <grid pid>` used to leave the local tasks running as orphans; a re-run then ran their cells twice.
    # A shell starts `cmd &` with SIGINT ignored, which the tasks inherit; submitit cancels a local task by SIGINT.
    config = write_grid(tmp_path / "grid.yaml", realdata, size=32, seeds=[0, 1, 2], cells_per_task=6)
    out, log = tmp_path / "results", tmp_path / "grid.log"
    proc = start_local_grid(config, out, log, sigint_ignored)
    try:
        deadline = time.time() + 300
        while not _task_processes(out / "submitit") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _task_processes(out / "submitit") and not records(out), log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)  # the grid process only, as `kill PID` does
        assert_stopped_cleanly(proc, 128 + signal.SIGTERM, out, log, controllers_interrupted=not sigint_ignored)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the grid and its tasks
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_ctrl_c_of_a_local_grid_ends_a_task_deaf_to_sigint(tmp_path, realdata):
    # Ctrl-C reaches the whole process group: grid, submitit's controller, task. The controller stops its task
    # (SIGINT, 1 s, SIGKILL); the grid's cancel, a second SIGINT, cut that second short, so a task that did not
    # stop on SIGINT (Lightning's fit) ran on after "grid stopped".
    from ad_eval.methods.registry import PLUGIN_ENV

    config = write_grid(tmp_path / "grid.yaml", realdata, methods={"sigintdeaf": {}},
                        datasets={"mvtec": {"root": str(realdata), "categories": ["hazelnut_reduced"]}})
    out, log, started = tmp_path / "results", tmp_path / "grid.log", tmp_path / "started"
    proc = start_local_grid(config, out, log, **{PLUGIN_ENV: "sigint_deaf_method", "SIGINT_DEAF_STARTED": str(started),
                                                 "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])})
    try:
        deadline = time.time() + 300
        while not started.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert started.exists(), log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does to its foreground process group
        assert_stopped_cleanly(proc, 128 + signal.SIGINT, out, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_report_grid_reports_that_grid_s_cells_not_a_newer_record_of_an_earlier_version(tmp_path, capsys):
    # size 256, then 224, then 256 again: the third grid run finds its records and runs nothing, and a plain
    # report keeps the newest record of each report cell (224's); --grid reports the grid's own cells
    from ad_eval.cell import record_path

    out = tmp_path / "results"
    out.mkdir()
    paths = {}
    for size, day, auroc in ((256, 1, 0.9), (224, 2, 0.7)):
        paths[size] = write_grid(tmp_path / f"grid{size}.yaml", tmp_path / "data", size=size)
        for cell in load_grid(paths[size]).cells:  # the records the grid would write
            record = {**cell.to_dict(), "cell_id": cell.cell_id, "backbone": cell.backbone_name,
                      "image_AUROC": auroc, "pixel_AUROC": None, "pixel_AUPRO": None,
                      "finished_at": f"2026-01-0{day}T00:00:00+00:00"}
            record.pop("backbone_name")
            record_path(out, cell).write_text(json.dumps(record))
    assert not pending_cells(load_grid(paths[256]), out)  # back at 256: nothing to run
    for extra, expected in (([], 0.7), (["--grid", str(paths[256])], 0.9)):
        report = tmp_path / f"report{len(extra)}"
        assert main(["report", "--results", str(out), "--out", str(report), *extra]) == 0
        long = (report / "results_long.csv").read_text().splitlines()
        header = long[0].split(",")
        values = {float(row.split(",")[header.index("mean")]) for row in long[1:]
                  if row.split(",")[header.index("metric")] == "image_AUROC"}
        assert values == {expected}, (extra, long[:3])
    err = capsys.readouterr().err
    assert "report --grid CONFIG reports only that grid's cells" in err  # the plain report's duplicate warning
    assert "2 record(s) and failure(s) of cells not in the grid left out" in err
