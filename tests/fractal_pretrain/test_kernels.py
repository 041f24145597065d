"""CUDA kernels without a GPU: they compile (nvcc for sm_80/sm_90, NVRTC with the renderer's own
options), their constant layouts match the Python side, and their shared helpers (Philox, uniform
draws, exp_neg, HSV colour), built for the host by nvcc, give the NumPy reference's exact bits.

Whole images vs the reference: test_render_kernels.py (CPU emulator in CI; GPU with marker ``gpu``).
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fractal_pretrain import rng
from fractal_pretrain.mandelbulb import constants as marcher
from fractal_pretrain.mandelbulb import reference as mandelbulb_reference
from fractal_pretrain.mandelbulb import renderer as mandelbulb_renderer
from fractal_pretrain.recipes import MAX_CHAINS, get_recipe
from fractal_pretrain.render import backend, cupy_renderer, kernel_constants, params, reference

KERNELS = cupy_renderer.KERNEL_DIR
KERNEL_FILES = (*cupy_renderer.KERNEL_FILES, "mandelbulb")
DEFINES = kernel_constants.define_options()
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernels not compiled")


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_compiles_with_nvcc(name, arch, tmp_path):
    result = subprocess.run(
        [NVCC, f"-arch={arch}", "-cubin", "-fmad=false", "-std=c++17", *DEFINES, f"-I{KERNELS}", "-Werror",
         "all-warnings",
         "-o", str(tmp_path / f"{name}.cubin"), str(KERNELS / f"{name}.cu")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# The largest block each kernel is launched with (cupy_renderer; render_items: one thread per chain).
MAX_BLOCK = {"plan_samples": cupy_renderer.PLAN_BLOCK, "plan_items": cupy_renderer.PLAN_BLOCK,
             "render_items": MAX_CHAINS, "render_items_point_masks": MAX_CHAINS,
             "plasma_background": cupy_renderer.PLASMA_BLOCK, "plasma_background_global": cupy_renderer.PLASMA_BLOCK,
             "paste_objects": cupy_renderer.PIXEL_BLOCK, "finish": cupy_renderer.PIXEL_BLOCK,
             "march_sprites": mandelbulb_renderer.PIXEL_BLOCK, "paste_sprites": mandelbulb_renderer.PIXEL_BLOCK,
             "paste_bank": mandelbulb_renderer.PIXEL_BLOCK}
# Static shared memory the renderer adds to the dynamic part when it checks what fits a block.
STATIC_SHARED = {"render_items": cupy_renderer.STATIC_SHARED_BYTES,
                 "render_items_point_masks": cupy_renderer.STATIC_SHARED_BYTES,
                 "plasma_background": cupy_renderer.PLASMA_STATIC_SHARED_BYTES}


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_launches_with_its_largest_block_and_uses_no_local_memory(arch, tmp_path):
    # 65536 registers per block on sm_80/sm_90: more per thread and a 1024-chain recipe fails to launch.
    # A stack frame means local memory (an indexed local array or spills), paid per pixel or per step.
    # Static shared memory above what the renderer counts would fail a launch whose histogram just fits.
    usage = {}
    for name in KERNEL_FILES:
        result = subprocess.run(
            [NVCC, f"-arch={arch}", "-cubin", "-fmad=false", *backend.CUPY_APPENDED_OPTIONS, "-std=c++17", *DEFINES,
             f"-I{KERNELS}", "-Xptxas", "-v",
             "-o", str(tmp_path / f"{name}.cubin"), str(KERNELS / f"{name}.cu")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        for entry, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)",
                                      result.stderr, flags=re.S):
            smem = re.search(r"(\d+) bytes smem", body)
            usage[entry] = (int(re.search(r"Used (\d+) registers", body)[1]),
                            int(re.search(r"(\d+) bytes stack frame", body)[1]), int(smem[1]) if smem else 0)
    assert set(usage) == set(MAX_BLOCK)
    for entry, (registers, stack, smem) in usage.items():
        assert registers * MAX_BLOCK[entry] <= 65536, f"{entry}: {registers} registers x {MAX_BLOCK[entry]} threads"
        assert stack == 0, f"{entry}: {stack} bytes of local memory per thread"
        if entry in STATIC_SHARED:  # the kernels with a dynamic part
            assert smem <= STATIC_SHARED[entry], f"{entry}: {smem} bytes of static shared memory"


def _nvrtc():
    """libnvrtc from the CUDA toolkit or torch's nvidia wheels, with its builtins preloaded."""
    candidates = glob.glob("/usr/local/cuda/lib64/libnvrtc.so*") + glob.glob(
        os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "lib", "libnvrtc.so*"))
    for path in candidates:
        folder = os.path.dirname(path)
        builtins = sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*")))
        try:
            for b in builtins:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_compiles_with_nvrtc_options_of_the_renderer(name):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found")
    header = (KERNELS / "common.cuh").read_bytes()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), (KERNELS / f"{name}.cu").read_bytes(), name.encode(), 1,
                                  (ctypes.c_char_p * 1)(header), (ctypes.c_char_p * 1)(b"common.cuh")) == 0
    # exactly what CuPy hands NVRTC: the backend's options, then what CuPy appends, then the architecture
    options = [o.encode() for o in backend.nvrtc_options() + backend.CUPY_APPENDED_OPTIONS]
    options += [b"--gpu-architecture=compute_90"]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()


