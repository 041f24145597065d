"""Export rendered fractals to WebDataset tar shards, and read them back.

Layout of an export directory::

    DIR/shard-000000.tar, shard-000001.tar, ...   # at most shard_size samples each
    DIR/manifest.json                              # written last: recipe, seed, shards, count

Each sample in a shard has the files ``<key>.png`` (lossless RGB PNG, encoded here with PIL so the
pixels are exact), ``<key>.cls`` (class id as text; single-label recipes) or ``<key>.multihot.npy``
(uint8 vector of length num_classes; multi-label recipes), and ``<key>.json`` (the renderer's
metadata). The key is the global sample index as nine digits, so the same (recipe, seed, epoch,
index) always lands in the same sample and any slice can be re-rendered and compared.

Reading with webdataset (1.0.x)::

    import webdataset as wds
    ds = wds.WebDataset(sorted(glob("DIR/shard-*.tar")), shardshuffle=False).decode("rgb8")
    for sample in ds: sample["png"], sample["cls"], sample["json"]

or with :func:`read_shards`, which needs only the standard library, NumPy and PIL.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-[0-9]*.tar"
MANIFEST_NAME = "manifest.json"
KEY_DIGITS = 9  # keys are f"{index:09d}": sortable, no dots (webdataset splits extensions at dots)
MANIFEST_FORMAT = 1  # bump when the shard layout changes
PNG_LEVEL = 3  # zlib level of the PNGs: 1-3 are zlib's fast strategy, ~2.5x the speed of 6 for ~7% more bytes


@dataclass(frozen=True)
class ExportedSample:
    """One sample read back from the shards.

    Attributes:
        key: the ``__key__`` (zero-padded index).
        index: the global sample index.
        image: uint8 array (H, W, 3).
        label: ``int`` class id, or uint8 multi-hot array (num_classes,) for multi-label recipes.
        meta: the renderer's metadata dict for this sample.
    """

    key: str
    index: int
    image: np.ndarray
    label: int | np.ndarray
    meta: dict[str, Any]


def sample_key(index: int) -> str:
    """WebDataset ``__key__`` of the sample with global index ``index``."""
    return f"{index:0{KEY_DIGITS}d}"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, 3) image: 8-bit RGB, every row with the 'Up' filter.

    Written with zlib rather than Pillow because ``zlib.compress`` releases the GIL: export encodes a
    batch on as many threads as the renderer uses (Pillow's in-memory encoder holds the GIL).
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width, _ = image.shape
    rows = image.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # Up: each byte minus the byte above (the row above the first is zero)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8: modulo 256, as PNG defines it

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_LEVEL))
            + chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) array from PNG bytes written by :func:`encode_png`."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, sort_keys=True).encode("utf-8")


def _resolved_recipe(recipe: Any) -> dict[str, Any] | None:
    """The recipe's fields as a JSON-safe dict, when it is a dataclass (for the manifest)."""
    if not dataclasses.is_dataclass(recipe):
        return None
    return json.loads(_json_bytes(dataclasses.asdict(recipe)))


