"""Lint an Apptainer definition file on a machine without Apptainer.

Debian bookworm packages no ``apptainer`` (nor ``singularity-container``), so CI cannot run
``apptainer build``. This checks what a build would trip over, following Apptainer's own parser
(``pkg/build/types/parser/deffile.go``: a line whose first word starts with ``%`` opens a section;
the header is everything before the first section):

* ``Bootstrap:`` is the first keyword (only comments and blank lines may come before it);
* agents that pull a base image (``docker``, ``library``, ``oras``, ...) have a ``From:`` line;
* every header keyword is one Apptainer knows;
* only known sections: ``%setup %files %environment %post %runscript %startscript %test %labels
  %help %arguments`` and the SCIF app sections (``%appinstall NAME`` ...);
* every shell section (``%setup %post %environment %runscript %startscript %test`` and
  ``%appinstall %appenv %apprun %appstart %apptest``) passes ``bash -n``;
* every ``%files`` source exists (globs must match), relative to the build context: the directory
  ``apptainer build`` runs in, the repository root;
* when spython is installed, its Singularity parser reads the file (it is lenient, hence the rest).

Usage::

    python3 containers/lint_def.py containers/fractal.def [--root REPO]

Prints one ``PATH:LINE: problem`` per problem and exits 1, or prints nothing and exits 0.
``lint(path, root)`` returns the same lines as a list.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the build context of containers/*.def

# Header keywords accepted by Apptainer (validHeaders in deffile.go); otherurl takes a number suffix.
HEADER_KEYS = frozenset({
    "bootstrap", "from", "includecmd", "mirrorurl", "updateurl", "osversion", "include", "library",
    "registry", "namespace", "stage", "product", "user", "regcode", "productpgp", "registerurl",
    "modules", "fingerprints", "confurl", "setopt",
})  # fmt: skip
NUMBERED_HEADER_KEYS = re.compile(r"otherurl\d+")
# Bootstrap agents that start from an existing image named by From:.
AGENTS_NEEDING_FROM = frozenset({
    "docker", "docker-daemon", "docker-archive", "oci", "oci-archive", "library", "localimage",
    "oras", "shub",
})  # fmt: skip

SECTIONS = frozenset({
    "setup", "files", "environment", "post", "runscript", "startscript", "test", "labels", "help",
    "arguments",
})  # fmt: skip
APP_SECTIONS = frozenset({
    "appinstall", "applabels", "appfiles", "appenv", "apptest", "apphelp", "apprun", "appstart",
})  # fmt: skip
SHELL_SECTIONS = frozenset({
    "setup", "post", "environment", "runscript", "startscript", "test",
    "appinstall", "appenv", "apprun", "appstart", "apptest",
})  # fmt: skip
FILES_SECTIONS = frozenset({"files", "appfiles"})

_BASH_ERROR = re.compile(r"line (\d+): (.*)")


@dataclass
class Section:
    """One ``%name args`` section: its header line number (1-based) and body lines."""

    name: str
    args: str
    line: int
    body: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One build stage: header keywords (lower case) with their line numbers, then sections."""

    header: dict[str, tuple[str, int]] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)


def _is_stage_start(line: str) -> bool:
    # Apptainer splits multi-stage files at every line starting with "Bootstrap:" (any case).
    return line.lower().startswith("bootstrap:")


def parse(lines: list[str], where: str) -> tuple[list[Stage], list[str]]:
    """Split a definition into stages, header keywords and sections, as Apptainer does.

    Args:
        lines: the file's lines, without line ends.
        where: the name to put in messages (the file's path).

    Returns:
        (stages, errors): the stages in file order, and the structural problems found on the way
        (first keyword, header syntax, unknown header keywords).
    """
    stages: list[Stage] = []
    errors: list[str] = []
    stage: Stage | None = None
    section: Section | None = None
    first_keyword_seen = False
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if _is_stage_start(line):
            stage, section = Stage(), None
            stages.append(stage)
        elif words and words[0].startswith("%"):
            if stage is None:  # sections with no header at all
                stage = Stage()
                stages.append(stage)
            name = words[0][1:].lower()
            args = line.strip()[len(words[0]):].strip()
            section = Section(name, args, number)
            stage.sections.append(section)
            if not first_keyword_seen:
                errors.append(f"{where}:{number}: the file must start with 'Bootstrap:', found section {words[0]}")
                first_keyword_seen = True
            continue
        if section is not None:
            section.body.append(line)
            continue
        text = line.split("#", 1)[0].strip()  # header line; comments may follow the value
        if not text:
            continue
        if not first_keyword_seen:
            first_keyword_seen = True
            if not text.lower().startswith("bootstrap:"):
                errors.append(f"{where}:{number}: 'Bootstrap:' must be the first keyword, found {text!r}")
        key, sep, value = text.partition(":")
        key = key.strip().lower()
        if not sep or not key:
            errors.append(f"{where}:{number}: header line is not 'Key: value': {text!r}")
            continue
        if key not in HEADER_KEYS and not NUMBERED_HEADER_KEYS.fullmatch(key):
            errors.append(f"{where}:{number}: unknown header keyword {key!r}")
        if stage is None:  # a header line before any Bootstrap: (already reported)
            stage = Stage()
            stages.append(stage)
        stage.header[key] = (value.strip(), number)
    if not stages:
        errors.append(f"{where}:1: empty definition: no 'Bootstrap:' header and no sections")
    return stages, errors