def test_cupy_options_change_with_the_included_header(tmp_path, monkeypatch):
    # CuPy's on-disk kernel cache keys on the .cu source and the options, not on included headers: the options
    # carry a digest of common.cuh, so an edited header cannot load the cubin built from the old one.
    kernels = tmp_path / "kernels"
    shutil.copytree(KERNELS, kernels)
    monkeypatch.setattr(backend, "KERNEL_DIR", kernels)
    before = backend.nvrtc_options()
    assert before[:len(backend.NVRTC_OPTIONS)] == backend.NVRTC_OPTIONS and f"-I{kernels}" in before
    assert set(DEFINES) <= set(before) and before == backend.nvrtc_options()
    header = kernels / "common.cuh"
    header.write_text(header.read_text() + "\n// one more line\n")
    after = backend.nvrtc_options()
    assert [o for o in before if o not in after] == [o for o in before if o.startswith("-DFRACTAL_HEADERS_SHA256=")]
    assert len(set(after) - set(before)) == 1


def _defines(prefix: str) -> dict[str, int]:
    return {k[len(prefix) + 1:]: v for k, v in kernel_constants.kernel_defines().items() if k.startswith(prefix + "_")}


def test_generated_constants_follow_the_python_definitions():
    ints = _defines("RI")
    assert ints.pop("COUNT") == len(cupy_renderer.RECIPE_INTS)
    assert {name.upper(): i for i, name in enumerate(cupy_renderer.RECIPE_INTS)} == ints
    floats = _defines("RF")
    assert floats.pop("COUNT") == len(cupy_renderer.recipe_floats(get_recipe("anderson")))
    assert floats["BLUR_P"] + 1 == floats["BLUR_SIGMA"] and floats["JITTER"] == 0
    streams = _defines("STREAM")
    assert {k: streams[k] for k in ("SAMPLE", "ITEM", "CHAOS", "PLASMA")} == {
        "SAMPLE": rng.STREAM_SAMPLE, "ITEM": rng.STREAM_ITEM, "CHAOS": rng.STREAM_CHAOS, "PLASMA": rng.STREAM_PLASMA}
    assert _defines("DRAW") == {name[5:]: getattr(params, name) for name in dir(params) if name.startswith("DRAW_")}
    assert _defines("JITTER") == {"NONE": 0, "BASIC": 1, "FRACTALDB": 2, "SVD": 3}
    assert "-DSTREAM_CHAOS=3u" in DEFINES and "-DRI_CHAINS=16" in DEFINES


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_kernel_sources_hold_no_copy_of_the_constants(tmp_path):
    # Without the generated -D options a kernel must not compile: common.cuh stops with an #error naming them.
    result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-D__host__=", "-D__device__=", f"-I{KERNELS}",
                             "-x", "c++", str(KERNELS / "common.cuh")], capture_output=True, text=True)
    assert result.returncode != 0 and "kernel_constants.py" in result.stderr
    for name in KERNEL_FILES:
        text = (KERNELS / f"{name}.cu").read_text() + (KERNELS / "common.cuh").read_text()
        for constant in kernel_constants.kernel_defines():
            assert f"#define {constant} " not in text, f"{name}.cu defines {constant} again"


