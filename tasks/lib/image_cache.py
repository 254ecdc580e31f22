"""The decoded image cache: its format, and reading it back fast.

`python -m tasks.decode_cache` writes it, one folder per split of cache.out_dir: `eval.<k>.npy` uint8 (n_k, S, S, 3)
segments with exactly EvalDataset's pixels before normalising (tasks.lib.preprocess.resize_and_crop) and
`eval.rows.npy`, where split row i lies in them; for train also `augment.*`, rows round(S * cache.margin) wide, the
source of random resized crops; `labels.npy`; and `meta.json` (segments, preprocessing, the split file's sha256 and
a digest of its rows, checked by every reader). The segments are hard links into the row store
(tasks.lib.row_store), so a retrain that adds images adds a segment instead of rewriting the array.

Torch is imported only where a batch is made, so the stage's decoding workers never import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import read_json
from tasks.lib.preprocess import Preprocessing
from tasks.lib.split_files import SplitRow

if TYPE_CHECKING:
    import torch

CACHE_FORMAT = 2         # 2: segments and a rows file per array
EVAL, AUGMENT = "eval", "augment"
# Only these fields change the stored pixels; mean/std are applied on the device.
GEOMETRY = ("crop_size", "resize_size", "interpolation")


def split_variants(split: str, preps: dict[str, Preprocessing]) -> dict[str, Preprocessing]:
    """Every split gets the eval crop; only train needs the margin for random crops."""
    return {name: p for name, p in preps.items() if name == EVAL or split == "train"}


def rows_digest(rows: Iterable[SplitRow]) -> str:
    """Hash of a split's rows in order: a cache built from other rows is stale."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.path}\t{row.label}\t{row.sha256}\n".encode())
    return digest.hexdigest()


def geometry(prep: Preprocessing) -> dict[str, Any]:
    return {key: getattr(prep, key) for key in GEOMETRY}


def read_meta(cache_dir: Path | str, split: str) -> dict[str, Any]:
    path = Path(cache_dir) / split / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: decoded cache not found; build it with `dvc repro decode_cache` "
                                f"(or `python -m tasks.decode_cache`)")
    meta = read_json(path)
    if meta.get("format") != CACHE_FORMAT:
        raise StageError(f"{path}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT}; "
                         f"rebuild it with `dvc repro decode_cache`")
    return meta


def open_split(cache_dir: Path | str, split: str, variant: str = EVAL) -> tuple[np.ndarray | SegmentedRows, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of one split, memory-mapped: a plain memory map when the array is one
    segment in split order (a build from scratch), else a `SegmentedRows` over its segments."""
    meta = read_meta(cache_dir, split)
    split_dir = Path(cache_dir) / split
    if variant not in meta["arrays"]:
        raise StageError(f"{split_dir}: no {variant!r} array (has {sorted(meta['arrays'])}); "
                         f"rebuild with `dvc repro decode_cache`")
    info = meta["arrays"][variant]
    broken = (f"{split_dir}: the {variant} arrays do not match meta.json (a partial copy?); "
              f"rebuild with `dvc repro decode_cache`")
    try:
        segments = [np.load(split_dir / name, mmap_mode="r") for name in info["segments"]]
        position = np.load(split_dir / info["rows"])
    except (OSError, ValueError) as err:
        raise StageError(f"{broken} ({err})") from None
    labels = np.load(split_dir / meta["labels"])
    shape = tuple(info["shape"])
    if (any(s.shape[1:] != shape[1:] or s.dtype != np.uint8 for s in segments) or position.shape != shape[:1]
            or len(labels) != meta["n_images"] or shape[0] != meta["n_images"]):
        raise StageError(broken)
    images = SegmentedRows(segments, position)
    if len(position) and (position.min() < 0 or position.max() >= images.stored):
        raise StageError(broken)
    plain = images.plain()
    return (images if plain is None else plain), labels


class SegmentedRows:
    """An array whose rows lie in several segment arrays: row i is row position[i] of their concatenation
    (a decoded-cache array after incremental builds)."""

    def __init__(self, segments: Sequence[np.ndarray], position: np.ndarray) -> None:
        self.segments, self.position = list(segments), np.asarray(position, dtype=np.int64)
        self.starts = np.cumsum([0] + [len(s) for s in self.segments])
        self.stored = int(self.starts[-1])
        row_shape = self.segments[0].shape[1:] if self.segments else ()
        self.shape, self.dtype = (len(self.position), *row_shape), np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.position)

    def plain(self) -> np.ndarray | None:
        """The one segment itself when it holds exactly the rows in order, else None."""
        if (len(self.segments) == 1 and len(self.segments[0]) == len(self.position)
                and np.array_equal(self.position, np.arange(len(self.position)))):
            return self.segments[0]
        return None

    def take(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows (checked by the caller) into out, a segment at a time; whole rows copied, no per-pixel work."""
        at = self.position[rows]
        if len(self.segments) == 1:
            return np.take(self.segments[0], at, axis=0, out=out, mode="clip")
        segment = np.searchsorted(self.starts, at, side="right") - 1
        for s in np.unique(segment):
            mine = np.flatnonzero(segment == s)
            out[mine] = np.take(self.segments[s], at[mine] - self.starts[s], axis=0)
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.asarray([index])][0]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        rows = np.where(rows < 0, rows + len(self), rows)
        return self.take(rows, np.empty((len(rows), *self.shape[1:]), dtype=np.uint8))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def load_arrays(cache_dir: Path | str, split: str, rows: Sequence[SplitRow],
                preps: Sequence[Preprocessing]) -> list[np.ndarray | SegmentedRows]:
    """One memory-mapped array per preprocessing, checked against rows."""
    meta = read_meta(cache_dir, split)
    if meta["rows_sha256"] != rows_digest(rows):
        raise StageError(f"{Path(cache_dir) / split}: built from other {split} rows than "
                         f"{meta['split_file']} has now; rebuild with `dvc repro decode_cache`")
    return [open_split(cache_dir, split, find_variant(meta, prep, Path(cache_dir) / split))[0]
            for prep in preps]


