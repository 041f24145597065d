"""containers/fractal.def and its linter (issue 6): CI has no Apptainer, so the def is linted instead.

Each lint rule is checked on a broken copy of the real def; the %runscript is run with a stub python3,
and the tiny render of %test with this environment's package.

    python -m pytest -q tests/containers
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEF = REPO / "containers" / "fractal.def"
LINTER = REPO / "containers" / "lint_def.py"


def _load_linter():
    spec = importlib.util.spec_from_file_location("lint_def", LINTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lint_def = _load_linter()


def _lines() -> list[str]:
    return DEF.read_text().splitlines()


def _index(lines: list[str], prefix: str) -> int:
    """0-based index of the first line starting with prefix."""
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))


def _section(name: str) -> str:
    stages, errors = lint_def.parse(_lines(), str(DEF))
    assert not errors
    bodies = [s.body for stage in stages for s in stage.sections if s.name == name]
    assert len(bodies) == 1, name
    return "\n".join(bodies[0]) + "\n"


def _own_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if "spython" not in e]  # spython is lenient; its verdict is tested apart


# --- the real def -------------------------------------------------------------------------------


def test_real_def_lints_clean():
    assert lint_def.lint(DEF, REPO) == []


def test_cli_exit_status_and_one_line_errors(tmp_path):
    ok = subprocess.run([sys.executable, str(LINTER), str(DEF)], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout) == (0, "")

    lines = _lines()
    broken = tmp_path / "broken.def"
    broken.write_text("\n".join(lines[1:]) + "\n")  # no Bootstrap:
    bad = subprocess.run([sys.executable, str(LINTER), "--root", str(REPO), str(broken)], capture_output=True,
                         text=True)
    assert bad.returncode == 1
    assert bad.stdout.startswith(f"{broken}:")
    assert all(re.match(rf"{re.escape(str(broken))}:\d+: ", line) for line in bad.stdout.splitlines())


def test_def_follows_the_project_conventions():
    text = DEF.read_text()
    base = re.search(r"^From:\s*(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "-cuda12." in base  # CUDA 12 for cupy-cuda12x
    assert not base.endswith(":latest") and re.search(r":\d+\.\d+\.\d+-", base)  # pinned by version tag
    assert "export PYTHONNOUSERSITE=1" in _section("environment")
    post = _section("post")
    assert '"/opt/fractal[gpu]"' in post and "pip install -e" not in post and "--editable" not in post
    assert "--constraint" in post  # the image's torch is kept
    # the runtime base image has no C++ compiler: without it device cpu would fall back to the NumPy reference
    assert re.search(r"^\s*(DEBIAN_FRONTEND=\S+\s+)?apt-get install -y .*\bg\+\+", post, re.M)
    for source in ("pyproject.toml", "README.md", "fractal_pretrain", "ad_eval", "jobs", "slurm"):
        assert re.search(rf"^\s+{source} /opt/fractal/{source}$", _section("files"), re.M), source


# --- each rule catches a broken copy ----------------------------------------------------------------


def _drop_bootstrap(lines):
    return lines[1:], _index(lines, "From:") - 1  # From: is now the first keyword


def _drop_from(lines):
    i = _index(lines, "From:")
    return lines[:i] + lines[i + 1:], 0  # reported on the Bootstrap: line


def _unknown_section(lines):
    i = _index(lines, "%help")
    return lines[:i] + ["%bogus"] + lines[i + 1:], i


def _bash_error_in_post(lines):
    i = _index(lines, "%post") + 2  # after "set -eu"
    return lines[:i] + ["    fi"] + lines[i:], i


def _missing_files_source(lines):
    i = _index(lines, "%files") + 1
    return lines[:i] + ["    no_such_dir /opt/fractal/no_such_dir"] + lines[i:], i


def _unknown_header_key(lines):
    i = _index(lines, "From:") + 1
    return lines[:i] + ["Frm: ubuntu:24.04"] + lines[i:], i


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_bootstrap, "'Bootstrap:' must be the first keyword"),
        (_drop_from, "needs a 'From:' line"),
        (_unknown_section, "unknown section %bogus"),
        (_bash_error_in_post, "%post: bash -n: syntax error near unexpected token `fi'"),
        (_missing_files_source, "%files source 'no_such_dir' does not exist"),
        (_unknown_header_key, "unknown header keyword 'frm'"),
    ],
    ids=["no-bootstrap-first", "no-from", "unknown-section", "bash-syntax-post", "missing-files-source",
         "unknown-header-key"],
)
def test_rule_catches_broken_copy(tmp_path, mutate, message):
    lines, index = mutate(_lines())
    broken = tmp_path / "broken.def"
    broken.write_text("\n".join(lines) + "\n")
    errors = _own_errors(lint_def.lint(broken, REPO))
    assert errors == [errors[0]] and errors[0].startswith(f"{broken}:{index + 1}: "), errors
    assert message in errors[0]


def test_files_sources_are_relative_to_the_build_context(tmp_path):
    errors = lint_def.lint(DEF, tmp_path)  # an empty folder is not the repository root
    errors = _own_errors(errors)
    assert len(errors) == 6 and all("does not exist" in e for e in errors)


def test_app_sections_stage_copies_and_globs_are_accepted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    definition = tmp_path / "multi.def"
    definition.write_text(
        "# two stages\n"
        "Bootstrap: docker\nFrom: debian:bookworm-slim\nStage: build\n\n"
        "%post\n    echo build > /built\n\n"
        "Bootstrap: scratch\nStage: final\n\n"
        "%files from build\n    /built /built\n"
        "%files\n    data/*.txt /opt/data/\n    \"data/a.txt\" /opt/a.txt\n"
        "%apprun hello\n    exec echo \"hello $*\"\n"
        "%applabels hello\n    Kind demo\n"
    )
    assert _own_errors(lint_def.lint(definition, tmp_path)) == []
    (tmp_path / "data" / "a.txt").unlink()
    errors = _own_errors(lint_def.lint(definition, tmp_path))
    assert [e.split(": ", 1)[0] for e in errors] == [f"{definition}:15", f"{definition}:16"]


# --- spython ----------------------------------------------------------------------------------------


def test_spython_parses_the_real_def():
    parsers = pytest.importorskip("spython.main.parse.parsers")
    recipes = parsers.SingularityParser(str(DEF)).recipe
    (recipe,) = recipes.values()
    assert recipe.fromHeader == re.search(r"^From:\s*(\S+)", DEF.read_text(), re.M).group(1)
    assert "pyproject.toml /opt/fractal/pyproject.toml" in recipe.files
    assert "PYTHONNOUSERSITE=1" in recipe.environ
    assert any("pip install" in line for line in recipe.install)


def test_spython_failure_is_reported(tmp_path, monkeypatch):
    parsers = pytest.importorskip("spython.main.parse.parsers")

    def fail(filename):
        raise ValueError("cannot parse")

    monkeypatch.setattr(parsers, "SingularityParser", fail)
    assert lint_def.lint(DEF, REPO) == [f"{DEF}:1: spython cannot parse the file: cannot parse"]


# --- the scripts do what %help says -----------------------------------------------------------------


@pytest.fixture
def runscript(tmp_path):
    """Run %runscript with /bin/sh (as Apptainer does) and a python3 stub that prints its arguments."""
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "python3"
    stub.write_text('#!/bin/sh\necho "python3 $*"\n')
    stub.chmod(0o755)
    script = tmp_path / "runscript"
    script.write_text(_section("runscript"))
    env = {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}"}

    def run(*args):
        return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, env=env)

    return run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fractal-pretrain", "recipes"], "python3 -m fractal_pretrain recipes"),
        (["ad-eval", "run", "--method", "patchcore"], "python3 -m ad_eval run --method patchcore"),
        (["python3", "-c", "print(1)"], "python3 -c print(1)"),
    ],
)
def test_runscript_dispatches(runscript, args, expected):
    result = runscript(*args)
    assert (result.returncode, result.stdout.strip()) == (0, expected)


def test_runscript_usage(runscript):
    assert runscript("--help").returncode == 0 and "usage:" in runscript("--help").stdout
    for args in ([], ["train"]):
        result = runscript(*args)
        assert result.returncode == 2 and "usage:" in result.stderr and result.stdout == ""


def test_runscript_usage_lists_every_subcommand(runscript):
    from ad_eval.cli import build_parser as ad_eval_parser
    from fractal_pretrain.cli import build_parser as fractal_parser

    usage = runscript("--help").stdout
    for program, parser in (("fractal-pretrain", fractal_parser()), ("ad-eval", ad_eval_parser())):
        (commands,) = (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (line,) = (line.split()[1] for line in usage.splitlines() if line.split()[:1] == [program])
        assert line.split("|") == list(commands), f"{program}: usage lists {line}, the CLI has {list(commands)}"


def test_test_section_render_command_runs(tmp_path):
    """The tiny CPU render of %test, with this environment's fractal_pretrain in place of the image's."""
    body = _section("test").replace("\\\n", " ")
    (command,) = [line.strip() for line in body.splitlines() if "fractal_pretrain render" in line]
    env = {**os.environ, "work": str(tmp_path)}
    command = command.replace("python3", shlex.quote(sys.executable), 1)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "render.png").stat().st_size > 0


def test_test_section_checks_the_compiled_renderer(tmp_path):
    """%test fails where the fast CPU renderer cannot be built (no compiler) instead of passing on the reference."""
    body = _section("test").replace("\\\n", " ")
    (command,) = [line.strip() for line in body.splitlines() if "fast_cpu.load()" in line]
    command = command.replace("python3", shlex.quote(sys.executable), 1)
    env = {**os.environ, "work": str(tmp_path)}
    assert subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env).returncode == 0
    broken = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            env={**env, "CXX": str(tmp_path / "no-such-compiler")})
    assert broken.returncode != 0 and "no C++ compiler" in broken.stderr
