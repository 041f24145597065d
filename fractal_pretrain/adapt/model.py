"""The ``adapt`` Lightning module: a frozen backbone, a trained residual-feature projector.

Each training batch is a pure function of (seed, batch number): B normal images, each of a training
class of the recipe drawn per image (class c renders as indices c + C * j, so different keys give
different renders of one class); K in ``shots`` drawn once per batch, and K references per image
(``normals.py``: by default shifted crops of the image's own render, a normal *instance*; or other renders
of the same class); synthetic anomalies (``anomalies.py``); two photometric views
(``views.py``); residual features of each view against its references; the projector; ADPretrain's
losses. Batches without anomalies are skipped. The batch number comes from a saved step counter, not the
optimiser step, so a skipped batch does not repeat and a resumed run continues with the next batch; with
DDP, step s of rank r is batch s * world_size + r (each rank its own batch; one device: batch s).

The last ``val_classes`` classes never train: validation renders fixed batches of them (loss and the
patch AUROC of the compressed norm, for the logs only: nothing is selected on it).
"""

from __future__ import annotations

import dataclasses
import time

import lightning.pytorch as pl
import numpy as np
import torch

from fractal_pretrain import rng
from fractal_pretrain.adapt.anomalies import AnomalyMix, AnomalySynthesizer
from fractal_pretrain.adapt.export import weights_digest, write_projector
from fractal_pretrain.adapt.features import stage_channels, stage_features
from fractal_pretrain.adapt.losses import compressed_norm, norm_labels, total_loss
from fractal_pretrain.adapt.normals import REFERENCE_MODES, crop_copies, crop_offsets, shift_margin, split_copies
from fractal_pretrain.adapt.projector import Projector, ProjectorConfig
from fractal_pretrain.adapt.residual import residual_features
from fractal_pretrain.adapt.views import photometric_view
from fractal_pretrain.config import ConfigError, build_checked, check_choice, check_device, check_range
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer

MAX_SHOTS = 64
# Render epochs (the renderer's key word) of each use: no two uses share a key.
EPOCH_TRAIN, EPOCH_TRAIN_REFS, EPOCH_VAL, EPOCH_VAL_REFS, EPOCH_CENTER, EPOCH_CENTER_REFS = range(6)
CENTER_VIEW = 2  # photometric view draw slot of the centre pass (training uses views 0 and 1)
# View draws are keyed (seed, render epoch of the batch, key): training EPOCH_TRAIN, validation EPOCH_VAL, so
# validation batch n never redraws training batch n's views; the centre pass draws with EPOCH_TRAIN, slot CENTER_VIEW.


def check_normal_classes(recipe, val_classes: int) -> None:
    """A recipe is usable when each image has one class (renders of one class are its normal images)."""
    # A MandelbulbRecipe has neither field: one label per image, its objects drawn from the class's formulas.
    label, source = getattr(recipe, "label", "class"), getattr(recipe, "object_source", "class")
    if getattr(recipe, "multi_label", False) or source != "class":
        raise ConfigError(f"recipe={recipe.name!r}: has no classes usable as normal classes (label={label}, "
                          f"object_source={source}); use a single-label recipe")
    if recipe.num_classes <= val_classes:
        raise ConfigError(f"val_classes={val_classes}: recipe {recipe.name!r} has only {recipe.num_classes} classes "
                          f"(some must remain for training)")


