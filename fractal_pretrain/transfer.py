"""Host arrays to a torch device without a host sync.

A copy from pageable host memory to a CUDA device waits for the stream it is queued on, that is for the
training step queued before it: done once per batch, the host stops running ahead of the GPU. Through
pinned memory with a non-blocking copy it does not wait (torch's pinned allocator keeps the buffer until
the copy is done). The renderers' uploads, the augmentation's parameters and the data module's batch
positions all go through ``host_to_device``.
"""

from __future__ import annotations

import numpy as np


def host_to_device(array, device):
    """``array`` (a CPU tensor, NumPy or anything ``np.asarray`` takes) as a tensor on ``device``, same dtype
    and shape: on CUDA a non-blocking copy from pinned memory (a tensor already pinned, e.g. by a DataLoader,
    is not copied on the host); elsewhere the array itself as a tensor (no copy when already contiguous)."""
    import torch

    host = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return host
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)
