"""Decoded rows kept between builds of the decoded cache as immutable segments, so a build costs what changed.

DVC deletes a stage's outputs before running it, so decode_cache keeps its rows here (`cache.store_dir`,
git-ignored) and hard-links them into its outputs. One folder per variant (`variant_key`: anything that changes
the pixels) holds segments `<split>.<build>.npy` (uint8 rows), `.keys.npy` (each row's sha256) and `.sum.json`
(checksums, tasks.lib.segment_checks: written last, so a segment without them is unfinished and never read);
`<split>.uses.json` lists the segments the split's last build reads, in order.

Verify before reuse: keys are checked whenever the index is read, rows (`failing_segments`) before a build
links or copies them; a segment that fails is dropped with a warning naming it and its images are decoded again.

A build (`plan_split`) keeps the segments holding its unchanged images and writes one new segment, so adding 1%
of images writes 1% of the rows. A segment the split uses less than 1/GARBAGE_FACTOR of is merged into the new
one, and beyond MAX_SEGMENTS all but the largest are: garbage stays bounded and copying is amortised. Unused
segments are deleted after each build (`prune_segments`); KEEP_VARIANTS variants are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from numpy.lib.format import open_memmap

from tasks.lib.io import atomic_path, sha256_file, write_json
from tasks.lib.preprocess import Preprocessing
from tasks.lib.segment_checks import drop_segment, read_sums, seal_segment, sums_path

log = logging.getLogger(__name__)

ROW_FORMAT = 2            # bump when the decoding or the segment files change (2: checksums)
KEEP_VARIANTS = 4
MAX_SEGMENTS = 8          # segments one split reads from; beyond it the small ones are merged
GARBAGE_FACTOR = 2.0      # a segment holding more than this times the rows a split uses from it is merged
STALE_INCOMPLETE_S = 86400   # an incomplete segment this old belongs to no running build


def variant_key(prep: Preprocessing, draft_size: int | None) -> str:
    """What the stored pixels depend on; mean/std are not among them (applied later, on the device)."""
    recipe = (f"rows{ROW_FORMAT}/pillow{PIL.__version__}/crop{prep.crop_size}/resize{prep.resize_size}/"
              f"{prep.interpolation}/draft{draft_size or 0}" + ("/cropbox" if draft_size else ""))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


KEY_BYTES = 16           # the index keeps each sha256's first 128 bits: odds of a false match are about 1e-27
INDEX_CHUNK = 65536      # keys converted at a time


# --------------------------------------------------------------------------- finding stored rows


@dataclass(frozen=True)
class StoredRows:
    """Every stored row of one variant, sorted by content hash: numpy arrays, 24 bytes a row."""

    files: list[Path]        # the segments' data files
    sizes: list[int]         # rows in each
    keys: np.ndarray         # S16: the first KEY_BYTES of each sha256, raw, sorted
    file_index: np.ndarray   # int32, into files
    row: np.ndarray          # int32, row within that file

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, file index, row) for each wanted key (`index_keys` of the sha256s), by binary search; a key
        stored in several segments is found in the first of them in `files` order."""
        if not len(self.keys):
            nowhere = np.zeros(len(wanted), dtype=np.int32)
            return np.zeros(len(wanted), dtype=bool), nowhere, nowhere
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        return self.keys[at] == wanted, self.file_index[at], self.row[at]


_NIBBLE = np.zeros(256, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def index_keys(hex_shas: np.ndarray) -> np.ndarray:
    """S64 hex sha256s -> S16 index keys (their first KEY_BYTES, raw: they sort as the hex does)."""
    keys = np.empty(len(hex_shas), dtype=f"S{KEY_BYTES}")
    raw = keys.view(np.uint8).reshape(-1, KEY_BYTES)
    for at in range(0, len(hex_shas), INDEX_CHUNK):
        nibbles = _NIBBLE[np.asarray(hex_shas[at:at + INDEX_CHUNK]).view(np.uint8).reshape(-1, 64)[:, :2 * KEY_BYTES]]
        raw[at:at + len(nibbles)] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return keys


def _read_index_keys(path: Path) -> np.ndarray:
    """A segment's keys file as index keys, memory-mapped: index_keys reads a chunk at a time, never the 64-byte
    hex of every row at once."""
    hex_shas = np.load(path, mmap_mode="r")
    if hex_shas.dtype != np.dtype("S64") or hex_shas.ndim != 1:
        raise ValueError(f"{path}: not a keys file")
    return index_keys(hex_shas)


def complete_segments(variant_dir: Path) -> list[str]:
    """Names of the segments whose checksums exist (finished), oldest first."""
    sums = []
    for path in variant_dir.glob("*.sum.json"):
        try:
            sums.append((path.stat().st_mtime_ns, path.name, path))
        except FileNotFoundError:      # pruned by a concurrent build meanwhile
            continue
    return [path.name.removesuffix(".sum.json") for *_, path in sorted(sums)]


def stored_rows(variant_dir: Path, prefer: Sequence[str] = ()) -> StoredRows:
    """Every finished segment of a variant folder as one sorted index; the `prefer` segments are searched first,
    so a build keeps reading the segments it read before when an image is stored twice."""
    names = complete_segments(variant_dir) if variant_dir.is_dir() else []
    ordered = [n for n in prefer if n in names] + [n for n in reversed(names) if n not in prefer]
    files, sizes, parts = [], [], []
    for name in ordered:
        part = _checked_keys(variant_dir, name)
        if part is None:
            continue
        files.append(variant_dir / f"{name}.npy")
        sizes.append(len(part))
        parts.append(part)
    if not parts:
        empty = np.empty(0, dtype=np.int32)
        return StoredRows(files, sizes, np.empty(0, dtype=f"S{KEY_BYTES}"), empty, empty)
    all_keys = np.concatenate(parts)
    file_index = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(parts)])
    row = np.concatenate([np.arange(len(k), dtype=np.int32) for k in parts])
    del parts
    order = np.argsort(all_keys, kind="stable")     # stable: among equal keys the preferred segment comes first
    return StoredRows(files, sizes, all_keys[order], file_index[order], row[order])


