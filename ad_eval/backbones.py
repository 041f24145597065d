"""Backbones to evaluate: our fractal-pretrained ResNets, torchvision ImageNet files, random inits.

A backbone is a torchvision ResNet state dict without ``fc.*`` plus the normalisation its
pre-training used. ``load_backbone(spec, arch, seed)`` reads one, checks it against the
architecture and returns a frozen ``Backbone``; ``Backbone.build()`` gives the plain torchvision
model and ``inject()`` loads the weights into a timm feature extractor (anomalib's models), whose
ResNet keys are the torchvision ones.

Specs:

- ``/path/backbone.pt`` (or the folder holding it): a state dict written by our pre-training,
  with ``backbone.json`` beside it (same stem, ``.json``): ``{"format":
  "fractal-pretrain-backbone/1", "arch": "resnet18", "mean": [3 floats], "std": [3 floats],
  ...}`` (recipe, seed, steps, image_size, ... are kept in ``Backbone.meta``). The json names
  the architecture; an ``arch`` argument that disagrees is an error.
- ``imagenet:/path/file.pth``: a torchvision ImageNet state dict (``fc.*`` dropped, a
  ``{"state_dict": ...}`` wrapper and ``module.``/``backbone.`` prefixes removed); ``arch`` is
  required, mean/std are ImageNet's. Nothing is downloaded: a missing file is an error naming the
  torchvision file to fetch.
- ``random``: torchvision's initialisation of ``arch`` under the CPU generator seeded with ``seed`` (the
  weights ``torch.manual_seed(seed)`` gives), in a forked RNG so the caller's random state is untouched
  (CUDA generators included: only the CPU one is seeded); ImageNet mean/std.

Every state dict must hold exactly the keys of the torchvision model minus ``fc.*`` (``fc.*`` is
ignored; BatchNorm ``num_batches_tracked`` counters, absent from some old torchvision files, are
filled with 0: eval-mode BatchNorm does not read them), with matching shapes and finite values.
Problems raise ``BackboneError``, one line naming the file and the first offending key; weights
of another architecture are reported as such ("... holds resnet18-shaped weights but
arch=resnet50").

Example::

    backbone = load_backbone("runs/fractal/backbone.pt")
    model = backbone.build()  # torchvision ResNet, fc = Identity, eval mode
    backbone = load_backbone("imagenet:/weights/wide_resnet50_2-95faca4d.pth", "wide_resnet50_2")
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models import resnet as tv_resnet

from ad_eval.datasets import IMAGENET_MEAN, IMAGENET_STD
from fractal_pretrain.handoff import FORMAT as BACKBONE_FORMAT
from fractal_pretrain.handoff import PROVENANCE_FIELDS, WEIGHTS_NAME

RANDOM_SPEC = "random"
IMAGENET_PREFIX = "imagenet:"
# The ResNet family of torchvision.models.resnet; timm has the same names and state-dict keys.
ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip
HEAD_PREFIX = "fc."  # the classifier: never part of a backbone, ignored when present
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # {"state_dict": {...}} and the like
_KEY_PREFIXES = ("module.", "backbone.")  # DataParallel/DDP, Lightning-module attribute names
_BN_COUNTER = "num_batches_tracked"


class BackboneError(ValueError):
    """A bad backbone spec or file. The message is one line naming the file and, if any, the key."""


@dataclass(frozen=True, eq=False)  # eq on dicts of tensors would be ambiguous
class Backbone:
    """Validated weights of a torchvision ResNet (no ``fc.*``) and the normalisation they expect.

    Attributes:
        arch: torchvision/timm name, one of ``ARCHS``.
        state_dict: every key of the torchvision model except ``fc.*``, CPU tensors, model order.
        mean, std: per-channel normalisation of [0, 1] RGB images used in pre-training.
        source: where the weights came from (the spec as given).
        meta: backbone.json for our pre-training, else what produced the weights.
    """

    arch: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    meta: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The torchvision ResNet with these weights (loaded strictly), ``fc = Identity``, eval mode.

        The parameters are copies: changing the model does not change this ``Backbone``.
        """
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move global RNG
            model = _builder(self.arch)()
        model.fc = nn.Identity()
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


