"""The GPU session's benchmark scripts (render_throughput, train_throughput, augment_throughput) on the CPU.

A lent GPU session has 15 minutes of device time; a benchmark that crashes there wastes minutes that cannot be
had back. So every path of the scripts runs here at tiny sizes: ``--device cpu`` (the CPU renderer) and
``--device emulator`` (the renderer's CUDA kernels on the CPU emulator: the device's code path, view bank
included), leaving out only what needs a GPU (side-stream prefetch, CUDA events, peak memory, the kernel
profile), which the rows report as null. The exact command lines of benchmarks/gpu_session.sh and
benchmarks/PENDING_GPU.md run too, with tiny sizes appended (argparse: the last value of a flag wins), and
every row must come out of summarise.py as a table line.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
GPU_SESSION = BENCH / "gpu_session.sh"
PENDING = BENCH / "PENDING_GPU.md"

# Mandelbulb recipes small enough for the emulator's view bank (4 formulas x 2 views) and the NumPy reference.
MANDELBULB_TINY = ["--set", "powers=[2,3]", "--set", "rules=[107,106]", "--set", "num_classes=4",
                   "--set", "bank_views=2"]
IFS_TINY = ["--set", "num_points=2000", "--set", "num_classes=8"]  # 8 classes: banks of a few hundred systems


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch, one_torch_thread):
    """benchmarks/ on sys.path, as for a script run from there (augment_throughput imports train_throughput)."""
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.fixture
def run(bench_script, capsys):
    def rows(name: str, argv: list[str]) -> list[dict]:
        """The JSON rows script ``name`` prints for ``argv`` (its main must return 0)."""
        capsys.readouterr()
        assert bench_script(name).main(argv) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    return rows


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)


def check_train_row(row: dict, device: str) -> None:
    """What summarise.py reads, numeric; the CUDA-only fields present and null off the GPU."""
    assert row["device"] == device
    unit = "samples" if row.get("objective") == "simsiam" else "img"
    positive(row, f"ceiling_{unit}_s", f"end_to_end_{unit}_s", "ratio", "ms_per_step")
    positive(row, "augment_ms_per_batch" if row["recipe"] == "ofdb" else "render_ms_per_batch")
    if row["recipe"] != "ofdb":
        assert row[f"prefetch_{unit}_s"] is None and row["prefetch_ratio"] is None
    assert row["peak_gib"] is None


def check_render_row(row: dict) -> None:
    positive(row, "size", "batch", "ms_per_batch", "images_per_s")
    assert re.fullmatch(r"[0-9a-f]{12}", row["digest"])


def check_augment_row(row: dict) -> None:
    if row["measure"] == "train_step":
        positive(row, "ceiling_img_s", "end_to_end_img_s", "ratio")
    else:
        positive(row, "batch", "ms_per_batch", "images_per_s")


@pytest.fixture
def table_lines(bench_script, tmp_path):
    def lines(rows: list[dict]) -> list[str]:
        """summarise.py's table body lines (header and separator lines left out) for these rows."""
        log = tmp_path / "rows.jsonl"
        log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        text = bench_script("summarise").summarise([str(log)])
        return [line for line in text.splitlines()
                if line.startswith("| ") and not line.startswith(("| recipe |", "| arch |", "| measure |"))]

    return lines


# --- train_throughput ---------------------------------------------------------------------------------------


def test_train_on_the_cpu_renderer_reports_null_prefetch_and_summarises(run, table_lines):
    rows = run("train_throughput", ["--device", "cpu", "--archs", "resnet18", "--batch", "4", "--size", "32",
                                    "--steps", "2", "--warmup", "1", "--dtype", "float32",
                                    "--matmul-precision", "highest", *IFS_TINY])
    assert len(rows) == 1
    check_train_row(rows[0], "cpu")
    assert rows[0]["recipe"] == "fractal4ad" and rows[0]["overrides"] == {"num_points": 2000, "num_classes": 8}
    assert table_lines(rows) == [
        f"| resnet18, float32, num_points=2000, num_classes=8, cpu | {rows[0]['ceiling_img_s']:,.0f} "
        f"| {rows[0]['end_to_end_img_s']:,.0f} | {rows[0]['ratio']:.3f} | – | – | {rows[0]['render_ms_per_batch']} |"]


