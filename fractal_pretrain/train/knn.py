"""k-NN probe of a frozen backbone: label-free training still gets a number that says features are learned.

A fixed labelled set is rendered once per run: ``classes x per_class`` images of the ``anderson`` recipe with
``classes`` systems (one system per class, the full single-fractal augmentation), keys ``[0, classes * per_class)``
of ``PROBE_EPOCH`` (an epoch training never reaches). Features are the backbone's pooled outputs, L2-normalised;
each image is classified by its ``k`` most cosine-similar others (leave-one-out), votes weighted by similarity.
Chance is ``1 / classes``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain.recipes import get_recipe

PROBE_EPOCH = 2**32 - 2  # below data.VAL_EPOCH: the probe's keys meet neither training nor validation keys
PROBE_BATCH = 256


def render_probe_set(classes: int, per_class: int, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as the model's input, labels) on the data module's device, in its input dtype and layout."""
    from fractal_pretrain.render.renderer import make_renderer

    recipe = get_recipe("anderson", {"num_classes": classes, "num_points": data.recipe.num_points,
                                     "chains": data.recipe.chains})
    renderer = make_renderer(recipe, size=data.size, seed=data.seed, device=data.device_name)
    indices = np.arange(classes * per_class, dtype=np.int64)
    parts = [renderer.render_tensor(indices[i:i + PROBE_BATCH], PROBE_EPOCH, dtype=data.input_dtype,
                                    channels_last=data.channels_last, mean=data.mean, std=data.std)
             for i in range(0, len(indices), PROBE_BATCH)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int, classes: int) -> float:
    """Leave-one-out k-NN top-1 accuracy with cosine similarity and similarity-weighted votes."""
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))  # never its own neighbour
    k = min(k, len(f) - 1)
    weight, neighbour = sim.topk(k, dim=1)
    votes = torch.zeros(len(f), classes, device=f.device)
    votes.scatter_add_(1, labels[neighbour], weight)
    return (votes.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([backbone(images[i:i + PROBE_BATCH]) for i in range(0, len(images), PROBE_BATCH)])
