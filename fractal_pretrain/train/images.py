"""Fixed image sets for training: a recipe's render-once set (OFDB), an image folder, WebDataset shards.

A fixed set is decoded (or rendered) once and kept as one uint8 tensor ``(N, 3, H, W)`` on the
training device, with int64 labels; each epoch visits it in an order that is a pure function of
(seed, epoch) (:func:`epoch_order`), so a resume continues the same stream. Shards too large for
``data.resident_gb`` stream instead (:class:`ShardStream`), with an epoch that is just as much a pure
function of (seed, epoch) for a given world size and worker count, so their resumes are exact too.

Sources (``data.source``):

* ``render``: a recipe with ``images_per_class`` > 0 (``ofdb``): indices ``[0, N)`` of epoch 0, rendered
  on the device (CuPy) or by the compiled CPU renderer (the NumPy reference without a compiler).
* ``folder``: ImageFolder layout, ``PATH/<class>/<image>`` (images may lie in subfolders of a class folder);
  classes are the sorted folder names.
* ``webdataset``: tar shards (a directory of ``*.tar``, e.g. ``fractal-pretrain export``'s, one shard, or
  a brace pattern); each sample needs an image (png, jpg, jpeg, webp, bmp, ppm) and a ``cls`` label.

Every set carries a ``record`` (source, path, count, classes, digest of the file list) that the run
writes into ``backbone.json``. Bad input is a one-line ``ConfigError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from fractal_pretrain import rng
from fractal_pretrain.config import ConfigError

FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")  # ImageFolder's
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")


@dataclass
class ImageSet:
    """A fixed, labelled set of uint8 images, resident on one device.

    All one size: ``images`` is one tensor (N, 3, H, W). Sizes that differ (allowed when the augmentation
    crops or resizes every image to one size) are kept in ``buckets``, one tensor per size with the set
    ids it holds, and ``images`` is None.
    """

    images: Any  # torch.uint8 (N, 3, H, W), or None with buckets
    labels: Any  # torch.int64 (N,)
    num_classes: int
    record: dict[str, Any] = field(default_factory=dict)
    buckets: list[tuple[Any, Any]] | None = None  # [(ids (n,), images (n, 3, H, W))] per size

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> ImageSet:
        buckets = None if self.buckets is None else [(i.to(device), x.to(device)) for i, x in self.buckets]
        images = None if self.images is None else self.images.to(device)
        return ImageSet(images, self.labels.to(device), self.num_classes, self.record, buckets)

    def gather(self, ids) -> list[tuple[Any, Any]]:
        """The images of set ids (a device tensor) as groups of one size: [(batch positions or None, images)].

        One size: a single group holding the whole batch in order (positions None), no host sync.
        """
        if self.buckets is None:
            return [(None, self.images[ids])]
        groups = []
        for bucket_ids, images in self.buckets:
            match = ids[:, None] == bucket_ids[None, :]  # (B, n): which member of this bucket each id is
            positions = match.any(dim=1).nonzero().flatten()  # a host sync: only sets of mixed sizes
            if len(positions):
                groups.append((positions, images[match[positions].int().argmax(dim=1)]))
        return groups

    @property
    def nbytes(self) -> int:
        if self.buckets is None:
            return self.images.numel()
        return sum(images.numel() for _, images in self.buckets)


def philox_permutation(seed: int, epoch: int, n: int, stream: int) -> np.ndarray:
    """A permutation of ``range(n)`` for (seed, epoch): argsort of a 64-bit Philox key per element of ``stream``."""
    hi, lo, _, _ = rng.draw_words(seed, epoch, np.arange(n, dtype=np.int64), stream, 0)
    keys = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    return np.argsort(keys, kind="stable").astype(np.int64)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of a fixed set of n images for (seed, epoch): position p shows image order[p].

    The same on every rank and after any resume.
    """
    return philox_permutation(seed, epoch, n, rng.STREAM_ORDER)


def list_digest(entries: list[tuple[str, int]]) -> str:
    """sha256 of a file list: one ``name<TAB>bytes`` line per file, in order."""
    h = hashlib.sha256()
    for name, size in entries:
        h.update(f"{name}\t{size}\n".encode())
    return h.hexdigest()


