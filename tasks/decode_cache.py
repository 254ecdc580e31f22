"""Stage decode_cache: decode every image once into memory-mapped uint8 arrays (`python -m tasks.decode_cache`).

JPEG decoding and resizing cost far more CPU than a GPU training step, so the
train stage must not redo them every epoch. This stage does them once, with a
process per core, and stores the pixels as plain .npy files that training
memory-maps (the OS pages in what a batch touches; nothing is loaded whole).

Layout of cache.dir (one folder per split, each a DVC output of its own, so
the train stage can depend on train/ and val/ without ever reading test/):

    <split>/eval.npy      uint8 (N, S, S, 3): the evaluation preprocessing at
                          train.image_size (tasks.preprocess.resize_and_crop),
                          i.e. exactly EvalDataset's pixels before normalising
    train/augment.npy     uint8 (N, M, M, 3), M = round(S * cache.margin): the
                          source of random resized crops (tasks.augment)
    <split>/labels.npy    int64 (N,)
    <split>/meta.json     each array's preprocessing, the split file's sha256
                          and a digest of its rows (checked by every reader)

The split files list every image's sha256, so they (with the preprocessing
params) key the cache: dvc.yaml declares them as deps.

Readers: `training_images` (what tasks.train calls: the cache when it matches,
else decoding), `load_arrays` / `open_split` (checked memory maps) and
`MappedImages` (batches out of a memory map, fast).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.format import open_memmap

from tasks.cli import StageError, progress, stage_main
from tasks.config import Params
from tasks.images import BadImage, load_rgb
from tasks.io import SPLITS, SplitRow, read_json, read_split, sha256_file, write_json
from tasks.preprocess import Preprocessing, resize_and_crop

if TYPE_CHECKING:
    import torch

log = logging.getLogger("decode_cache")

CACHE_FORMAT = 1
EVAL, AUGMENT = "eval", "augment"
# Images per task sent to a worker: large enough to amortise opening the
# memory maps, small enough that the cores finish together.
CHUNK = 64
# Only these fields change the stored pixels; mean/std are applied on the device.
GEOMETRY = ("crop_size", "resize_size", "interpolation")


@dataclass(frozen=True)
class Job:
    """A chunk of one split for one worker: decode rows[start:start+len(paths)] into every array."""

    raw_dir: Path
    split_dir: Path
    start: int
    paths: tuple[str, ...]
    preps: tuple[tuple[str, Preprocessing], ...]
    max_pixels: int


# --------------------------------------------------------------------------- what to store


def cache_preprocessings(params: Params) -> dict[str, Preprocessing]:
    """The arrays the train stage asks for: the eval crop and the larger square random crops come from."""
    # Imported here so the worker processes that decode never import torch.
    from tasks.data import train_preprocessing
    from tasks.models import default_preprocessing

    prep = default_preprocessing(params.model.arch, params.train.image_size)
    return {EVAL: prep, AUGMENT: train_preprocessing(prep, params.cache.margin)}


def split_variants(split: str, preps: dict[str, Preprocessing]) -> dict[str, Preprocessing]:
    """Every split gets the eval crop; only train needs the margin for random crops."""
    return {name: p for name, p in preps.items() if name == EVAL or split == "train"}


def rows_digest(rows: Sequence[SplitRow]) -> str:
    """Hash of a split's rows in order: a cache built from other rows is stale."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.path}\t{row.label}\t{row.sha256}\n".encode())
    return digest.hexdigest()


def geometry(prep: Preprocessing) -> dict[str, Any]:
    return {key: getattr(prep, key) for key in GEOMETRY}


# --------------------------------------------------------------------------- building


