"""`fractal-pretrain preview`: the contact sheet is the batch `fit` trains on, deterministic, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from fractal_pretrain.cli import main
from fractal_pretrain.preview import grid_shape, save_grid, tile_origins, to_pixels, zoom
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer
from fractal_pretrain.train.cli import make_cli
from fractal_pretrain.train.data import FractalDataModule, rank_slice
from fractal_pretrain.train.preview import (
    batch_sheet,
    on_cpu,
    target_caption,
    training_batch,
)

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "jobs" / "pretrain"
SMOKE, OFDB_SMOKE, SELFSUP_SMOKE = (str(PRETRAIN / f"{n}.yaml") for n in ("smoke", "ofdb_smoke", "selfsup_smoke"))


def preview(config: str, out: Path, *extra: str) -> int:
    return main(["preview", "--config", config, "--out", str(out), *extra])


def tiles(png: Path, n: int, side: int, group: int = 1) -> np.ndarray:
    """The ``n`` tiles of ``side`` px cut out of a captioned sheet."""
    sheet = np.asarray(Image.open(png).convert("RGB"))
    return np.stack([sheet[y:y + side, x:x + side] for x, y in tile_origins(n, side, side, labels=True,
                                                                          group=group)])


def natural_batch(data: FractalDataModule, epoch: int, step: int):
    """The batch of (epoch, step) as an uninterrupted epoch reaches it: the loader iterated from step 0."""
    data.setup("fit")
    loader = data.train_dataloader()
    loader.epoch_fn = lambda: epoch
    for batch in loader:
        images, targets = data.on_before_batch_transfer(batch, 0)
        if batch["step"] == step:
            return images, targets
    raise AssertionError(f"no step {step}")


class RecordBatches(pl.Callback):
    """Keeps the (images, targets) that ``training_step`` gets at each (epoch, step)."""

    def __init__(self):
        self.batches = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.current_epoch, batch_idx] = tuple(t.detach().clone() for t in batch)


def test_ofdb_sheet_is_the_augmented_mixed_batch_fit_trains_on(tmp_path, capsys):
    # The real training loop (render-once set, augmentation, CutMix / MixUp) records every batch it trains on.
    cli = make_cli(["--config", OFDB_SMOKE, "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2", "--data.val_samples", "0"])
    record = RecordBatches()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(record.batches) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 10 images in batches of 6

    mixed = []
    for (epoch, step), (images, targets) in record.batches.items():
        if (epoch, step) not in ((0, 0), (1, 1)):
            continue
        out = tmp_path / f"batch-{epoch}-{step}.png"
        assert preview(OFDB_SMOKE, out, "--epoch", str(epoch), "--step", str(step)) == 0
        n = len(images)
        assert f"epoch {epoch} step {step}, rank 0 of 1 on cpu, {n} of {n} samples, 32 px x4" in capsys.readouterr().out
        expected = to_pixels(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        np.testing.assert_array_equal(tiles(out, n, 32 * 4), zoom(expected, 4))  # x4: tiles of 128 px
        captions = [target_caption(t, multi_label=False) for t in targets.numpy()]
        mixed += [":" in c for c in captions]
        reference = tmp_path / "reference.png"
        save_grid(zoom(expected, 4), reference, labels=captions)
        assert out.read_bytes() == reference.read_bytes()  # captions included
    assert any(mixed) and not all(mixed)  # a mixed batch (soft targets, two classes each) and an unmixed one


def test_same_command_same_bytes_and_the_rendered_images_exactly(tmp_path):
    a, b, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "other.png"
    extra = ("--data.batch_size", "4", "--epoch", "1", "--step", "3", "--trainer.max_epochs", "2")
    assert preview(SMOKE, a, *extra) == 0
    assert preview(SMOKE, b, *extra) == 0
    assert a.read_bytes() == b.read_bytes()
    assert preview(SMOKE, other, *extra[:-4], "--step", "2") == 0
    assert other.read_bytes() != a.read_bytes()
    # Un-normalised, the tiles are the renderer's bytes of rank 0's keys of epoch 1, step 3.
    renderer = make_renderer(get_recipe("anderson", {"num_classes": 10, "num_points": 5000}), size=64, seed=0,
                             device="cpu")
    rendered = renderer.render(rank_slice(3, 64, 4, 0, 1), epoch=1).images
    np.testing.assert_array_equal(tiles(a, 4, 128), zoom(rendered, 2))


def test_rank_zero_of_the_configured_world(tmp_path):
    # Two devices x two nodes: rank 0 gets the first quarter of the step's global slice, whatever the machine.
    cli = make_cli(on_cpu(["--config", SMOKE, "--data.batch_size", "2", "--trainer.devices", "2",
                           "--trainer.num_nodes", "2"]))
    images, labels = training_batch(cli.datamodule, cli.trainer, epoch=0, step=1)
    renderer = make_renderer(get_recipe("anderson", {"num_classes": 10, "num_points": 5000}), size=64, seed=0,
                             device="cpu")
    expected = renderer.render(np.array([8, 9]), epoch=0)
    np.testing.assert_array_equal(to_pixels(images, cli.datamodule.mean, cli.datamodule.std), expected.images)
    np.testing.assert_array_equal(labels.numpy(), expected.labels)


def test_two_views_are_adjacent_pairs(tmp_path):
    out = tmp_path / "pairs.png"
    assert preview(SELFSUP_SMOKE, out, "--data.batch_size", "3", "--step", "1", "--zoom", "1") == 0
    data = make_cli(["--config", SELFSUP_SMOKE, "--data.batch_size", "3"]).datamodule
    images, _ = natural_batch(data, epoch=0, step=1)
    pixels = to_pixels(images, data.mean, data.std)
    pairs = np.stack([pixels[[i, 3 + i]] for i in range(3)]).reshape(6, 64, 64, 3)  # 1st views, then 2nd views
    assert grid_shape(6, group=2) == (2, 4)  # a pair never wraps
    np.testing.assert_array_equal(tiles(out, 6, 64, group=2), pairs)
    sheet = batch_sheet(images, _, mean=data.mean, std=data.std, views=2, multi_label=False, num=2)
    assert sheet.captions == ["pair 0 view 1", "pair 0 view 2", "pair 1 view 1", "pair 1 view 2"]
    np.testing.assert_array_equal(sheet.pixels, pairs[:4])


def test_streamed_shards_with_augmentation_give_the_batch_of_an_uninterrupted_epoch(tmp_path):
    shards = tmp_path / "shards"
    assert main(["export", "--recipe", "anderson", "--num", "12", "--size", "32", "--out", str(shards),
                 "--shard-size", "4", "--set", "num_classes=5", "--set", "num_points=2000", "--no-progress"]) == 0
    source = ("--data.source", "webdataset", "--data.path", str(shards), "--data.resident_gb", "0",
              "--data.num_workers", "1", "--data.batch_size", "4", "--data.augment", "{enabled: true, size: 16}")
    out = tmp_path / "stream.png"
    assert preview(OFDB_SMOKE, out, *source, "--epoch", "1", "--step", "2", "--zoom", "1") == 0
    cli = make_cli(on_cpu(["--config", OFDB_SMOKE, *source]))
    assert cli.datamodule.streams
    images, targets = natural_batch(cli.datamodule, epoch=1, step=2)
    assert targets.shape == (4, 5)
    np.testing.assert_array_equal(tiles(out, 4, 16), to_pixels(images, cli.datamodule.mean, cli.datamodule.std))


def test_pairs_stand_apart_on_one_row(tmp_path):
    images = np.arange(6, dtype=np.uint8).repeat(4 * 4 * 3).reshape(6, 4, 4, 3)
    grid = save_grid(images, tmp_path / "g.png", group=2)
    sheet = np.asarray(Image.open(grid).convert("RGB"))
    assert grid_shape(6, group=2) == (2, 4) and grid_shape(3, group=2) == (2, 2)
    assert sheet.shape == (2 * 4 + 2, 4 * 4 + 2 * 2 + 10, 3)  # 2 px between the views, 10 between the pairs
    origins = tile_origins(6, 4, 4, labels=False, group=2)
    assert origins[:4] == [(0, 0), (6, 0), (20, 0), (26, 0)] and origins[4] == (0, 6)
    for i, (x, y) in enumerate(origins):
        assert (sheet[y:y + 4, x:x + 4] == i).all()


def test_multi_label_captions_are_the_label_sets():
    cli = make_cli(on_cpu(["--config", SMOKE, "--data.recipe", "multiinstance", "--data.batch_size", "4"]))
    images, labels = training_batch(cli.datamodule, cli.trainer, epoch=0, step=0)
    assert labels.shape == (4, 10)
    sheet = batch_sheet(images, labels, mean=cli.datamodule.mean, std=cli.datamodule.std, views=0,
                        multi_label=True, num=64)
    assert sheet.captions == [",".join(str(c) for c in np.flatnonzero(row)) for row in labels.numpy()]
    assert any("," in c for c in sheet.captions)


def test_captions():
    assert target_caption(np.int64(12), multi_label=False) == "12"
    one_hot = np.zeros(500, dtype=np.float32)
    one_hot[7] = 1
    assert target_caption(one_hot, multi_label=False) == "7"
    soft = np.zeros(500, dtype=np.float32)
    soft[[12, 480]] = [0.63, 0.37]
    assert target_caption(soft, multi_label=False) == "12:0.63 480:0.37"
    soft[[12, 480]] = [0.37, 0.63]
    assert target_caption(soft, multi_label=False) == "480:0.63 12:0.37"
    multi = np.zeros(10, dtype=np.float32)
    multi[[2, 5]] = 1
    assert target_caption(multi, multi_label=True) == "2,5"
    multi[5] = 0.25
    assert target_caption(multi, multi_label=True) == "2:1.00,5:0.25"


def test_cpu_unless_asked_later():
    assert on_cpu(["--config", "a.yaml", "--config=b.yaml", "--x", "1"]) == [
        "--config", "a.yaml", "--config=b.yaml", "--trainer.accelerator", "cpu", "--x", "1"]
    assert on_cpu(["--config", "a.yaml", "--trainer.accelerator", "gpu"])[-2:] == ["--trainer.accelerator", "gpu"]
    assert on_cpu(["--data.size", "8"])[:2] == ["--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("extra, message", [
    (("--data.batch_sise", "4"), "batch_sise"),
    (("--data.size", "3"), "data.size=3"),
    (("--step", "8"), "--step 8: an epoch has 8 steps (0..7)"),
    (("--epoch", "2", "--trainer.max_epochs", "2"), "--epoch 2: the run trains epochs 0..1"),
    (("--step", "-1"), "--step"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "batch.png"
    assert preview(SMOKE, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("fractal-pretrain")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_key_in_the_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(Path(SMOKE).read_text().replace("  batch_size: 8", "  batch_sise: 8"))
    assert preview(str(config), tmp_path / "batch.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_sise" in err[0]
    assert not (tmp_path / "batch.png").exists()


def test_lightnings_start_up_output_is_held_as_fits_and_its_info_lines_dropped(tmp_path):
    """preview holds Lightning's start-up output as ``fit`` does (``held_startup_output``): a warning from building
    the trainer (deterministic with benchmark) used to print before a bad --epoch's error line. On success the
    warning shows; the info lines (GPU available, tips) and the srun hint do not: a preview trains nothing."""
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fractal_pretrain", "preview", "--config", SMOKE,
                               "--trainer.deterministic", "true", "--trainer.benchmark", "true",
                               "--out", str(tmp_path / "batch.png"), *extra],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)

    bad = run("--trainer.max_epochs", "2", "--epoch", "2")
    assert bad.returncode == 2 and not bad.stdout, bad
    assert bad.stderr.splitlines() == ["fractal-pretrain: error: --epoch 2: the run trains epochs 0..1 "
                                       "(trainer.max_epochs=2)"], bad.stderr
    good = run("--data.batch_size", "4")
    assert good.returncode == 0 and "`deterministic=True` and `benchmark=True`" in good.stderr, good
    assert "GPU available" not in good.stdout + good.stderr and "srun" not in good.stderr, good
    assert good.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'batch.png'}: epoch 0 step 0")


def test_bad_out_is_one_line(tmp_path, capsys):
    assert preview(SMOKE, tmp_path / "missing" / "batch.png") == 2
    assert capsys.readouterr().err.strip().endswith(f"its folder {tmp_path / 'missing'} does not exist")
    assert preview(SMOKE, tmp_path) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {tmp_path}: is a folder, not a file")
    assert list(tmp_path.iterdir()) == []


def test_to_pixels_inverts_the_data_modules_normalisation():
    from fractal_pretrain.train.data import normalise

    pixels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(2, 3, 1, 1)
    pixels[1] = pixels[1].flip(-1)
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    x = normalise(pixels, mean, std, "float32", channels_last=True)
    np.testing.assert_array_equal(to_pixels(x, mean, std), pixels.permute(0, 2, 3, 1).numpy())