def _checked_keys(variant_dir: Path, name: str) -> np.ndarray | None:
    """A finished segment's index keys, after its keys file matched its checksum; None: gone, or dropped."""
    data, keys = variant_dir / f"{name}.npy", variant_dir / f"{name}.keys.npy"
    sums = read_sums(data)
    if sums is None:                  # deleted by a concurrent build's pruning: decode instead
        return None
    try:
        if isinstance(sums, str):
            raise ValueError(sums)
        if sha256_file(keys) != sums["keys_sha256"]:
            raise ValueError("its keys file differs from what was written")
        return _read_index_keys(keys)
    except (OSError, ValueError) as err:
        if sums_path(data).exists():     # still there, so not pruned meanwhile: broken
            drop_segment(data, str(err))
        return None


# --------------------------------------------------------------------------- planning one split's build


@dataclass(frozen=True)
class SplitPlan:
    """How one variant of one split is laid out: stored segments kept as they are, then one new segment holding,
    in split order, the images to decode and the rows copied from merged segments. `position`: each split row's
    place in the concatenation (what the output's rows file stores)."""

    kept: list[int]               # indexes into StoredRows.files, in output order
    new_rows: np.ndarray          # int32: split rows in the new segment, in order
    copies: np.ndarray            # int32: rows of the new segment copied from a stored segment (others: decoded)
    copy_from: np.ndarray         # int32 per copy: index into StoredRows.files
    copy_row: np.ndarray          # int32 per copy: row in that file
    position: np.ndarray          # int64 per split row

    @property
    def new_size(self) -> int:
        return len(self.new_rows)

    def slots(self, split_rows: np.ndarray) -> np.ndarray:
        """Where the given split rows (all in the new segment) lie in it."""
        return np.searchsorted(self.new_rows, split_rows)


def plan_split(sizes: Sequence[int], reusable: np.ndarray, file_index: np.ndarray, row: np.ndarray) -> SplitPlan:
    """Which segments a split keeps reading and which rows go into its new segment (see the module docstring).
    reusable: per split row, whether it is stored in every variant the split needs; file_index / row: where."""
    n_files = len(sizes)
    source = np.where(reusable, file_index, 0).astype(np.int32)
    used = np.bincount(source[reusable], minlength=n_files)
    sources = [int(i) for i in np.flatnonzero(used)]
    kept = [i for i in sources if used[i] * GARBAGE_FACTOR >= sizes[i]]   # mostly removed images: merge it
    has_new = bool((~reusable).any()) or len(kept) < len(sources)
    if len(kept) + has_new > MAX_SEGMENTS:
        kept = [max(kept, key=lambda i: int(used[i]))]      # too many: keep the largest, merge the others
    is_kept = np.zeros(max(n_files, 1), dtype=bool)
    is_kept[kept] = True
    from_kept = reusable & is_kept[source]
    new_rows = np.flatnonzero(~from_kept).astype(np.int32)
    copies = np.flatnonzero(reusable[new_rows]).astype(np.int32)
    copied_rows = new_rows[copies]
    starts = np.cumsum([0] + [sizes[i] for i in kept])
    slot = np.full(max(n_files, 1), -1, dtype=np.int64)
    slot[kept] = np.arange(len(kept))
    position = np.empty(len(reusable), dtype=np.int64)
    kept_rows = np.flatnonzero(from_kept)
    position[kept_rows] = starts[slot[source[kept_rows]]] + row[kept_rows]
    position[new_rows] = starts[-1] + np.arange(len(new_rows))
    return SplitPlan(kept, new_rows, copies, source[copied_rows], row[copied_rows].astype(np.int32), position)


