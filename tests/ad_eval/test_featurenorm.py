"""FeatureNorm's scoring (issue 14): each patch by the compressed norm sqrt(||e|| + 1) - 1, the layers' maps
bilinearly upsampled and averaged, then smoothed by PatchCore's Gaussian (anomalib's AnomalyMapGenerator)."""

import math

import torch
from torch import nn

from ad_eval.methods.featurenorm import gaussian_smooth, norm_maps


class Fixed(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, images):
        return self.features


def test_patch_score_is_the_compressed_norm_upsampled_and_averaged_over_layers():
    g = torch.Generator().manual_seed(0)
    layers = {"layer2": torch.randn(2, 8, 4, 4, generator=g), "layer3": torch.randn(2, 16, 2, 2, generator=g)}
    maps = norm_maps(Fixed(layers), torch.zeros(2, 3, 16, 16), (16, 16))
    assert maps.shape == (2, 16, 16)
    # A constant-norm layer gives a constant map: the score of one patch, checked by hand.
    e = torch.zeros(1, 3, 2, 2)
    e[0, 0] = 3.0
    e[0, 1] = 4.0  # ||e|| = 5 at every patch: sqrt(5 + 1) - 1
    flat = norm_maps(Fixed({"a": e}), torch.zeros(1, 3, 8, 8), (8, 8))
    assert torch.allclose(flat, torch.full((1, 8, 8), math.sqrt(6.0) - 1.0))
    by_layer = [torch.nn.functional.interpolate((torch.sqrt(v.norm(dim=1) + 1) - 1)[:, None], size=[16, 16],
                                                mode="bilinear", align_corners=False)[:, 0] for v in layers.values()]
    assert torch.allclose(maps, (by_layer[0] + by_layer[1]) / 2, atol=1e-6)


def test_smoothing_is_patchcores_gaussian():
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator

    maps = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1))
    blur = AnomalyMapGenerator(sigma=4).blur
    assert torch.allclose(gaussian_smooth(maps, 4.0), blur(maps[:, None])[:, 0], atol=1e-5)
