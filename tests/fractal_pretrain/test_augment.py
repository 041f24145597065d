"""BatchAugmenter: the whole transform against torchvision, determinism by key, mixing, config errors.

Run: PYTHONPATH=$PWD .venv/bin/python -m pytest tests/fractal_pretrain/test_augment.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_augment_ops import tv_apply
from torchvision.transforms import AutoAugment, AutoAugmentPolicy
from torchvision.transforms.v2 import functional as TF

from fractal_pretrain.augment import AugmentConfig, BatchAugmenter, apply_mix
from fractal_pretrain.augment.params import mix_params, sample_params
from fractal_pretrain.config import ConfigError

OFDB = AugmentConfig(enabled=True, size=32)  # OFDB-4AD's settings at a small output size


def _images(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, 3, side // 8, side // 8), dtype=torch.uint8, generator=g)
    return F.interpolate(coarse.float(), size=(side, side), mode="bilinear").round().to(torch.uint8)


def _torchvision_crop(image: torch.Tensor, p, k: int, cfg: AugmentConfig) -> torch.Tensor:
    out = TF.resized_crop(image.float(), *[int(v) for v in p.crop[k]], [cfg.size, cfg.size], antialias=True)
    out = out.round().to(torch.uint8)  # torchvision's float path for uint8 (as on CUDA)
    return TF.horizontal_flip(out) if p.hflip[k] else out


def _torchvision_rest(image: torch.Tensor, p, k: int, cfg: AugmentConfig) -> torch.Tensor:
    """AutoAugment, normalise and erase with torchvision v2 kernels, fed the same drawn parameters."""
    out = image
    if p.policy[k] >= 0:
        reference = AutoAugment(AutoAugmentPolicy.IMAGENET)
        space = reference._augmentation_space(10, (cfg.size, cfg.size))
        for step, (name, _, bin_) in enumerate(reference.policies[p.policy[k]]):
            if p.fire[k, step]:
                table, signed = space[name]
                mag = float(table[bin_].item()) if bin_ is not None else 0.0
                out = tv_apply(out, name, -mag if signed and p.negate[k, step] else mag)
    out = TF.normalize(TF.to_dtype(out, torch.float32, scale=True), list(cfg.mean), list(cfg.std))
    if p.erase[k, 2]:
        out = TF.erase(out, *[int(v) for v in p.erase[k]], v=torch.tensor(cfg.erase_value))
    return out


def test_transform_equals_torchvision_chain_for_the_same_draws():
    images, aug = _images(64), BatchAugmenter(OFDB, num_classes=5)
    params = aug.sample_params(images, seed=3, epoch=1, indices=np.arange(100, 164))
    assert params.fire.any() and params.erase[:, 2].any() and params.hflip.any()  # the draws exercise every op
    cropped = aug.crop(images, params)
    reference = torch.stack([_torchvision_crop(images[k], params, k, OFDB) for k in range(len(images))])
    # the crop: within one grey level of torchvision, on a few pixels (float summation order, see ops.py)
    assert (cropped.int() - reference.int()).abs().max() <= 1
    assert (cropped != reference).float().mean() < 1e-3
    # everything after the crop: exactly torchvision's, sample by sample
    out = aug.finish(reference, params)
    assert out.shape == (64, 3, 32, 32)
    for k in range(len(images)):
        torch.testing.assert_close(out[k], _torchvision_rest(reference[k], params, k, OFDB), atol=0, rtol=0)


def test_same_key_same_sample_for_any_batch_split():
    images, aug = _images(12), BatchAugmenter(OFDB, num_classes=5)
    indices = np.arange(500, 512)
    whole = aug.transform(images, aug.sample_params(images, 7, 2, indices))
    order = np.array([5, 0, 11, 3, 8, 1, 2, 10, 4, 9, 6, 7])
    for part in (order[:5], order[5:9], order[9:]):
        sub = images[torch.from_numpy(part)]
        out = aug.transform(sub, aug.sample_params(sub, 7, 2, indices[part]))
        assert torch.equal(out, whole[torch.from_numpy(part)])


def test_draws_depend_on_seed_epoch_and_index():
    base = sample_params(OFDB, 1, 0, np.arange(64), 64, 64)
    for other in (sample_params(OFDB, 2, 0, np.arange(64), 64, 64), sample_params(OFDB, 1, 1, np.arange(64), 64, 64),
                  sample_params(OFDB, 1, 0, np.arange(64, 128), 64, 64)):
        assert not np.array_equal(base.crop, other.crop)
        assert not np.array_equal(base.policy, other.policy)


def test_draw_distributions_follow_the_config():
    n, side = 20_000, 512
    p = sample_params(AugmentConfig(enabled=True), 0, 0, np.arange(n), side, side)
    area = p.crop[:, 2] * p.crop[:, 3] / side**2
    aspect = p.crop[:, 3] / p.crop[:, 2]
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert 3 / 4 - 0.02 < aspect.min() and aspect.max() < 4 / 3 + 0.02
    assert (p.crop[:, :2] >= 0).all() and (p.crop[:, 0] + p.crop[:, 2] <= side).all()
    assert abs(p.hflip.mean() - 0.5) < 0.02
    assert abs(p.erase[:, 2].astype(bool).mean() - 0.5) < 0.02  # erase_p; every erase box fits at 224
    counts = np.bincount(p.policy, minlength=25)
    assert counts.min() > 0.8 * n / 25 and counts.max() < 1.2 * n / 25
    first_prob = np.array([AutoAugment(AutoAugmentPolicy.IMAGENET).policies[k][0][1] for k in p.policy])
    assert abs(p.fire[:, 0].mean() - first_prob.mean()) < 0.02
    assert abs(p.negate.mean() - 0.5) < 0.02


def test_disabled_ops_draw_nothing():
    cfg = AugmentConfig(enabled=True, crop=False, hflip_p=0.0, autoaugment="none", erase_p=0.0, mix_p=0.0)
    p = sample_params(cfg, 0, 0, np.arange(100), 40, 50)
    assert (p.crop == [0, 0, 40, 50]).all() and not p.hflip.any() and (p.policy == -1).all()
    assert not p.erase.any()
    assert mix_params(cfg, 0, 0, 5, 0, 8, 32, 32).mode == "none"


def test_disabled_augmenter_only_normalises():
    images, labels = _images(4, side=16), torch.tensor([0, 2, 1, 2])
    out, targets = BatchAugmenter(AugmentConfig(), num_classes=3)(images, labels, seed=0, epoch=0,
                                                                  indices=range(4), step=0)
    ref = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(out, ref)
    assert torch.equal(targets, F.one_hot(labels, 3).float())


def test_float_input_matches_uint8_input():
    images = _images(8)
    aug = BatchAugmenter(OFDB, num_classes=5)
    params = aug.sample_params(images, 0, 0, np.arange(8))
    from_u8 = aug.transform(images, params)
    from_float = aug.transform(images.float() / 255.0, params)
    assert (from_u8 - from_float).abs().max() <= 1.0 / 255 / 0.224 + 1e-5  # at most one grey level
    assert (from_u8 != from_float).float().mean() < 0.001


# ---------------------------------------------------------------------------- batch mixing


def test_mix_is_a_pure_function_of_seed_epoch_step_rank():
    cfg = AugmentConfig(enabled=True)
    a = mix_params(cfg, 1, 2, 3, 0, 16, 32, 32)
    b = mix_params(cfg, 1, 2, 3, 0, 16, 32, 32)
    assert a.mode == b.mode and a.lam == b.lam and a.box == b.box and np.array_equal(a.partner, b.partner)
    keys = [(1, 2, 3, 1), (1, 2, 4, 0), (1, 3, 3, 0), (2, 2, 3, 0)]
    draws = [mix_params(cfg, *key[:3], key[3], 16, 32, 32) for key in keys]
    assert len({(d.mode, d.lam, tuple(d.partner)) for d in draws + [a]}) == 5


def test_mix_frequencies_and_lambda():
    cfg = AugmentConfig(enabled=True)
    draws = [mix_params(cfg, 0, 0, step, 0, 32, 224, 224) for step in range(4000)]
    modes = np.array([d.mode for d in draws])
    assert abs((modes == "none").mean() - 0.2) < 0.03
    assert abs((modes == "cutmix").mean() - 0.4) < 0.03
    mixup = np.array([d.lam for d in draws if d.mode == "mixup"])
    assert abs(mixup.mean() - 0.5) < 0.03 and mixup.min() >= 0 and mixup.max() < 1  # Beta(1, 1)
    for d in draws[:200]:
        assert sorted(d.partner) == list(range(32))


def test_beta_alpha_other_than_one():
    draws = [mix_params(AugmentConfig(enabled=True, mix_alpha=0.2, cutmix_p=0.0), 0, 0, s, 0, 8, 32, 32)
             for s in range(2000)]
    lam = np.array([d.lam for d in draws if d.mode == "mixup"])
    assert ((lam < 0.1) | (lam > 0.9)).mean() > 0.5  # Beta(0.2, 0.2) piles up at the ends
    assert abs(lam.mean() - 0.5) < 0.05


def test_cutmix_lambda_from_the_clipped_box():
    cfg = AugmentConfig(enabled=True, mix_p=1.0, cutmix_p=1.0)
    side, clipped = 32, 0
    for step in range(300):
        mix = mix_params(cfg, 0, 0, step, 0, 8, side, side)
        top, bottom, left, right = mix.box
        assert 0 <= top <= bottom <= side and 0 <= left <= right <= side
        assert mix.lam == pytest.approx(1 - (bottom - top) * (right - left) / side**2, abs=1e-12)
        clipped += (bottom - top) * (right - left) < 4 * ((bottom - top) // 2) * ((right - left) // 2) or \
            top == 0 or left == 0 or bottom == side or right == side
    assert clipped > 50  # boxes at the border were clipped and lambda recomputed


def test_cutmix_and_mixup_on_images_and_targets():
    images, labels = _images(8), torch.arange(8) % 5
    aug = BatchAugmenter(AugmentConfig(enabled=True, size=32, mix_p=1.0, cutmix_p=1.0), num_classes=5)
    clean = aug.transform(images, aug.sample_params(images, 0, 0, np.arange(8)))
    out, targets = aug(images, labels, seed=0, epoch=0, indices=np.arange(8), step=4)
    mix = mix_params(aug.config, 0, 0, 4, 0, 8, 32, 32)
    top, bottom, left, right = mix.box
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(out[:, :, inside], clean[mix.partner][:, :, inside])
    assert torch.equal(out[:, :, ~inside], clean[:, :, ~inside])
    onehot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(targets, mix.lam * onehot + (1 - mix.lam) * onehot[mix.partner])
    # the soft-target cross-entropy is OFDB-4AD's lam * CE(y_a) + (1 - lam) * CE(y_b)
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    expected = mix.lam * F.cross_entropy(logits, labels) + (1 - mix.lam) * F.cross_entropy(logits, labels[mix.partner])
    torch.testing.assert_close(F.cross_entropy(logits, targets), expected)

    aug = BatchAugmenter(AugmentConfig(enabled=True, size=32, mix_p=1.0, cutmix_p=0.0), num_classes=5)
    out, targets = aug(images, labels, seed=0, epoch=0, indices=np.arange(8), step=4)
    mix = mix_params(aug.config, 0, 0, 4, 0, 8, 32, 32)
    assert mix.mode == "mixup"
    torch.testing.assert_close(out, mix.lam * clean + (1 - mix.lam) * clean[mix.partner])


def test_cutmix_and_mixup_equal_torchvisions_for_the_same_parameters():
    """torchvision.transforms.v2 CutMix / MixUp (which pair sample i with i - 1) against apply_mix with that
    partner and torchvision's draws: the box from lambda and centre, the recomputed lambda, images, targets."""
    from torchvision.transforms import v2

    from fractal_pretrain.augment.params import MixParams, cutmix_box

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 24, 40, generator=g), torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])
    onehot, partner = F.one_hot(labels, 5).float(), np.roll(np.arange(8), 1)
    clipped = 0
    for seed in range(40):
        cutmix, mixup = v2.CutMix(num_classes=5), v2.MixUp(num_classes=5)
        torch.manual_seed(seed)
        lam, cx, cy = float(cutmix._dist.sample(())), int(torch.randint(40, (1,))), int(torch.randint(24, (1,)))
        torch.manual_seed(seed)
        want = cutmix.make_params([images])
        box, lam_box = cutmix_box(lam, cy, cx, 24, 40)
        x1, y1, x2, y2 = want["box"]
        assert box == (y1, y2, x1, x2) and lam_box == want["lam_adjusted"]
        clipped += (x2 - x1) * (y2 - y1) < 4 * int(0.5 * (1 - lam) ** 0.5 * 40) * int(0.5 * (1 - lam) ** 0.5 * 24)
        torch.manual_seed(seed)
        want_images, want_targets = cutmix(images, labels)
        got_images, got_targets = apply_mix(images, onehot, MixParams("cutmix", lam_box, partner, box))
        assert torch.equal(got_images, want_images) and torch.equal(got_targets, want_targets)
        torch.manual_seed(seed)
        lam = float(mixup._dist.sample(()))
        torch.manual_seed(seed)
        want_images, want_targets = mixup(images, labels)
        got_images, got_targets = apply_mix(images, onehot, MixParams("mixup", lam, partner, (0, 0, 0, 0)))
        assert torch.equal(got_images, want_images) and torch.equal(got_targets, want_targets)
    assert clipped > 5  # boxes clipped at the border were among them


