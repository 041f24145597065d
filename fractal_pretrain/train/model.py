"""The classifier trained on fractals: a torchvision ResNet from scratch, SGD, one of two schedules.

Single-label recipes use cross-entropy; multi-label ones (``multiinstance``) use BCE with Anderson &
Farrell's positive weighting (each positive of a sample weighs ``num_classes / positives``).
Validation reports top-1/top-5 accuracy, or mean average precision for multi-label recipes.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision

from fractal_pretrain.config import ConfigError, check_choice, check_range

SCHEDULES = ("multistep", "onecycle", "constant")


def resnet_names() -> list[str]:
    """torchvision ResNet-family architectures (resnet*, wide_resnet*, resnext*)."""
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(("resnet", "wide_resnet", "resnext")))


def build_resnet(arch: str, num_classes: int) -> torch.nn.Module:
    check_choice("model.arch", arch, resnet_names())
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE where each positive weighs num_classes / (positives in its sample), negatives 1."""
    targets = targets.float()
    positives = targets.sum(dim=1, keepdim=True).clamp(min=1.0)
    weight = torch.where(targets > 0, targets.shape[1] / positives, torch.ones_like(targets))
    return F.binary_cross_entropy_with_logits(logits.float(), targets, weight=weight)


class FractalClassifier(pl.LightningModule):
    """A ResNet trained from scratch to tell fractal classes apart.

    Args:
        arch: Any torchvision ResNet-family name (resnet18, resnet50, wide_resnet50_2, ...).
        num_classes: Output classes; linked from the data module's recipe by the CLI.
        multi_label: Multi-hot targets (BCE) instead of class indices (CE); linked from the recipe.
        lr: Peak SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        schedule: ``multistep`` (x gamma at each milestone epoch; fractal4AD), ``onecycle`` (per step over
            the whole run; Anderson & Farrell) or ``constant``.
        milestones: Epochs of the multistep decay.
        gamma: Multistep decay factor.
        onecycle_pct_start: Warm-up share of the one-cycle schedule (Anderson: 0).
        onecycle_final_div_factor: One-cycle final learning-rate divisor (Anderson: 1e3).
        channels_last: Use the NHWC memory format on CUDA (the renderer emits it directly).
        compile: ``torch.compile`` the network (in place: checkpoint keys are unchanged).
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000, multi_label: bool = False,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = "multistep",
                 milestones: tuple[int, ...] = (30, 60), gamma: float = 0.1, onecycle_pct_start: float = 0.0,
                 onecycle_final_div_factor: float = 1e3, channels_last: bool = True, compile: bool = False):
        super().__init__()
        check_range("model.num_classes", num_classes, 2, None, integer=True)
        check_range("model.lr", lr, 0.0, None)
        check_range("model.momentum", momentum, 0.0, 1.0)
        check_range("model.weight_decay", weight_decay, 0.0, None)
        check_choice("model.schedule", schedule, SCHEDULES)
        check_range("model.gamma", gamma, 0.0, 1.0)
        check_range("model.onecycle_pct_start", onecycle_pct_start, 0.0, 1.0)
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"model.milestones={list(milestones)!r}: must be increasing epochs")
        self.save_hyperparameters()
        self.net = build_resnet(arch, num_classes)
        if multi_label:
            self.val_map = torchmetrics.classification.MultilabelAveragePrecision(num_labels=num_classes)
        else:
            self.val_top1 = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, top_k=1)
            self.val_top5 = torchmetrics.classification.MulticlassAccuracy(
                num_classes=num_classes, top_k=min(5, num_classes))

    def configure_model(self) -> None:
        if self.hparams.channels_last and self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.multi_label:
            return multilabel_loss(logits, targets)
        return F.cross_entropy(logits.float(), targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        # Checking needs a host sync, so only on logging steps, where Lightning syncs the loss anyway.
        if self.global_step % self.trainer.log_every_n_steps == 0 and not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}: {loss.item()}")
        self.log("train/loss", loss, prog_bar=True)
        if not self.hparams.multi_label:
            self.log("train/acc", (logits.argmax(1) == targets).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.log("val/loss", self.loss(logits, targets), sync_dist=True)
        if self.hparams.multi_label:
            self.val_map.update(logits.float(), targets.int())
            self.log("val/mAP", self.val_map, prog_bar=True)
        else:
            self.val_top1.update(logits, targets)
            self.val_top5.update(logits, targets)
            self.log("val/top1", self.val_top1, prog_bar=True)
            self.log("val/top5", self.val_top5)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones), hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hp.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=hp.onecycle_pct_start, final_div_factor=hp.onecycle_final_div_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