def export_shards(
    recipe_name: str,
    *,
    out_dir: str | Path,
    num: int,
    seed: int,
    size: int | None,
    shard_size: int,
    overrides: dict[str, Any] | None = None,
    epoch: int = 0,
    start: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Render samples ``start .. start+num-1`` and write them as WebDataset shards.

    Old ``shard-*.tar`` files and the manifest in ``out_dir`` are replaced.

    Args:
        recipe_name: a name from :func:`fractal_pretrain.recipes.list_recipes`.
        out_dir: directory for the shards and ``manifest.json`` (created if missing).
        num: number of samples, >= 1.
        seed: base seed of the renderer.
        size: image side in pixels (None: the recipe's default, ``recipes.default_size``).
        shard_size: samples per shard (webdataset ``maxcount``).
        overrides: recipe field overrides, as for :func:`fractal_pretrain.recipes.get_recipe`.
        epoch: epoch passed to the renderer.
        start: first global sample index.
        batch_size: samples rendered per ``render`` call.
        device: ``"cpu"``, ``"cpu-reference"`` or ``"cuda"``.
        num_threads: CPU threads of ``device="cpu"`` (None: every core); the images do not depend on it.
        progress: show a tqdm bar over samples with images/s (on stderr).

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        ConfigError: unknown recipe, override key or device (from the library).
        ValueError: non-positive ``num``, ``size``, ``shard_size`` or ``batch_size``, or
            negative ``start``/``epoch``.
    """
    from fractal_pretrain.recipes import default_size
    from fractal_pretrain.render import make_renderer

    overrides = dict(overrides or {})
    recipe = _single_view_recipe(recipe_name, overrides)
    size = default_size(recipe) if size is None else size
    _check_export_args(num=num, size=size, shard_size=shard_size, batch_size=batch_size, start=start, epoch=epoch)
    renderer = make_renderer(recipe, size=size, seed=seed, device=device, num_threads=num_threads)
    out_dir = Path(out_dir)
    _clear_export_dir(out_dir)
    shards, count = _write_shards(
        renderer,
        recipe,
        out_dir,
        range(start, start + num),
        epoch=epoch,
        shard_size=shard_size,
        batch_size=batch_size,
        progress=progress,
    )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "recipe": recipe.name,
        "overrides": overrides,
        "resolved_recipe": _resolved_recipe(recipe),
        "num_classes": int(recipe.num_classes),
        "multi_label": bool(recipe.multi_label),
        "seed": seed,
        "epoch": epoch,
        "start": start,
        "num": num,
        "size": size,
        "device": device,
        "shard_size": shard_size,
        "shards": shards,
        "count": count,
    }
    _write_manifest(out_dir, manifest)  # the manifest appears only when all shards are done
    return manifest


def _check_export_args(*, num: int, size: int, shard_size: int, batch_size: int, start: int, epoch: int) -> None:
    """ValueError naming the first count below 1 or index below 0."""
    for name, value in (("num", num), ("size", size), ("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("start", start), ("epoch", epoch)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if epoch > 2**32 - 1:  # the renderer's bound, checked before an existing export is cleared
        raise ValueError(f"epoch must be <= {2**32 - 1}, got {epoch}")


def _single_view_recipe(recipe_name: str, overrides: dict[str, Any]) -> Any:
    """The recipe with ``overrides``; a ConfigError for a two-view recipe (a shard sample holds one image)."""
    from fractal_pretrain.recipes import get_recipe

    recipe = get_recipe(recipe_name, overrides or None)
    if getattr(recipe, "views", 0):
        from fractal_pretrain.config import ConfigError

        raise ConfigError(f"recipe {recipe_name!r} has views={recipe.views}: shards hold one image per sample; "
                          "two-view recipes are rendered on the fly only")
    return recipe


def _clear_export_dir(out_dir: Path) -> None:
    """Creates ``out_dir`` and removes the manifest first, so that a half-replaced export is never taken for done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for old in out_dir.glob(SHARD_GLOB):
        old.unlink()


def _write_shards(
    renderer: Any,
    recipe: Any,
    out_dir: Path,
    indices: range,
    *,
    epoch: int,
    shard_size: int,
    batch_size: int,
    progress: bool,
) -> tuple[list[str], int]:
    """Renders ``indices`` batch by batch into ``shard-*.tar`` files; returns (shard names, samples written)."""
    import webdataset as wds
    from tqdm import tqdm

    shards: list[str] = []

    def _record_shard(fname: str) -> None:  # ShardWriter calls this after closing each shard
        shards.append(Path(fname).name)

    count = 0
    render_seconds = 0.0
    with (
        # the bar's rate is images/s written; the postfix is images/s of the renderer alone
        tqdm(total=len(indices), unit="img", desc=f"export {recipe.name}", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=getattr(renderer, "num_threads", 1)) as encoder,
        wds.ShardWriter(
            str(out_dir / SHARD_PATTERN), maxcount=shard_size, verbose=0, post=_record_shard
        ) as sink,
    ):
        for lo in range(indices.start, indices.stop, batch_size):
            batch_indices = np.arange(lo, min(lo + batch_size, indices.stop), dtype=np.int64)
            tick = time.perf_counter()
            batch = renderer.render(batch_indices, epoch=epoch)
            render_seconds += time.perf_counter() - tick
            pngs = list(encoder.map(encode_png, batch.images))
            for j, index in enumerate(batch_indices.tolist()):
                sink.write(_shard_sample(index, pngs[j], batch.metadata(j), batch.labels[j], recipe.multi_label))
                count += 1
            bar.set_postfix_str(f"render {count / max(render_seconds, 1e-9):.0f} img/s", refresh=False)
            bar.update(len(batch_indices))
    return shards, count


def _shard_sample(index: int, png: bytes, metadata: Any, label: Any, multi_label: bool) -> dict[str, Any]:
    """One webdataset sample: the PNG, the metadata JSON and the label (multi-hot ``.npy`` or class id text)."""
    sample: dict[str, Any] = {"__key__": sample_key(index), "png": png, "json": _json_bytes(metadata)}
    if multi_label:
        sample["multihot.npy"] = _npy_bytes(np.asarray(label, np.uint8))
    else:
        sample["cls"] = str(int(label)).encode("ascii")
    return sample


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """``out_dir/manifest.json``, written to a temporary file and renamed over."""
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, default=_json_default, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read ``out_dir/manifest.json``."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir} (is it an export directory?)")
    return json.loads(path.read_text())


def _shard_paths(out_dir: Path) -> list[Path]:
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        return [out_dir / name for name in load_manifest(out_dir)["shards"]]
    paths = sorted(out_dir.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {MANIFEST_NAME} and no {SHARD_GLOB} files in {out_dir}")
    return paths


def _to_sample(key: str, files: dict[str, bytes]) -> ExportedSample:
    if "multihot.npy" in files:
        label: int | np.ndarray = np.load(io.BytesIO(files["multihot.npy"]), allow_pickle=False)
    elif "cls" in files:
        label = int(files["cls"].decode("ascii"))
    else:
        raise ValueError(f"sample {key} has neither .cls nor .multihot.npy")
    return ExportedSample(
        key=key,
        index=int(key.rsplit("/", 1)[-1]),
        image=decode_png(files["png"]),
        label=label,
        meta=json.loads(files["json"]),
    )


def tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of one tar shard, grouped by webdataset's own functions (keys,
    lower-cased extensions, skipped ``__meta__`` files), so a listing counts exactly what a stream reads. A
    duplicate member in one sample raises ValueError, as in webdataset."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as stream:
        for sample in group_by_keys({**f, "__url__": str(path)} for f in tar_file_iterator(stream)):
            key = sample.pop("__key__")
            sample.pop("__url__")
            yield key, sample


def read_shards(out_dir: str | Path) -> Iterator[ExportedSample]:
    """Yield the samples of an export directory in write order.

    Shards come from ``manifest.json`` if present (else ``shard-*.tar`` sorted by name); samples
    from each tar in member order, grouped by key exactly as webdataset groups them.

    Args:
        out_dir: a directory written by :func:`export_shards`.

    Yields:
        :class:`ExportedSample` per sample.

    Raises:
        FileNotFoundError: no manifest and no shards in ``out_dir``.
    """
    for path in _shard_paths(Path(out_dir)):
        for key, files in tar_samples(path):
            yield _to_sample(key, files)
