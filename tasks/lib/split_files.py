"""The files prepare writes and every later stage reads: `<split>.csv` (per image: path relative to
data.raw_dir, class index, sha256 of its bytes) and `classes.json`. Torch-free: the registry and predict read them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.lib.columns import PackedStrings
from tasks.lib.io import atomic_path, read_json, sha256_file

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class SplitRow:
    """One image of a split: path relative to the raw data folder, class index, content hash."""

    path: str
    label: int
    sha256: str


@dataclass(frozen=True)
class SplitColumns:
    """A split file read whole as columns (about 110 bytes per image instead of a SplitRow's 350)."""

    paths: PackedStrings
    labels: np.ndarray       # int64
    sha256: np.ndarray       # S64: the hex digests

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[SplitRow]:
        """The rows one at a time (none is kept)."""
        for i, path in enumerate(self.paths):
            yield SplitRow(path, int(self.labels[i]), self.sha256[i].decode())


def split_path(prepared_dir: Path | str, split: str) -> Path:
    """Where the prepare stage writes a split's file."""
    return Path(prepared_dir) / f"{split}.csv"


def write_split(path: Path | str, rows: Iterable[SplitRow]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "sha256"])
        for row in rows:
            writer.writerow([row.path, row.label, row.sha256])


def read_split(path: Path | str) -> list[SplitRow]:
    """Every row of a split file, in file order."""
    return list(_rows(path))


def read_split_columns(path: Path | str) -> SplitColumns:
    """read_split as columns, for the stages whose memory must not grow by an object per image."""
    paths, labels, hashes = PackedStrings(), [], bytearray()
    for row in _rows(path):
        paths.append(row.path)
        labels.append(row.label)
        hashes += row.sha256.encode()
    return SplitColumns(paths, np.asarray(labels, dtype=np.int64), np.frombuffer(bytes(hashes), dtype="S64"))


def _rows(path: Path | str) -> Iterator[SplitRow]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split file not found; run the prepare stage first (dvc repro prepare)")
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            yield SplitRow(r["path"], int(r["label"]), r["sha256"])


def split_digest(path: Path | str) -> str:
    """Hash of a split file's content: two models were tested on the same data iff these match."""
    return sha256_file(path)


def labels_of(rows: Iterable[SplitRow]) -> np.ndarray:
    return np.asarray([row.label for row in rows], dtype=np.int64)


def read_classes(prepared_dir: Path | str) -> list[str]:
    """Class names in index order, as written by the prepare stage."""
    path = Path(prepared_dir) / "classes.json"
    classes = read_json(path)
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"{path}: expected a list of at least two class names; re-run the prepare stage")
    return [str(c) for c in classes]
