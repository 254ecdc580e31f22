"""The decoded image cache: its format, and reading it back fast.

`python -m tasks.decode_cache` (the stage) writes it; the train stage reads it
through `training_images`. Layout of cache.dir, one folder per split:

    <split>/eval.npy      uint8 (N, S, S, 3): the evaluation preprocessing at
                          train.image_size (tasks.lib.preprocess.resize_and_crop),
                          i.e. exactly EvalDataset's pixels before normalising
    train/augment.npy     uint8 (N, M, M, 3), M = round(S * cache.margin): the
                          source of random resized crops (tasks.lib.augment)
    <split>/labels.npy    int64 (N,)
    <split>/meta.json     each array's preprocessing, the split file's sha256
                          and a digest of its rows (checked by every reader)

Readers: `training_images` (the cache when it matches, else decoding),
`load_arrays` / `open_split` (checked memory maps) and `MappedImages` (batches
out of a memory map, fast). Torch is imported only where a batch is made, so
the stage's decoding workers never import it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.lib.cli import StageError
from tasks.lib.config import Params
from tasks.lib.io import SplitRow, read_json
from tasks.lib.preprocess import Preprocessing
from tasks.lib.row_store import variant_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger("decode_cache")

CACHE_FORMAT = 1
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


# --------------------------------------------------------------------------- reading


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


def open_split(cache_dir: Path | str, split: str, variant: str = EVAL,
               mmap_mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of one split, memory-mapped: pages load as batches touch them.

    mmap_mode "c" (copy-on-write) gives a writable view, which torch.from_numpy
    accepts without a warning; the file itself is never changed.
    """
    meta = read_meta(cache_dir, split)
    split_dir = Path(cache_dir) / split
    if variant not in meta["arrays"]:
        raise StageError(f"{split_dir}: no {variant!r} array (has {sorted(meta['arrays'])}); "
                         f"rebuild with `dvc repro decode_cache`")
    images = np.load(split_dir / meta["arrays"][variant]["file"], mmap_mode=mmap_mode)
    labels = np.load(split_dir / meta["labels"])
    if images.shape != tuple(meta["arrays"][variant]["shape"]) or len(labels) != meta["n_images"]:
        raise StageError(f"{split_dir}: arrays do not match meta.json (a partial copy?); "
                         f"rebuild with `dvc repro decode_cache`")
    return images, labels


def load_arrays(cache_dir: Path | str, split: str, rows: Sequence[SplitRow], preps: Sequence[Preprocessing],
                mmap_mode: str = "r") -> list[np.ndarray]:
    """Drop-in for tasks.lib.data.decode_arrays: one memory-mapped array per preprocessing, checked against rows."""
    meta = read_meta(cache_dir, split)
    if meta["rows_sha256"] != rows_digest(rows):
        raise StageError(f"{Path(cache_dir) / split}: built from other {split} rows than "
                         f"{meta['split_file']} has now; rebuild with `dvc repro decode_cache`")
    return [open_split(cache_dir, split, find_variant(meta, prep, Path(cache_dir) / split), mmap_mode)[0]
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
    """A memory-mapped uint8 NHWC array that hands out batches as torch tensors, fast.

    torch's indexing copies a uint8 batch element by element (about 90 ms for
    256 images of 258 px on one thread: the GPU waited on it); np.take copies
    whole rows (a few ms). With pin=True the batch lands in pinned memory,
    ready for a non-blocking copy; torch's pinned allocator holds it until
    that copy is done. Supports what the training loop uses: len(), .shape and
    [index tensor | slice].
    """

    def __init__(self, array: np.ndarray, pin: bool = False, keys: Sequence[str] | None = None, pixels: str = "",
                 features_dir: Path | None = None) -> None:
        self.array, self.pin = array, pin
        self.shape = tuple(array.shape)
        # What tasks.training.features keys stored backbone features by: each row's content hash, how the
        # pixels were made (tasks.lib.row_store.variant_key) and where the features are kept.
        self.keys, self.pixels, self.features_dir = keys, pixels, features_dir

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        import torch

        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        # mode="clip" (indices are checked above) lets np.take write straight into out, unbuffered.
        np.take(self.array, rows, axis=0, out=out.numpy(), mode="clip")
        return out


def training_images(params: Params, split: str, rows: Sequence[SplitRow], preps: Sequence[Preprocessing],
                    pin: bool = False) -> list[MappedImages]:
    """The train stage's images of one split: from the cache when it matches rows and preprocessing, else decoded now.

    The cache is verified before use (rows digest, array geometry), so a stale
    one is never read; decoding instead is correct, only slower, and says so.
    """
    try:
        arrays = load_arrays(params.cache.dir, split, rows, preps)
        meta = read_meta(params.cache.dir, split)
        pixels = [meta["arrays"][find_variant(meta, p, Path(params.cache.dir))].get("pixels", "") for p in preps]
    except (FileNotFoundError, StageError) as err:
        log.warning("%s; decoding the %s images in memory instead", err, split)
        from tasks.lib.data import decode_arrays

        arrays = decode_arrays(list(rows), params.data.raw_dir, preps, limits=params.prepare.limits(),
                               workers=params.train.num_workers, desc=f"decoding {split}")
        pixels = [variant_key(p, None) for p in preps]
    keys = [row.sha256 for row in rows]
    return [MappedImages(array, pin, keys, key, params.cache.features_dir) if key else MappedImages(array, pin)
            for array, key in zip(arrays, pixels)]