@pytest.mark.parametrize("mode", ["view_bank", "on_the_fly"])
def test_train_mandelbulb_on_the_emulated_kernels_in_both_modes(mode, run, table_lines):
    rows = run("train_throughput", ["--device", "emulator", "--archs", "resnet18", "--recipe", "mandelbulbvar",
                                    "--batch", "2", "--size", "16", "--steps", "1", "--warmup", "1",
                                    "--set", f"mode={mode}", *MANDELBULB_TINY])
    check_train_row(rows[0], "emulator")
    assert rows[0]["overrides"]["mode"] == mode
    assert f"mode={mode}" in table_lines(rows)[0]


def test_train_mandelbulb_on_the_cpu_reference(run):
    rows = run("train_throughput", ["--device", "cpu", "--archs", "resnet18", "--recipe", "mandelbulbvar",
                                    "--batch", "2", "--size", "8", "--steps", "1", "--warmup", "1",
                                    "--set", "mode=on_the_fly", *MANDELBULB_TINY])
    check_train_row(rows[0], "cpu")


def test_train_ofdb_takes_its_overrides_and_a_batch_larger_than_the_set_is_one_line(run, table_lines, bench_script,
                                                                                      capsys):
    argv = ["--ofdb", "--device", "cpu", "--archs", "resnet18", "--size", "32", "--crop", "16", "--steps", "1",
            "--warmup", "1", *IFS_TINY, "--set", "num_classes=6"]
    rows = run("train_throughput", argv + ["--batch", "3"])
    check_train_row(rows[0], "cpu")
    assert (rows[0]["crop"], rows[0]["overrides"]["num_classes"]) == (16, 6)
    assert "(augment)" in table_lines(rows)[0]
    assert bench_script("train_throughput").main(argv + ["--batch", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "train_throughput: error: --batch 8: the OFDB set has 6 images, fewer than a batch"


def test_train_bad_override_is_one_line_with_status_2(bench_script, capsys):
    assert bench_script("train_throughput").main(["--device", "cpu", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0]


# --- render_throughput --------------------------------------------------------------------------------------


def test_render_emulated_kernels_draw_the_cpu_renderers_images(run, table_lines):
    argv = ["--recipes", "anderson,selfsup", "--size", "32", "--batch", "2", "--repeats", "1", *IFS_TINY]
    emulated = run("render_throughput", ["--device", "emulator", "--profile", "--label", "tree", *argv])
    cpu = run("render_throughput", ["--device", "cpu", "--trials", "1", "--threads", "1", *argv])
    for row in emulated:
        check_render_row(row)
        assert row["kernel_ms"] is None and row["version"] == "tree" and row["shared_histogram"] is True
    for row in cpu:
        check_render_row(row)
    assert [r["device"] for r in cpu] == ["cpu-reference", "cpu"] * 2
    digests = {r["recipe"]: r["digest"] for r in emulated}
    assert all(r["digest"] == digests[r["recipe"]] for r in cpu)
    lines = table_lines(emulated + cpu)
    assert len(lines) == 6
    assert lines[0].startswith("| anderson, num_points=2000, num_classes=8, emulator | tree | 32 | 2 |")


@pytest.mark.parametrize("mode", ["view_bank", "on_the_fly"])
def test_render_mandelbulb_rows_on_the_emulated_kernels(mode, run):
    rows = run("render_throughput", ["--device", "emulator", "--recipes", "mandelbulbvar", "--size", "16",
                                     "--batch", "2", "--repeats", "1", "--set", f"mode={mode}", *MANDELBULB_TINY])
    check_render_row(rows[0])
    assert rows[0]["setup_s"] >= 0
    positive(rows[0], "rays_per_s")  # view_bank: the bank's rays (4 formulas x 2 views x 16^2) over setup_s


def kernel_versions_commits() -> list[str]:
    """The commits PENDING_GPU.md has kernel_versions.sh copy for the versions stage (every such command: the IFS
    kernels' A/B and the ray marcher's)."""
    found = re.findall(r"kernel_versions\.sh((?: [0-9a-f]{7,40})+)", PENDING.read_text())
    return list(dict.fromkeys(commit for commits in found for commit in commits.split()))


# What the versions stage renders with each old package: the IFS default, and the ray marcher as PENDING_GPU.md's
# VERSION_RECIPES=mandelbulbvar VERSION_ARGS="--set mode=on_the_fly ..." call does (tiny sizes)
VERSION_RUNS = {"anderson": ["--size", "32", *IFS_TINY],
                "mandelbulbvar": ["--size", "16", "--set", "mode=on_the_fly", *MANDELBULB_TINY]}


def emulated_version_row(package: Path, recipe: str, label: str) -> dict:
    """render_throughput.py's row for ``recipe`` on the emulator with ``package``'s fractal_pretrain first."""
    done = subprocess.run([sys.executable, str(BENCH / "render_throughput.py"), "--device", "emulator", "--recipes",
                           recipe, "--batch", "2", "--repeats", "1", "--label", label, *VERSION_RUNS[recipe]],
                          env={**os.environ, "PYTHONPATH": str(package)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@functools.cache
def tree_digest(recipe: str) -> str:
    return emulated_version_row(ROOT, recipe, "tree")["digest"]


@pytest.mark.parametrize("commit", kernel_versions_commits())
def test_render_runs_against_the_old_packages_of_the_versions_stage(commit, tmp_path):
    """The versions stage runs this tree's render_throughput.py with an old copy of fractal_pretrain first on
    the path: it must import there, and run the GPU rows' code on that version's emulator where it has one."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                                                     capture_output=True).returncode != 0:
        pytest.skip(f"commit {commit} not in this checkout")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "fractal_pretrain"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = [sys.executable, str(BENCH / "render_throughput.py")]
    assert subprocess.run([*script, "--help"], env=env, capture_output=True).returncode == 0
    if "emulate" not in (tmp_path / "fractal_pretrain/render/cupy_renderer.py").read_text():
        return  # before the emulator: importing and the options are all that can be checked here
    recipes = ["anderson"] + (["mandelbulbvar"] if (tmp_path / "fractal_pretrain/mandelbulb").is_dir() else [])
    for recipe in recipes:
        row = emulated_version_row(tmp_path, recipe, commit)
        check_render_row(row)
        assert row["version"] == commit
        assert row["digest"] == tree_digest(recipe)  # every version draws the same images (the stage's check)


# --- augment_throughput -------------------------------------------------------------------------------------


def test_augment_stages_and_training_step_on_the_cpu(run, table_lines):
    rows = run("augment_throughput", ["--device", "cpu", "--batch", "2", "--source", "64", "--size", "32",
                                      "--steps", "2", "--warmup", "1", "--repeats", "1", "--model", "resnet18",
                                      "--tf32"])
    assert [r["measure"] for r in rows] == ["host_draws", "crop_flip", "autoaugment", "normalise_erase", "mix",
                                            "augment", "train_step"]
    for row in rows:
        check_augment_row(row)
        assert row["device"] == "cpu" and row["tf32"] is True
    lines = table_lines(rows)
    assert len(lines) == 7 and lines[0].startswith("| host_draws | cpu | True | 2 | 64 -> 32 |")
    assert lines[-1].startswith("| resnet18, augment tf32, cpu |")


# --- benchmarks/gpu_session.sh ------------------------------------------------------------------------------


def test_gpu_session_script_parses_and_handles_every_stage_of_its_usage():
    assert subprocess.run(["bash", "-n", str(GPU_SESSION)]).returncode == 0
    text = GPU_SESSION.read_text()
    usage = re.search(r"usage: gpu_session\.sh ([\w|-]+)", text).group(1).split("|")
    cases = re.findall(r"^  ([\w-]+)\)$", text, re.M)
    assert usage and sorted(usage) == sorted(cases)
    documented = set(re.findall(r"^#\s+bash benchmarks/gpu_session\.sh ([\w-]+)", text, re.M))
    assert documented == set(usage)
    unknown = re.search(r'echo "unknown stage \$stage: (.*)" >&2', text).group(1)
    assert sorted(re.split(r", | or ", unknown)) == sorted(usage)


@pytest.mark.parametrize("mib, parts", [(43, 3), (90, 0)])  # a resnet18's backbone.pt, a resnet50's
def test_pretrain_stages_leave_in_out_what_the_device_tool_brings_back(tmp_path, mib, parts):
    """$OUT comes back only within 8 files of at most 16 MiB, 64 MiB in all: pretrain_and_report splits
    backbone.pt into it where it fits, else leaves it in runs/ and says so (python3 stubbed: no GPU here)."""
    function = re.search(r"^pretrain_and_report\(\) \{\n.*?^\}\n", GPU_SESSION.read_text(), re.M | re.S).group(0)
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    run = tmp_path / "runs" / "net"
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "metrics.csv").write_text("step\n")
    (run / "backbone.json").write_text("{}")
    with open(run / "backbone.pt", "wb") as f:
        f.truncate(mib * 2**20)
    for folder in ("results/net", "reports/net"):
        (tmp_path / folder).mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "device.txt").write_text("gpu\n")
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", f"{function}out={out}\npretrain_and_report net A,B"], cwd=tmp_path, env=env,
                   check=True)
    sizes = [p.stat().st_size for p in out.iterdir()]
    assert len(sizes) <= 8 and max(sizes) <= 16 * 2**20 and sum(sizes) <= 64 * 2**20
    assert len(list(out.glob("backbone.pt.part-*"))) == parts and (out / "net.tar.gz").is_file()
    if not parts:
        assert "too large to bring back" in (out / "pretrain.log").read_text()


def stubbed_path(tmp_path) -> dict:
    """An environment whose python3 and nvidia-smi do nothing and succeed (no GPU, no wheels here)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("python3", "nvidia-smi"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    return {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out")}


@pytest.mark.parametrize("stage, config", [("pretrain", "short_r18"), ("ofdb-pretrain", "ofdb_short_r50"),
                                           ("adapt", "adapt_short_r18")])
def test_stages_that_evaluate_on_the_real_samples_stop_at_once_without_them(tmp_path, stage, config):
    """Without .gpu_data/realdata (the eval config's root) the stage stops before training, one line, status 2;
    with the config's categories there it goes on (adapt then wants the pretrain stage's backbone)."""
    import yaml

    env = stubbed_path(tmp_path)
    work = tmp_path / "repo"
    work.mkdir()
    done = subprocess.run(["bash", str(GPU_SESSION), stage], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu_session.sh {stage}: .gpu_data/realdata/hazelnut_reduced is missing: carry .gpu_data "
        "(mkdir -p .gpu_data && cp -r ../shared/realdata .gpu_data/)"]
    mvtec = yaml.safe_load((ROOT / "jobs" / "eval" / f"{config}.yaml").read_text())["datasets"]["mvtec"]
    assert mvtec["root"] == ".gpu_data/realdata"
    for category in mvtec["categories"]:
        (work / mvtec["root"] / category).mkdir(parents=True)
    done = subprocess.run(["bash", str(GPU_SESSION), stage], cwd=work, env=env, capture_output=True, text=True)
    assert ".gpu_data/realdata" not in done.stderr
    if stage == "adapt":
        assert done.returncode == 2 and "runs/short_r18/backbone.pt is missing" in done.stderr


SHELL_VALUES = {"label": "working tree"}  # variables the commands use outside a for loop
# $name, ${name} or ${name:-default} (an unset variable with a default takes the default)
SHELL_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}|\$(?P<bare>\w+)")


def session_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, script, argv) of every benchmark call in gpu_session.sh and PENDING_GPU.md, loop variables
    expanded (``for mode in a b; do``), without the redirections."""
    found = []
    for path in (GPU_SESSION, PENDING):
        loop: dict[str, list[str]] = {}
        for line in path.read_text().replace("\\\n", " ").splitlines():
            line = line.strip()
            if m := re.match(r"for (\w+) in (.+?); do", line):
                loop = {m.group(1): m.group(2).split()}
            elif line == "done":
                loop = {}
            m = re.search(r"python3 benchmarks/(\w+_throughput)\.py(.*?)(?:\s+2>&1|\s+\||$)", line)
            if not m:
                continue
            for values in itertools.product(*loop.values()) if loop else [()]:
                shell = {**SHELL_VALUES, **dict(zip(loop, values, strict=True))}
                args = SHELL_VARIABLE.sub(lambda v, shell=shell: shell.get(v["name"] or v["bare"], v["default"]),
                                          m.group(2))
                found.append((path.name, m.group(1), tuple(shlex.split(args))))
    return found


def tiny_session_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, script, argv with the tiny flags) of each different session command once."""
    unique = {}
    for where, script, argv in session_commands():
        unique.setdefault((script, (*argv, *tiny(script, argv))), where)
    return [(where, script, argv) for (script, argv), where in unique.items()]


def tiny(script: str, argv: tuple[str, ...]) -> list[str]:
    """Flags appended to a session command so it runs on the CPU in seconds (the last value of a flag wins)."""
    mandelbulb = any("mandelbulb" in a for a in argv)
    sets = MANDELBULB_TINY if mandelbulb else IFS_TINY
    size = "16" if mandelbulb else "32"
    if script == "render_throughput":
        return ["--device", "emulator", "--size", size, "--batch", "2", "--repeats", "1", *sets]
    if script == "augment_throughput":
        return ["--device", "cpu", "--batch", "2", "--source", "64", "--size", "32", "--steps", "1", "--warmup",
                "1", "--repeats", "1"]
    common = ["--batch", "2", "--size", size, "--steps", "1", "--warmup", "1"]
    if "--ofdb" in argv:  # the data module renders the set on the trainer's device: the CPU renderer
        return ["--device", "cpu", *common, "--crop", "16", *sets]
    return ["--device", "emulator", *common, *sets]


def test_session_commands_are_found():
    scripts = {script for _, script, _ in session_commands()}
    assert scripts == {"render_throughput", "train_throughput", "augment_throughput"}


def command_id(argv) -> str:
    return " ".join(argv[:argv.index("--device", 1) if "--device" in argv[1:] else len(argv)])


@pytest.mark.parametrize("where,script,argv", tiny_session_commands(),
                         ids=lambda v: command_id(v) if isinstance(v, tuple) else v)
def test_every_session_command_runs_at_tiny_sizes_and_summarises(where, script, argv, run, table_lines):
    rows = run(script, list(argv))
    assert rows
    for row in rows:
        {"render_throughput": lambda r: check_render_row(r),
         "augment_throughput": check_augment_row,
         "train_throughput": lambda r: check_train_row(r, "cpu" if "--ofdb" in argv else "emulator")}[script](row)
    assert len(table_lines(rows)) == len(rows)


def test_every_stage_stops_at_once_when_cupy_cannot_use_a_gpu(tmp_path):
    """A machine whose CuPy import or device count fails stops the stage before any test or benchmark runs,
    one line on stderr, status 2 (else every gpu test skips and every command fails on its own)."""
    env = stubbed_path(tmp_path)
    stubs = Path(env["PATH"].split(os.pathsep)[0])
    (stubs / "python3").write_text('#!/bin/sh\ncase "$*" in *getDeviceCount*) exit 1;; esac\nexit 0\n')
    done = subprocess.run(["bash", str(GPU_SESSION), "kernels"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_session.sh kernels: CuPy cannot use a GPU here (import or device count failed: see device.txt)"]
    assert not (tmp_path / "out" / "gpu-tests.log").exists()