def test_soft_targets_give_timms_mixup_loss_with_label_smoothing():
    """F.cross_entropy(label_smoothing=eps) on our targets == timm's SoftTargetCrossEntropy on mixup_target."""
    timm_loss = pytest.importorskip("timm.loss")
    from timm.data.mixup import mixup_target

    labels = torch.tensor([3, 0, 7, 7, 1, 5])
    mix = mix_params(AugmentConfig(enabled=True, mix_p=1.0, cutmix_p=0.0), 0, 0, 2, 0, 6, 32, 32)
    mix = type(mix)(mix.mode, mix.lam, np.arange(6)[::-1].copy(), mix.box)  # timm pairs with the flipped batch
    _, targets = apply_mix(torch.zeros(6, 3, 4, 4), F.one_hot(labels, 10).float(), mix)
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for eps in (0.0, 0.1):
        expected = timm_loss.SoftTargetCrossEntropy()(logits, mixup_target(labels, 10, lam=mix.lam, smoothing=eps))
        torch.testing.assert_close(F.cross_entropy(logits, targets, label_smoothing=eps), expected)


def test_multihot_labels_and_bfloat16_output():
    images = _images(4)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    aug = BatchAugmenter(AugmentConfig(enabled=True, size=32, mix_p=1.0), num_classes=3, out_dtype=torch.bfloat16)
    out, targets = aug(images, labels, seed=0, epoch=0, indices=np.arange(4), step=0)
    mix = mix_params(aug.config, 0, 0, 0, 0, 4, 32, 32)
    assert out.dtype == torch.bfloat16 and targets.dtype == torch.float32
    torch.testing.assert_close(targets, mix.lam * labels + (1 - mix.lam) * labels[mix.partner])