def find_variant(meta: dict[str, Any], prep: Preprocessing, where: Path) -> str:
    """The stored array made with prep's geometry; a clear error when the params changed since the build."""
    wanted = geometry(prep)
    for name, info in meta["arrays"].items():
        if {key: info[key] for key in GEOMETRY} == wanted:
            return name
    have = {name: {key: info[key] for key in GEOMETRY} for name, info in meta["arrays"].items()}
    raise StageError(f"{where}: no array with preprocessing {wanted} (cache has {have}); train.image_size or "
                     f"cache.margin changed since the build: rebuild with `dvc repro decode_cache`")


class MappedImages:
    """A memory-mapped uint8 NHWC array (or SegmentedRows) that hands out batches as torch tensors, fast:
    np.take copies whole rows (a few ms), where torch's indexing copies element by element (90 ms a batch)."""

    def __init__(self, array: np.ndarray | SegmentedRows, pin: bool = False, keys: Sequence[str] | None = None,
                 pixels: str = "") -> None:
        self.array, self.pin = array, pin
        self.shape = tuple(array.shape)
        # What tasks.training.features keys stored backbone features by: each row's content hash and how the
        # pixels were made (tasks.lib.row_store.variant_key).
        self.keys, self.pixels = keys, pixels

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        import torch

        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        if isinstance(self.array, SegmentedRows):
            self.array.take(rows, out.numpy())
        else:   # mode="clip" (indices are checked above) lets np.take write straight into out, unbuffered
            np.take(self.array, rows, axis=0, out=out.numpy(), mode="clip")
        return out


def training_images(params: Params, split: str, rows: Sequence[SplitRow], preps: Sequence[Preprocessing],
                    pin: bool = False) -> list[MappedImages]:
    """The train stage's images of one split: the decode_cache stage's arrays, checked before use (a cache
    built from other rows, another geometry or another cache.jpeg_draft is an error that says to rebuild it)."""
    out_dir = Path(params.cache.out_dir)
    arrays = load_arrays(out_dir, split, rows, preps)
    meta = read_meta(out_dir, split)
    drafted = any(info["jpeg_draft_size"] for info in meta["arrays"].values())
    if drafted != params.cache.jpeg_draft:
        raise StageError(f"{out_dir / split}: built with cache.jpeg_draft {str(drafted).lower()}, but it is "
                         f"{str(params.cache.jpeg_draft).lower()} now: rebuild with `dvc repro decode_cache`")
    keys = [row.sha256 for row in rows]
    return [MappedImages(array, pin, keys, meta["arrays"][find_variant(meta, p, out_dir)]["pixels"])
            for array, p in zip(arrays, preps)]
