"""Decoded rows kept between builds of the decoded cache, keyed by content hash, so a build decodes only new images.

DVC deletes a stage's outputs before it runs the stage, so the decode_cache
stage cannot reuse its own previous arrays. It keeps them here instead
(`cache.store_dir`, git-ignored, not a DVC output) and hard-links the
finished arrays into its outputs, so the store costs no extra disk space.

Layout: one folder per variant (`variant_key`: the geometry, the JPEG draft
size, Pillow's version and ROW_FORMAT: anything that changes the pixels), and
in it, per split and build, `<split>.<build>.npy` (uint8 rows) and
`<split>.<build>.keys.npy` (each row's sha256). The keys file is written
last: a build without one is incomplete and never read. A finished build
replaces the split's older builds, which are then deleted (a reader that has
them open keeps reading them). So the store holds the images of the last
build of each split and variant; variants not built for a while are pruned
(KEEP_VARIANTS newest kept).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from numpy.lib.format import open_memmap

from tasks.lib.preprocess import Preprocessing

ROW_FORMAT = 1            # bump when the decoding itself changes
KEEP_VARIANTS = 4


def variant_key(prep: Preprocessing, draft_size: int | None) -> str:
    """What the stored pixels depend on; mean/std are not among them (applied later, on the device)."""
    recipe = (f"rows{ROW_FORMAT}/pillow{PIL.__version__}/crop{prep.crop_size}/resize{prep.resize_size}/"
              f"{prep.interpolation}/draft{draft_size or 0}" + ("/cropbox" if draft_size else ""))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


KEY_BYTES = 16           # the index keeps each sha256's first 128 bits: odds of a false match are about 1e-27
INDEX_CHUNK = 65536      # keys converted at a time


@dataclass(frozen=True)
class StoredRows:
    """Every stored row of one variant, sorted by content hash: numpy arrays, 24 bytes a row."""

    files: list[Path]        # the builds' data files
    keys: np.ndarray         # S16: the first KEY_BYTES of each sha256, raw, sorted
    file_index: np.ndarray   # int32, into files
    row: np.ndarray          # int32, row within that file

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, file index, row) for each wanted key (`index_keys` of the sha256s); a binary search, no dict."""
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
    """A build's keys file as index keys, read a chunk at a time (never the 64-byte hex of every row at once)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        if dtype != np.dtype("S64") or len(shape) != 1:
            raise ValueError(f"{path}: not a keys file")
        parts = [index_keys(np.fromfile(handle, dtype="S64", count=min(INDEX_CHUNK, shape[0] - at)))
                 for at in range(0, shape[0], INDEX_CHUNK)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=f"S{KEY_BYTES}")


def stored_rows(variant_dir: Path) -> StoredRows:
    """The newest finished build of every split in a variant folder, as one sorted index."""
    newest: dict[str, Path] = {}
    for keys in sorted(variant_dir.glob("*.keys.npy"), key=lambda p: p.stat().st_mtime_ns):
        newest[keys.name.split(".")[0]] = keys
    files, parts = [], []
    for keys in newest.values():
        try:
            parts.append(_read_index_keys(keys))
        except (OSError, ValueError):     # deleted or replaced by a concurrent build: decode instead
            continue
        files.append(keys.with_name(keys.name.removesuffix(".keys.npy") + ".npy"))
    if not parts:
        empty = np.empty(0, dtype=np.int32)
        return StoredRows(files, np.empty(0, dtype=f"S{KEY_BYTES}"), empty, empty)
    all_keys = np.concatenate(parts)
    file_index = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(parts)])
    row = np.concatenate([np.arange(len(k), dtype=np.int32) for k in parts])
    del parts
    order = np.argsort(all_keys, kind="stable")
    return StoredRows(files, all_keys[order], file_index[order], row[order])


class RowWriter:
    """A new build of one split's rows for one variant: preallocated, filled by position, then published."""

    def __init__(self, store_dir: Path, split: str, prep: Preprocessing, draft_size: int | None, n: int) -> None:
        self.variant_dir = Path(store_dir) / variant_key(prep, draft_size)
        self.variant_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.build = split, f"{time.time_ns()}-{os.getpid()}"
        self.path = self.variant_dir / f"{split}.{self.build}.npy"
        self.row_bytes = prep.crop_size * prep.crop_size * 3
        array = open_memmap(self.path, mode="w+", dtype=np.uint8, shape=(n, prep.crop_size, prep.crop_size, 3))
        self.offset = array.offset
        del array

    def copy_rows(self, source: Path, source_start: int, start: int, count: int) -> None:
        """Rows [source_start, +count) of a stored build into rows [start, +count) here, inside the kernel."""
        src_offset = _data_offset(source) + source_start * self.row_bytes
        dst_offset = self.offset + start * self.row_bytes
        with open(source, "rb") as src, open(self.path, "rb+") as dst:
            _copy_range(src.fileno(), dst.fileno(), src_offset, dst_offset, count * self.row_bytes)

    def publish(self, keys: np.ndarray) -> Path:
        """fsync the rows, write the keys (the mark of a finished build), delete this split's older builds."""
        with open(self.path, "rb+") as handle:
            os.fsync(handle.fileno())
        keys_path = self.variant_dir / f"{self.split}.{self.build}.keys.npy"
        tmp = keys_path.with_name(f".{keys_path.name}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, keys.astype("S64"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, keys_path)
        self._remove_older_builds()
        return self.path

    def _remove_older_builds(self) -> None:
        """Finished builds of this split other than this one; unfinished ones only once they are a day old
        (a concurrent build may still be writing them)."""
        stale_before = time.time() - 86400
        for data in self.variant_dir.glob(f"{self.split}.*.npy"):
            build = data.name.split(".")[1]
            if build == self.build or data.name.endswith(".keys.npy"):
                continue
            keys = self.variant_dir / f"{self.split}.{build}.keys.npy"
            if keys.exists() or data.stat().st_mtime < stale_before:
                keys.unlink(missing_ok=True)
                data.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _data_offset(path: Path) -> int:
    return np.load(path, mmap_mode="r").offset


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
