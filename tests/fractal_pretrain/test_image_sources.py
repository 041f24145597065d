"""Training from image folders and WebDataset shards; bad input; the cosine schedule and soft targets."""

from __future__ import annotations

import io
import json
import math
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fit_helpers import assert_split_run_equals_straight_run, fit_command
from PIL import Image

from fractal_pretrain.cli import main
from fractal_pretrain.export import read_shards
from fractal_pretrain.train.data import StreamBatches
from fractal_pretrain.train.images import ShardStream, list_digest, list_folder, list_shards, shard_set
from fractal_pretrain.train.model import cosine_factor, soft_cross_entropy

REPO = Path(__file__).resolve().parents[2]
OFDB_SMOKE = str(REPO / "jobs" / "pretrain" / "ofdb_smoke.yaml")


def write_image(path: Path, side: int = 24, seed: int = 0, height: int | None = None) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height or side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    for c in range(classes):
        for i in range(per_class):
            write_image(root / f"class_{c}" / f"img_{i}.png", seed=10 * c + i)
    return root


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", OFDB_SMOKE, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--data.val_samples", "0", *extra]


def test_folder_source_trains_and_records_where_its_images_came_from(tmp_path):
    folder = make_folder(tmp_path / "images")
    (folder / "notes.txt").write_text("not a class")  # files beside the class folders are ignored
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "folder", "--data.path", str(folder), "--data.batch_size", "4",
                         "--trainer.max_epochs", "2", "--data.augment", "{enabled: true, size: 16}")) == 0
    meta = json.loads((run / "backbone.json").read_text())
    listing = list_folder(folder)
    entries = [(str(f.relative_to(folder)), f.stat().st_size) for f in listing.files]
    side = list(np.asarray(Image.open(listing.files[0])).shape[:2])
    assert meta["images"] == {"source": "folder", "path": str(folder.resolve()), "count": 6, "classes": 3,
                              "digest": list_digest(entries), "image_size": side}
    assert meta["recipe"] is None and meta["steps"] == 4  # 6 images at batch 4: 2 steps per epoch
    assert meta["image_size"] == 16 and meta["objective"] == "classification"  # the crops the network saw


def test_folder_listing_is_torchvisions_imagefolder(tmp_path):
    # ImageFolder walks each class folder recursively (sorted, links followed) and reads .pgm too
    from torchvision.datasets import ImageFolder

    folder = make_folder(tmp_path / "images", classes=2, per_class=2)
    write_image(folder / "class_0" / "nested" / "deeper" / "a.png", seed=7)
    write_image(folder / "class_1" / "b.PGM", seed=8)
    Image.open(folder / "class_1" / "b.PGM").convert("L").save(folder / "class_1" / "b.PGM", "PPM")
    write_image(folder / "class_2" / "only" / "nested.jpg", seed=9)  # a class whose images are all nested
    listing = list_folder(folder)
    reference = ImageFolder(str(folder))
    assert list(listing.classes) == reference.classes
    assert [(str(f), label) for f, label in zip(listing.files, listing.labels, strict=True)] == reference.samples


def test_shards_from_export_train_resident_and_hold_the_exported_images(tmp_path):
    shards = tmp_path / "shards"
    assert main(["export", "--recipe", "anderson", "--num", "10", "--size", "32", "--out", str(shards),
                 "--shard-size", "4", "--set", "num_classes=5", "--set", "num_points=2000", "--no-progress"]) == 0
    listing = list_shards(str(shards))
    assert (listing.count, listing.counts, listing.num_classes, listing.shape) == (10, (4, 4, 2), 5, (32, 32))
    resident = shard_set(listing)
    exported = list(read_shards(shards))
    assert torch.equal(resident.images, torch.from_numpy(np.stack([s.image for s in exported])).permute(0, 3, 1, 2))
    assert resident.labels.tolist() == [s.label for s in exported]
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", str(shards), "--trainer.max_steps",
                         "3", "--data.augment", "null")) == 0
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["images"]["source"] == "webdataset" and meta["images"]["count"] == 10
    assert meta["image_size"] == [32, 32]  # no augmentation: the images as they are
    assert meta["images"]["shards"] == 3 and len(meta["images"]["digest"]) == 64


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png_bytes(side: int = 16, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_foreign_shards_with_jpg_and_cls_stream_equal_batch_counts(tmp_path):
    # Shards of 5, 5 and 2 samples; too large for data.resident_gb 0 they stream, and every rank gets
    # exactly count // (batch x world) full batches.
    for s, n in enumerate((5, 5, 2)):
        samples = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buf, "JPEG")
            samples.append({"__key__": f"s{s}_{i}", "jpg": buf.getvalue(), "cls": str(i % 3).encode()})
        write_shard(tmp_path / f"part-{s}.tar", samples)
    listing = list_shards(str(tmp_path / "part-{0..2}.tar"))
    assert listing.count == 12 and listing.num_classes == 3
    batches = list(ShardStream(listing, batch_size=4, seed=0, rank=0, world=1, workers=0))
    assert len(batches) == 3 and all(len(b["labels"]) == 4 and b["images"].shape == (4, 16, 16, 3) for b in batches)
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", str(tmp_path), "--data.resident_gb", "0",
                         "--data.num_workers", "0", "--data.batch_size", "4", "--trainer.max_epochs", "1")) == 0
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["images"]["streamed"] is True and meta["steps"] == 3


