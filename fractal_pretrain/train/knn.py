"""k-NN probe of a frozen backbone: label-free training still gets a number that says features are learned.

A fixed labelled set is rendered once per run: ``classes x per_class`` images of the ``anderson`` recipe with
``classes`` systems (one system per class, the full single-fractal augmentation), keys ``[0, classes * per_class)``
of ``PROBE_EPOCH`` (an epoch training never reaches). The systems are held out: drawn under ``probe_seed(seed)``,
not the run's own seed, so they are not the first systems of the training bank (system k is a pure function of
(seed, k)), and the probe measures features of unseen fractals, not memorised ones (benchmarks/RESULTS.md,
"k-NN probe": a 100-class classification backbone scored 64.5% on the 20 first systems of its own bank, 45.0%
and 55.0% on two held-out sets).
Features are the backbone's pooled outputs, L2-normalised; each image is classified by its ``k`` most
cosine-similar others (leave-one-out), votes weighted by similarity. Chance is ``1 / classes``.
``benchmarks/knn_probe.py`` runs the same probe on any backbone.pt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain.recipes import get_recipe

PROBE_EPOCH = 2**32 - 2  # below data.VAL_EPOCH: the probe's keys meet neither training nor validation keys
PROBE_BATCH = 256
PROBE_SEED_OFFSET = 1_000_003  # probe systems: another seed's independent draws


def probe_seed(seed: int) -> int:
    """The bank seed of the probe's systems for a run of ``seed`` (never ``seed`` itself)."""
    return (seed + PROBE_SEED_OFFSET) % 2**32


def render_probe_set(classes: int, per_class: int, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as the model's input, labels) on the data module's device, in its input dtype and layout."""
    return render_probe_images(classes, per_class, size=data.size, seed=data.seed, device=data.device_name,
                               num_points=data.recipe.num_points, chains=data.recipe.chains,
                               dtype=data.input_dtype, channels_last=data.channels_last, mean=data.mean, std=data.std)


def render_probe_images(classes: int, per_class: int, *, size: int, seed: int, device: str, num_points: int,
                        chains: int, dtype: str, channels_last: bool, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe set of a run of ``seed``: held-out systems (``probe_seed``), ``per_class`` renders each."""
    from fractal_pretrain.render.renderer import make_renderer

    recipe = get_recipe("anderson", {"num_classes": classes, "num_points": num_points, "chains": chains})
    renderer = make_renderer(recipe, size=size, seed=probe_seed(seed), device=device)
    indices = np.arange(classes * per_class, dtype=np.int64)
    parts = [renderer.render_tensor(indices[i:i + PROBE_BATCH], PROBE_EPOCH, dtype=dtype,
                                    channels_last=channels_last, mean=mean, std=std)
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
