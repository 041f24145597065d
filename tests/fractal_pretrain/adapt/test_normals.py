"""Normal instances and references (``adapt/normals.py``), the view keys of validation, validation scoring and
the per-step skip metric."""

import numpy as np
import pytest
import torch

from fractal_pretrain.adapt.losses import compressed_norm, norm_labels
from fractal_pretrain.adapt.model import EPOCH_TRAIN, EPOCH_VAL, EPOCH_VAL_REFS, AdaptModule, patch_auroc
from fractal_pretrain.adapt.normals import crop_copies, crop_offsets, split_copies
from fractal_pretrain.adapt.views import photometric_view, view_draws
from fractal_pretrain.config import ConfigError


def module(references: str, reference_shift: float = 0.0625, size: int = 64) -> AdaptModule:
    m = AdaptModule(backbone="random", arch="resnet18", recipe="anderson", references=references,
                    reference_shift=reference_shift, recipe_overrides={"num_classes": 6, "num_points": 4000},
                    size=size, batch_size=4, shots=(2,), eval_shots=3, val_classes=2,
                    anomalies={"anomaly_p": 1.0, "mask_systems": 16, "mask_points": 3000}, projector={"kind": "mlp"})
    m.setup("fit")
    return m


@pytest.fixture(scope="module")
def instance():
    return module("instance")


def test_crops_are_windows_of_one_render():
    renders = torch.arange(2 * 3 * 10 * 10).view(2, 3, 10, 10)
    offsets = crop_offsets(0, 0, np.array([5, 9]), 3, margin=2)
    assert offsets.shape == (2, 3, 2) and offsets.min() >= 0 and offsets.max() <= 4
    images, refs = split_copies(crop_copies(renders, offsets, 6), 3)
    assert images.shape == (2, 3, 6, 6) and refs.shape == (4, 3, 6, 6)
    for b in range(2):
        (y, x), *ref_offsets = offsets[b]
        assert torch.equal(images[b], renders[b, :, y:y + 6, x:x + 6])
        for i, (y, x) in enumerate(ref_offsets):
            assert torch.equal(refs[2 * b + i], renders[b, :, y:y + 6, x:x + 6])
    assert np.array_equal(offsets, crop_offsets(0, 0, np.array([5, 9]), 3, margin=2))  # pure in the key
    assert not np.array_equal(offsets, crop_offsets(0, 1, np.array([5, 9]), 3, margin=2))


def test_without_shift_the_references_are_the_image():
    m = module("instance", reference_shift=0.0)
    images, refs = m.normal_images(np.array([0, 1, 2]), np.arange(3), 3, (EPOCH_VAL, EPOCH_VAL_REFS))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(refs.view(3, 3, 3, 64, 64), images[:, None].expand(-1, 3, -1, -1, -1))


def test_instance_references_cover_a_normal_image_better_than_other_renders(instance):
    """The reason for the default: against crops of its own render a normal image leaves a residual about
    half that against other renders of its class (anderson: other scale, flips, hue, background)."""
    other = module("class")
    keys, classes = np.arange(8), np.arange(8) % 4

    def normal_residual(m):
        images, refs = m.normal_images(classes, keys, 3, (EPOCH_VAL, EPOCH_VAL_REFS))
        (res,) = m.residuals([images.float() / 255.0], refs, 3)
        return float(compressed_norm(res["layer2"].movedim(1, -1)).mean())

    assert normal_residual(instance) < 0.7 * normal_residual(other)


def test_validation_views_never_redraw_training_views(instance):
    """Training and validation batch n share their sample keys; the view key's epoch word (the batch's render
    epoch) keeps them apart. Training views are the draws of the training key, as before the validation split."""
    seed, k = instance.hparams.seed, instance.hparams.eval_shots
    train, val = instance.batch_inputs(1, val=False), instance.batch_inputs(1, val=True)
    assert np.array_equal(train.keys, val.keys)
    for v in (0, 1):
        assert torch.equal(train.views[v], photometric_view(train.anomalous, train.keys, seed, v, epoch=EPOCH_TRAIN))
        ref_keys = np.repeat(train.keys, train.k)
        assert torch.equal(train.reference_views[v],
                           photometric_view(train.references, ref_keys, seed, v, epoch=EPOCH_TRAIN))
        # the validation images under the training batch's draws are not the validation views
        assert not torch.equal(val.views[v], photometric_view(val.anomalous, val.keys, seed, v, epoch=EPOCH_TRAIN))
        assert torch.equal(val.views[v], photometric_view(val.anomalous, val.keys, seed, v, epoch=EPOCH_VAL))
        assert torch.equal(val.reference_views[v],
                           photometric_view(val.references, np.repeat(val.keys, k), seed, v, epoch=EPOCH_VAL))
        assert (view_draws(seed, EPOCH_VAL, val.keys, v) != view_draws(seed, EPOCH_TRAIN, train.keys, v)).all()


def test_validation_scores_plain_images_and_pools_batches(instance, monkeypatch):
    logged = {}
    monkeypatch.setattr(instance, "log", lambda name, value, **_: logged.__setitem__(name, value))
    instance.on_validation_epoch_start()
    for batch in range(3):
        instance.validation_step(torch.tensor(batch), batch)  # as AdaptData.val_dataloader yields it
    assert set(instance._val_scores) == {(n, k) for n in ("layer2", "layer3") for k in ("raw", "norm")}
    pooled = {key: torch.cat(parts, dim=1) for key, parts in instance._val_scores.items()}
    # The raw scores are the plain anomalous images' residual norms, not a photometric view's.
    residuals, mask, _ = instance.make_batch(0, val=True, plain=True)
    first = compressed_norm(residuals[2]["layer2"].movedim(1, -1)).flatten()
    assert torch.allclose(pooled[("layer2", "raw")][0, :len(first)], first)
    assert torch.equal(pooled[("layer2", "raw")][1, :len(first)].bool(),
                       norm_labels(mask, tuple(residuals[2]["layer2"].shape[-2:])).flatten())
    instance.on_validation_epoch_end()
    for (name, kind), (scores, labels) in pooled.items():
        assert logged[f"val/auroc_{kind}_{name}"] == pytest.approx(patch_auroc(scores, labels))
        assert np.isfinite(logged[f"val/auroc_{kind}_{name}"])  # a batch without defects at a layer is fine


def test_bad_reference_mode_and_shift():
    with pytest.raises(ConfigError, match="model.references"):
        module("others")
    with pytest.raises(ConfigError, match="model.reference_shift"):
        module("instance", reference_shift=0.5)


@pytest.mark.parametrize("name", ["mandelbulbvar", "multimandelbulb"])
def test_mandelbulb_classes_are_normal_classes(name):
    """One label per image, objects of the class's own formulas: usable (it was an AttributeError traceback,
    MandelbulbRecipe has no label/object_source/multi_label fields)."""
    from fractal_pretrain.adapt.model import check_normal_classes
    from fractal_pretrain.recipes import get_recipe

    check_normal_classes(get_recipe(name), 10)
    with pytest.raises(ConfigError, match=f"val_classes=200000: recipe '{name}' has only"):
        check_normal_classes(get_recipe(name), 200_000)
