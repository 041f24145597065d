"""Training objectives that look at two views of each sample (``model.objective``), one class each.

The supervised objectives (``classification``, ``multilabel``) are the classifier's own losses
(``model.py``). A two-view objective owns everything beyond the backbone: its heads, its loss, its
optimiser groups and any per-step update. The backbone is the torchvision ResNet without its ``fc``
(replaced by the identity), so ``backbone.pt`` is exported exactly as for classification and the
heads never leave the checkpoint.

SimSiam (Chen & He 2021, as in Anderson & Farrell's ``model/selfsupervised.yaml``):
  projector  f -> 2048 -> 2048 -> dim, each Linear without bias followed by BN (ReLU between;
             the last BN without affine parameters);
  predictor  dim -> pred_dim -> dim, a bottleneck MLP (Linear, BN, ReLU, Linear);
  loss       D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 with D(p, z) = -cos(p, z);
  optimiser  lr scaled by batch / 256; the predictor keeps its learning rate fixed (no schedule). With
             model.decay_norm_and_bias false (the anchor's), norm weights and biases get no weight decay, the
             predictor's too. (The anchor's yaml names a predictor group without a weight_decay, so its
             base.py decays all of the predictor's parameters, its BN and last bias included: 3,072 values at
             the default widths; not copied here.)

BYOL (Grill et al. 2020), the second objective, written as any further one would be:
  projector  f -> hidden -> dim (Linear, BN, ReLU, Linear); hidden = model.predictor_dim (BYOL: 4096),
             dim = model.projector_dim (BYOL: 256);
  predictor  dim -> hidden -> dim, the same shape;
  target     a momentum copy of backbone + projector, never optimised: after every step
             target <- tau target + (1 - tau) online, tau = 1 - (1 - 0.996) (cos(pi k / K) + 1) / 2 over the
             run's K steps; in training mode it normalises with its own batch statistics, as the online side;
  loss       D(p1, t2) / 2 + D(p2, t1) / 2, t the target's projection, D(p, z) = -cos(p, z) as SimSiam's (so the
             logs compare); BYOL writes (2 - 2cos) summed over both directions, 4x this gradient: its lr x is
             model.lr 4x here. Its LARS optimiser is not reproduced (SGD, like every objective here).
  Only the online backbone is exported; the target stays in the checkpoint (exact resume).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

LR_REFERENCE_BATCH = 256  # two-view objectives: lr = model.lr * global batch / 256 (SimSiam's linear scaling)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean cos(p, stopgrad(z)): the target branch gets no gradient."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def normalised_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of z / |z|: ~1/sqrt(dim) when healthy, ~0 when collapsed."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the batch's centred singular values normalised to sum 1 (RankMe, Garrido et al. 2023).

    At most min(batch, dim). It shows *dimensional* collapse, which ``normalised_std`` misses: outputs that
    span a few directions with heavy-tailed values, each dimension standardised by the last BN, keep a std
    near 1/sqrt(dim) (test_selfsup.py; benchmarks/RESULTS.md "SimSiam on CPU": a run whose validation rank fell
    from 26.6 to 15.8 of 32 while its z_std stayed at 0.019-0.022).
    """
    z = z.detach().float()
    if not torch.isfinite(z).all():  # svdvals raises on them; the loss check reports the divergence
        return torch.tensor(float("nan"), device=z.device)
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    return torch.exp(-(p * p.clamp_min(torch.finfo(s.dtype).tiny).log()).sum())