MARCHER_NAMES = {"MAX_ITERATIONS", "BAILOUT", "POWER_BITS", "TRAP_START", "TRAP_L1_DIVISOR", "TRAP_EXPONENT",
                 "PRIMARY_STEPS", "PRIMARY_THRESHOLD", "PRIMARY_LIMIT", "SHADOW_STEPS", "SHADOW_THRESHOLD",
                 "SHADOW_LIMIT", "SHADOW_OFFSET_DIVISOR", "NORMAL_EPS", "LIGHT_X", "LIGHT_Y", "LIGHT_Z", "AMBIENT",
                 "DIFFUSE", "SHADOW_LIGHT"}


def _marcher_value(name: str):
    return marcher.LIGHT["XYZ".index(name[-1])] if name.startswith("LIGHT_") else getattr(marcher, name)


def _marcher_literals() -> dict[str, str]:
    options = dict(d[2:].split("=", 1) for d in DEFINES)
    return {name: options[f"MB_{name}"] for name in MARCHER_NAMES}


def test_mandelbulb_marcher_constants_are_generated_from_python():
    # mandelbulb/constants.py is the one definition: the reference reads it, the -D options carry it exactly.
    want = {name: _marcher_value(name) for name in MARCHER_NAMES}
    generated = {k[3:]: v for k, v in kernel_constants.mb_marcher_defines().items()}
    assert generated == want and all(type(generated[k]) is type(want[k]) for k in want)
    for name, text in _marcher_literals().items():
        value = want[name]
        if isinstance(value, np.float32):
            text = text.removeprefix("(").removesuffix(")")
            assert text.endswith("f") and np.float32(float.fromhex(text[:-1])) == value, name
        else:
            assert text == str(value), name
    assert _marcher_literals()["LIGHT_X"] == "(-0x1.4p+3f)" and _marcher_literals()["DIFFUSE"] == "0x1.ccccccp-1f"
    assert mandelbulb_reference.PRIMARY_THRESHOLD is marcher.PRIMARY_THRESHOLD
    assert mandelbulb_reference.MAX_ITERATIONS is marcher.MAX_ITERATIONS
    with pytest.raises(TypeError, match="MB_X: 0.5"):
        kernel_constants.literal("MB_X", 0.5)  # a Python float: which precision? Say float32 explicitly
    with pytest.raises(TypeError, match="MB_X: .*inf"):
        kernel_constants.literal("MB_X", np.float32(np.inf))
    assert kernel_constants.literal("MB_X", np.float32(4.0)) == "0x1p+2f"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_compilers_read_the_marcher_floats_as_the_python_bits(tmp_path):
    floats = sorted(name for name in MARCHER_NAMES if isinstance(_marcher_value(name), np.float32))
    body = "".join(f'  std::printf("%08x\\n", bits(MB_{name}));\n' for name in floats)
    src = tmp_path / "bits.cpp"
    src.write_text("#include <cstdio>\n#include <cstring>\nunsigned bits(float f) { unsigned u; "
                   "std::memcpy(&u, &f, 4); return u; }\nint main() {\n" + body + "}\n")
    subprocess.run(["g++", "-std=c++17", *DEFINES, str(src), "-o", str(tmp_path / "bits")], check=True)
    out = subprocess.run([str(tmp_path / "bits")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(v, 16) for v in out] == [int(_marcher_value(n).view(np.uint32)) for n in floats]


def test_mandelbulb_kernel_writes_no_marcher_number_of_its_own():
    # After log32 (Cephes' coefficients) only arithmetic identities remain as float literals; a shading or
    # marching number belongs in mandelbulb/constants.py.
    text = (KERNELS / "mandelbulb.cu").read_text()
    body = text[text.index("template <int P>"):]
    literals = set(re.findall(r"(?<![\w.])\d+\.\d*(?:e[-+]?\d+)?f|(?<![\w.])\d+e[-+]?\d+f", body))
    assert literals <= {"0.0f", "0.5f", "1.0f", "2.0f", "255.0f"}, literals
    assert not re.search(r"ipow<\d", body) and "march<P>(cam, ray, rule, textbook, MB_PRIMARY_STEPS" in body
    assert "MB_LIGHT_X - hit[0]" in body and "MB_MAX_ITERATIONS" in body


def test_recipe_ints_encode_the_recipe():
    recipe = get_recipe("multiinstance", {"num_classes": 7})
    ints = dict(zip(cupy_renderer.RECIPE_INTS, cupy_renderer.recipe_ints(recipe, 64), strict=False))
    assert ints["num_classes"] == 7 and ints["multi_label"] == 1 and ints["source_any"] == 1
    assert ints["side"] == 32 and ints["slots"] == 5 and ints["jitter"] == 0 and ints["flip_bits"] == 7
    floats = cupy_renderer.recipe_floats(recipe)
    lo, width = rng.range_params(*recipe.object_scale)
    at = _defines("RF")["OBJECT_SCALE"]
    assert floats[at] == lo and floats[at + 1] == width


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("cuda") / "host_check"
    src = Path(__file__).parent / "cuda" / "host_check.cu"
    subprocess.run([NVCC, "-x", "cu", "-std=c++17", "-fmad=false", *DEFINES, f"-I{KERNELS}", str(src), "-o", str(exe)],
                   check=True, capture_output=True)

    def run(lines: list[str]) -> list[str]:
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return out.stdout.split("\n")[:-1]

    return run


def test_host_build_of_philox_matches_numpy(host_check):
    gen = np.random.default_rng(0)
    cases = gen.integers(0, 2**32, size=(200, 6), dtype=np.uint64)
    lines = host_check(["philox " + " ".join(map(str, c)) for c in cases])
    for c, line in zip(cases, lines, strict=False):
        expected = rng.philox4x32(tuple(c[:4].astype(np.uint32)), tuple(c[4:].astype(np.uint32)))
        assert [int(v) for v in line.split()] == [int(e) for e in expected]


def test_host_build_of_exp_neg_is_bit_identical(host_check):
    xs = np.linspace(0.0, 3.0, 301, dtype=np.float32)
    lines = host_check([f"expneg {x:.9g}" for x in xs])
    got = np.array([int(v) for v in lines], dtype=np.uint32).view(np.float32)
    np.testing.assert_array_equal(got, params.exp_neg(xs))
    np.testing.assert_allclose(got, np.exp(-xs.astype(np.float64)), rtol=2e-6)


def test_host_build_of_hsv_is_identical(host_check):
    grid = [(h, s, v) for h in range(0, 256, 5) for s in (0, 77, 200, 255) for v in (0, 128, 255)]
    lines = host_check([f"hsv {h} {s} {v}" for h, s, v in grid])
    expected = reference.hsv_to_rgb(*(np.array(x) for x in zip(*grid, strict=False)))
    got = np.array([[int(v) for v in line.split()] for line in lines])
    np.testing.assert_array_equal(got, expected)


def test_plan_layout_constants():
    assert _defines("SAMPLE") == {"FLOATS": cupy_renderer.SAMPLE_FLOATS}
    assert _defines("ITEM") == {"INTS": cupy_renderer.ITEM_INTS, "FLOATS": cupy_renderer.ITEM_FLOATS}
    assert cupy_renderer.ITEM_FLOATS == params.MAX_MAPS * 6 + params.MAX_MAPS + 7
    assert _defines("IF") == {"CUM": 48, "START": 56, "SHIFT": 58, "SCALE": 60, "HUE": 62}