# ---------------------------------------------------------------------------- config errors


def test_defaults_are_ofdb4ad():
    cfg = AugmentConfig()
    assert not cfg.enabled and AugmentConfig.from_dict({}) == cfg and AugmentConfig.from_dict(None) == cfg
    assert (cfg.size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip_p, cfg.autoaugment) == \
        (224, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, "imagenet")
    assert (cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, cfg.erase_value) == (0.5, (0.02, 0.33), (0.3, 3.3), 0.0)
    assert (cfg.mix_p, cfg.cutmix_p, cfg.mix_alpha) == (0.8, 0.5, 1.0)
    assert AugmentConfig.from_dict({"enabled": True, "crop_scale": [0.2, 1]}).crop_scale == (0.2, 1.0)


@pytest.mark.parametrize("values, named", [
    ({"hflip_p": 1.5}, "hflip_p=1.5"),
    ({"mix_p": -0.1}, "mix_p=-0.1"),
    ({"erase_p": "half"}, "erase_p='half'"),
    ({"crop_scale": [0.9, 0.1]}, "crop_scale=[0.9, 0.1]"),
    ({"autoaugment": "cifar10"}, "autoaugment='cifar10'"),
    ({"size": 0}, "size=0"),
    ({"std": [0.2, 0.0, 0.2]}, "std=0.0"),
    ({"mixup": 0.8}, "unknown key 'mixup'"),
])
def test_bad_values_name_the_key(values, named):
    with pytest.raises(ConfigError, match=None) as err:
        AugmentConfig.from_dict(values)
    message = str(err.value)
    assert named in message and "\n" not in message


