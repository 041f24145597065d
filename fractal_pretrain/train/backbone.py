"""``backbone.pt`` + ``backbone.json``: what pre-training hands to ad_eval (format: ``fractal_pretrain.handoff``).

``backbone.pt`` is the network's state dict with exactly the torchvision keys of its architecture,
minus the classifier (``fc.*``). ``backbone.json`` says how to use it: architecture, input
normalisation, image size, and where it came from (recipe and its config, seed, epochs, steps).
Both are written atomically, so a killed export never leaves a half-written backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fractal_pretrain.atomic import atomic_write
from fractal_pretrain.handoff import FORMAT, META_NAME, WEIGHTS_NAME
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.train.model import build_resnet

NET_PREFIX = "net."


class BackboneExportError(ValueError):
    """A checkpoint that cannot be turned into a backbone; the message names the file and the key."""


def backbone_state(model_state: dict[str, torch.Tensor], arch: str, where: str = "model") -> dict[str, torch.Tensor]:
    """The torchvision backbone keys of ``arch`` taken from a FractalClassifier state dict, checked."""
    net = {k[len(NET_PREFIX):]: v for k, v in model_state.items() if k.startswith(NET_PREFIX)}
    expected = {k: v.shape for k, v in build_resnet(arch, num_classes=2).state_dict().items()
                if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(net))
    if missing:
        raise BackboneExportError(f"{where}: no {arch} key {missing[0]!r} ({len(missing)} missing)")
    for key, shape in expected.items():
        if net[key].shape != shape:
            raise BackboneExportError(
                f"{where}: {key} has shape {tuple(net[key].shape)}, {arch} needs {tuple(shape)}")
    return {k: net[k].detach().cpu().clone() for k in expected}


def backbone_meta(hparams, data_hparams, *, epoch: int, steps: int, source: str,
                  images: dict[str, Any] | None = None) -> dict[str, Any]:
    """The backbone.json fields from the model's and the data module's hyper-parameters.

    ``images`` is where the training images came from (the data module's record: source, path, count,
    digest of the file list); a run on a folder or shards has no recipe.
    """
    overrides = dict(data_hparams.get("recipe_overrides") or {})
    recipe = data_hparams.get("recipe") if data_hparams.get("source", "render") == "render" else None
    return {
        "arch": hparams["arch"],
        "mean": list(data_hparams.get("mean", ())),
        "std": list(data_hparams.get("std", ())),
        "image_size": input_size(data_hparams, images or {}),
        "objective": hparams.get("objective") or ("multilabel" if hparams.get("multi_label") else "classification"),
        "recipe": recipe,
        "recipe_config": get_recipe(recipe, overrides).to_dict() if recipe else None,
        "seed": data_hparams.get("seed"),
        "epoch": epoch,  # Lightning's epoch counter when saved (a partial epoch counts)
        "steps": steps,
        "source": source,
        "images": images or {},
    }


def input_size(data_hparams, images: dict[str, Any]):
    """The side the network was trained at: the augmentation's output, else a fixed set's image size
    ([H, W], folders and shards are used as they are), else the rendered size."""
    augment = data_hparams.get("augment") or {}
    if augment.get("enabled", False):
        from fractal_pretrain.augment import AugmentConfig

        return augment.get("size", AugmentConfig.size)
    if images.get("image_size") and images.get("source") != "render":
        return images["image_size"]
    return data_hparams.get("size")


def write_backbone(state: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Writes ``backbone.pt`` and ``backbone.json`` into out_dir; returns the .pt path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pt = out / WEIGHTS_NAME
    atomic_write(pt, lambda f: torch.save(state, f))
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    atomic_write(out / META_NAME, lambda f: f.write(text.encode()))
    return pt


def export_checkpoint(ckpt: str | Path, out_dir: str | Path | None = None) -> Path:
    """backbone.pt/.json from a pre-training checkpoint (default: next to its run's checkpoints/ folder)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise BackboneExportError(f"{ckpt}: checkpoint not found")
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which
        raise BackboneExportError(f"{ckpt}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    hparams = data.get("hyper_parameters") or {}
    data_hparams = data.get("datamodule_hyper_parameters") or {}
    if "arch" not in hparams or "state_dict" not in data:
        raise BackboneExportError(f"{ckpt}: not a fractal-pretrain checkpoint (no model hyper-parameters)")
    state = backbone_state(data["state_dict"], hparams["arch"], where=str(ckpt))
    images = (data.get("FractalDataModule") or {}).get("images")  # the data module's state_dict
    meta = backbone_meta(hparams, data_hparams, epoch=int(data.get("epoch", 0)),
                         steps=int(data.get("global_step", 0)), source=str(ckpt.resolve()), images=images)
    if out_dir is None:
        out_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return write_backbone(state, meta, out_dir)
