"""Residual scale: fixed from the normal residuals before training, stored, applied in adapt and ad_eval alike."""

import pytest
import torch

from ad_eval.backbones import load_backbone
from ad_eval.datasets import Sample
from ad_eval.projection import ProjectedExtractor, load_projection
from fractal_pretrain.adapt.export import read_projector
from fractal_pretrain.adapt.features import stage_features
from fractal_pretrain.adapt.losses import compressed_norm, flat, total_loss
from fractal_pretrain.adapt.model import AdaptModule
from fractal_pretrain.adapt.residual import residual_features

LAYERS = ("layer2", "layer3")


@pytest.fixture(scope="module", params=["instance", "class"])
def module(request):
    m = AdaptModule(backbone="random", arch="resnet18", layers=LAYERS, recipe="anderson", references=request.param,
                    recipe_overrides={"num_classes": 6, "num_points": 4000}, size=64, batch_size=4, shots=(2,),
                    eval_shots=2, center_images=8, center_shots=2, val_classes=2,
                    anomalies={"anomaly_p": 1.0, "mask_systems": 16, "mask_points": 3000},
                    projector={"kind": "mlp"})
    m.setup("fit")
    m.compute_centers()
    return m


def test_scale_is_the_mean_normal_residual_norm(module):
    scales = module.projector.scales()
    assert all(s > 1.0 for s in scales.values())  # raw resnet18 residuals are far from ADPretrain's unit shell
    residuals, mask, _ = module.make_batch(0, val=False)
    normal = {n: flat(r)[~torch.nn.functional.interpolate(mask[:, None].float(), r.shape[-2:])[:, 0].flatten().bool()]
              for n, r in residuals[0].items()}
    for name, r in normal.items():  # scaled normal residuals of a training view: mean norm about 1
        assert 0.3 < float(torch.linalg.vector_norm(r, dim=1).mean()) / scales[name] < 3.0


def normal_median_norm(projected: dict, mask: torch.Tensor, name: str) -> float:
    e = projected[name]
    normal = ~torch.nn.functional.interpolate(mask[:, None].float(), e.shape[-2:])[:, 0].flatten().bool()
    return float(compressed_norm(flat(e.detach()))[normal].median())


def test_loss_is_finite_and_sane_only_with_the_scale(module):
    residuals, mask, _ = module.make_batch(1, val=False)
    e1, e2 = (module.projector(r) for r in residuals)
    loss = total_loss(e1, e2, mask, module.centers())
    # An untrained projector starts with normal residuals on the norm loss's shell (compressed norm 0.4)
    # and an O(1) loss per term (the abnormal margin is not yet met).
    assert loss is not None and torch.isfinite(loss) and float(loss) < 30.0
    assert all(0.25 < normal_median_norm(e1, mask, n) < 0.6 for n in LAYERS)
    saved = module.projector.scales()
    try:
        for layer in module.projector.layers.values():
            layer.residual_scale.fill_(1.0)
        raw = [module.projector(r) for r in residuals]
        unscaled = total_loss(*raw, mask, {n: c * saved[n] for n, c in module.centers().items()})
    finally:
        for name, layer in module.projector.layers.items():
            layer.residual_scale.fill_(saved[name])
    # Raw: outside the shell. Crops of the image's own render under the view's own light (jitter_references)
    # leave residuals of about the shift only (median compressed norm 0.7 / 1.0 on layers 2 / 3); other renders
    # of the class, more (1.0 / 1.5).
    instance = module.hparams.references == "instance"
    assert all(normal_median_norm(raw[0], mask, n) > (0.6 if instance else 1.0) for n in LAYERS)
    # the exp(distance) weights of the norm loss grow with the norms (x1.4 with other renders as references,
    # x1.1 with crops of the image's own render, whose raw residuals are smaller)
    assert float(unscaled) > (1.0 if instance else 1.2) * float(loss)


def test_ad_eval_applies_the_stored_scale(module, tmp_path):
    module.export(tmp_path, steps=0)
    data, meta = read_projector(tmp_path)
    assert meta["residual_scales"] == pytest.approx(module.projector.scales())
    assert float(data["state_dict"]["layers.layer3.residual_scale"]) == pytest.approx(meta["residual_scales"]["layer3"])
    backbone = load_backbone("random", "resnet18", seed=0)
    train = [Sample(tmp_path / f"{i}.png", 0, "good") for i in range(2)]
    projection = load_projection(str(tmp_path), backbone, train, seed=0, category="x")
    assert projection.projector.scales() == pytest.approx(module.projector.scales())
    images, references = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    net = module.backbone

    def inner(x):
        return stage_features(net, x, LAYERS)

    extractor = ProjectedExtractor(inner, projection, references)
    out = extractor(images)
    with torch.no_grad():
        f, ref = inner(images), inner(references)
        expected = module.projector({n: residual_features(f[n], ref[n]) for n in LAYERS})
    for name in LAYERS:
        assert torch.allclose(out[name], expected[name], atol=1e-5)
