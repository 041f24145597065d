"""Can the projector learn at all? The classic sanity checks of the ``adapt`` stage (RESULTS.md, "Can the
projector learn?"): references share their image's photometric view, and the projector overfits one fixed
batch (loss down, the batch's projected patch AUROC clearly above the raw residual's)."""

import numpy as np
import pytest
import torch

from fractal_pretrain.adapt.losses import compressed_norm, flat, norm_labels, total_loss
from fractal_pretrain.adapt.model import AdaptModule, patch_auroc
from fractal_pretrain.config import ConfigError


def module(**overrides) -> AdaptModule:
    torch.manual_seed(0)  # the projector's initialisation
    kwargs = dict(backbone="random", arch="resnet18", recipe="anderson",
                  recipe_overrides={"num_classes": 6, "num_points": 4000}, size=64, batch_size=4, shots=(2,),
                  eval_shots=2, center_images=8, center_shots=2, val_classes=2,
                  anomalies={"anomaly_p": 1.0, "mask_systems": 16, "mask_points": 3000},
                  projector={"kind": "attention", "bank_size": 64, "heads": 4})
    m = AdaptModule(**{**kwargs, **overrides})
    m.setup("fit")
    return m


@pytest.mark.parametrize("jitter", [True, False])
def test_references_share_their_images_photometric_view(jitter):
    """Without shift the references are the normal image itself; with jitter_references (the default) each
    view's residual is then exactly zero, as a test image against train images under the same light. The
    old pairing (jittered image, unjittered references) leaves a residual on every patch."""
    m = module(reference_shift=0.0, anomalies={"anomaly_p": 0.0}, jitter_references=jitter)
    residuals, mask, _ = m.make_batch(3, val=False, plain=True)
    assert not mask.any()
    for view in residuals[:2]:
        for name, r in view.items():
            size = float(torch.linalg.vector_norm(r, dim=1).mean())
            assert (size < 1e-4) if jitter else (size > 0.1), (name, size)
    assert all(float(r.abs().max()) < 1e-4 for r in residuals[2].values())  # plain: no jitter either way


def test_jitter_references_must_be_a_bool():
    with pytest.raises(ConfigError, match="model.jitter_references"):
        module(jitter_references="yes")


def batch_aurocs(residuals: dict, mask: torch.Tensor) -> dict[str, float]:
    """Patch AUROC of the compressed norm per layer (FeatureNorm's score) against the nearest-resized mask."""
    return {name: patch_auroc(compressed_norm(flat(e)), norm_labels(mask, tuple(e.shape[-2:])).flatten())
            for name, e in residuals.items()}


def test_projector_overfits_one_fixed_batch():
    """The guard against silent regressions of the whole stage (gradient flow, losses, scale, centres):
    100 Adam steps (lr 1e-3) on one batch bring its loss far down and its projected AUROC, on the training
    view and on the plain anomalous images, clearly above the raw residual's (0.87 / 0.83 -> 0.97 / 1.0
    when written)."""
    m = module()
    m.compute_centers()
    residuals, mask, _ = m.make_batch(0, val=False, plain=True)
    assert mask.any()
    raw = {kind: batch_aurocs(residuals[i], mask) for kind, i in (("view", 0), ("plain", 2))}
    optimizer = torch.optim.Adam(m.projector.parameters(), lr=1e-3, weight_decay=5e-4)
    losses = []
    for _ in range(100):
        e1, e2 = (m.projector(r) for r in residuals[:2])
        loss = total_loss(e1, e2, mask, m.centers())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < losses[0] - 10.0, (losses[0], losses[-5:])
    with torch.no_grad():
        projected = {kind: batch_aurocs(m.projector(residuals[i]), mask) for kind, i in (("view", 0), ("plain", 2))}
    for kind in raw:
        for name in m.layers:
            assert projected[kind][name] > max(raw[kind][name] + 0.05, 0.93), (kind, name, raw, projected)
