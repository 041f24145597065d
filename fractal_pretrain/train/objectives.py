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
"""

from __future__ import annotations

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


class TwoViewObjective(nn.Module):
    """What the classifier asks of a two-view objective; subclasses define the heads and the loss."""

    def forward(self, backbone: nn.Module, view1: torch.Tensor, view2: torch.Tensor):
        """(loss, {name: scalar tensor to log}) for one batch of view pairs."""
        raise NotImplementedError

    def param_groups(self, backbone: nn.Module, lr: float) -> list[dict]:
        """Optimiser groups; a group with ``fixed_lr`` keeps that learning rate whatever the schedule."""
        return [{"params": [*backbone.parameters(), *self.parameters()]}]

    def after_step(self, backbone: nn.Module) -> None:
        """Called after every optimiser step (BYOL/DINO: the momentum update of the target network)."""


class SimSiam(TwoViewObjective):
    def __init__(self, features: int, dim: int = 2048, pred_dim: int = 512):
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

    def forward(self, backbone, view1, view2):
        z1, z2 = self.projector(backbone(view1)), self.projector(backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return loss, {"z_std": normalised_std(z1)}

    def param_groups(self, backbone, lr):
        return [{"params": [*backbone.parameters(), *self.projector.parameters()]},
                {"params": list(self.predictor.parameters()), "fixed_lr": lr}]


# Two-view objectives by ``model.objective`` name. BYOL or DINO is one more TwoViewObjective subclass here:
# its heads (BYOL: online projector + predictor and a momentum copy of backbone + projector; DINO: projection
# heads, a centre, teacher temperature), its loss in ``forward``, the momentum update in ``after_step``, and an
# entry in this dict. The data (two views per sample), the optimiser, schedules, monitoring and export are shared.
TWO_VIEW_OBJECTIVES: dict[str, type[TwoViewObjective]] = {"simsiam": SimSiam}
SUPERVISED_OBJECTIVES = ("classification", "multilabel")
OBJECTIVES = (*SUPERVISED_OBJECTIVES, *TWO_VIEW_OBJECTIVES)


def build_objective(name: str, features: int, projector_dim: int, predictor_dim: int) -> TwoViewObjective:
    return TWO_VIEW_OBJECTIVES[name](features, projector_dim, predictor_dim)