# ----------------------------------------------------------------------------- loading


def load_backbone(spec: str, arch: str | None = None, seed: int = 0) -> Backbone:
    """Load and validate a backbone.

    Args:
        spec: a ``backbone.pt`` path (or its folder), ``imagenet:<path>`` or ``random``.
        arch: torchvision architecture name; required for ``imagenet:`` and ``random``, optional
            for ``backbone.pt`` (whose json names it; a different value is an error).
        seed: seed of the ``random`` initialisation (ignored otherwise).

    Returns:
        The validated ``Backbone``.

    Raises:
        BackboneError: a missing or unreadable file, a wrong architecture, a missing, unexpected,
            misshapen or non-finite tensor, or a bad backbone.json.
    """
    if arch is not None:
        _check_arch(arch, f"arch={arch!r}")
    if spec == RANDOM_SPEC:
        return _random_backbone(_require_arch(spec, arch), seed)
    if spec.startswith(IMAGENET_PREFIX):
        return _imagenet_backbone(spec, _require_arch(spec, arch))
    return _pretrained_backbone(spec, arch)


def _random_backbone(arch: str, seed: int) -> Backbone:
    # fork_rng(devices=[]) restores only the CPU generator: torch.manual_seed would also reseed every CUDA one for
    # good. Module initialisation runs on the CPU, so the CPU generator alone decides the weights.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = _builder(arch)()
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    return Backbone(
        arch, state_dict, IMAGENET_MEAN, IMAGENET_STD, RANDOM_SPEC, {"init": "torchvision", "seed": seed}
    )


def _imagenet_backbone(spec: str, arch: str) -> Backbone:
    path = Path(spec[len(IMAGENET_PREFIX) :]).expanduser()
    if not path.is_file():
        raise BackboneError(f"{spec}: file not found; {imagenet_download_hint(arch)}")
    state_dict = validate_state_dict(_read_state_dict(path), arch, where=str(path))
    return Backbone(arch, state_dict, IMAGENET_MEAN, IMAGENET_STD, spec, {"file": str(path)})


def check_spec(spec: str, arch: str | None = None) -> None:
    """The cheap part of ``load_backbone``: files exist, backbone.json is valid; the weights of a backbone.pt are
    not read. An ``imagenet:`` file has no json naming its arch, so its tensors are checked against ``arch`` here
    (read once more when the cell loads it; a resnet18 file with ``--arch resnet50`` was a failure record).

    ``ad-eval run`` calls it before a cell starts, so a bad ``--backbone`` is one line and writes nothing.
    """
    if arch is not None:
        _check_arch(arch, f"arch={arch!r}")
    if spec == RANDOM_SPEC:
        _require_arch(spec, arch)
    elif spec.startswith(IMAGENET_PREFIX):
        arch = _require_arch(spec, arch)
        _imagenet_backbone(spec, arch)
    else:
        _pretrained_files(spec, arch)


