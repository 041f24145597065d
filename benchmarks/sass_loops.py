"""Static instruction counts of the kernels' innermost loops (SASS), for kernel work without a GPU.

Compiles ``fractal_pretrain/render/kernels/*.cu`` for one architecture with nvcc (the flags of the tests),
disassembles with cuobjdump (``pip install nvidia-cuda-cuobjdump`` where the CUDA toolkit lacks it) and
prints a Markdown table per kernel: every innermost loop (a backward branch with no other loop inside),
its instructions, and the memory instructions among them (shared LDS/STS, global LDG/STG, atomics, local
LDL/STL = spills, warp MATCH) and CALL: the out-of-line slow paths of IEEE division and square root, whose
~5 inline set-up instructions each are skipped on the fast path (executed ~ instructions - 5 CALL). A loop
body that serves several chaos steps (4 per Philox call, 4 per replayed group) is reported whole: divide by
hand. Static counts: branches inside a body are counted whether taken or not.

    python3 benchmarks/sass_loops.py [--arch sm_90] [--kernels render_items,finish] [--min 40] [--source DIR]
                                     [--define MB_MIN_POWER=8 --define MB_MAX_POWER=8]

``--source`` compares another version's kernels, e.g. a ``git worktree`` of an older commit's
``fractal_pretrain/render/kernels``. ``--define NAME=VALUE`` replaces a generated constant, e.g. one
power for ``march_sprites`` (it is specialised per power of MB_MIN_POWER..MB_MAX_POWER).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "fractal_pretrain" / "render" / "kernels"
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNCTION = re.compile(r"Function : (\S+)")
BRANCH_TARGET = re.compile(r"\bBRA\b.*0x([0-9a-f]+)\s*$")
KINDS = {"LDS": ("LDS",), "STS": ("STS",), "LDG/STG": ("LDG", "STG", "LD.", "ST."), "ATOM": ("ATOM", "RED."),
         "LDL/STL": ("LDL", "STL"), "MATCH": ("MATCH",), "CALL": ("CALL",)}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # the pip CUDA packages share this namespace

        for root in nvidia.__path__:
            for candidate in Path(root).glob("cu*/bin/cuobjdump"):
                return str(candidate)
    except ImportError:
        pass
    sys.exit("cuobjdump not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`")


def disassemble(source: Path, arch: str, workdir: Path, overrides: tuple[str, ...] = ()) -> str:
    nvcc = shutil.which("nvcc") or sys.exit("nvcc not found")
    cubin = workdir / f"{source.stem}.cubin"
    from fractal_pretrain.render.kernel_constants import define_options

    # Kernels since the generated constants need their -D options; older versions (--source) define their own.
    generated = "FRACTAL_CONSTANTS" in (source.parent / "common.cuh").read_text()
    replaced = {o.split("=")[0] for o in overrides}
    defines = [d for d in define_options() if d[2:].split("=")[0] not in replaced] if generated else []
    subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-fmad=false", "-std=c++17",
                    *defines, *(f"-D{o}" for o in overrides), f"-I{source.parent}", "-o", str(cubin), str(source)],
                   check=True)
    return subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction text)]."""
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in sass.splitlines():
        if m := FUNCTION.search(line):
            name = m.group(1)
            out[name] = []
        elif name and (m := INSTRUCTION.match(line)):
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def innermost_loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    loops = []
    for address, text in code:
        m = BRANCH_TARGET.search(text)
        if m and int(m.group(1), 16) <= address:
            loops.append((int(m.group(1), 16), address))
    return [(lo, hi) for lo, hi in loops
            if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in loops)]


def loop_row(code: list[tuple[int, str]], lo: int, hi: int) -> dict:
    body = [text for address, text in code if lo <= address <= hi]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for text in body]
    row = {"loop": f"{lo:#06x}-{hi:#06x}", "instructions": len(body)}
    for kind, prefixes in KINDS.items():
        row[kind] = sum(op.startswith(prefixes) for op in ops)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--min", type=int, default=20, help="hide loops with fewer instructions")
    parser.add_argument("--source", type=Path, default=KERNELS, help="folder of the .cu files")
    parser.add_argument("--define", action="append", default=[], help="NAME=VALUE replacing a generated constant")
    args = parser.parse_args(argv)
    wanted = {k for k in args.kernels.split(",") if k}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(args.source.glob("*.cu")):
            for name, code in functions(disassemble(source, args.arch, Path(tmp), tuple(args.define))).items():
                if wanted and name not in wanted:
                    continue
                rows = [loop_row(code, lo, hi) for lo, hi in innermost_loops(code)]
                rows = [r for r in rows if r["instructions"] >= args.min]
                print(f"\n### {name} ({source.name}, {args.arch}): {len(code)} instructions\n")
                print("| " + " | ".join(["loop", "instructions", *KINDS]) + " |")
                print("|" + "---|" * (2 + len(KINDS)))
                for r in rows:
                    print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