def test_block_must_be_a_mapping():
    with pytest.raises(ConfigError, match="augment="):
        AugmentConfig.from_dict([1, 2])


def test_batch_shape_errors():
    aug = BatchAugmenter(OFDB, num_classes=3)
    with pytest.raises(ValueError, match="3 sample indices for a batch of 4"):
        aug(_images(4), torch.zeros(4, dtype=torch.long), seed=0, epoch=0, indices=[0, 1, 2], step=0)
    with pytest.raises(ValueError, match=r"expected \(N, 1 or 3, H, W\)"):
        aug(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), seed=0, epoch=0,
            indices=[0, 1], step=0)


# ---------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
def test_cuda_batch_never_syncs_and_matches_cpu():
    """On CUDA the whole call queues work without a device sync and gives the CPU's images."""
    images, labels = _images(32), torch.arange(32) % 5
    aug = BatchAugmenter(AugmentConfig(enabled=True, size=32, mix_p=1.0), num_classes=5)
    kwargs = dict(seed=1, epoch=0, indices=np.arange(32), step=3)
    on_cpu, cpu_targets = aug(images, labels, **kwargs)
    gpu_images, gpu_labels = images.cuda(), labels.cuda()
    aug(gpu_images, gpu_labels, **kwargs)  # warm-up: caches, pinned pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu, gpu_targets = aug(gpu_images, gpu_labels, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(gpu_targets.cpu(), cpu_targets)
    # crop rounding may move rare pixels by a grey level, which Equalize etc. can spread within an image
    differs = (on_gpu.cpu() - on_cpu).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert differs.float().mean() <= 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["Color", "Contrast", "Sharpness", "Rotate", "ShearX", "Equalize", "AutoContrast"])