def patch_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Rank AUROC (ties counted half) of scores for labels 1 vs 0; NaN with one class only."""
    scores, labels = scores.float().flatten().cpu(), labels.flatten().bool().cpu()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    equal = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * equal)


@dataclasses.dataclass(frozen=True)
class AdaptBatch:
    """One batch's images before the backbone (``AdaptModule.batch_inputs``), on the module's device:
    uint8 (B, 3, H, W) normal ``images``, their (B K, 3, H, W) ``references`` (image i's are rows
    i K .. i K + K - 1), the ``anomalous`` copies and their (B, H, W) bool ``mask``, and the two photometric
    ``views`` of the anomalous images (float [0, 1]) with the ``reference_views`` each is matched against
    (``photometric_views``); ``classes`` and ``keys`` (B,) and the key ``epoch`` of the renders and anomalies."""

    k: int
    classes: np.ndarray
    keys: np.ndarray
    epoch: int
    images: torch.Tensor
    references: torch.Tensor
    anomalous: torch.Tensor
    mask: torch.Tensor
    views: tuple[torch.Tensor, torch.Tensor]
    reference_views: tuple[torch.Tensor, torch.Tensor]


class AdaptModule(pl.LightningModule):
    """Trains ``Projector`` over a frozen backbone's residual features on synthetic fractal anomalies."""

    def __init__(self, backbone: str = "random", arch: str | None = None, backbone_seed: int = 0,
                 layers: tuple[str, ...] = ("layer2", "layer3"), recipe: str = "anderson",
                 recipe_overrides: dict | None = None, size: int = 224, batch_size: int = 32,
                 shots: tuple[int, ...] = (1, 4, 8), eval_shots: int = 8, center_images: int = 64,
                 center_shots: int = 4, val_classes: int = 10, references: str = "instance",
                 reference_shift: float = 0.0625, jitter_references: bool = True,
                 anomalies: dict | None = None, projector: dict | None = None, lr: float = 1e-4,
                 weight_decay: float = 5e-4, milestones: tuple[int, ...] = (), gamma: float = 0.1,
                 seed: int = 0, render_device: str = "auto"):
        super().__init__()
        self.save_hyperparameters()
        from ad_eval.backbones import load_backbone  # the validated backbone loader (same as ad-eval's)
        from ad_eval.methods.base import check_layers

        try:
            self.layers = check_layers(layers)
        except ValueError as err:
            raise ConfigError(f"model.layers: {err}") from None
        check_range("model.size", size, 32, 1024, integer=True)
        check_range("model.batch_size", batch_size, 1, 4096, integer=True)
        if not shots or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SHOTS for k in shots):
            raise ConfigError(f"model.shots={list(shots)!r}: must be a non-empty list of integers in [1, {MAX_SHOTS}]")
        for name, value in (("eval_shots", eval_shots), ("center_shots", center_shots)):
            check_range(f"model.{name}", value, 1, MAX_SHOTS, integer=True)
        check_range("model.center_images", center_images, 1, 100_000, integer=True)
        check_range("model.val_classes", val_classes, 1, 1_000_000, integer=True)
        check_range("model.seed", seed, 0, 2**32 - 1, integer=True)
        check_choice("model.references", references, REFERENCE_MODES)
        check_device("model.render_device", render_device, also=("cpu-reference",))  # else only in setup
        check_range("model.reference_shift", reference_shift, 0.0, 0.25)
        if not isinstance(jitter_references, bool):
            raise ConfigError(f"model.jitter_references={jitter_references!r}: must be true or false")
        self.margin = shift_margin(size, reference_shift) if references == "instance" else 0
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
            raise ConfigError(f"model.milestones={list(milestones)!r}: optimiser steps (integers >= 1)")
        self.recipe = get_recipe(recipe, recipe_overrides)
        check_normal_classes(self.recipe, val_classes)
        self.mix = build_checked(AnomalyMix, anomalies, "model.anomalies")
        self.projector_config = build_checked(ProjectorConfig, projector, "model.projector")
        self.backbone_info = load_backbone(backbone, arch, seed=backbone_seed)
        self.backbone_digest = weights_digest(self.backbone_info.state_dict)
        self._frozen = [self.backbone_info.build().requires_grad_(False)]  # a list: not a submodule, not saved
        self.channels = stage_channels(self._frozen[0], self.layers)
        try:
            self.projector = Projector(self.channels, self.projector_config)
        except ValueError as err:
            raise ConfigError(f"model.projector: {err}") from None
        for name, c in self.channels.items():
            self.register_buffer(f"center_{name}", torch.zeros(c))
        self.register_buffer("centers_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.train_classes = self.recipe.num_classes - val_classes
        self._renderer = self._synth = self._last_start = None
        self._steps_done: int | None = None  # host copy of batches_seen: reading the buffer each step would sync
        self._val_scores: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._mean = torch.tensor(self.backbone_info.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.backbone_info.std).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ pieces
    @property
    def backbone(self) -> torch.nn.Module:
        return self._frozen[0]

    def setup(self, stage: str) -> None:
        device = str(self.device) if self.hparams.render_device == "auto" else self.hparams.render_device
        device = "cpu" if device.startswith("cpu") else device
        self._renderer = make_renderer(self.recipe, size=self.hparams.size + 2 * self.margin, seed=self.hparams.seed,
                                       device=device)
        self._synth = AnomalySynthesizer(self.mix, seed=self.hparams.seed, device=device)

    def on_fit_start(self) -> None:
        self.backbone.to(self.device).eval()
        if not bool(self.centers_ready):
            self.compute_centers()

    def centers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"center_{name}") for name in self.layers}

    def render(self, classes: np.ndarray, keys: np.ndarray, epoch: int) -> torch.Tensor:
        """(B, 3, S, S) uint8 renders of ``classes`` with per-image keys (class c, key j: index c + C j);
        S = size + 2 margin (the margin is 0 unless references are crops of the image's render)."""
        indices = classes.astype(np.int64) + self.recipe.num_classes * keys.astype(np.int64)
        images, _ = self._renderer.render_tensor(indices, epoch, dtype="uint8")
        return images.to(self.device)

    def features(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images01 - self._mean.to(images01)) / self._std.to(images01)
        with torch.no_grad():
            return {k: v.float() for k, v in stage_features(self.backbone, x, self.layers).items()}

    def batch_plan(self, batch: int, classes_range: tuple[int, int], fixed_shots: int | None):
        """(K, classes (B,)) of batch number ``batch``: pure functions of (seed, batch)."""
        words = rng.draw_words(self.hparams.seed, 0, batch, rng.STREAM_REFERENCES,
                               np.arange(1 + self.hparams.batch_size))
        shots = self.hparams.shots
        k = fixed_shots or shots[int(rng.to_int(words[0][0], len(shots)))]
        low, high = classes_range
        return k, low + rng.to_int(words[1][1:], high - low)

    def residuals(self, views: list[torch.Tensor], refs, k: int) -> list[dict[str, torch.Tensor]]:
        """Residual features of each view against each image's K references: ``refs`` (B K, 3, H, W) uint8
        shared by every view, or a list of float [0, 1] references, one per view (``reference_views``)."""
        if isinstance(refs, torch.Tensor):
            ref_feats = [self.features(refs.float() / 255.0)] * len(views)
        else:
            ref_feats = [self.features(r) for r in refs]
        out = []
        for view, refs_of_view in zip(views, ref_feats, strict=True):
            grouped = {name: r.view(-1, k, *r.shape[1:]) for name, r in refs_of_view.items()}  # (B, K, C, h, w)
            out.append({name: residual_features(f, grouped[name]) for name, f in self.features(view).items()})
        return out

    def photometric_views(self, images: torch.Tensor, refs: torch.Tensor, keys: np.ndarray, k: int,
                          slots: tuple[int, ...], epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Photometric views (draw ``slots``, key epoch word ``epoch``) of the images and the references each is
        matched against.

        With ``jitter_references`` (the default) an image's K references get the very draw of its view (same
        brightness, contrast, saturation, greyscale and blur), as a test image and the category's train
        images share one light: the residual then measures the defect, not the jitter. Without it (the
        literal reading of ADPretrain, whose DINOv2 features are nearly jitter invariant) a backbone that is
        not photometrically invariant (random init, a CNN) turns the jitter into a residual on every patch:
        the projector learns to find defects among jitter residuals, which transfers to unjittered test
        images not at all (RESULTS.md, "Can the projector learn?")."""
        seed = self.hparams.seed
        views = [photometric_view(images, keys, seed, v, epoch=epoch) for v in slots]
        if not self.hparams.jitter_references:
            return views, [refs.float() / 255.0] * len(slots)
        ref_keys = np.repeat(np.asarray(keys), k)  # reference i of image b draws with b's key
        return views, [photometric_view(refs, ref_keys, seed, v, epoch=epoch) for v in slots]

    def normal_images(self, classes: np.ndarray, keys: np.ndarray, k: int, epochs: tuple[int, int]):
        """(images (B, 3, H, W), references (B K, 3, H, W)) uint8 of the normal classes (``normals.py``):
        ``instance``: 1 + K crops of one render per image (epoch ``epochs[0]``); ``class``: the references
        are renders of the same classes with other keys (epoch ``epochs[1]``)."""
        if self.hparams.references == "instance":
            renders = self.render(classes, keys, epochs[0])
            offsets = crop_offsets(self.hparams.seed, epochs[0], keys, 1 + k, self.margin)
            return split_copies(crop_copies(renders, offsets, self.hparams.size), 1 + k)
        images = self.render(classes, keys, epochs[0])
        refs = self.render(np.repeat(classes, k), (keys[:, None] * MAX_SHOTS + np.arange(k)).reshape(-1), epochs[1])
        return images, refs

    def batch_inputs(self, batch: int, *, val: bool) -> AdaptBatch:
        """The images of batch number ``batch`` (training, or with ``val`` the held-out validation batch),
        before the backbone: what ``make_batch`` feeds it, and what ``fractal-pretrain preview`` shows."""
        size = self.hparams.batch_size
        if val:
            k, classes = self.batch_plan(2**31 + batch, (self.train_classes, self.recipe.num_classes),
                                         self.hparams.eval_shots)
            epochs = (EPOCH_VAL, EPOCH_VAL_REFS)
        else:
            k, classes = self.batch_plan(batch, (0, self.train_classes), None)
            epochs = (EPOCH_TRAIN, EPOCH_TRAIN_REFS)
        keys = batch * size + np.arange(size)
        images, refs = self.normal_images(classes, keys, k, epochs)
        anomalous, mask = self._synth.apply(images, keys, epochs[0])
        views, ref_views = self.photometric_views(anomalous, refs, keys, k, (0, 1), epochs[0])
        return AdaptBatch(k, classes, keys, epochs[0], images, refs, anomalous, mask, tuple(views), tuple(ref_views))

    def make_batch(self, batch: int, *, val: bool, plain: bool = False):
        """Residuals of the two anomalous views (and, with ``plain``, of the anomalous images themselves against
        the plain references, as a third entry), the masks and K of batch number ``batch``."""
        inputs = self.batch_inputs(batch, val=val)
        views, ref_views = list(inputs.views), list(inputs.reference_views)
        if plain:
            views.append(inputs.anomalous.float() / 255.0)
            ref_views.append(inputs.references.float() / 255.0)
        return self.residuals(views, ref_views, inputs.k), inputs.mask, inputs.k

    @torch.no_grad()
    def compute_centers(self) -> None:
        """Per layer, over ``center_images`` training-class renders (K = center_shots): the residual scale
        (mean norm of the normal residuals, the projector's fixed input divisor) and the centre (mean normal
        residual, in scaled units: the projector's input and, through its skip, output units). Residuals of a
        photometric view (draw slot CENTER_VIEW, no training view's) and its references made as for the
        training views (``photometric_views``), as the losses see them: with ``jitter_references`` off, an
        unjittered image against its own crops leaves little but the shift, and a scale from those would put
        the jittered normal training residuals far outside the norm loss's shell."""
        total = {name: torch.zeros(c, device=self.device, dtype=torch.float64) for name, c in self.channels.items()}
        norms = {name: torch.zeros((), device=self.device, dtype=torch.float64) for name in self.channels}
        done, batch = 0, 0
        while done < self.hparams.center_images:
            n = min(self.hparams.batch_size, self.hparams.center_images - done)
            _, classes = self.batch_plan(2**30 + batch, (0, self.train_classes), None)
            classes, keys = classes[:n], done + np.arange(n)
            k = self.hparams.center_shots
            images, refs = self.normal_images(classes, keys, k, (EPOCH_CENTER, EPOCH_CENTER_REFS))
            (res,) = self.residuals(*self.photometric_views(images, refs, keys, k, (CENTER_VIEW,), EPOCH_TRAIN), k)
            for name, r in res.items():
                total[name] += r.double().sum(dim=(0, 2, 3))
                norms[name] += torch.linalg.vector_norm(r.double(), dim=1).sum()
            done += n
            batch += 1
        for name in self.layers:
            spatial = res[name].shape[-2] * res[name].shape[-1]
            count = done * spatial
            scale = (norms[name] / count).clamp_min(1e-6)  # all-zero residuals (identical references): no scaling
            self.projector.layers[name].residual_scale.copy_(scale.float())
            getattr(self, f"center_{name}").copy_((total[name] / count / scale).float())
        self.centers_ready.fill_(True)

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch, batch_idx):
        # batches_seen counts steps (the same on every rank); each rank draws its own batch of the step
        number = self._next_step() * self.trainer.world_size + self.trainer.global_rank
        start = time.perf_counter()
        if self._last_start is not None:  # wall time of the whole previous step (forward, backward, optimiser)
            self.log("train/step_s", start - self._last_start, on_step=True)
        self._last_start = start
        residuals, mask, k = self.make_batch(number, val=False)
        prepared = time.perf_counter()
        e1, e2 = (self.projector(r) for r in residuals)
        loss = total_loss(e1, e2, mask, self.centers())
        self.log("train/k", float(k), on_step=True)
        self.log("train/anomalous_fraction", mask.flatten(1).any(1).float().mean(), on_step=True)
        self.log("train/prepare_s", prepared - start, on_step=True)
        # Logged on every step: Lightning keeps reporting a step metric's last value until the epoch ends, so
        # a "skipped" logged only on skipped steps read 1 on every later row of metrics.csv.
        self.log("train/skipped", float(loss is None), on_step=True)
        if loss is None:  # NaN, not nothing: an unlogged loss would repeat the previous step's value
            self.log("train/loss", float("nan"), on_step=True, prog_bar=True)
            if self.trainer.world_size > 1:  # DDP: every rank must run backward; a zero loss adds no gradient
                return sum(p.sum() for p in self.projector.parameters()) * 0.0
            return None  # one device: no backward, no update (the batch still counts towards max_steps)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def _next_step(self) -> int:
        """This step's number, counted on the host: the buffer (in checkpoints) is read once per run, since
        reading a CUDA tensor waits for the previous step's backward and stops the host preparing the batch."""
        if self._steps_done is None:
            self._steps_done = int(self.batches_seen)
        step, self._steps_done = self._steps_done, self._steps_done + 1
        self.batches_seen += 1  # on the device, queued: no sync
        return step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._steps_done = None  # the restored buffer is the count now

    def on_validation_epoch_start(self) -> None:
        self._val_scores = {}

    def validation_step(self, batch, batch_idx):
        """The loss on the two views; the scores of the plain anomalous images (``val_scores``)."""
        # ``batch`` is the validation batch number (a rank's share under DDP; batch_idx restarts at 0 per rank)
        residuals, mask, _ = self.make_batch(int(batch), val=True, plain=True)
        e1, e2 = (self.projector(r) for r in residuals[:2])
        loss = total_loss(e1, e2, mask, self.centers())
        if loss is not None:
            self.log("val/loss", loss, on_epoch=True, batch_size=mask.shape[0])
        for key, scores in self.val_scores(residuals[2], mask).items():
            self._val_scores.setdefault(key, []).append(scores)

    def val_scores(self, plain: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """Per (layer, raw | norm): (2, B h w) compressed norms and patch labels of the plain anomalous images.

        Plain, not a photometric view: downstream a test image is compared with train images taken under
        the same light, unjittered (``ad_eval``); the views are the training objective's invariance, and a
        jittered image's residual is large everywhere for a backbone that is not photometrically invariant
        (e.g. a random init), which drowned the defects (RESULTS.md)."""
        projected = self.projector(plain)
        out = {}
        for name, e in projected.items():
            labels = norm_labels(mask, tuple(e.shape[-2:])).flatten().float()
            for kind, r in (("raw", plain[name]), ("norm", e)):
                out[(name, kind)] = torch.stack([compressed_norm(r.movedim(1, -1)).flatten().float(), labels])
        return out

    def on_validation_epoch_end(self) -> None:
        """Patch AUROC over all validation batches pooled (a mean of per-batch AUROCs is NaN as soon as one
        batch has no abnormal patch at a layer, and noisy with a few defects per batch); this rank's batches."""
        for (name, kind), parts in sorted(self._val_scores.items()):
            scores, labels = torch.cat(parts, dim=1)
            self.log(f"val/auroc_{kind}_{name}", patch_auroc(scores, labels))
        self._val_scores = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["backbone_digest"] = self.backbone_digest  # a resume refuses other weights (adapt/cli.py)
        checkpoint["world_size"] = self.trainer.world_size  # and other ranks: step s draws batches s * W + r

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.projector.parameters(), lr=self.hparams.lr,
                                     weight_decay=self.hparams.weight_decay)
        # Absolute steps, not fractions of max_steps: a run stopped and resumed with a larger max_steps
        # keeps the schedule it started with.
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(set(self.hparams.milestones)),
                                                         gamma=self.hparams.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export(self, folder, steps: int) -> None:
        """projector.pt + projector.json (see ``export.py``)."""
        meta = {
            "backbone": self.hparams.backbone, "backbone_digest": self.backbone_digest,
            "arch": self.backbone_info.arch,
            # a seed names weights only for a random init; a file's weights ignore it
            "backbone_seed": self.hparams.backbone_seed if self.hparams.backbone == "random" else None,
            "layers": list(self.layers), "channels": self.channels,
            "projector": self.projector_config.to_dict(), "shots": self.hparams.eval_shots,
            "train_shots": list(self.hparams.shots), "center_shots": self.hparams.center_shots,
            "center_images": self.hparams.center_images, "recipe": self.recipe.name,
            "recipe_config": self.recipe.to_dict(), "anomalies": self.mix.to_dict(), "seed": self.hparams.seed,
            "size": self.hparams.size, "references": self.hparams.references,
            "reference_shift": self.hparams.reference_shift,
            "jitter_references": self.hparams.jitter_references, "steps": steps,
            "batches": int(self.batches_seen) * (self.trainer.world_size if self._trainer is not None else 1),
            "bank_bytes": self.projector.bank_bytes(), "residual_scales": self.projector.scales(),
        }
        write_projector(folder, self.projector.state_dict(), self.centers(), meta)
