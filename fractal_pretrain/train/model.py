"""The classifier trained on fractals: a torchvision ResNet from scratch, SGD, one of four schedules.

Single-label recipes use cross-entropy (optionally label-smoothed); batches mixed by the augmentation
(CutMix / MixUp) come with soft targets, shape (B, num_classes), and train with the mixed
cross-entropy ``-sum(t * log_softmax)``, which equals ``lam * CE(y_a) + (1 - lam) * CE(y_b)``.
Multi-label ones (``multiinstance``) use BCE with Anderson &
Farrell's positive weighting (each positive of a sample weighs ``num_classes / positives``).
Validation reports top-1/top-5 accuracy, or mean average precision for multi-label recipes.

``objective`` picks the loss: ``classification`` and ``multilabel`` (the default follows the recipe's label)
as above, or a two-view self-supervised objective (``simsiam``, ``byol``; ``objectives.py``, where more would go)
on a two-view recipe such as ``selfsup``: batches hold 2B images (all first views, then all second views),
the backbone's ``fc`` is the identity, the objective's heads train beside it (BYOL's momentum target follows
it) and none of them is exported.
Two-view runs log ``*/loss``, ``*/z_std`` (std of the normalised projector output, collapse: ~0), on validation
batches ``val/z_rank`` (dimensional collapse) and ``val/pair_gap`` (is the loss about the pairs?), and at each
validation ``val/knn_top1`` of the frozen backbone on a fixed labelled fractal set (``knn.py``).
"""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision

from fractal_pretrain.config import ConfigError, check_choice, check_range, check_type
from fractal_pretrain.train import knn
from fractal_pretrain.train.objectives import LR_REFERENCE_BATCH, OBJECTIVES, TWO_VIEW_OBJECTIVES, build_objective

SCHEDULES = ("multistep", "onecycle", "cosine", "constant")


def cosine_factor(step: int, *, warmup: int, length: int, lr: float, min_lr: float, warmup_start_lr: float) -> float:
    """Learning rate at optimiser ``step`` as a multiple of ``lr``: linear warm-up from ``warmup_start_lr``
    over ``warmup`` steps, then a half cosine from ``lr`` to ``min_lr`` ending at ``length``; ``min_lr`` after."""
    if lr == 0:
        return 0.0
    if step < warmup:
        return (warmup_start_lr + (lr - warmup_start_lr) * step / warmup) / lr
    span = max(length - warmup, 1)
    t = min(step - warmup, span) / span
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / lr


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class probabilities (B, C), smoothed as F.cross_entropy smooths class ids."""
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def resnet_names() -> list[str]:
    """torchvision ResNet-family architectures (resnet*, wide_resnet*, resnext*)."""
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(("resnet", "wide_resnet", "resnext")))


def build_resnet(arch: str, num_classes: int) -> torch.nn.Module:
    check_choice("model.arch", arch, resnet_names())
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def check_objective(objective: str, multi_label: bool, views: int) -> None:
    """The objective must fit the recipe: labels for the supervised ones, two views for the others."""
    check_choice("model.objective", objective, OBJECTIVES)
    if objective in TWO_VIEW_OBJECTIVES and not views:
        raise ConfigError(f"model.objective={objective}: needs a two-view recipe (views=2, e.g. data.recipe: selfsup); "
                          f"this recipe gives no views")
    if objective not in TWO_VIEW_OBJECTIVES and views:
        raise ConfigError(f"model.objective={objective}: a two-view recipe (views={views}) needs one of "
                          f"{', '.join(TWO_VIEW_OBJECTIVES)}")
    if objective == "classification" and multi_label:
        raise ConfigError("model.objective=classification: the recipe has multi-hot labels; use multilabel")
    if objective == "multilabel" and not multi_label:
        raise ConfigError("model.objective=multilabel: the recipe has one label per image; use classification")


def keep_fixed_lrs(optimizer) -> None:
    """Groups with ``fixed_lr`` (SimSiam's predictor) keep that learning rate whatever the schedule did."""
    for group in optimizer.param_groups:
        if group.get("fixed_lr") is not None:
            group["lr"] = group["fixed_lr"]


# Layers whose parameters (scale and shift) are spared weight decay when model.decay_norm_and_bias is false, as in
# Anderson & Farrell's optimiser groups (theirs: every module whose class name holds "Norm"; here the torch ones).
NORM_LAYERS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
               torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
               torch.nn.GroupNorm, torch.nn.RMSNorm)