def _check_header(stage: Stage, where: str) -> list[str]:
    if "bootstrap" not in stage.header:
        return []  # reported by parse as a missing first keyword
    agent, line = stage.header["bootstrap"]
    if not agent:
        return [f"{where}:{line}: 'Bootstrap:' has no agent (docker, library, localimage, ...)"]
    if agent.lower() in AGENTS_NEEDING_FROM and not stage.header.get("from", ("", 0))[0]:
        return [f"{where}:{line}: 'Bootstrap: {agent}' needs a 'From:' line naming the base image"]
    return []


def _check_section_name(section: Section, where: str) -> list[str]:
    if section.name in SECTIONS:
        return []
    if section.name in APP_SECTIONS:
        if not section.args:
            return [f"{where}:{section.line}: %{section.name} needs an app name (%{section.name} NAME)"]
        return []
    known = " ".join(f"%{name}" for name in sorted(SECTIONS)) + " %app*"
    return [f"{where}:{section.line}: unknown section %{section.name} (known: {known})"]


def _check_shell(section: Section, where: str, bash: str | None) -> list[str]:
    if bash is None:
        return [f"{where}:{section.line}: %{section.name}: cannot check the shell syntax, bash not found"]
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as handle:
        handle.write("\n".join(section.body) + "\n")
        script = handle.name
    try:
        result = subprocess.run([bash, "-n", script], capture_output=True, text=True, check=False)
    finally:
        os.unlink(script)
    if result.returncode == 0:
        return []
    message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else "syntax error"
    match = _BASH_ERROR.search(message)
    if match:  # body line N is file line section.line + N
        return [f"{where}:{section.line + int(match.group(1))}: %{section.name}: bash -n: {match.group(2)}"]
    return [f"{where}:{section.line}: %{section.name}: bash -n: {message.replace(script, '<script>')}"]


def _check_files(section: Section, where: str, root: Path) -> list[str]:
    if section.args.split()[:1] == ["from"]:
        return []  # sources are paths in an earlier stage, not on the host
    errors = []
    for offset, raw in enumerate(section.body, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            source = shlex.split(text)[0]
        except ValueError as exc:
            errors.append(f"{where}:{section.line + offset}: %{section.name}: cannot split {text!r}: {exc}")
            continue
        if "{{" in source:
            continue  # templated by %arguments / --build-arg: only known at build time
        path = Path(source) if os.path.isabs(source) else root / source
        found = glob.glob(str(path)) if glob.has_magic(source) else path.exists()
        if not found:
            errors.append(
                f"{where}:{section.line + offset}: %{section.name} source {source!r} does not exist "
                f"(relative to the build context {root})"
            )
    return errors


def _check_spython(path: Path, where: str) -> list[str]:
    try:
        from spython.logger import bot
        from spython.main.parse.parsers import SingularityParser
    except ImportError:
        return []  # optional: the checks above do not need it
    sink = io.StringIO()
    streams = bot.outputStream, bot.errorStream
    bot.outputStream = bot.errorStream = sink  # its logger keeps the streams it started with
    try:  # spython logs warnings (e.g. on a multi-line %runscript) and may call sys.exit on errors
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            recipes = SingularityParser(str(path)).recipe
    except (Exception, SystemExit) as exc:
        logged = sink.getvalue().strip().splitlines()
        detail = logged[-1] if isinstance(exc, SystemExit) and logged else str(exc) or type(exc).__name__
        return [f"{where}:1: spython cannot parse the file: {detail}"]
    finally:
        bot.outputStream, bot.errorStream = streams
    if not recipes:
        return [f"{where}:1: spython found no build stage"]
    return []


def lint(path: str | Path, root: str | Path = REPO_ROOT) -> list[str]:
    """Check one Apptainer definition file.

    Args:
        path: the definition file.
        root: the build context, where relative ``%files`` sources are looked up (the directory
            ``apptainer build`` runs in).

    Returns:
        One ``PATH:LINE: problem`` string per problem, in file order per check; empty when clean.
    """
    path, root = Path(path), Path(root)
    where = str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        return [f"{where}:0: cannot read: {exc.strerror or exc}"]
    stages, errors = parse(lines, where)
    bash = shutil.which("bash")
    for stage in stages:
        errors += _check_header(stage, where)
        for section in stage.sections:
            name_errors = _check_section_name(section, where)
            errors += name_errors
            if name_errors:
                continue
            if section.name in SHELL_SECTIONS:
                errors += _check_shell(section, where, bash)
            if section.name in FILES_SECTIONS:
                errors += _check_files(section, where, root)
    errors += _check_spython(path, where)
    return errors


def main(argv: list[str] | None = None) -> int:
    """Lint the given definition files; print problems; return 0 if all are clean, else 1."""
    parser = argparse.ArgumentParser(description="Lint Apptainer definition files without Apptainer.")
    parser.add_argument("defs", nargs="+", metavar="DEF", help="definition file(s)")
    parser.add_argument(
        "--root", default=str(REPO_ROOT), help="build context for %%files sources (default: the repository root)"
    )
    args = parser.parse_args(argv)
    errors = [error for definition in args.defs for error in lint(definition, args.root)]
    for error in errors:
        print(error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
