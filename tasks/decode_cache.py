"""Stage decode_cache: decode every image once into memory-mapped uint8 arrays (`python -m tasks.decode_cache`).

Decoding and resizing cost far more CPU than a GPU training step, so this stage does them once, a process
per core, into .npy files training memory-maps (format and readers: `tasks.lib.image_cache`).
Incremental: decoded rows stay in `cache.store_dir` as immutable segments (`tasks.lib.row_store`); a
build hard-links the segments of unchanged images and decodes only new ones, and reads back identical to a
build from scratch. Nothing is reused unchecked: each image's bytes must match the split file's sha256,
and a stored segment's checksums are verified before it is linked or copied. `cache.jpeg_draft` decodes
JPEGs at a reduced scale; without it the pixels are exactly what evaluate and predict compute.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.lib.cli import stage_main
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.image_cache import AUGMENT, CACHE_FORMAT, EVAL, geometry, rows_digest, split_variants
from tasks.lib.images import BadImage, ImageLimits, load_rgb
from tasks.lib.io import process_alive, sha256_file, storage_error, write_json
from tasks.lib.parallel import imap_unordered, worker_count
from tasks.lib.preprocess import Preprocessing, imagenet_preprocessing, resize_and_crop, train_preprocessing
from tasks.lib.progress import progress
from tasks.lib.row_store import (SegmentWriter, SplitPlan, copy_runs, index_keys, link_or_copy, plan_split,
                                 prune_segments, prune_variants, read_uses, stored_rows, variant_key, write_uses)
from tasks.lib.segment_checks import drop_segment, failing_segments
from tasks.lib.split_files import SPLITS, SplitColumns, read_split_columns

log = logging.getLogger("decode_cache")

# Images per task sent to a worker: large enough to amortise the task, small
# enough that the cores finish together and little is in flight.
CHUNK = 64


@dataclass(frozen=True)
class Target:
    """One array a worker writes rows into: the file, where its data starts, the row size and the preprocessing."""

    path: Path
    offset: int
    row_bytes: int
    prep: Preprocessing


@dataclass(frozen=True)
class Job:
    """A chunk of one split for one worker: decode these files, each into its row (slot) of every target."""

    raw_dir: Path
    rows: tuple[tuple[str, str, tuple[int, ...]], ...]     # (path, sha256 from the split file, its row in each target)
    targets: tuple[Target, ...]
    limits: ImageLimits
    draft_size: int | None


def cache_preprocessings(params: Params) -> dict[str, Preprocessing]:
    """The arrays the train stage asks for: the eval crop and the larger square random crops come from.
    Without importing torch (under load 20 s and 650 MB here, more than decoding a few thousand images)."""
    prep = imagenet_preprocessing(params.train.image_size)
    return {EVAL: prep, AUGMENT: train_preprocessing(prep, params.cache.margin)}


def build_cache(prepared_dir: Path, raw_dir: Path, out_dir: Path, preps: dict[str, Preprocessing], *,
                splits: Sequence[str] = SPLITS, limits: ImageLimits = ImageLimits(), workers: int = 0,
                store_dir: Path | None = None, draft: bool = False) -> dict[str, Any]:
    """Decode every split into out_dir; built beside it and swapped in whole, so a crash leaves no half cache.
    store_dir keeps the rows for the next build (None: every image is decoded); draft: JPEG draft decoding."""
    out_dir = Path(out_dir)
    remove_abandoned_builds(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    store = Path(store_dir) if store_dir else tmp / ".rows"
    # One JPEG draft size for every split (the largest resize), so a row's pixels never depend on its split.
    draft_size = max(p.resize_size for p in preps.values()) if draft else None
    summary: dict[str, Any] = {}
    verified: set[Path] = set()       # segments checked by this build (splits share segments)
    try:
        for split in splits:
            split_file = Path(prepared_dir) / f"{split}.csv"
            summary[split] = build_split(split_file, Path(raw_dir), tmp / split, split_variants(split, preps),
                                         limits=limits, draft_size=draft_size, store_dir=store, workers=workers,
                                         desc=f"decoding {split}", verified=verified)
        shutil.rmtree(tmp / ".rows", ignore_errors=True)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if store_dir:
        keys = [variant_key(p, draft_size) for p in preps.values()]
        for key in keys:
            prune_segments(store / key)
        prune_variants(store, keys)
    return summary


def build_split(split_file: Path, raw_dir: Path, split_dir: Path, preps: dict[str, Preprocessing], *,
                limits: ImageLimits, draft_size: int | None, store_dir: Path, workers: int, desc: str,
                verified: set[Path]) -> dict[str, Any]:
    """One split's arrays, labels and meta.json (last) in split_dir: each array is the stored segments of its
    unchanged images (hard-linked) plus one new segment, and a rows file (split row -> place in them)."""
    rows = read_split_columns(split_file)      # columns: memory must not grow by an object per image
    split_dir.mkdir(parents=True)
    split = split_dir.name
    reusable, plans, stored = plan_checked(rows.sha256, preps, store_dir, draft_size, split, workers, verified)
    to_decode = np.flatnonzero(~reusable)
    writers = {name: SegmentWriter(store_dir, split, preps[name], draft_size, plan.new_size)
               for name, plan in plans.items() if plan.new_size}
    try:
        for name, writer in writers.items():
            for source, source_start, start, count in copy_runs(plans[name]):
                writer.copy_rows(stored[name][source], source_start, start, count)
        decode_rows(raw_dir, rows, to_decode, {name: (w, preps[name], plans[name]) for name, w in writers.items()},
                    limits=limits, draft_size=draft_size, workers=workers, desc=desc, split_file=split_file)
        new = {name: [writer.publish(rows.sha256, plans[name].new_rows)] for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    arrays = {}
    for name, prep in preps.items():
        segments = [stored[name][i] for i in plans[name].kept] + new.get(name, [])
        arrays[name] = link_segments(split_dir, name, segments, plans[name].position)
        write_uses(Path(store_dir) / variant_key(prep, draft_size), split, segments)
    np.save(split_dir / "labels.npy", rows.labels)
    write_meta(split_dir, split_file, raw_dir, rows, preps, draft_size, arrays)
    n, copied = len(rows), max(len(plan.copies) for plan in plans.values())
    log.info("%s: %d images, %d decoded, %d read from %s (%d of them copied into the new segment)", split, n,
             len(to_decode), n - len(to_decode), store_dir, copied)
    return {"n_images": n, "arrays": list(preps), "decoded": len(to_decode), "reused": n - len(to_decode),
            "copied": copied, "segments": {name: len(files) for name, files in arrays.items()}}


def plan_arrays(shas: np.ndarray, preps: dict[str, Preprocessing], store_dir: Path, draft_size: int | None,
                split: str) -> tuple[np.ndarray, dict[str, SplitPlan], dict[str, list[Path]]]:
    """(per row: stored in every array?, each array's plan, its stored segment files); a row is reused only if
    every array has it: decoding makes all of them at once."""
    wanted, found, stored = index_keys(shas), {}, {}
    for name, prep in preps.items():      # one variant's index in memory at a time
        variant_dir = Path(store_dir) / variant_key(prep, draft_size)
        index = stored_rows(variant_dir, prefer=read_uses(variant_dir, split))
        found[name], stored[name] = index.find(wanted), (index.files, index.sizes)
        del index
    reusable = np.logical_and.reduce([f[0] for f in found.values()])
    plans = {name: plan_split(stored[name][1], reusable, *found[name][1:]) for name in preps}
    return reusable, plans, {name: files for name, (files, _) in stored.items()}


def plan_checked(shas: np.ndarray, preps: dict[str, Preprocessing], store_dir: Path, draft_size: int | None,
                 split: str, workers: int, verified: set[Path]
                 ) -> tuple[np.ndarray, dict[str, SplitPlan], dict[str, list[Path]]]:
    """plan_arrays, over stored segments whose rows match their checksums: a segment the plan would link or
    copy from that fails is dropped from the store (with a warning naming it), and the split planned again."""
    while True:
        reusable, plans, stored = plan_arrays(shas, preps, store_dir, draft_size, split)
        read = {stored[name][int(i)] for name, plan in plans.items() for i in (*plan.kept, *np.unique(plan.copy_from))}
        failing = failing_segments(sorted(read - verified), worker_count(workers))
        verified |= read - set(failing)
        if not failing:
            return reusable, plans, stored
        for segment, why in failing.items():
            drop_segment(segment, why)


def decode_rows(raw_dir: Path, rows: SplitColumns, to_decode: np.ndarray,
                targets: dict[str, tuple[SegmentWriter, Preprocessing, SplitPlan]], *, limits: ImageLimits,
                draft_size: int | None, workers: int, desc: str, split_file: Path) -> None:
    """Decode the split rows to_decode into their places in the new segments, a chunk per worker task. Each
    file is hashed as it is decoded: changed bytes would put another image's pixels under its sha256 for good."""
    writes = tuple(Target(w.path, w.offset, w.row_bytes, prep) for w, prep, _ in targets.values())
    plans = [plan for _, _, plan in targets.values()]

    def job(part: np.ndarray) -> Job:
        slots = np.stack([plan.slots(part) for plan in plans], axis=1).tolist()   # each row's place in each
        return Job(raw_dir, tuple((rows.paths[i], rows.sha256[i].decode(), tuple(s)) for i, s in zip(part, slots)),
                   writes, limits, draft_size)

    jobs = (job(to_decode[at:at + CHUNK]) for at in range(0, len(to_decode), CHUNK))
    for _ in progress(_images_done(jobs, workers, split_file), desc=desc, total=len(to_decode), unit="img"):
        pass


def link_segments(split_dir: Path, name: str, segments: list[Path], position: np.ndarray) -> list[str]:
    """Hard-link an array's segments into the split's folder and write its rows file; the segments' file names."""
    names = []
    for k, segment in enumerate(segments):
        target = split_dir / f"{name}.{k}.npy"
        try:
            link_or_copy(segment, target)
        except FileNotFoundError:
            raise StageError(f"{segment}: removed while this build used it (another decode_cache build pruned "
                             f"the store {segment.parent.parent}?); run the stage again") from None
        names.append(target.name)
    np.save(split_dir / f"{name}.rows.npy", position)
    return names


def write_meta(split_dir: Path, split_file: Path, raw_dir: Path, rows: SplitColumns,
               preps: dict[str, Preprocessing], draft_size: int | None, segments: dict[str, list[str]]) -> None:
    """meta.json, written last: what each array holds and which split rows built it (readers check both)."""
    n = len(rows)
    write_json(split_dir / "meta.json", {
        "format": CACHE_FORMAT,
        "n_images": n,
        "split_file": str(split_file),
        "split_sha256": sha256_file(split_file),
        "rows_sha256": rows_digest(rows),
        "raw_dir": str(raw_dir),
        "arrays": {name: {"segments": segments[name], "rows": f"{name}.rows.npy",
                          "shape": [n, p.crop_size, p.crop_size, 3], **geometry(p),
                          "jpeg_draft_size": draft_size, "pixels": variant_key(p, draft_size)}
                   for name, p in preps.items()},
        "labels": "labels.npy",
    })


def _images_done(jobs: Iterator[Job], workers: int, split_file: Path) -> Iterator[None]:
    """One item per decoded image, as chunks finish; the first bad image stops the build."""
    for done, error, storage in imap_unordered(decode_chunk, jobs, worker_count(workers)):
        if storage:    # the cache's disk, not the data: prepare cannot help
            raise StageError(error)
        if error:
            raise StageError(f"{error}; the raw data changed since prepare wrote {split_file}: re-run it "
                             f"(dvc repro prepare)")
        yield from (None for _ in range(done))


def decode_chunk(job: Job) -> tuple[int, str, bool]:
    """Worker: decode, resize and write one chunk at its rows' offsets; returns (images done, error naming the
    file, whether the error is the cache's disk or permissions)."""
    # Draft pixels are approximate already; resampling only what the crop keeps is a third of the resize cost.
    draft = job.draft_size is not None
    fds = [os.open(t.path, os.O_WRONLY) for t in job.targets]
    try:
        for rel, sha256, slots in job.rows:
            path = os.path.join(job.raw_dir, rel)     # a str: pathlib would intern every file name
            try:
                img = load_rgb(path, job.limits.max_pixels, max_aspect_ratio=job.limits.max_aspect_ratio,
                               max_file_bytes=job.limits.max_file_bytes, draft_size=job.draft_size, sha256=sha256)
                pixels = [np.asarray(resize_and_crop(img, target.prep, resample_crop_only=draft), dtype=np.uint8)
                          for target in job.targets]
            except BadImage as err:     # BadImage does not survive pickling back to the parent; its message does
                return 0, str(err), False
            except Exception as err:    # MemoryError included: name the file instead of a bare traceback
                return 0, f"{path}: {type(err).__name__}: {err}", False
            for fd, target, row, slot in zip(fds, job.targets, pixels, slots):
                try:
                    os.pwrite(fd, row.tobytes(), target.offset + slot * target.row_bytes)
                except OSError as err:
                    return 0, str(storage_error(err, target.path)), True
    finally:
        for fd in fds:
            os.close(fd)
    # No fsync here: the parent fsyncs each file once, when every row is in.
    return len(job.rows), "", False


def remove_abandoned_builds(out_dir: Path) -> None:
    """Delete the temporary folders (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) of builds whose process is gone:
    a killed build cannot clean up after itself, and each such folder holds a whole cache."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = folder.name.removeprefix(f".{out_dir.name}.").partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not process_alive(int(pid)):
            log.info("removing %s, left by a build that was stopped (process %s is gone)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder in for the old one with renames; the old one is deleted after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def run(params: Params) -> dict[str, Any]:
    """The stage: every split of data.prepared_dir into cache.out_dir."""
    preps = cache_preprocessings(params)
    summary = build_cache(params.data.prepared_dir, params.data.raw_dir, params.cache.out_dir, preps,
                          limits=params.prepare.limits(), workers=params.cache.num_workers,
                          store_dir=params.cache.store_dir, draft=params.cache.jpeg_draft)
    log.info("decoded cache in %s: %s", params.cache.out_dir, ", ".join(
        f"{split} {info['n_images']} images ({info['decoded']} decoded)" for split, info in summary.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Decode every image of the splits once into memory-mapped uint8 arrays.", argv)


if __name__ == "__main__":
    sys.exit(main())