def copy_runs(plan: SplitPlan) -> Iterator[tuple[int, int, int, int]]:
    """(source file index, source row, row in the new segment, count): rows stored consecutively and copied
    consecutively, in one call each."""
    if not len(plan.copies):
        return
    slots, files, sources = plan.copies, plan.copy_from, plan.copy_row
    breaks = np.flatnonzero((np.diff(slots) != 1) | (np.diff(sources) != 1) | (np.diff(files) != 0)) + 1
    for start, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(slots)]])):
        yield int(files[start]), int(sources[start]), int(slots[start]), int(end - start)


# --------------------------------------------------------------------------- writing a segment


class SegmentWriter:
    """A new segment of one split's rows for one variant: preallocated, filled by position, then published."""

    def __init__(self, store_dir: Path, split: str, prep: Preprocessing, draft_size: int | None, n: int) -> None:
        self.variant_dir = Path(store_dir) / variant_key(prep, draft_size)
        self.variant_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"{split}.{time.time_ns()}-{os.getpid()}"
        self.path = self.variant_dir / f"{self.name}.npy"
        self.row_bytes = prep.crop_size * prep.crop_size * 3
        array = open_memmap(self.path, mode="w+", dtype=np.uint8, shape=(n, prep.crop_size, prep.crop_size, 3))
        self.offset = array.offset
        del array

    def copy_rows(self, source: Path, source_start: int, start: int, count: int) -> None:
        """Rows [source_start, +count) of a stored segment into rows [start, +count) here, inside the kernel."""
        src_offset = np.load(source, mmap_mode="r").offset + source_start * self.row_bytes
        dst_offset = self.offset + start * self.row_bytes
        with open(source, "rb") as src, open(self.path, "rb+") as dst:
            _copy_range(src.fileno(), dst.fileno(), src_offset, dst_offset, count * self.row_bytes)

    def publish(self, shas: np.ndarray, rows: np.ndarray) -> Path:
        """fsync the rows, write their keys (shas[rows], a chunk at a time), then the checksums of both: the mark
        of a finished segment."""
        with open(self.path, "rb+") as handle:
            os.fsync(handle.fileno())

        with atomic_path(self.variant_dir / f"{self.name}.keys.npy") as tmp, open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|S64", "fortran_order": False,
                                                          "shape": (len(rows),)})
            for at in range(0, len(rows), INDEX_CHUNK):
                handle.write(np.asarray(shas[rows[at:at + INDEX_CHUNK]], dtype="S64").tobytes())
        seal_segment(self.path)
        return self.path

    def discard(self) -> None:
        for path in (sums_path(self.path), self.variant_dir / f"{self.name}.keys.npy", self.path):
            path.unlink(missing_ok=True)


def write_uses(variant_dir: Path, split: str, segments: Sequence[Path]) -> None:
    """Record which segments the split's last build reads: what pruning keeps."""
    write_json(variant_dir / f"{split}.uses.json", [p.name.removesuffix(".npy") for p in segments])


def read_uses(variant_dir: Path, split: str) -> list[str]:
    try:
        names = json.loads((variant_dir / f"{split}.uses.json").read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def prune_segments(variant_dir: Path) -> None:
    """Delete finished segments no split uses, and unfinished ones old enough that no build is writing them.
    A reader that has a deleted segment open (or linked into an output) keeps its rows."""
    if not variant_dir.is_dir():
        return
    splits = {uses.name.removesuffix(".uses.json") for uses in variant_dir.glob("*.uses.json")}
    live = {name for split in splits for name in read_uses(variant_dir, split)}
    stale_before = time.time() - STALE_INCOMPLETE_S
    for data in variant_dir.glob("*.npy"):
        if data.name.endswith(".keys.npy") or data.stem in live:
            continue
        if sums_path(data).exists() or data.stat().st_mtime < stale_before:
            for path in (sums_path(data), variant_dir / f"{data.stem}.keys.npy", data):    # unfinished first
                path.unlink(missing_ok=True)


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """copy_file_range (no copy through user space; a reflink on filesystems that have them), else pread/pwrite."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except OSError:
            done = os.pwrite(dst, os.pread(src, min(count, 1 << 24), src_offset), dst_offset)
        if done <= 0:
            raise OSError(f"short copy: {count} bytes left")
        count, src_offset, dst_offset = count - done, src_offset + done, dst_offset + done


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra space); a copy where the store lies on another filesystem."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prune_variants(store_dir: Path, keep: Sequence[str]) -> None:
    """Delete variant folders other than `keep`, oldest first, beyond the KEEP_VARIANTS newest."""
    folders = sorted((p for p in Path(store_dir).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns,
                     reverse=True) if Path(store_dir).is_dir() else []
    extra = [p for p in folders if p.name not in keep][max(0, KEEP_VARIANTS - len(keep)):]
    for folder in extra:
        shutil.rmtree(folder, ignore_errors=True)