def _bad_folder_truncated(root: Path) -> str:
    make_folder(root)
    bad = root / "class_1" / "img_0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    return str(bad)


def _bad_folder_sizes(root: Path) -> str:
    make_folder(root)
    write_image(root / "class_2" / "img_9.png", side=24, height=20)
    return "images of different sizes"


def _bad_class_folder(root: Path) -> str:
    make_folder(root)
    (root / "class_9").mkdir()
    (root / "class_9" / "readme.txt").write_text("no images here")
    return "class_9: class folder without images"


def _empty_folder(root: Path) -> str:
    root.mkdir()
    return "empty image folder"


@pytest.mark.parametrize("make_bad", [_empty_folder, _bad_class_folder, _bad_folder_truncated, _bad_folder_sizes],
                         ids=["empty", "class-without-images", "truncated", "sizes"])
def test_bad_image_folders_are_one_line_errors_and_write_nothing(tmp_path, capsys, make_bad):
    expected = make_bad(tmp_path / "images")
    run = tmp_path / "run"
    # without augmentation: its crop would make images of different sizes one size (trained, test below)
    assert main(fit_args(run, "--data.source", "folder", "--data.path", str(tmp_path / "images"), "--data.augment",
                         "{enabled: false}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fractal-pretrain: error:") and expected in err[-1]
    assert not run.exists()


@pytest.mark.parametrize("second,expected", [({"png": png_bytes(seed=1)}, "a.tar: sample 'k1' has no label"),
                                             ({"png": png_bytes(seed=1)[:50], "cls": b"1"}, "a.tar:k1.png: unreadable"),
                                             ({"cls": b"1"}, "a.tar: sample 'k1' has no image")],
                         ids=["no-label", "truncated", "no-image"])
def test_bad_shard_samples_are_named(tmp_path, capsys, second, expected):
    write_shard(tmp_path / "a.tar", [{"__key__": "k0", "png": png_bytes(), "cls": b"0"}, {"__key__": "k1", **second}])
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", str(tmp_path / "a.tar"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error:") and expected in err and not run.exists()


@pytest.mark.parametrize("damage", [lambda data: data[:1000], lambda data: png_bytes()],
                         ids=["truncated-tar", "not-a-tar"])