def decode_image(data: bytes | Path, name: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels; an unreadable or truncated image, or one of float pixels, is an error naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            return rgb8(im, name)
    except ConfigError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ConfigError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG, TIFF, PGM with maxval > 255)


def rgb8(im, name: str) -> np.ndarray:
    """Pillow's ``convert("RGB")`` (torchvision's ImageFolder loader), except for wide grey pixels, which it
    clips at 255 (a 16-bit image turns almost white): those are scaled to 8 bits by their top byte, as
    torchvision's ``to_dtype(uint8, scale=True)`` does; float pixels have no range to scale from."""
    if im.mode in WIDE_GREY_MODES:
        pixels = np.asarray(im).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ConfigError(f"{name}: {im.mode} pixels from {pixels.min()} to {pixels.max()}, outside the 16-bit "
                              "range 0..65535; convert it to 8 or 16 bits")
        return np.repeat((pixels >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode.startswith("F"):
        raise ConfigError(f"{name}: float pixels (mode {im.mode}) have no fixed range to scale to 8 bits; "
                          "convert it to 8 or 16 bits")
    return np.asarray(im.convert("RGB"))


def build_set(arrays: list[np.ndarray], names: list[str], labels, num_classes: int, record: dict[str, Any],
              mixed_sizes: bool) -> ImageSet:
    """An ImageSet of decoded (H, W, 3) images; different sizes need ``mixed_sizes`` (a crop that equalises)."""
    import torch

    labels = torch.as_tensor(labels, dtype=torch.int64)
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) == 1:  # the size the network sees without data.augment (backbone.json's image_size)
        return ImageSet(_to_tensor(arrays), labels, num_classes, {**record, "image_size": list(shapes[0][:2])})
    if not mixed_sizes:
        other = next(i for i, a in enumerate(arrays) if a.shape != arrays[0].shape)
        raise ConfigError(
            f"images of different sizes: {names[0]} is {arrays[0].shape[0]}x{arrays[0].shape[1]}, {names[other]} is "
            f"{arrays[other].shape[0]}x{arrays[other].shape[1]}; without data.augment (its crop or resize makes "
            f"them one size) a training set needs one size")
    buckets = [(torch.tensor(ids, dtype=torch.int64), images) for ids, images in size_groups(arrays)]
    return ImageSet(None, labels, num_classes, record, buckets)


def size_groups(arrays: list[np.ndarray]) -> list[tuple[list[int], Any]]:
    """(H, W, 3) images of several sizes as one group per size, sizes sorted: [(positions in ``arrays``,
    uint8 (n, 3, H, W) tensor)] (resident sets' buckets, streamed batches of mixed sizes)."""
    groups = []
    for shape in sorted({a.shape for a in arrays}):
        ids = [i for i, a in enumerate(arrays) if a.shape == shape]
        groups.append((ids, _to_tensor([arrays[i] for i in ids])))
    return groups


def _to_tensor(arrays: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def check_resident(count: int, shape: tuple[int, int], resident_gb: float, what: str) -> None:
    size = count * 3 * shape[0] * shape[1]
    if size > resident_gb * 2**30:
        raise ConfigError(f"{what}: {count} images of {shape[0]}x{shape[1]} need {size / 2**30:.1f} GiB, more than "
                          f"data.resident_gb={resident_gb}; use data.source webdataset (shards stream)")


def image_shape(data: bytes | Path, name: str) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.size[1], im.size[0]
    except Exception as err:
        raise ConfigError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------- render once


def render_set(recipe, size: int, seed: int, device: str, chunk: int = 64, num_threads: int | None = None) -> ImageSet:
    """A recipe's fixed set: indices [0, N) of epoch 0 rendered once (N = images_per_class x classes)."""
    import torch

    from fractal_pretrain.render import make_renderer

    n = recipe.fixed_images
    renderer = make_renderer(recipe, size=size, seed=seed, device=device, num_threads=num_threads)
    print(f"fractal_pretrain: rendering the {recipe.name} set, {n} images of {size} px on {device}",
          file=sys.stderr, flush=True)
    images, labels = [], []
    for lo in range(0, n, chunk):
        batch_images, batch_labels = renderer.render_tensor(np.arange(lo, min(n, lo + chunk)), 0, dtype="uint8")
        images.append(batch_images.contiguous())
        labels.append(batch_labels.to(batch_images.device))
    record = {"source": "render", "recipe": recipe.name, "count": n, "size": size, "seed": seed, "epoch": 0}
    return ImageSet(torch.cat(images), torch.cat(labels).long(), recipe.num_classes, record)


# ----------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class FolderListing:
    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        entries = [(str(f.relative_to(self.root)), f.stat().st_size) for f in self.files]
        return {"source": "folder", "path": str(self.root.resolve()), "count": len(self.files),
                "classes": len(self.classes), "digest": list_digest(entries)}


def list_folder(path: str | Path) -> FolderListing:
    """Class folders and their images (sorted), checked: no class folders or an empty one is an error."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.path={str(path)!r}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.path={str(path)!r}: empty image folder (no class folders)")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = _class_images(root / name)
        if not images:
            raise ConfigError(f"{root / name}: class folder without images ({', '.join(FOLDER_SUFFIXES)})")
        files += images
        labels += [label] * len(images)
    return FolderListing(root, tuple(classes), tuple(files), tuple(labels))


def _class_images(folder: Path) -> list[Path]:
    """A class folder's images as torchvision's ImageFolder finds them: the folder walked recursively (links
    followed), directories and then files in sorted order."""
    found = []
    for parent, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [Path(parent) / n for n in sorted(names) if n.lower().endswith(FOLDER_SUFFIXES)]
    return found


def folder_set(listing: FolderListing, resident_gb: float, mixed_sizes: bool = False) -> ImageSet:
    check_resident(len(listing.files), image_shape(listing.files[0], str(listing.files[0])), resident_gb,
                   str(listing.root))
    arrays = [decode_image(f, str(f)) for f in listing.files]
    return build_set(arrays, [str(f) for f in listing.files], listing.labels, len(listing.classes), listing.record(),
                     mixed_sizes)


# ----------------------------------------------------------------------------- WebDataset shards


def shard_paths(path: str) -> list[Path]:
    """Shards of ``data.path``: a directory (its manifest's shards, else every ``*.tar``), a file, or braces."""
    import braceexpand

    root = Path(path)
    if root.is_dir():
        manifest = root / "manifest.json"
        if manifest.is_file():
            try:
                names = json.loads(manifest.read_text())["shards"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{manifest}: not a readable manifest ({type(err).__name__}: {err})") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{manifest}: 'shards' must be a list of shard file names, got {names!r:.80}")
            paths = [root / n for n in names]
        else:
            paths = sorted(root.glob("*.tar"))
        if not paths:
            raise ConfigError(f"data.path={path!r}: no .tar shards in the directory")
    else:
        try:
            paths = [Path(p) for p in braceexpand.braceexpand(path)]
        except braceexpand.UnbalancedBracesError as err:
            raise ConfigError(f"data.path={path!r}: {err}") from None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"data.path={path!r}: shard {missing[0]} not found")
    return paths


def shard_image_key(files: dict[str, bytes]) -> str | None:
    return next((k for k in SHARD_IMAGE_KEYS if k in files), None)


def shard_label(files: dict[str, bytes], key: str, shard: Path) -> int:
    if "cls" not in files:
        raise ConfigError(f"{shard}: sample {key!r} has no label (a .cls file)")
    try:
        return int(files["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{shard}: sample {key!r} has a .cls that is not an integer") from None


def decode_sample(sample: dict[str, Any], shape: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """(uint8 (H, W, 3) RGB pixels, label) of a raw webdataset sample; a bad image, or one of another size
    than ``shape`` (a streamed batch is one tensor; None: any size), is an error naming it (streamed images
    are read only when trained on: the listing checked labels and one image's header)."""
    key, url = sample["__key__"], Path(sample["__url__"])
    image = shard_image_key(sample)
    if image is None:
        raise ConfigError(f"{url}: sample {key!r} has no image ({', '.join(SHARD_IMAGE_KEYS)})")
    name = f"{url}:{key}.{image}"
    pixels = decode_image(sample[image], name)
    if shape is not None and pixels.shape[:2] != tuple(shape):
        raise ConfigError(f"{name} is {pixels.shape[0]}x{pixels.shape[1]}, the first image {shape[0]}x{shape[1]}: "
                          "streamed shards need images of one size")
    return pixels, shard_label(sample, key, url)


@dataclass(frozen=True)
class ShardListing:
    """What a scan of the shards found: sample counts, labels, the first image's size."""

    path: str
    shards: tuple[Path, ...]
    counts: tuple[int, ...]
    labels: tuple[int, ...]
    num_classes: int
    shape: tuple[int, int]

    @property
    def count(self) -> int:
        return len(self.labels)

    def record(self) -> dict[str, Any]:
        entries = [(p.name, p.stat().st_size) for p in self.shards]
        return {"source": "webdataset", "path": str(Path(self.path).resolve()), "count": self.count,
                "classes": self.num_classes, "shards": len(self.shards), "digest": list_digest(entries),
                "image_size": list(self.shape)}


def list_shards(path: str) -> ShardListing:
    """Scan every shard once: each sample must have an image and a ``cls``; classes = max label + 1."""
    from fractal_pretrain.export import tar_samples

    shards = shard_paths(path)
    counts, labels, shape = [], [], None
    for shard in shards:
        n = 0
        try:
            for key, files in tar_samples(shard):
                image = shard_image_key(files)
                if image is None:
                    raise ConfigError(f"{shard}: sample {key!r} has no image ({', '.join(SHARD_IMAGE_KEYS)})")
                labels.append(shard_label(files, key, shard))
                if shape is None:
                    shape = image_shape(files[image], f"{shard}:{key}.{image}")
                n += 1
        except ConfigError:
            raise
        except (OSError, EOFError, tarfile.TarError, ValueError) as err:  # not a tar, cut short, a duplicate member
            raise ConfigError(f"{shard}: unreadable shard ({type(err).__name__}: {err})") from None
        counts.append(n)
    if not labels:
        raise ConfigError(f"data.path={path!r}: the shards hold no samples")
    if min(labels) < 0:
        raise ConfigError(f"data.path={path!r}: negative class label {min(labels)}")
    return ShardListing(path, tuple(shards), tuple(counts), tuple(labels), max(labels) + 1, shape)


def shard_set(listing: ShardListing, mixed_sizes: bool = False) -> ImageSet:
    """Decode every sample once into a resident set (in shard and member order)."""
    from fractal_pretrain.export import tar_samples

    arrays, names = [], []
    for shard in listing.shards:
        for key, files in tar_samples(shard):
            image = shard_image_key(files)
            names.append(f"{shard}:{key}.{image}")
            arrays.append(decode_image(files[image], names[-1]))
    return build_set(arrays, names, listing.labels, listing.num_classes, listing.record(), mixed_sizes)


# ----------------------------------------------------------------------------- streamed shards
#
# Epoch e of a streamed set is one sequence of samples: the shards in the order shard_order(seed, e), each
# in its tar order. Rank r reads the contiguous part [r * Q, (r + 1) * Q) with Q = steps * batch_size and
# steps = count // (batch_size * world), so ranks read disjoint samples and make the same number of full
# batches (the tail of the sequence, under one global batch, is left out; another one every epoch). Within
# a rank, batch t comes from logical worker t % W (the DataLoader's round robin over W workers); logical
# worker l reads its own contiguous part of the rank's samples through a shuffle buffer seeded by
# (seed, e, r, l). Everything is a pure function of (seed, e, rank, world, W): a resume after t batches
# starts each worker where its share of batches t, t+1, ... begins and gives the same batches.

SHUFFLE_BUFFER = 1000  # encoded samples per worker (webdataset's default)


def stream_steps(count: int, batch_size: int, world: int) -> int:
    """Full batches per rank and epoch of a streamed set (the same on every rank)."""
    return count // (batch_size * world)


def shard_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of a streamed set's n shards in ``epoch``."""
    return philox_permutation(seed, epoch, n, rng.STREAM_SHARDS)


def worker_batches(steps: int, workers: int) -> list[int]:
    """Batches of each logical worker: worker l makes batches l, l + W, l + 2W... of the rank's epoch."""
    return [len(range(w, steps, workers)) for w in range(workers)]


def stream_segments(counts: tuple[int, ...], order: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``(shard, skip, take)`` runs that hold positions [lo, hi) of the epoch's sample sequence."""
    sizes = np.asarray(counts, dtype=np.int64)[order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    segments = []
    for k, shard in enumerate(order):
        a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
        if a < b:
            segments.append((int(shard), a - int(starts[k]), b - a))
    return segments


def shuffle_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The 64-bit seed of one (rank, logical worker)'s shuffle buffer in ``epoch``."""
    hi, lo, _, _ = rng.draw_words(seed, epoch, rank, rng.STREAM_SHARD_SHUFFLE, 0, lane=worker)
    return (int(hi) << 32) | int(lo)


class ShardStream(IterableDataset):
    """One rank's streamed batches of one epoch, read by webdataset; a torch ``IterableDataset``.

    ``epoch`` and ``start`` (batches of the epoch already consumed) are set before each iteration; every
    DataLoader worker then yields dicts ``{split, epoch, step, images (B, H, W, 3) uint8, labels}`` for its
    share of the steps ``start...``, in the order the DataLoader's round robin returns them. With
    ``mixed_sizes`` (an augmentation that crops or resizes every image to one size) images may differ in
    size and a batch of several sizes has ``images`` as a list of B (H, W, 3) arrays.
    """

    def __init__(self, listing: ShardListing, batch_size: int, seed: int, rank: int, world: int, workers: int,
                 buffer: int = SHUFFLE_BUFFER, mixed_sizes: bool = False):
        self.listing, self.batch_size, self.seed = listing, batch_size, seed
        self.rank, self.world, self.workers, self.buffer = rank, world, max(1, workers), buffer
        self.mixed_sizes = mixed_sizes
        self.steps = stream_steps(listing.count, batch_size, world)
        self.epoch, self.start = 0, 0

    def segments(self, epoch: int, worker: int) -> list[tuple[int, int, int]]:
        """``(shard, skip, take)`` runs that logical ``worker`` of this rank reads in ``epoch``."""
        counts = worker_batches(self.steps, self.workers)
        lo = (self.rank * self.steps + sum(counts[:worker])) * self.batch_size
        order = shard_order(self.seed, epoch, len(self.listing.shards))
        return stream_segments(self.listing.counts, order, lo, lo + counts[worker] * self.batch_size)

    def _samples(self, segments):
        """The raw samples of the segments, grouped by webdataset; a short shard is an error naming it."""
        import webdataset as wds

        for shard, skip, take in segments:
            url = str(self.listing.shards[shard])
            got = 0
            for sample in itertools.islice(wds.tarfile_samples([{"url": url}]), skip, skip + take):
                got += 1
                yield sample
            if got < take:
                raise ConfigError(f"{url}: {skip + got} samples, the listing counted {self.listing.counts[shard]} "
                                  "(the shard changed since the run started)")

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} worker(s), runs in {workers}")
        epoch, start = self.epoch, self.start
        logical = (start + worker) % workers  # the DataLoader asks worker 0 first: for step start on a resume
        skipped = len(range(logical, start, workers))  # batches of this logical worker before start
        pipeline = wds.DataPipeline(
            lambda: self._samples(self.segments(epoch, logical)),
            wds.shuffle(self.buffer, initial=self.buffer,
                        rng=random.Random(shuffle_seed(self.seed, epoch, self.rank, logical))),
            lambda samples: itertools.islice(samples, skipped * self.batch_size, None),  # consumed: not decoded
            lambda samples: (decode_sample(sample, None if self.mixed_sizes else self.listing.shape)
                             for sample in samples),
            wds.batched(self.batch_size, partial=False,
                        collation_fn=_as_lists if self.mixed_sizes else wds.filters.default_collation_fn),
        )
        for k, (images, labels) in enumerate(pipeline):
            yield {"split": "train", "epoch": epoch, "step": start + worker + k * workers, "images": images,
                   "labels": np.asarray(labels, dtype=np.int64)}


def _as_lists(samples: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray | list[np.ndarray], list[int]]:
    """A batch of images that may differ in size: stacked (in the worker) when they do not, else a list."""
    images, labels = zip(*samples, strict=True)
    if len({image.shape for image in images}) == 1:
        return np.stack(images), list(labels)
    return list(images), list(labels)