def test_cuda_ops_equal_torchvision_on_cuda(name):
    from test_augment_ops import CASES
    from test_augment_ops import _images as op_images

    from fractal_pretrain.augment import ops

    images, mags = op_images().cuda(), CASES[name]
    batched = ops.apply_op(name, images, mags)
    for k, m in enumerate(mags):
        reference = tv_apply(images[k], name, float(m))
        if name in ("Rotate", "ShearX"):  # the grid's (HW x 3) @ (3 x 2) may round differently batched in cuBLAS
            assert (batched[k] != reference).float().mean() < 1e-3, k
        else:
            assert torch.equal(batched[k], reference), k



def test_host_preparation_has_no_per_sample_loop(monkeypatch):
    """A batch's AutoAugment parameters come from per-op tables: one affine matrix per distinct magnitude
    (a handful per op), not one per sample. (That they are the right ones: the torchvision chain test above.)"""
    from fractal_pretrain.augment import ops

    calls = []
    real = ops._inverse_affine
    monkeypatch.setattr(ops, "_inverse_affine", lambda *args: calls.append(args) or real(*args))
    images, aug = _images(512, side=32), BatchAugmenter(OFDB, num_classes=5)
    groups = aug._groups(aug.sample_params(images, seed=0, epoch=0, indices=np.arange(512)), 32, 32)
    warped = sum(len(chosen) for name, chosen, _ in groups if name in ("Rotate", "ShearX"))
    assert warped > 50 and len(calls) <= 10  # Rotate: 4 magnitudes x 2 signs at most; ShearX: 1 x 2


def test_a_grey_batch_is_augmented_as_its_rgb_copy_for_an_rgb_network():
    # AugmentConfig's mean and std have three values (the backbones take RGB): one channel is repeated over
    # them, as PIL's convert("RGB") does for a grey image
    grey = _images(6)[:, :1]
    aug = BatchAugmenter(OFDB, num_classes=5)
    kwargs = dict(seed=1, epoch=0, indices=np.arange(6), step=0)
    out, targets = aug(grey, torch.arange(6) % 5, **kwargs)
    expected, expected_targets = aug(grey.expand(-1, 3, -1, -1), torch.arange(6) % 5, **kwargs)
    assert out.shape == (6, 3, 32, 32) and torch.equal(out, expected) and torch.equal(targets, expected_targets)