def pair_gap(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean cos(p_i, z_i) minus mean cos(p_i, z_j), j != i: how much of the loss is about the pair.

    ~0 when the predictor matches every target equally well (the loss fell through what all samples
    share), up to 1 + 1 / (n - 1) when each output points at its own pair's target only.
    """
    c = F.normalize(p.detach().float(), dim=1) @ F.normalize(z.detach().float(), dim=1).T
    n = len(c)
    return c.diagonal().mean() - (c.sum() - c.diagonal().sum()) / (n * (n - 1))


def monitor(z: torch.Tensor, p: torch.Tensor, target: torch.Tensor, diagnostics: bool) -> dict[str, torch.Tensor]:
    """What every two-view objective logs, from its first view's projection ``z``, that view's prediction ``p``
    and the target ``p`` is trained toward: z_std always; with ``diagnostics`` also z_rank and pair_gap."""
    stats = {"z_std": normalised_std(z)}
    if diagnostics:
        stats.update(z_rank=effective_rank(z), pair_gap=pair_gap(p, target))
    return stats


class TwoViewObjective(nn.Module):
    """What the classifier asks of a two-view objective; subclasses define the heads and the loss."""

    follows_progress = False  # True: after_step needs the share of the run done (the run must have a length)

    def forward(self, backbone: nn.Module, view1: torch.Tensor, view2: torch.Tensor, diagnostics: bool = False):
        """(loss, {name: scalar tensor to log}) for one batch of view pairs; ``diagnostics`` adds the costlier
        statistics (validation only: an SVD per batch is not free next to a training step)."""
        raise NotImplementedError

    def param_groups(self, backbone: nn.Module, lr: float) -> list[dict]:
        """Optimiser groups; a group with ``fixed_lr`` keeps that learning rate whatever the schedule."""
        return [{"params": [*backbone.parameters(), *self.parameters()]}]

    def after_step(self, backbone: nn.Module, progress: float) -> None:
        """Called after every optimiser step with the share of the run's steps done (0 unless
        ``follows_progress``; BYOL: the momentum update of the target network)."""


class SimSiam(TwoViewObjective):
    def __init__(self, features: int, dim: int = 2048, pred_dim: int = 512, backbone: nn.Module | None = None):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(features, features, bias=False), nn.BatchNorm1d(features), nn.ReLU(inplace=True),
            nn.Linear(features, features, bias=False), nn.BatchNorm1d(features), nn.ReLU(inplace=True),
            nn.Linear(features, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, backbone, view1, view2, diagnostics=False):
        z1, z2 = self.projector(backbone(view1)), self.projector(backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return loss, monitor(z1, p1, z2, diagnostics)

    def param_groups(self, backbone, lr):
        return [{"params": [*backbone.parameters(), *self.projector.parameters()]},
                {"params": list(self.predictor.parameters()), "fixed_lr": lr}]


def mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, BN, ReLU, Linear."""
    return nn.Sequential(nn.Linear(width_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, width_out))


class BYOL(TwoViewObjective):
    BASE_MOMENTUM = 0.996  # BYOL's tau_base: the target's momentum at the first step, rising to 1 at the last
    follows_progress = True

    def __init__(self, features: int, dim: int = 256, pred_dim: int = 4096, backbone: nn.Module | None = None):
        super().__init__()
        if backbone is None:
            raise ValueError("BYOL needs the backbone: its target network is a momentum copy of it")
        self.projector = mlp(features, pred_dim, dim)  # BYOL: both MLPs 4096 wide inside
        self.predictor = mlp(dim, pred_dim, dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, backbone, view1, view2, diagnostics=False):
        z1, z2 = self.projector(backbone(view1)), self.projector(backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = (self.target_projector(self.target_backbone(v)) for v in (view1, view2))
        loss = 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))
        return loss, monitor(z1, p1, t2, diagnostics)

    def param_groups(self, backbone, lr):
        return [{"params": [*backbone.parameters(), *self.projector.parameters(), *self.predictor.parameters()]}]

    @torch.no_grad()
    def after_step(self, backbone, progress):
        tau = 1.0 - (1.0 - self.BASE_MOMENTUM) * (math.cos(math.pi * min(progress, 1.0)) + 1.0) / 2.0
        for online, target in ((backbone, self.target_backbone), (self.projector, self.target_projector)):
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - tau)


# Two-view objectives by ``model.objective`` name. A further one (DINO, VICReg, ...) is one more
# TwoViewObjective subclass here, as BYOL is: its heads (and any momentum copy of the backbone, made from the
# ``backbone`` it is given), its loss in ``forward``, any per-step update in ``after_step``, and an entry in this
# dict. The data (two views per sample), the optimiser, schedules, monitoring and export are shared.
TWO_VIEW_OBJECTIVES: dict[str, type[TwoViewObjective]] = {"simsiam": SimSiam, "byol": BYOL}
SUPERVISED_OBJECTIVES = ("classification", "multilabel")
OBJECTIVES = (*SUPERVISED_OBJECTIVES, *TWO_VIEW_OBJECTIVES)


def build_objective(name: str, backbone: nn.Module, features: int, projector_dim: int | None,
                    predictor_dim: int | None) -> TwoViewObjective:
    """``backbone``: the online network (its ``fc`` already the identity), for objectives that copy it; a width
    of None takes the objective's own default."""
    widths = {key: w for key, w in (("dim", projector_dim), ("pred_dim", predictor_dim)) if w is not None}
    return TWO_VIEW_OBJECTIVES[name](features, backbone=backbone, **widths)