def _pretrained_files(spec: str, arch: str | None) -> tuple[Path, dict]:
    """The backbone.pt path and its checked backbone.json of a pretrained spec."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise BackboneError(
            f"backbone file {path} not found (spec must be a backbone.pt path, its folder, "
            f"{IMAGENET_PREFIX}<path> or {RANDOM_SPEC})"
        )
    json_path = path.with_suffix(".json")
    if not json_path.is_file() and path.suffix == ".ckpt":  # a fit's checkpoints/last.ckpt: say how to get one
        raise BackboneError(f"{path}: a training checkpoint, not a backbone.pt; write one with "
                            f"`fractal-pretrain export-backbone {path}`")
    if not json_path.is_file():
        _read_state_dict(path, what="not a backbone checkpoint")  # a stray file: say so, not "json missing"
    meta = read_backbone_json(json_path)
    if arch is not None and arch != meta["arch"]:
        raise BackboneError(f"{json_path} says arch={meta['arch']} but arch={arch} was requested")
    return path, meta


def _pretrained_backbone(spec: str, arch: str | None) -> Backbone:
    path, meta = _pretrained_files(spec, arch)
    state_dict = validate_state_dict(_read_state_dict(path), meta["arch"], where=str(path))
    return Backbone(
        meta["arch"], state_dict, tuple(meta["mean"]), tuple(meta["std"]), str(path), meta
    )


def read_backbone_json(path: str | Path) -> dict:
    """The metadata written beside ``backbone.pt``, checked: format, arch, mean and std."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: missing; our backbone.pt files need their backbone.json beside them")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackboneError(_one_line(f"{path}: not readable JSON: {err}")) from None
    if not isinstance(meta, dict):
        raise BackboneError(f"{path}: must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != BACKBONE_FORMAT:
        raise BackboneError(f"{path}: format {meta.get('format')!r} must be {BACKBONE_FORMAT!r}")
    _check_arch(meta.get("arch"), f"{path}: arch {meta.get('arch')!r}")
    for name in ("mean", "std"):
        values = meta.get(name)
        if (
            not isinstance(values, list)
            or len(values) != 3
            or not all(_is_finite_number(v) for v in values)
        ):
            raise BackboneError(f"{path}: {name} {values!r} must be a list of 3 finite numbers")
        meta[name] = [float(v) for v in values]
    if min(meta["std"]) <= 0:
        raise BackboneError(f"{path}: std {meta['std']} must be > 0")
    return meta


def provenance(backbone: Backbone) -> dict:
    """``backbone_<field>`` record entries naming the pre-training of one of our backbone.pt files.

    Empty for ImageNet files and random inits (their records stay as they were).
    """
    if backbone.meta.get("format") != BACKBONE_FORMAT:
        return {}
    return {f"backbone_{name}": backbone.meta.get(name) for name in PROVENANCE_FIELDS}


def imagenet_download_hint(arch: str) -> str:
    """What to download for ``imagenet:`` weights of ``arch`` (from torchvision's weight enums)."""
    weights = get_model_weights(arch).IMAGENET1K_V1  # the original release, as PatchCore/PaDiM used
    filename = weights.url.rsplit("/", 1)[-1]
    return (
        f"download the torchvision ImageNet weights for {arch} ({filename} = "
        f"{type(weights).__name__}.IMAGENET1K_V1, {weights.url}) on a machine with internet and "
        "pass its path"
    )


def _read_state_dict(path: Path, what: str = "cannot read as a torch state dict") -> dict[str, torch.Tensor]:
    """A state dict from a torch file: wrappers unwrapped, ``module.``/``backbone.`` stripped.

    ``what`` starts the error message when the file is not a torch file at all.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors: all mean "not a plain state dict"
        # torch's first sentence only: the rest of a weights_only error is advice to load with weights_only=False
        detail = _one_line(str(err)).split(". ")[0][:200]
        raise BackboneError(_one_line(f"{path}: {what} ({type(err).__name__}: {detail})")) from None
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise BackboneError(f"{path}: holds {type(obj).__name__}, not a non-empty state dict")
    state_dict = {}
    for key, value in obj.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _KEY_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        if not isinstance(value, torch.Tensor):
            raise BackboneError(f"{path}: {key} holds {type(value).__name__}, not a tensor")
        if name in state_dict:
            raise BackboneError(f"{path}: {key} duplicates {name} once prefixes are removed")
        state_dict[name] = value
    return state_dict


# ----------------------------------------------------------------------------- validation


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: str, *, where: str
) -> dict[str, torch.Tensor]:
    """Check a state dict against torchvision's ``arch`` and return it without ``fc.*``.

    Args:
        state_dict: tensors by torchvision key; ``fc.*`` is allowed and dropped.
        arch: the architecture the weights must fit.
        where: the file (or spec) named in error messages.

    Returns:
        The tensors in the model's key order, detached on the CPU; missing BatchNorm
        ``num_batches_tracked`` counters are filled with 0.

    Raises:
        BackboneError: wrong architecture, or the first missing / misshapen / unexpected /
            non-finite key.
    """
    expected = _expected_shapes(arch)
    weights = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    problem = _first_mismatch(weights, expected)
    if problem is not None:
        guess = _guess_arch(weights)
        if guess is not None and guess != arch:
            raise BackboneError(f"{where} holds {guess}-shaped weights but arch={arch}")
        raise BackboneError(f"{where}: {problem}")
    out = {}
    for key, shape in expected.items():
        value = weights.get(key)
        if value is None:  # only BatchNorm counters may be missing (_first_mismatch)
            value = torch.zeros(shape, dtype=torch.long)
        value = value.detach().to("cpu")
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            raise BackboneError(f"{where}: {key} holds non-finite values (NaN or inf)")
        out[key] = value
    return out


def _first_mismatch(
    weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]
) -> str | None:
    """The first missing or misshapen expected key, then the first unexpected one, or None."""
    for key, shape in expected.items():
        if key not in weights:
            if key.endswith(_BN_COUNTER):
                continue
            return f"missing key {key}"
        if tuple(weights[key].shape) != tuple(shape):
            return (
                f"{key} has shape {tuple(weights[key].shape)}, expected {tuple(shape)}"
            )
    for key in weights:
        if key not in expected:
            return f"unexpected key {key} (only {HEAD_PREFIX}* is ignored)"
    return None


def _guess_arch(weights: Mapping[str, torch.Tensor]) -> str | None:
    """The architecture whose keys and shapes the weights match exactly, if any."""
    for arch in ARCHS:
        if _first_mismatch(weights, _expected_shapes(arch)) is None:
            return arch
    return None


@functools.cache
def _expected_shapes(arch: str) -> dict[str, torch.Size]:
    """Key -> shape of torchvision's ``arch`` without ``fc.*`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = _builder(arch)()
    return {
        k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)
    }


