"""AdaBN: a backbone's BatchNorm running statistics re-estimated on the category's normal train images.

A backbone pre-trained on synthetic images normalises every layer with the statistics of those images, and
on real photographs these are off: in benchmarks/RESULTS.md ("Recipes at equal CPU budget") resetting them
moved a MandelbulbVAR backbone's PatchCore pixel AUROC from 0.614 to 0.774. AdaBN (Li et al., "Revisiting
Batch Normalization for Practical Domain Adaptation", 2016) replaces them with the target domain's. In anomaly
detection the target's normal images are the train set every method fits on anyway, so nothing of the test
set is used and the protocol stays one-class. Only ``running_mean``/``running_var`` change; every learned
weight stays as pre-trained. ``ad-eval run --bn-stats train`` (grid: a backbone's ``bn_stats: train``) turns it
on; the records' backbone label gets ``+adabn`` so reports keep it apart from the backbone's own statistics.
Off by default: in the CPU recipe study it lowered PatchCore's pixel AUROC for every backbone but MandelbulbVAR
(0.614 -> 0.775); hazelnut mostly gained, transistor lost throughout (benchmarks/RESULTS.md, "AdaBN").

The estimate is PyTorch's cumulative average (``momentum=None``) of each BatchNorm layer's batch statistics in
training mode, over the cell's train images in their listed order in batches of ``BATCH``: with up to
``BATCH`` images (few-shot cells) it is the exact mean and unbiased variance of each layer's input over all
images and positions; with more, the mean of per-batch values over the fewest batches of at most ``BATCH``,
equal in size to one image (50 images: 25 + 25). A layer's input is what the layers before it
give in training mode (batch-normalised), as in AdaBN. Deterministic for a given image list and device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ad_eval.backbones import Backbone
from ad_eval.datasets import ADImageDataset, Sample

BN_STATS = ("source", "train")  # source: the backbone's own running statistics; train: re-estimated here
LABEL_SUFFIX = "+adabn"  # records' backbone label: Fractals -> Fractals+adabn
BATCH = 32  # most images per statistics batch: every few-shot cell of up to 32 images is one exact batch
# its references and centres were made under the backbone's own statistics
PROJECTOR_NEEDS_SOURCE_STATS = ("bn_stats='train' with a projector: the projector was adapted on the backbone's own "
                                "BatchNorm statistics (use bn_stats='source')")


def adabn_label(name: str) -> str:
    return name if name.endswith(LABEL_SUFFIX) else name + LABEL_SUFFIX


@torch.no_grad()
def recalibrated(backbone: Backbone, images: Sequence[Sample], *, size: int, crop: int | None,
                 device: str = "cpu", batch_size: int = BATCH) -> Backbone:
    """``backbone`` with every BatchNorm layer's running statistics estimated on ``images``.

    The images are preprocessed as the methods see them (``size``, ``crop``, the backbone's mean/std).
    Returns a new ``Backbone`` (CPU tensors); ``backbone`` itself is unchanged.
    """
    if not images:
        raise ValueError("bn_stats='train': the category has no train images to estimate statistics on")
    model = backbone.build().to(device)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches, not an exponential one
        norm.train()
    data = ADImageDataset(images, size=size, crop=crop, mean=backbone.mean, std=backbone.std)
    # batches of equal size (to one image): the average over batches then weighs every image alike, and no last
    # batch of one image (33 images: 17 + 16, not 32 + 1) has half the weight or a 1x1 layer4 BatchNorm can't use
    equal = math.ceil(len(data) / math.ceil(len(data) / batch_size))
    for batch in DataLoader(data, batch_size=equal, shuffle=False):
        model(batch["image"].to(device))
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    return dataclasses.replace(backbone, state_dict={key: state[key] for key in backbone.state_dict})
