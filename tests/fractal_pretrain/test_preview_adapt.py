"""`fractal-pretrain preview` of an adapt config: one row per sample, the very tensors AdaptModule makes for
that batch number, deterministic, one-line errors; fit and adapt configs told apart by their keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fractal_pretrain.adapt.cli import make_adapt_cli
from fractal_pretrain.cli import main
from fractal_pretrain.config import ConfigError
from fractal_pretrain.preview import grid_shape, save_grid, tile_origins, zoom
from fractal_pretrain.train.preview import (
    MASK_COLOUR,
    MAX_REFERENCE_TILES,
    adapt_sheet,
    anomaly_kinds,
    config_command,
    mask_overlay,
    on_cpu,
)

REPO = Path(__file__).resolve().parents[2]
ADAPT_SMOKE = str(REPO / "jobs" / "adapt" / "smoke.yaml")  # 64 px, batch 4, shots [1, 2], eval_shots 2
FIT_SMOKE = str(REPO / "jobs" / "pretrain" / "smoke.yaml")


def preview(out: Path, *extra: str, config: str = ADAPT_SMOKE) -> int:
    return main(["preview", "--config", config, "--out", str(out), *extra])


def tiles(png: Path, rows: int, cols: int, side: int) -> np.ndarray:
    """(rows, cols, side, side, 3): the tiles of a captioned sheet of one sample per row."""
    sheet = np.asarray(Image.open(png).convert("RGB"))
    origins = tile_origins(rows * cols, side, side, labels=True, group=cols, cols=cols)
    return np.stack([sheet[y:y + side, x:x + side] for x, y in origins]).reshape(rows, cols, side, side, 3)


def module_of(*extra: str):
    """The module as the adapt command line builds it (on the CPU), set up as at the start of a run."""
    module = make_adapt_cli(on_cpu(["--config", ADAPT_SMOKE, *extra])).model
    module.setup("fit")
    return module


def hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def test_rows_are_the_tensors_make_batch_uses(tmp_path, capsys):
    out = tmp_path / "batch.png"
    assert preview(out, "--batch", "3", "--zoom", "1") == 0
    module = module_of()
    inputs = module.batch_inputs(3, val=False)
    k, classes = inputs.k, inputs.classes
    assert f"training batch 3 (step 3, rank 0 of world size 1), K={k}, 4 of 4 samples" in capsys.readouterr().out

    # make_batch feeds the backbone exactly these images: residuals of the views vs the references in the same light.
    residuals, mask, k_made = module.make_batch(3, val=False)
    expected = module.residuals(list(inputs.views), list(inputs.reference_views), k)
    assert k_made == k and torch.equal(mask, inputs.mask)
    for made, want in zip(residuals, expected, strict=True):
        assert all(torch.equal(made[name], want[name]) for name in want)

    cols = k + 5
    got = tiles(out, 4, cols, 64)
    references = hwc(inputs.references).reshape(4, k, 64, 64, 3)
    anomalous = hwc(inputs.anomalous)
    np.testing.assert_array_equal(got[:, :k], references)
    np.testing.assert_array_equal(got[:, k], hwc(inputs.images))
    np.testing.assert_array_equal(got[:, k + 1], anomalous)
    mask = inputs.mask.numpy()
    red = (anomalous.astype(np.int32) + MASK_COLOUR) // 2
    np.testing.assert_array_equal(got[:, k + 2], np.where(mask[..., None], red, anomalous))
    for v in (0, 1):
        np.testing.assert_array_equal(got[:, k + 3 + v], hwc((inputs.views[v] * 255).round().to(torch.uint8)))

    kinds = anomaly_kinds(module, inputs)
    for i, kind in enumerate(kinds):  # the drawn kind is the defect: "none" exactly where nothing changed
        assert (kind == "none") == (not mask[i].any()) == np.array_equal(anomalous[i], hwc(inputs.images)[i])
    captions = []
    for i in range(4):
        captions += [f"ref {j + 1}/{k}" for j in range(k)]
        captions += [f"{i}: class {classes[i]}", kinds[i], f"mask {100 * mask[i].mean():.1f}%", "view 1", "view 2"]
    reference = tmp_path / "reference.png"
    save_grid(got.reshape(-1, 64, 64, 3), reference, labels=captions, group=cols, cols=cols)
    assert out.read_bytes() == reference.read_bytes()  # captions included
    assert any(kind != "none" for kind in kinds)


def test_same_command_same_bytes_validation_and_other_batches_differ(tmp_path, capsys):
    a, b, c, val = (tmp_path / f"{n}.png" for n in ("a", "b", "c", "val"))
    assert preview(a, "--batch", "1") == 0
    assert preview(b, "--step", "1") == 0  # --step is --batch
    assert a.read_bytes() == b.read_bytes()
    assert preview(c, "--batch", "2") == 0
    assert c.read_bytes() != a.read_bytes()
    capsys.readouterr()
    assert preview(val, "--batch", "0", "--val", "--num", "2") == 0
    assert "validation batch 0, K=2, 2 of 4 samples" in capsys.readouterr().out
    module = module_of()
    inputs = module.batch_inputs(0, val=True)
    assert inputs.k == 2 and (inputs.classes >= module.train_classes).all()  # held-out classes, eval_shots
    got = tiles(val, 2, 2 + 5, 128)  # x2: tiles of 128 px
    np.testing.assert_array_equal(got[:, 2], zoom(hwc(inputs.images[:2]), 2))
    np.testing.assert_array_equal(got[:, 3], zoom(hwc(inputs.anomalous[:2]), 2))


def test_a_ddp_config_numbers_batches_as_its_ranks_draw_them(tmp_path, capsys):
    """Under DDP step s of rank r trains batch s * W + r (W: trainer.devices x trainer.num_nodes): at W = 2,
    --batch 7 is step 3 of rank 1, a batch the 6-step run does train; the sheet is batch 7 itself."""
    out = tmp_path / "ddp.png"
    assert preview(out, "--batch", "7", "--trainer.devices", "2", "--zoom", "1") == 0
    assert "training batch 7 (step 3, rank 1 of world size 2), K=" in capsys.readouterr().out
    inputs = module_of().batch_inputs(7, val=False)
    got = tiles(out, 4, inputs.k + 5, 64)
    np.testing.assert_array_equal(got[:, inputs.k], hwc(inputs.images))
    np.testing.assert_array_equal(got[:, inputs.k + 1], hwc(inputs.anomalous))


def test_at_most_four_references_of_k():
    module = module_of("--model.shots", "[6]")
    inputs = module.batch_inputs(0, val=False)
    sheet = adapt_sheet(inputs, anomaly_kinds(module, inputs), num=1)
    cols = MAX_REFERENCE_TILES + 5
    assert inputs.k == 6 and sheet.group == sheet.cols == cols and sheet.pixels.shape == (cols, 64, 64, 3)
    assert sheet.captions[:5] == ["ref 1/6", "ref 2/6", "ref 3/6", "ref 4/6", f"0: class {inputs.classes[0]}"]
    np.testing.assert_array_equal(sheet.pixels[:4], hwc(inputs.references[:4]))


def test_mask_overlay_changes_only_masked_pixels():
    pixels = np.full((1, 2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[[True, False], [False, False]]])
    out = mask_overlay(pixels, mask)
    assert out[0, 0, 0].tolist() == [177, 50, 50] and (out[0, 1:] == 100).all() and (out[0, 0, 1] == 100).all()


def test_one_sample_per_row_grid():
    assert grid_shape(63, group=7, cols=7) == (9, 7)
    assert grid_shape(63, group=7) == (5, 14)  # near-square would put two samples on a row
    assert tile_origins(4, 8, 8, labels=False, group=2, cols=2)[2] == (0, 10)


def test_configs_are_told_apart_by_their_keys(tmp_path):
    assert config_command(["--config", ADAPT_SMOKE, "--batch", "2"]) == "adapt"
    assert config_command([f"--config={FIT_SMOKE}", "--step", "2"]) == "fit"
    assert config_command(["--model.shots", "[1]"]) == "adapt"  # overrides count too
    assert config_command(["--data.batch_size", "4"]) == "fit"  # no config: fit, as before
    trainer_only = tmp_path / "trainer.yaml"
    trainer_only.write_text("trainer:\n  max_steps: 3\nmodel:\n  lr: 0.1\n")  # lr: both have it
    with pytest.raises(ConfigError, match=r"trainer.yaml: neither a fit config .* nor an adapt config"):
        config_command(["--config", str(trainer_only)])
    with pytest.raises(ConfigError, match=r"smoke.yaml with its overrides: mixes keys of fit \(data.recipe\) and of "
                                          r"adapt \(data.batches_per"):
        config_command(["--config", ADAPT_SMOKE, "--data.recipe", "anderson"])


@pytest.mark.parametrize("extra, message", [
    (("--batch", "6"), "--batch 6: the run trains batches 0..5 (trainer.max_steps=6 x world size 1)"),
    (("--batch", "12", "--trainer.devices", "2"), "batches 0..11 (trainer.max_steps=6 x world size 2)"),
    (("--batch", "1", "--val"), "--batch 1 --val: validation has batches 0..0 (data.val_batches=1)"),
    (("--val", "--data.val_batches", "0"), "--val: validation has no batches (data.val_batches=0)"),
    (("--model.shotz", "[1]"), "shotz"),
    (("--model.size", "3"), "model.size=3"),
    (("--data.recipe", "anderson"), "mixes keys of fit (data.recipe) and of adapt"),
    (("--batch", "-1"), "--batch"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "batch.png"
    assert preview(out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("fractal-pretrain")
    assert list(tmp_path.iterdir()) == []