# ----------------------------------------------------------------------------- injection


def inject(extractor: nn.Module, backbone: Backbone, where: str) -> list[str]:
    """Load ``backbone`` into a timm feature extractor (e.g. a ``FeatureListNet``) in place.

    The extractor may stop before ``layer4`` and has no ``fc``; every key it has must be in the
    backbone with the same shape, else nothing is loaded.

    Args:
        extractor: module whose state-dict keys are torchvision ResNet keys.
        backbone: the weights.
        where: names the extractor in error messages (e.g. "stfpm teacher").

    Returns:
        The loaded keys, in the extractor's order.
    """
    own = extractor.state_dict()
    for key, value in own.items():
        if key not in backbone.state_dict:
            raise BackboneError(
                f"{where}: extractor key {key} is not in the {backbone.arch} backbone "
                f"from {backbone.source}"
            )
        if backbone.state_dict[key].shape != value.shape:
            raise BackboneError(
                f"{where}: {key} has shape {tuple(value.shape)} in the extractor but "
                f"{tuple(backbone.state_dict[key].shape)} in {backbone.source}"
            )
    extractor.load_state_dict({k: backbone.state_dict[k] for k in own}, strict=True)
    return list(own)


# ----------------------------------------------------------------------------- helpers


def _builder(arch: str):
    _check_arch(arch, f"arch={arch!r}")
    return getattr(tv_resnet, arch)


def _check_arch(arch, what: str) -> None:
    if arch not in ARCHS:
        raise BackboneError(f"{what} is not a supported architecture: {', '.join(ARCHS)}")


def _require_arch(spec: str, arch: str | None) -> str:
    if arch is None:
        raise BackboneError(f"{spec}: arch is required (e.g. arch='resnet18')")
    return arch


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(message: str) -> str:
    return " ".join(message.split())
