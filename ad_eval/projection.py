"""``--projector``: a method sees projected residual features instead of the backbone's raw features.

A projector (``fractal-pretrain adapt``, format in ``fractal_pretrain/adapt/export.py``) belongs to one
backbone: its json carries a digest of the backbone weights, and ``load_projection`` refuses any other
backbone (one line naming the file). The references are K normal train images of the category, chosen
by ``ad_eval.fewshot.select_shots`` with the cell's seed (K: the cell's ``projector_shots``, else the
projector's ``shots``; in a few-shot cell at most its K, and among its K images), so the choice is a pure
function of (seed, category, K) and is recorded.

``ProjectedExtractor`` wraps a feature extractor returning ``{layer: (B, C, h, w)}`` (anomalib's timm
extractor, or ``stage_features``): every layer's output becomes projector(f - nearest reference patch),
the references' features computed once by the same extractor on the same preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.datasets import Sample
from ad_eval.fewshot import select_shots
from fractal_pretrain.adapt.export import read_projector, weights_digest
from fractal_pretrain.adapt.projector import Projector, ProjectorConfig
from fractal_pretrain.adapt.residual import residual_features
from fractal_pretrain.config import ConfigError, build_checked

LABEL_SUFFIX = "+adapt"  # records' backbone label of projected variants: Fractals -> Fractals+adapt


@dataclass(frozen=True, eq=False)
class Projection:
    """A loaded projector, the layers it was trained on and the chosen reference images."""

    path: str
    projector: Projector
    layers: tuple[str, ...]
    references: tuple[Sample, ...]
    meta: dict = field(repr=False)

    def check_layers(self, layers: Sequence[str] | None, method: str) -> None:
        if layers is None or not set(layers) <= set(self.layers):
            raise ConfigError(f"projector {self.path}: trained on layers {', '.join(self.layers)}; {method} uses "
                              f"{', '.join(layers or ()) or 'no layers'}")

    def record_fields(self) -> dict:
        return {"projector_path": self.path, "projector_digest": self.meta.get("projector_digest", ""),
                "projector_shots": len(self.references), "projector_recipe": self.meta.get("recipe"),
                "projector_steps": self.meta.get("steps"),
                "projector_references": [s.path.name for s in self.references]}


@dataclass(frozen=True, eq=False)
class ProjectedBackbone(Backbone):
    """A ``Backbone`` that carries a ``Projection``: methods that accept one use it."""

    projection: Projection | None = None


def load_projection(path: str, backbone: Backbone, train: Sequence[Sample], *, seed: int, category: str,
                    shots: int | None = None, cell_shots: int | None = None) -> Projection:
    """The projector of ``path`` checked against ``backbone``, with its K references from ``train``.

    ``cell_shots``: a few-shot cell's K. Its references must be among its K images: K' <= K references drawn
    with the cell's seed are (``select_shots`` takes a prefix of one ranking); the projector's own default is
    lowered to K, a ``shots`` above it is an error."""
    data, meta = read_projector(path)
    digest = weights_digest(backbone.state_dict)
    if meta["backbone_digest"] != digest:
        seed_of = meta.get("backbone_seed")  # None for a file backbone (older projectors recorded 0 for any)
        made_for = f"{meta.get('backbone')!r} {meta.get('arch')}" + (
            f" seed {seed_of}" if meta.get("backbone") == "random" and seed_of is not None else "")
        # A random init is other weights for every seed: say which seed this one is and what to do.
        random = backbone.source == "random"
        this = f"{backbone.source!r} {backbone.arch}" + (f" seed {seed}" if random else "")
        same_init = random and meta.get("backbone") == "random" and meta.get("arch") == backbone.arch
        hint = "; a random init differs per seed: adapt one per seed (model.backbone_seed)" if same_init else ""
        raise ConfigError(f"projector {path}: made for backbone {made_for} (weights digest {meta['backbone_digest']}), "
                          f"not for {this} (digest {digest}){hint}")
    k = meta["shots"] if shots is None else shots
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"projector_shots={k!r}: must be an integer >= 1")
    if cell_shots is not None and k > cell_shots:
        if shots is not None:
            raise ConfigError(f"projector_shots={k}: more references than the cell's shots={cell_shots} (a few-shot "
                              "cell sees only its own images); use at most that many")
        k = cell_shots
    if k > len(train):
        raise ConfigError(f"projector_shots={k}: category {category!r} has only {len(train)} train images")
    config = build_checked(ProjectorConfig, meta["projector"], f"projector {path}: projector")
    projector = Projector({str(n): int(c) for n, c in meta["channels"].items()}, config)
    try:
        projector.load_state_dict(data["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"projector {path}: weights do not match its json ({str(err).splitlines()[0]})") from None
    references = tuple(select_shots(train, k, seed=seed, category=category))
    meta = {**meta, "projector_digest": weights_digest(data["state_dict"])}
    return Projection(str(path), projector.eval().requires_grad_(False), tuple(meta["layers"]), references, meta)


def attach(backbone: Backbone, projection: Projection) -> ProjectedBackbone:
    return ProjectedBackbone(backbone.arch, backbone.state_dict, backbone.mean, backbone.std, backbone.source,
                             backbone.meta, projection)


def projection_of(backbone) -> Projection | None:
    return getattr(backbone, "projection", None)


def projected_label(name: str) -> str:
    return name if name.endswith(LABEL_SUFFIX) else name + LABEL_SUFFIX


class ProjectedExtractor(nn.Module):
    """``inner(images) -> {layer: f}`` becomes ``{layer: projector(f - nearest reference of f)}``.

    ``references`` are the K reference images already preprocessed like the inputs (B, 3, H, W).
    """

    def __init__(self, inner: nn.Module, projection: Projection, references: torch.Tensor):
        super().__init__()
        self.inner, self.projector = inner, projection.projector
        self.register_buffer("references", references, persistent=False)
        self._reference_features: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.inner(images)
        if self._reference_features is None:
            self._reference_features = {k: v.float() for k, v in self.inner(self.references.to(images)).items()}
        self.projector.to(images.device)
        return {name: self.projector.layers[name](residual_features(f.float(), self._reference_features[name]))
                if name in self.projector.layers else f for name, f in features.items()}