def test_a_shard_that_is_not_a_readable_tar_is_named(tmp_path, capsys, damage):
    write_shard(tmp_path / "a.tar", [{"__key__": f"k{i}", "png": png_bytes(seed=i), "cls": b"0"} for i in range(4)])
    (tmp_path / "a.tar").write_bytes(damage((tmp_path / "a.tar").read_bytes()))
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", str(tmp_path / "a.tar"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error:") and "a.tar: unreadable shard" in err and not run.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_in_streamed_shards_stops_the_run_with_one_line_naming_it(tmp_path, capsys, workers):
    # streamed images are decoded only when trained on: the listing reads labels and one image's header
    samples = [{"__key__": f"k{i}", "png": png_bytes(seed=i), "cls": str(i % 2).encode()} for i in range(8)]
    samples[5]["png"] = samples[5]["png"][:60]
    write_shard(tmp_path / "a.tar", samples)
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", str(tmp_path / "a.tar"),
                         "--data.resident_gb", "0", "--data.num_workers", str(workers), "--data.batch_size", "2",
                         "--model.warmup_epochs", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error: ") and err.endswith("a.tar:k5.png: unreadable image (OSError: "
                                                                         "image file is truncated)")
    # the same shard with k5 whole: k1 is 12x12 (k0, the first, 16x16) and, without an augmentation whose crop
    # makes them one size, fails its batch
    samples[5]["png"], samples[1]["png"] = png_bytes(seed=5), png_bytes(side=12)
    write_shard(tmp_path / "a.tar", samples)
    assert main(fit_args(tmp_path / "run2", "--data.source", "webdataset", "--data.path", str(tmp_path / "a.tar"),
                         "--data.resident_gb", "0", "--data.num_workers", str(workers), "--data.batch_size", "2",
                         "--model.warmup_epochs", "0", "--data.augment", "{enabled: false}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("is 12x12, the first image 16x16: streamed shards need images of one size")


def test_a_path_without_a_source_that_reads_it_is_an_error(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.path", str(folder))) == 2  # data.source stays render
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error: data.path=") and "data.source=render" in err
    assert not run.exists()


def test_resuming_a_checkpoint_of_another_model_is_an_error_that_leaves_the_run_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(run, "--trainer.max_steps", "1", "--model.warmup_epochs", "0")) == 0  # 10 classes
    config = (run / "config.yaml").read_bytes()
    folder = make_folder(tmp_path / "images")  # 3 classes
    capsys.readouterr()
    assert main(fit_args(run, "--data.source", "folder", "--data.path", str(folder))) == 2  # --ckpt_path auto
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error: data.source='folder': ") and "last.ckpt" in err
    assert (run / "config.yaml").read_bytes() == config and len(list((run / "logs").iterdir())) == 1
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # a checkpoint without the run's keys:
    del saved["hyper_parameters"], saved["datamodule_hyper_parameters"]  # its weights still tell
    torch.save(saved, tmp_path / "bare.ckpt")
    assert main(fit_args(run, "--data.source", "folder", "--data.path", str(folder),
                         "--ckpt_path", str(tmp_path / "bare.ckpt"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error: ckpt_path=") and "net.fc.bias is (10,) there, (3,)" in err
    assert (run / "config.yaml").read_bytes() == config and len(list((run / "logs").iterdir())) == 1
    (tmp_path / "cut.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    assert main(fit_args(tmp_path / "other", "--ckpt_path", str(tmp_path / "cut.ckpt"))) == 2
    assert "cut.ckpt': not a readable checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("augment,expected", [("{enabled: true, crop_sclae: [0.1, 1.0]}", "crop_sclae"),
                                              ("{enabled: true, erase_p: 1.5}", "erase_p=1.5"),
                                              ("{enabled: true, mean: [0.5, 0.5, 0.5]}", "data.augment.mean")])
def test_bad_augment_keys_and_probabilities_are_one_line_errors(tmp_path, capsys, augment, expected):
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.augment", augment)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractal-pretrain: error: data.augment") and expected in err[0]
    assert "mean" not in err[0].partition("allowed:")[2]  # the block refuses mean and std: data.mean, data.std
    assert not run.exists()


def test_cosine_schedule_warms_up_linearly_then_follows_half_a_cosine():
    lr_at = {s: 0.1 * cosine_factor(s, warmup=5, length=25, lr=0.1, min_lr=1e-5, warmup_start_lr=1e-6)
             for s in (0, 1, 5, 15, 25, 40)}
    assert lr_at[0] == pytest.approx(1e-6)
    assert lr_at[1] == pytest.approx(1e-6 + (0.1 - 1e-6) / 5)
    assert lr_at[5] == pytest.approx(0.1)
    assert lr_at[15] == pytest.approx(1e-5 + (0.1 - 1e-5) * 0.5)  # half way down
    assert lr_at[25] == pytest.approx(1e-5) and lr_at[40] == pytest.approx(1e-5)


def test_cosine_schedule_in_epochs_is_stepped_per_optimiser_step(tmp_path):
    # 10 images at batch 6: 2 steps per epoch; warm-up 1 epoch = 2 steps, cosine over 3 epochs = 6 steps.
    run = tmp_path / "run"
    assert main(fit_args(run, "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "1",
                         "--model.warmup_start_lr", "0.01", "--model.min_lr", "0.001")) == 0
    rows = [line.split(",") for line in (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("lr-SGD")
    lrs = [float(r[column]) for r in rows[1:] if r[column]]
    expected = [0.05 * cosine_factor(s, warmup=2, length=6, lr=0.05, min_lr=0.001, warmup_start_lr=0.01)
                for s in range(6)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[2] == pytest.approx(0.05) and lrs[0] == pytest.approx(0.01)


@pytest.mark.parametrize("schedule,expected", [(["--model.warmup_epochs", "3"], "model.warmup_epochs=3 (2 steps per "),
                                               (["--model.warmup_epochs", "0", "--model.warmup_steps", "9"],
                                                "model.warmup_steps=9")], ids=["epochs", "steps"])
def test_a_warm_up_longer_than_the_run_is_an_error_before_anything_is_written(tmp_path, capsys, schedule, expected):
    # 10 images at batch 6: 2 steps per epoch, 4 steps in 2 epochs
    run = tmp_path / "run"
    assert main(fit_args(run, "--trainer.max_epochs", "2", *schedule)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fractal-pretrain: error:") and expected in err and "cosine schedule (4 steps)" in err
    assert not run.exists()


def test_soft_targets_give_the_mixed_cross_entropy():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    a, b, lam = torch.tensor([0, 3, 6, 2, 2]), torch.tensor([1, 3, 0, 5, 4]), 0.3
    onehot = F.one_hot(a, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, a))
    mixed = lam * onehot + (1 - lam) * F.one_hot(b, 7).float()
    want = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    torch.testing.assert_close(soft_cross_entropy(logits, mixed), want)
    torch.testing.assert_close(soft_cross_entropy(logits, onehot, 0.1), F.cross_entropy(logits, a, label_smoothing=0.1))
    assert not math.isclose(float(soft_cross_entropy(logits, mixed)), float(F.cross_entropy(logits, a)))


def test_images_of_different_sizes_train_when_the_augmentation_crops_them_to_one(tmp_path):
    from fractal_pretrain.train.data import FractalDataModule

    folder = make_folder(tmp_path / "images")
    write_image(folder / "class_0" / "wide.png", side=40, height=24, seed=99)
    write_image(folder / "class_2" / "tall.png", side=20, height=30, seed=98)
    data = FractalDataModule(source="folder", path=str(folder), batch_size=8, seed=3,
                             augment={"enabled": True, "size": 16, "mix_p": 0.0})
    data.load_images()
    data.setup("fit")
    assert data.image_set.images is None and len(data.image_set.buckets) == 3
    indices = np.arange(8)
    groups, labels = data._take("train", 1, indices)
    assert len(groups) == 3 and sum(len(where) for where, _ in groups) == 8
    images, targets = data._finish(groups, labels, "train", 1, indices, 0)
    assert images.shape == (8, 3, 16, 16) and torch.equal(targets.argmax(1), labels)
    # each sample is augmented exactly as it would be alone: its draws depend on its own index and size
    order = data.epoch_order(1)
    for i in range(8):
        alone = data.image_set.gather(order[i:i + 1])[0][1]
        want, _ = data.augmenter(alone, labels[i:i + 1], seed=3, epoch=1, indices=indices[i:i + 1], step=0)
        assert torch.equal(images[i:i + 1], want), i
    val_images, _ = data._finish(*data._take("val", 2**32 - 1, indices), "val", 0, indices, 0)
    assert val_images.shape == (8, 3, 16, 16)
    assert main(fit_args(tmp_path / "run", "--data.source", "folder", "--data.path", str(folder),
                         "--data.batch_size", "4", "--trainer.max_steps", "2")) == 0


def write_numbered_shards(root: Path, sizes: tuple[int, ...], side: int = 8) -> None:
    """Shards whose sample j (counted over all shards) is an image of noise seeded by j, with label j."""
    root.mkdir(parents=True, exist_ok=True)
    j = 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            samples.append({"__key__": f"s{j:04d}", "png": png_bytes(side, seed=j), "cls": str(j).encode()})
            j += 1
        write_shard(root / f"part-{s}.tar", samples)


def streamed(listing, epoch: int, rank: int = 0, world: int = 1, workers: int = 0, seed: int = 0, batch: int = 3,
             consumed: int = 0) -> list[dict]:
    """The batches one rank streams in ``epoch``, resumed after ``consumed`` batches."""
    batches = StreamBatches(ShardStream(listing, batch, seed, rank, world, workers), workers, lambda: epoch)
    batches.load_state_dict({"epoch": epoch, "consumed": consumed})
    return list(batches)


def sample_ids(batches: list[dict]) -> list[int]:
    return [int(v) for b in batches for v in b["labels"]]


def test_streamed_order_is_a_function_of_seed_and_epoch(tmp_path):
    write_numbered_shards(tmp_path, (7, 5, 9, 3))
    listing = list_shards(str(tmp_path))
    first, again = streamed(listing, epoch=2), streamed(list_shards(str(tmp_path)), epoch=2)
    assert [b["step"] for b in first] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert sample_ids(first) == sample_ids(again)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(torch.as_tensor(a["images"]), torch.as_tensor(b["images"]))
    # labels name the samples: 24 of 24 distinct ones in an epoch of 8 batches of 3, shuffled
    assert sorted(sample_ids(first)) == list(range(24)) and sample_ids(first) != list(range(24))
    assert sample_ids(streamed(listing, epoch=3)) != sample_ids(first)
    assert sample_ids(streamed(listing, epoch=2, seed=1)) != sample_ids(first)
    # pixels come with their labels: sample j is noise seeded by j
    want = np.asarray(Image.open(io.BytesIO(png_bytes(8, seed=sample_ids(first)[0]))).convert("RGB"))
    assert np.array_equal(np.asarray(first[0]["images"][0]), want)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_ranks_get_the_same_batch_count_and_disjoint_samples(tmp_path, workers):
    # 3 shards of unequal size for 2 ranks: a split by shard would give the ranks 2 and 1 shards (and unequal
    # batch counts, a DDP hang); each rank reads its own half of the epoch's sample sequence instead.
    write_numbered_shards(tmp_path, (6, 6, 3))
    listing = list_shards(str(tmp_path))
    ranks = [streamed(listing, epoch=1, rank=rank, world=2, workers=workers) for rank in (0, 1)]
    assert [len(b) for b in ranks] == [2, 2]  # 15 // (3 x 2)
    assert all(len(b["labels"]) == 3 for batches in ranks for b in batches)
    seen = [set(sample_ids(batches)) for batches in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_streamed_resume_continues_with_the_batches_an_uninterrupted_epoch_gives(tmp_path):
    # two workers: batch t comes from worker t % 2, so a resume after an odd count swaps the workers' roles
    write_numbered_shards(tmp_path, (7, 5, 9, 3))
    listing = list_shards(str(tmp_path))
    whole = streamed(listing, epoch=4, rank=1, world=2, workers=2)
    assert [b["step"] for b in whole] == [0, 1, 2, 3]
    for consumed in (1, 2, 3):
        tail = streamed(listing, epoch=4, rank=1, world=2, workers=2, consumed=consumed)
        assert [b["step"] for b in tail] == [b["step"] for b in whole[consumed:]]
        assert sample_ids(tail) == sample_ids(whole[consumed:]), consumed


def test_streamed_fit_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path):
    # 13 samples at batch 4 stream as 3 steps per epoch through 2 workers; stop after step 4 (mid-epoch 1,
    # an odd count of consumed batches: the workers swap roles), every batch augmented and mixed.
    write_numbered_shards(tmp_path / "shards", (5, 2, 6), side=16)
    common = ("--data.source", "webdataset", "--data.path", str(tmp_path / "shards"), "--data.resident_gb", "0",
              "--data.num_workers", "2", "--data.batch_size", "4", "--data.augment",
              "{enabled: true, size: 16, mix_p: 1.0}", "--checkpoint_every_n_steps", "1",
              "--trainer.max_epochs", "2", "--model.cosine_epochs", "2")
    assert_split_run_equals_straight_run(partial(fit_command, OFDB_SMOKE), tmp_path, 4, (), common)
    meta = json.loads((tmp_path / "split" / "backbone.json").read_text())
    assert meta["images"]["streamed"] is True and meta["steps"] == 6


def test_streamed_images_of_different_sizes_train_when_the_augmentation_crops_them_to_one(tmp_path):
    from fractal_pretrain.train.data import FractalDataModule

    samples = [{"__key__": f"k{i}", "png": png_bytes(side=16 if i % 3 else 24, seed=i), "cls": str(i % 2).encode()}
               for i in range(8)]
    write_shard(tmp_path / "a.tar", samples)
    data = FractalDataModule(source="webdataset", path=str(tmp_path / "a.tar"), batch_size=4, seed=3, resident_gb=0,
                             num_workers=0, augment={"enabled": True, "size": 16, "mix_p": 0.0})
    data.setup("fit")
    assert data.streams
    batch = next(iter(data.train_dataloader()))
    assert {tuple(image.shape) for image in batch["images"]} == {(16, 16, 3), (24, 24, 3)}
    images, targets = data.on_before_batch_transfer(batch, 0)
    assert images.shape == (4, 3, 16, 16) and torch.equal(targets.argmax(1), torch.as_tensor(batch["labels"]))
    for i, image in enumerate(batch["images"]):  # each sample augmented as it would be alone
        alone = torch.as_tensor(np.asarray(image)).permute(2, 0, 1)[None]
        want, _ = data.augmenter(alone, targets[i:i + 1].argmax(1), seed=3, epoch=0, indices=[i], step=0)
        assert torch.equal(images[i:i + 1], want), i
    assert main(fit_args(tmp_path / "run", "--data.source", "webdataset", "--data.path", str(tmp_path / "a.tar"),
                         "--data.resident_gb", "0", "--data.num_workers", "1", "--data.batch_size", "4",
                         "--data.augment", "{enabled: true, size: 16}", "--trainer.max_epochs", "1")) == 0
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["steps"] == 2


def streamed_module(tmp_path: Path, sides: tuple[int, ...], device: str):
    """A set-up webdataset data module on ``device`` (a stand-in trainer names it) and its two batches."""
    from types import SimpleNamespace

    from fractal_pretrain.train.data import FractalDataModule

    samples = [{"__key__": f"k{i}", "png": png_bytes(side=side, seed=i), "cls": str(i % 2).encode()}
               for i, side in enumerate(sides * 2)]
    write_shard(tmp_path / "a.tar", samples)
    data = FractalDataModule(source="webdataset", path=str(tmp_path / "a.tar"), batch_size=4, seed=3, resident_gb=0,
                             num_workers=1, augment={"enabled": True, "size": 16, "mix_p": 0.0})
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0,
                                   world_size=1, current_epoch=0, is_global_zero=True, precision="32-true",
                                   num_devices=1)
    data.setup("fit")
    loader = data.train_dataloader()
    return data, loader, list(loader)


SIDES = pytest.mark.parametrize("sides", [(16, 16, 16, 16), (16, 24, 16, 24)], ids=["one_size", "mixed_sizes"])


@SIDES
def test_streamed_batches_are_pinned_only_for_cuda_and_reach_the_cpu_model_augmented(tmp_path, sides):
    data, loader, batches = streamed_module(tmp_path, sides, "cpu")
    assert not loader.pin_memory and len(batches) == 2
    for batch in batches:
        images, targets = data.on_before_batch_transfer(batch, 0)
        assert images.shape == (4, 3, 16, 16) and torch.equal(targets.argmax(1), torch.as_tensor(batch["labels"]))


@pytest.mark.gpu
@SIDES
def test_on_cuda_a_streamed_batch_goes_to_the_device_without_a_host_sync(tmp_path, sides):
    """Pinned by the loader (one size) or stacked per size on the host (several): labels, images and group
    positions uploaded from pinned memory, the positions of each group's draws read on the host."""
    data, loader, (first, second) = streamed_module(tmp_path, sides, "cuda")
    assert loader.pin_memory
    data.on_before_batch_transfer(first, 0)  # warm-up: the pinned pool, the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, targets = data.on_before_batch_transfer(second, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and images.shape == (4, 3, 16, 16)
    assert torch.equal(targets.argmax(1).cpu(), torch.as_tensor(second["labels"]))


def test_16_bit_grey_images_are_scaled_not_clipped_and_float_images_are_named(tmp_path):
    from fractal_pretrain.config import ConfigError
    from fractal_pretrain.train.images import decode_image

    wide = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # 0 .. 63,000
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode in ("I;16", "I")  # Pillow's 16-bit grey
    pixels = decode_image(tmp_path / "wide.png", "wide.png")
    expected = (wide >> 8).astype(np.uint8)  # torchvision's to_dtype(uint8, scale=True): the top byte
    assert pixels.shape == (8, 8, 3) and all(np.array_equal(pixels[..., c], expected) for c in range(3))
    assert (pixels == 255).mean() < 0.05  # convert("RGB") clipped 98% of these to 255
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tif")
    with pytest.raises(ConfigError, match=r"^\S*float.tif: float pixels \(mode F\)"):
        decode_image(tmp_path / "float.tif", str(tmp_path / "float.tif"))
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "grey.png")  # 8-bit grey: as convert("RGB")
    assert np.array_equal(decode_image(tmp_path / "grey.png", "grey.png"), np.full((4, 4, 3), 7, np.uint8))


@pytest.mark.parametrize("path,expected", [
    ("manifest:null", "manifest.json: 'shards' must be a list of shard file names, got None"),
    ("manifest:[1, 2]", "manifest.json: 'shards' must be a list of shard file names"),
    ("s-{0..3.tar", "data.path='s-{0..3.tar': "),
], ids=["null-shards", "number-shards", "unbalanced-braces"])
def test_a_bad_manifest_or_brace_pattern_is_one_line(tmp_path, capsys, path, expected):
    if path.startswith("manifest:"):
        (tmp_path / "manifest.json").write_text(f'{{"shards": {path.removeprefix("manifest:")}}}')
        path = str(tmp_path)
    run = tmp_path / "run"
    assert main(fit_args(run, "--data.source", "webdataset", "--data.path", path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractal-pretrain: error:") and expected in err[0]
    assert not run.exists()


def test_shard_listing_groups_members_as_webdataset_does(tmp_path):
    # upper-case extensions, a __meta__ member and one without an extension: webdataset lower-cases the first and
    # skips the others; the listing must count what the stream reads
    import webdataset as wds

    samples = [{"__key__": f"k{i}", "PNG": png_bytes(seed=i), "Cls": str(i).encode()} for i in range(3)]
    write_shard(tmp_path / "a.tar", samples)
    with tarfile.open(tmp_path / "a.tar", "a") as tar:
        for name in ("__meta__", "README"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    listing = list_shards(str(tmp_path / "a.tar"))
    streamed = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False, empty_check=False))
    assert listing.count == len(streamed) == 3 and listing.labels == (0, 1, 2)
    assert all({"png", "cls"} <= set(sample) for sample in streamed)


@pytest.mark.parametrize("change,expected", [
    (("--data.batch_size", "2"), "data.batch_size=2: "),
    (("--trainer.devices", "2", "--trainer.strategy", "ddp"),
     "world size (trainer.devices x trainer.num_nodes)=2: "),
], ids=["batch-size", "world-size"])
def test_a_mid_epoch_resume_under_another_batch_geometry_is_refused(tmp_path, capsys, change, expected):
    # the checkpoint's position counts batches of 4 on one rank; under another geometry the rest of the epoch
    # would skip or repeat samples
    run = tmp_path / "run"
    args = ("--data.batch_size", "4", "--model.warmup_epochs", "0")
    assert main(fit_args(run, *args, "--trainer.max_steps", "1", "--checkpoint_every_n_steps", "1")) == 0
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(fit_args(run, *args, "--trainer.max_steps", "2", *change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "last.ckpt was written" in err[0], err
    assert (run / "config.yaml").read_bytes() == config


def test_another_image_set_under_the_same_path_is_refused_a_moved_copy_resumes(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    run = tmp_path / "run"
    args = ("--data.source", "folder", "--data.batch_size", "2", "--model.warmup_epochs", "0")
    assert main(fit_args(run, *args, "--data.path", str(folder), "--trainer.max_steps", "1")) == 0
    moved = folder.rename(tmp_path / "scratch_copy")  # node-local scratch: same files, another path
    assert main(fit_args(run, *args, "--data.path", str(moved), "--trainer.max_steps", "2")) == 0
    write_image(moved / "class_0" / "img_9.png", seed=99)  # one more image: another file list
    capsys.readouterr()
    assert main(fit_args(run, *args, "--data.path", str(moved), "--trainer.max_steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "count 7 of its images" in err[0] and "with count 6" in err[0], err
