"""The projector hand-off from ``adapt`` to ``ad_eval``: ``projector.pt`` + ``projector.json``.

``projector.pt``: ``{"state_dict": projector weights (with each layer's ``residual_scale`` buffer, the
divisor of its input residuals), "centers": {layer: (C,) mean normal residual, in scaled units}}``.
``projector.json``: ``{"format", "backbone" (the spec adapt loaded), "backbone_digest", "arch", "layers",
"channels", "projector" (ProjectorConfig), "shots" (K at evaluation), "center_shots", "recipe",
"recipe_config", "anomalies", "seed", "steps", "residual_scales" (the same divisors, for reading)}``.
The digest is over the backbone weights (every tensor, sorted by name), so a projector is only ever used
on the features it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fractal_pretrain.atomic import atomic_write
from fractal_pretrain.config import ConfigError

FORMAT = "fractal-pretrain-projector/2"  # 2: per-layer residual_scale buffers in the state dict
WEIGHTS_NAME = "projector.pt"
META_NAME = "projector.json"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of a state dict's names, shapes, dtypes and bytes, sorted by name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if name.startswith("fc."):
            continue
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def write_projector(folder: Path, state_dict: dict, centers: dict, meta: dict) -> None:
    """Writes both files atomically (``fractal_pretrain.atomic``: a killed job never leaves half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "centers": {k: v.detach().cpu().float() for k, v in centers.items()}}
    text = json.dumps({"format": FORMAT, **meta}, indent=2) + "\n"
    atomic_write(folder / WEIGHTS_NAME, lambda f: torch.save(payload, f))
    atomic_write(folder / META_NAME, lambda f: f.write(text.encode()))


def read_projector(path: str | Path) -> tuple[dict, dict]:
    """(the .pt contents, the json) of ``projector.pt`` or its folder; one-line errors naming the file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    sidecar = weights.with_name(META_NAME)
    if not weights.is_file():
        raise ConfigError(f"projector {weights}: file not found")
    if not sidecar.is_file():
        raise ConfigError(f"projector {sidecar}: file not found (projector.json must sit beside projector.pt)")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"projector {sidecar}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"projector {sidecar}: format={meta.get('format') if isinstance(meta, dict) else None!r}: "
                          f"must be {FORMAT!r}")
    for key in ("backbone_digest", "layers", "channels", "projector", "shots"):
        if key not in meta:
            raise ConfigError(f"projector {sidecar}: missing key {key!r}")
    try:
        data = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"projector {weights}: cannot read ({type(err).__name__})") from None
    if not isinstance(data, dict) or "state_dict" not in data or "centers" not in data:
        raise ConfigError(f"projector {weights}: needs keys 'state_dict' and 'centers'")
    return data, meta