def build_cache(prepared_dir: Path, raw_dir: Path, out_dir: Path, preps: dict[str, Preprocessing], *,
                splits: Sequence[str] = SPLITS, max_pixels: int = 89_478_485, workers: int = 0) -> dict[str, Any]:
    """Decode every split into out_dir; built beside it and swapped in whole, so a crash leaves no half cache."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {}
    try:
        for split in splits:
            split_file = Path(prepared_dir) / f"{split}.csv"
            summary[split] = build_split(split_file, Path(raw_dir), tmp / split, split_variants(split, preps),
                                         max_pixels=max_pixels, workers=workers, desc=f"decoding {split}")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def build_split(split_file: Path, raw_dir: Path, split_dir: Path, preps: dict[str, Preprocessing], *,
                max_pixels: int, workers: int, desc: str) -> dict[str, Any]:
    """One split's arrays, labels and meta.json in split_dir; meta.json is written last."""
    rows = read_split(split_file)
    split_dir.mkdir(parents=True)
    n = len(rows)
    for name, prep in preps.items():
        # open_memmap sizes the file up front; the workers fill it in place.
        open_memmap(split_dir / f"{name}.npy", mode="w+", dtype=np.uint8,
                    shape=(n, prep.crop_size, prep.crop_size, 3)).flush()
    np.save(split_dir / "labels.npy", np.asarray([r.label for r in rows], dtype=np.int64))
    jobs = [Job(raw_dir, split_dir, start, tuple(r.path for r in rows[start:start + CHUNK]),
                tuple(preps.items()), max_pixels) for start in range(0, n, CHUNK)]
    run_jobs(jobs, workers or os.cpu_count() or 1, desc, n)
    for name in preps:
        fsync_file(split_dir / f"{name}.npy")
    meta = {
        "format": CACHE_FORMAT,
        "n_images": n,
        "split_file": str(split_file),
        "split_sha256": sha256_file(split_file),
        "rows_sha256": rows_digest(rows),
        "raw_dir": str(raw_dir),
        "arrays": {name: {"file": f"{name}.npy", "shape": [n, p.crop_size, p.crop_size, 3], **geometry(p)}
                   for name, p in preps.items()},
        "labels": "labels.npy",
    }
    write_json(split_dir / "meta.json", meta)
    return {"n_images": n, "arrays": list(preps)}


def run_jobs(jobs: list[Job], workers: int, desc: str, n_images: int) -> None:
    """Decode the chunks in a process pool (Pillow holds the GIL for part of its work), with a progress bar."""
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(decode_chunk, job) for job in jobs]
        try:
            for _ in progress(_images_done(futures), desc=desc, total=n_images, unit="img"):
                pass
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _images_done(futures: list[Future]) -> Iterator[None]:
    """One item per decoded image, as chunks finish; the first bad image stops the build."""
    for future in as_completed(futures):
        done, error = future.result()
        if error:
            raise StageError(f"{error}; the raw data changed since prepare ran: re-run it (dvc repro prepare)")
        yield from (None for _ in range(done))


def decode_chunk(job: Job) -> tuple[int, str]:
    """Worker: decode, resize and write one chunk; returns (images done, error message or '')."""
    arrays = [(np.load(job.split_dir / f"{name}.npy", mmap_mode="r+"), prep) for name, prep in job.preps]
    try:
        for offset, rel in enumerate(job.paths):
            # BadImage does not survive pickling back to the parent; its message does.
            img = load_rgb(job.raw_dir / rel, job.max_pixels)
            for array, prep in arrays:
                array[job.start + offset] = np.asarray(resize_and_crop(img, prep), dtype=np.uint8)
    except BadImage as err:
        return 0, str(err)
    # No flush here: msync of a shared mapping writes the whole file's dirty pages,
    # which serialises the workers on the disk; the parent fsyncs each file once.
    return len(job.paths), ""


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder in for the old one with renames; the old one is deleted after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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
    """Drop-in for tasks.data.decode_arrays: one memory-mapped array per preprocessing, checked against rows."""
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

    def __init__(self, array: np.ndarray, pin: bool = False) -> None:
        self.array, self.pin = array, pin
        self.shape = tuple(array.shape)

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
    except (FileNotFoundError, StageError) as err:
        log.warning("%s; decoding the %s images in memory instead", err, split)
        from tasks.data import decode_arrays

        arrays = decode_arrays(list(rows), params.data.raw_dir, preps, max_pixels=params.prepare.max_pixels,
                               workers=params.train.num_workers, desc=f"decoding {split}")
    return [MappedImages(array, pin) for array in arrays]


# --------------------------------------------------------------------------- stage


def run(params: Params) -> dict[str, Any]:
    """The stage: every split of data.prepared_dir into cache.dir."""
    preps = cache_preprocessings(params)
    summary = build_cache(params.data.prepared_dir, params.data.raw_dir, params.cache.dir, preps,
                          max_pixels=params.prepare.max_pixels, workers=params.cache.num_workers)
    log.info("decoded cache in %s: %s", params.cache.dir,
             ", ".join(f"{split} {info['n_images']} images" for split, info in summary.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Decode every image of the splits once into memory-mapped uint8 arrays.", argv)


if __name__ == "__main__":
    sys.exit(main())
