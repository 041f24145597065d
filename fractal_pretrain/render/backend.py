"""Where the CUDA kernels run: CuPy on a GPU, or the CPU emulator (``emulator.py``) in CI.

A renderer holds one ``KernelBackend`` and never branches on the device itself: kernels are looked up,
launched on a stream, fed uploads and sized for shared memory through it. ``CupyBackend`` compiles
``kernels/<module>.cu`` with NVRTC on first use (``--fmad=false``: float32 products and sums round like
NumPy's) and launches on torch's current stream; ``EmulatorBackend`` builds the same source for the CPU
and runs it on CPU tensors, mirroring an H100's shared-memory limit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import numpy as np

from fractal_pretrain.config import ConfigError
from fractal_pretrain.render.kernel_constants import define_options
from fractal_pretrain.transfer import host_to_device

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")  # fmad off: float32 ops round like NumPy's
# What CuPy adds after our options in every NVRTC build (cupy/cuda/compiler.py, _compile_with_cache_cuda); the
# last -ftz wins, so on the GPU float32 denormals flush to zero, unlike NumPy, the emulator and nvcc's default.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)
H100_SHARED_OPTIN = 232_448  # bytes of shared memory a block may opt in to: the emulator mirrors the H100


def ptr(tensor) -> np.uint64:
    """A torch tensor's device pointer as a kernel argument."""
    return np.uint64(tensor.data_ptr())


def device_free_memory(device) -> int | None:
    """Free memory in bytes of a torch device (``torch.cuda.mem_get_info``); None for the CPU, where nothing
    is kept resident and nothing is checked."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def kernel_source(name: str) -> str:
    return (KERNEL_DIR / f"{name}.cu").read_text()


def nvrtc_options() -> tuple[str, ...]:
    """The options CuPy compiles ``kernels/*.cu`` with: ``NVRTC_OPTIONS``, the constants (``-D``), the include
    folder and a digest of the headers there. CuPy's kernel cache (``~/.cupy/kernel_cache``) is keyed by the
    source string and the options, not by the headers it includes: without the digest, a ``.cu`` file whose
    ``common.cuh`` changed (an edit between two calls on a warm machine, another package version in
    benchmarks/kernel_versions.sh) would load the cubin built from the old header."""
    digest = hashlib.sha256()
    for header in sorted(KERNEL_DIR.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    headers = f"-DFRACTAL_HEADERS_SHA256=0x{digest.hexdigest()[:16]}"  # read by no kernel: part of the cache key
    return NVRTC_OPTIONS + define_options() + (f"-I{KERNEL_DIR}", headers)


@functools.cache
def cupy_module(name: str, device_id: int):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=kernel_source(name), options=nvrtc_options())


class KernelBackend:
    """The device-specific part of the kernel renderers (see the module docstring)."""

    emulated: bool
    torch_device: object
    device_id: int

    def kernel(self, module: str, name: str):
        """A kernel of ``kernels/<module>.cu``, called as ``kernel(grid, block, args, shared_mem=...)``."""
        raise NotImplementedError

    def stream(self):
        """The stream kernels launch on (torch's current one), or None."""
        return None

    @contextlib.contextmanager
    def launching(self, stream):
        """Kernels called inside the ``with`` block run on ``stream``."""
        yield

    def upload(self, array: np.ndarray):
        """A host array as a device tensor, without a host sync (``transfer.host_to_device``: pinned and
        non-blocking on CUDA, so a side-stream render never stalls the training loop)."""
        return host_to_device(array, self.torch_device)

    def shared_optin(self) -> int:
        """Bytes of shared memory a block may opt in to."""
        raise NotImplementedError

    def free_memory(self) -> int | None:
        """Free device memory in bytes (None: not a device, nothing to check)."""
        return None


class EmulatorBackend(KernelBackend):
    emulated = True

    def __init__(self):
        import torch

        self.torch_device, self.device_id = torch.device("cpu"), -1

    def kernel(self, module: str, name: str):
        from fractal_pretrain.render import emulator

        return emulator.load_module(module).get_function(name)

    def shared_optin(self) -> int:
        return H100_SHARED_OPTIN


class CupyBackend(KernelBackend):
    emulated = False

    def __init__(self, device: str):
        import torch

        try:  # check the device before anything slow (banks) is built
            import cupy  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"device={device!r} needs CuPy ({err}); install the 'gpu' extra") from None
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: no CUDA device is visible")
        requested = torch.device(device)
        self.device_id = requested.index if requested.index is not None else torch.cuda.current_device()
        self.torch_device = torch.device("cuda", self.device_id)

    def kernel(self, module: str, name: str):
        return cupy_module(module, self.device_id).get_function(name)

    def stream(self):
        import cupy
        import torch

        return cupy.cuda.ExternalStream(torch.cuda.current_stream(self.torch_device).cuda_stream, self.device_id)

    @contextlib.contextmanager
    def launching(self, stream):
        import cupy

        with cupy.cuda.Device(self.device_id), stream:
            yield

    def shared_optin(self) -> int:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        return int(props.get("sharedMemPerBlockOptin", props["sharedMemPerBlock"]))

    def free_memory(self) -> int | None:
        return device_free_memory(self.torch_device)


def make_backend(device: str = "cuda", emulate: bool = False) -> KernelBackend:
    """The emulator (``emulate=True``) or CuPy on ``device`` ('cuda' or 'cuda:N')."""
    return EmulatorBackend() if emulate else CupyBackend(device)