def undecayed_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters of ``module`` that decay_norm_and_bias=false spares: every normalisation layer's
    weights and every bias."""
    return {id(param) for layer in module.modules() for name, param in layer.named_parameters(recurse=False)
            if isinstance(layer, NORM_LAYERS) or name == "bias"}


def split_weight_decay(groups: list[dict], undecayed: set[int]) -> list[dict]:
    """Each optimiser group as two: its decayed parameters, then the ``undecayed`` ones with weight_decay 0; a
    group's other settings (``fixed_lr``) go with both halves, and an empty half is left out."""
    split = []
    for group in groups:
        params = list(group["params"])
        decayed = [p for p in params if id(p) not in undecayed]
        spared = [p for p in params if id(p) in undecayed]
        split += [{**group, "params": decayed}] if decayed else []
        split += [{**group, "params": spared, "weight_decay": 0.0}] if spared else []
    return split


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
        decay_norm_and_bias: Decay every parameter (true; fractal4AD, OFDB-4AD) or spare the normalisation
            layers' weights and all biases, of the backbone and of every head (false; Anderson & Farrell).
        schedule: ``multistep`` (x gamma at each milestone epoch; fractal4AD), ``onecycle`` (per step over
            the whole run; Anderson & Farrell) or ``constant``.
        milestones: Epochs of the multistep decay.
        gamma: Multistep decay factor.
        onecycle_pct_start: Warm-up share of the one-cycle schedule (Anderson: 0).
        onecycle_final_div_factor: One-cycle final learning-rate divisor (Anderson: 1e3).
        warmup_epochs: Cosine: linear warm-up length in epochs (OFDB-4AD: 5), or use ``warmup_steps``.
        warmup_steps: Cosine: linear warm-up length in optimiser steps.
        cosine_epochs: Cosine: schedule length in epochs (default: the whole run), or ``cosine_steps``.
        cosine_steps: Cosine: schedule length in optimiser steps.
        min_lr: Cosine: final learning rate (OFDB-4AD / timm: 1e-5).
        warmup_start_lr: Cosine: learning rate at step 0 (OFDB-4AD / timm: 1e-6).
        label_smoothing: Cross-entropy label smoothing (single-label only).
        channels_last: Use the NHWC memory format on CUDA (the renderer emits it directly).
        compile: ``torch.compile`` the network (in place: checkpoint keys are unchanged).
        objective: ``classification``, ``multilabel`` (default: whichever the recipe's label needs) or a
            two-view objective (``simsiam``, ``byol``) on a two-view recipe; two-view ``lr`` is per 256 samples of the
            global batch (the optimiser runs at ``lr * batch * world / 256``).
        views: Views per sample of the recipe; linked from the data module.
        projector_dim: Two-view: output width of the projector; default the objective's (SimSiam: 2048,
            BYOL: 256).
        predictor_dim: Two-view: hidden width of the predictor; default the objective's (SimSiam: 512, a
            bottleneck; BYOL: 4096, also the projector's).
        knn_classes: Two-view: classes (systems) of the k-NN probe set; 0 disables the probe.
        knn_per_class: Two-view: probe images per class.
        knn_k: Two-view: neighbours that vote.
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000, multi_label: bool = False,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = "multistep",
                 milestones: tuple[int, ...] = (30, 60), gamma: float = 0.1, onecycle_pct_start: float = 0.0,
                 onecycle_final_div_factor: float = 1e3, warmup_epochs: float = 0.0, warmup_steps: int = 0,
                 cosine_epochs: float | None = None, cosine_steps: int | None = None, min_lr: float = 0.0,
                 warmup_start_lr: float = 0.0, label_smoothing: float = 0.0, channels_last: bool = True,
                 compile: bool = False, objective: str | None = None, views: int = 0, projector_dim: int | None = None,
                 predictor_dim: int | None = None, knn_classes: int = 10, knn_per_class: int = 20, knn_k: int = 10,
                 decay_norm_and_bias: bool = True):
        super().__init__()
        objective = objective or ("multilabel" if multi_label else "classification")
        check_objective(objective, multi_label, views)
        for name, width in (("model.projector_dim", projector_dim), ("model.predictor_dim", predictor_dim)):
            if width is not None:
                check_range(name, width, 1, None, integer=True)
        check_range("model.knn_classes", knn_classes, 0, None, integer=True)
        if knn_classes == 1:
            raise ConfigError("model.knn_classes=1: must be 0 (no probe) or >= 2")
        check_range("model.knn_per_class", knn_per_class, 1, None, integer=True)
        check_range("model.knn_k", knn_k, 1, None, integer=True)
        check_range("model.num_classes", num_classes, 2, None, integer=True)
        check_range("model.lr", lr, 0.0, None)
        check_range("model.momentum", momentum, 0.0, 1.0)
        check_range("model.weight_decay", weight_decay, 0.0, None)
        check_type("model.decay_norm_and_bias", decay_norm_and_bias, bool, "true or false")
        check_choice("model.schedule", schedule, SCHEDULES)
        check_range("model.gamma", gamma, 0.0, 1.0)
        check_range("model.onecycle_pct_start", onecycle_pct_start, 0.0, 1.0)
        check_range("model.warmup_epochs", warmup_epochs, 0.0, None)
        check_range("model.warmup_steps", warmup_steps, 0, None, integer=True)
        if warmup_epochs and warmup_steps:
            raise ConfigError("model.warmup_epochs and model.warmup_steps: set one of them, not both")
        if cosine_epochs is not None:
            check_range("model.cosine_epochs", cosine_epochs, 0.0, None)
        if cosine_steps is not None:
            check_range("model.cosine_steps", cosine_steps, 1, None, integer=True)
        if cosine_epochs is not None and cosine_steps is not None:
            raise ConfigError("model.cosine_epochs and model.cosine_steps: set one of them, not both")
        check_range("model.min_lr", min_lr, 0.0, None)
        check_range("model.warmup_start_lr", warmup_start_lr, 0.0, None)
        check_range("model.label_smoothing", label_smoothing, 0.0, 1.0)
        if label_smoothing and multi_label:
            raise ConfigError("model.label_smoothing needs a single-label recipe (multi-label trains with BCE)")
        if label_smoothing and objective in TWO_VIEW_OBJECTIVES:
            raise ConfigError(f"model.label_smoothing={label_smoothing}: model.objective={objective} has no labels to "
                              "smooth; set it to 0")
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"model.milestones={list(milestones)!r}: must be increasing epochs")
        self.save_hyperparameters()
        self.two_view = objective in TWO_VIEW_OBJECTIVES
        # Two-view: no classifier (a recipe of 1M systems would make a 2048 x 1M fc), the pooled features feed
        # the objective's heads.
        self.net = build_resnet(arch, 2 if self.two_view else num_classes)
        if self.two_view:
            features = self.net.fc.in_features
            self.net.fc = torch.nn.Identity()
            self.objective = build_objective(objective, self.net, features, projector_dim, predictor_dim)
            self._probe_set = None
        elif multi_label:
            self.val_map = torchmetrics.classification.MultilabelAveragePrecision(num_labels=num_classes)
        else:
            self.val_top1 = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, top_k=1)
            self.val_top5 = torchmetrics.classification.MulticlassAccuracy(
                num_classes=num_classes, top_k=min(5, num_classes))

    def configure_model(self) -> None:
        # Lightning calls this before the strategy moves the module to its device: ask the strategy, not
        # self.device (still the CPU here); the move keeps the memory format
        if self.hparams.channels_last and self.trainer.strategy.root_device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
            if self.two_view:  # a momentum copy of the backbone (BYOL) too; heads are 2-D: unchanged
                self.objective.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.multi_label:
            return multilabel_loss(logits, targets)
        if targets.is_floating_point():  # mixed batches: class probabilities
            return soft_cross_entropy(logits, targets, self.hparams.label_smoothing)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)

    def two_view_step(self, batch, split: str) -> torch.Tensor:
        images, _ = batch  # labels (the systems) are unused: the probe has its own labelled set
        view1, view2 = images.chunk(2)
        # validation batches hold >= 2 pairs per rank (data.steps_per_epoch): a pair has others to compare with
        loss, stats = self.objective(self.net, view1, view2, diagnostics=split == "val")
        samples = len(view1)
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=split == "val", batch_size=samples)
        for name, value in stats.items():
            self.log(f"{split}/{name}", value, sync_dist=split == "val", batch_size=samples)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.two_view:
            loss = self.two_view_step(batch, "train")
            if self.global_step % self.trainer.log_every_n_steps == 0 and not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {self.global_step}: {loss.item()}")
            return loss
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        # Checking needs a host sync, so only on logging steps, where Lightning syncs the loss anyway.
        if self.global_step % self.trainer.log_every_n_steps == 0 and not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}: {loss.item()}")
        self.log("train/loss", loss, prog_bar=True)
        if not self.hparams.multi_label:
            labels = targets.argmax(1) if targets.is_floating_point() else targets  # mixed: the larger share
            self.log("train/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # here, not in on_train_batch_end: callbacks (checkpoints, the SIGTERM stop) run that hook before the
        # module's, so a checkpoint of this step would miss this step's update and a resume would differ
        if self.two_view:
            follows = self.objective.follows_progress  # only then does the run need a length (check_schedule)
            run_steps = self._run_steps(self.trainer, self.trainer.datamodule)[1] if follows else None
            self.objective.after_step(self.net, (step + 1) / run_steps if follows else 0.0)

    def on_validation_epoch_end(self) -> None:
        """Two-view runs: k-NN top-1 of the frozen backbone on the probe set (rendered once, rank 0 logs it)."""
        hp = self.hparams
        if not self.two_view or not hp.knn_classes or self.trainer.sanity_checking:
            return
        if self._probe_set is None:
            self._probe_set = knn.render_probe_set(hp.knn_classes, hp.knn_per_class, self.trainer.datamodule)
        images, labels = self._probe_set
        with self.trainer.precision_plugin.forward_context():
            features = knn.embed(self.net, images)
        top1 = knn.knn_top1(features, labels.to(features.device), hp.knn_k, hp.knn_classes)
        self.log("val/knn_top1", top1, prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.two_view:
            self.two_view_step(batch, "val")
            return
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

    def effective_lr(self) -> float:
        """model.lr, or for two-view objectives model.lr x global batch / 256."""
        if not self.two_view:
            return self.hparams.lr
        data = self.trainer.datamodule if self.trainer is not None else None
        batch = getattr(data, "batch_size", LR_REFERENCE_BATCH) * (self.trainer.world_size if self.trainer else 1)
        return self.hparams.lr * batch / LR_REFERENCE_BATCH

    def build_optimizer(self, lr: float) -> torch.optim.SGD:
        """SGD at ``lr`` over the objective's groups (one for classification), each split in two when
        ``decay_norm_and_bias`` is false."""
        hp = self.hparams
        groups = self.objective.param_groups(self.net, lr) if self.two_view else [{"params": list(self.parameters())}]
        if not hp.decay_norm_and_bias:
            groups = split_weight_decay(groups, undecayed_parameters(self))
        return torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def configure_optimizers(self):
        lr = self.effective_lr()
        optimizer = self.build_optimizer(lr)
        config = self._schedule(optimizer, lr)
        keep_fixed_lrs(optimizer)  # OneCycleLR sets every group's starting lr on construction
        return config

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step() if metric is None else scheduler.step(metric)
        keep_fixed_lrs(scheduler.optimizer)

    def _schedule(self, optimizer, lr: float):
        hp = self.hparams
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones), hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        if hp.schedule == "cosine":
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": self._cosine(optimizer, lr), "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=self._run_steps(self.trainer, self.trainer.datamodule)[1],
            pct_start=hp.onecycle_pct_start, final_div_factor=hp.onecycle_final_div_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _cosine(self, optimizer, lr: float):
        """Cosine with linear warm-up, stepped per optimiser step; epochs count the run's steps per epoch."""
        hp = self.hparams
        warmup, length = self._cosine_steps(self.trainer, self.trainer.datamodule)
        lr_at = functools.partial(cosine_factor, warmup=warmup, length=length, lr=lr, min_lr=hp.min_lr,
                                  warmup_start_lr=hp.warmup_start_lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    def check_schedule(self, trainer, data) -> None:
        """The schedule's length checks, before ``fit`` writes anything (``fit`` only runs them once the run
        directory exists)."""
        if self.hparams.schedule == "cosine":
            self._cosine_steps(trainer, data)
        elif self.hparams.schedule == "onecycle":
            self._run_steps(trainer, data)
        if self.two_view and self.objective.follows_progress:
            self._check_progress_objective(trainer, data)

    def _check_progress_objective(self, trainer, data) -> None:
        """An objective with a momentum target needs the run's length and a float32 target."""
        name = self.hparams.objective
        try:
            self._run_steps(trainer, data)
        except ConfigError:
            raise ConfigError(f"model.objective={name}: its momentum schedule needs the run's length; set "
                              "trainer.max_steps or trainer.max_epochs") from None
        if str(trainer.precision) in ("bf16-true", "16-true"):
            raise ConfigError(f"trainer.precision={trainer.precision}: model.objective={name} would keep its momentum "
                              "target in half precision, where an update of 0.4% rounds away; use bf16-mixed")

    def _cosine_steps(self, trainer, data) -> tuple[int, int]:
        """(warm-up steps, cosine length in steps) of the run; a warm-up longer than the cosine is an error."""
        hp = self.hparams
        per_epoch, total = self._run_steps(trainer, data)
        warmup = hp.warmup_steps or round(hp.warmup_epochs * per_epoch)
        length = hp.cosine_steps or (round(hp.cosine_epochs * per_epoch) if hp.cosine_epochs is not None else total)
        if warmup > length:
            given = f"model.warmup_steps={hp.warmup_steps}" if hp.warmup_steps else (
                f"model.warmup_epochs={hp.warmup_epochs:g} ({per_epoch} steps per epoch)")
            raise ConfigError(f"{given}: the warm-up ({warmup} steps) is longer than the cosine schedule "
                              f"({length} steps); shorten it or lengthen the run")
        return warmup, length

    @staticmethod
    def _run_steps(trainer, data) -> tuple[int, int]:
        """(optimiser steps per epoch, optimiser steps of the run), counted without building the loader.

        Lightning's ``estimated_stepping_batches`` builds the train loader here, before a checkpoint's
        loader state is restored, and that state is then never applied: a mid-epoch resume would start
        its epoch over. The data module knows its steps per epoch without a loader.
        """
        if data is None or not hasattr(data, "train_steps_per_epoch"):
            return max(1, int(trainer.num_training_batches)), int(trainer.estimated_stepping_batches)
        steps = data.train_steps_per_epoch(world=trainer.world_size)
        per_epoch = max(1, math.ceil(steps / trainer.accumulate_grad_batches))
        limits = [per_epoch * trainer.max_epochs] if trainer.max_epochs not in (None, -1) else []
        if trainer.max_steps != -1:
            limits.append(trainer.max_steps)
        if not limits:
            raise ConfigError("this schedule needs trainer.max_epochs or trainer.max_steps (its length)")
        return per_epoch, max(1, min(limits))
