"""fractal_pretrain/transfer.py: host arrays to a device without a host sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fractal_pretrain.train.data import channel_stats, normalise
from fractal_pretrain.transfer import host_to_device


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.int64).reshape(2, 3), np.float32([0.5, 0.25]),
                                   np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2], [1.5, 2.5]])
def test_values_dtype_and_shape_arrive_unchanged_on_the_cpu(array):
    out = host_to_device(array, "cpu")
    want = np.asarray(array)
    assert out.device.type == "cpu" and out.is_contiguous()
    assert out.dtype == torch.from_numpy(np.ascontiguousarray(want)).dtype and tuple(out.shape) == want.shape
    np.testing.assert_array_equal(out.numpy(), want)


def test_a_cpu_tensor_is_passed_through_on_the_cpu():
    # a DataLoader's batch (pinned on CUDA machines) is a tensor, possibly a strided view: kept as it is
    batch = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4).permute(0, 2, 1)
    assert host_to_device(batch, "cpu") is batch


def test_data_module_normalisation_uploads_its_statistics_once_per_device():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    first = normalise(images, mean, std, "float32", channels_last=False)
    stats = channel_stats(mean, std, images.device)
    second = normalise(images, list(mean), list(std), "float32", channels_last=False)
    assert all(a is b for a, b in zip(channel_stats(mean, std, images.device), stats, strict=True))
    want = (images.float() * np.float32(1 / 255) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    assert torch.equal(first, second) and torch.equal(first, want)


@pytest.mark.gpu
def test_on_cuda_neither_the_copy_nor_the_data_module_normalisation_syncs():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, device="cuda")
    positions, want = np.arange(5, dtype=np.int64), normalise(images, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "float32",
                                                              channels_last=True)
    host_to_device(positions, "cuda")  # warm-up: the pinned pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = host_to_device(positions, "cuda")
        got = normalise(images, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "float32", channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and torch.equal(out.cpu(), torch.from_numpy(positions))
    assert torch.equal(got, want)
