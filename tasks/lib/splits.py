"""The prepare stage's split tables: the good images as columns (`ImageTable`), deduplicated by content and
assigned to train/val/test by content hash and seed, so adding images never moves an existing one to another split.

Memory: about 80 bytes per image plus its path, and every step works on arrays of row numbers; a Python object
per image would be 500 bytes, and peak memory would grow with the data set well past the decoder's.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.lib.check_store import CheckResult
from tasks.lib.columns import PackedStrings
from tasks.lib.config import PrepareParams
from tasks.lib.scan import FoundFile
from tasks.lib.split_files import SPLITS

SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of checking one candidate, on its way into an ImageTable (or the rejected list)."""

    path: str             # relative to raw_dir, POSIX separators
    label_name: str
    split: str | None     # predefined layouts only
    sha256: str = ""
    dhash: int | None = None
    reason: str = ""
    detail: str = ""

    @classmethod
    def of(cls, c: FoundFile, sha256: str, check: CheckResult) -> Checked:
        return cls(c.path, c.label_name, c.split, sha256, check.dhash, check.reason, check.detail)


NO_SPLIT = -1


class ImageTable:
    """The good images of one run, as columns; rows are numbered in the order they were added."""

    def __init__(self) -> None:
        self.paths = PackedStrings()
        self.label_names: list[str] = []          # label ids index this; first-seen order
        self._label_ids: dict[str, int] = {}
        self._digests = bytearray()               # sha256, 32 raw bytes per image
        self._labels, self._splits = array("i"), array("b")
        self._dhashes, self._has_dhash = array("Q"), array("b")

    def add(self, item: Checked) -> None:
        self.paths.append(item.path)
        self._labels.append(self._label_ids.setdefault(item.label_name, len(self._label_ids)))
        if self._labels[-1] == len(self.label_names):
            self.label_names.append(item.label_name)
        self._digests += bytes.fromhex(item.sha256)
        self._splits.append(SPLIT_ORDER[item.split] if item.split else NO_SPLIT)
        self._dhashes.append(item.dhash or 0)
        self._has_dhash.append(item.dhash is not None)

    def __len__(self) -> int:
        return len(self.paths)

    def freeze(self) -> ImageTable:
        """Numpy views of the columns (call once every image was added)."""
        self.digests = np.frombuffer(self._digests, dtype="S32")    # a view, no copy; sorts as the hex strings would
        self.labels = np.asarray(self._labels, dtype=np.int32)
        self.splits = np.asarray(self._splits, dtype=np.int8)
        self.dhashes = np.asarray(self._dhashes, dtype=np.uint64)
        self.has_dhash = np.asarray(self._has_dhash, dtype=bool)
        return self

    def sha256(self, row: int) -> str:
        # Through the raw bytes: numpy drops trailing zero bytes when it hands out an S32 element.
        return self.digests.view(np.uint8)[32 * row:32 * row + 32].tobytes().hex()

    def label(self, row: int) -> str:
        return self.label_names[self.labels[row]]


def dedupe(table: ImageTable) -> tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """One copy per content hash (rows, in content order), the first by (split, path); content under two classes
    is a label conflict. Only groups of copies are looked at in Python; unique content stays in arrays."""
    order = np.argsort(table.digests, kind="stable")
    starts = np.flatnonzero(_new_content(table.digests, order))
    sizes = np.diff(starts, append=len(order))
    keep = order[starts]
    conflicts: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    dropped = []
    for group in np.flatnonzero(sizes > 1).tolist():
        start = int(starts[group])
        members = sorted(order[start:start + sizes[group]].tolist(),
                         key=lambda row: (max(int(table.splits[row]), 0), table.paths[row]))
        first, copies = members[0], members[1:]
        labels = sorted({table.label(row) for row in members})
        keep[group] = first
        if len(labels) > 1:
            conflicts.append({"sha256": table.sha256(first), "classes": labels,
                              "paths": [table.paths[row] for row in members]})
            dropped.append(group)
            continue
        removed += [{"path": table.paths[row], "same_as": table.paths[first]} for row in copies]
    kept = np.delete(keep, dropped)
    removed.sort(key=lambda r: r["path"])
    conflicts.sort(key=lambda c: c["paths"][0])
    duplicates = {"n_removed": len(removed), "removed": removed}
    return kept, duplicates, conflicts


COMPARE_CHUNK = 65536


def _new_content(digests: np.ndarray, order: np.ndarray) -> np.ndarray:
    """flags[i]: the row at order[i] holds other content than the row before it. In chunks: the digests are
    never copied whole (6.4 MB at 200,000 images)."""
    flags = np.ones(len(order), dtype=bool)
    for start in range(1, len(order), COMPARE_CHUNK):
        stop = min(start + COMPARE_CHUNK, len(order))
        flags[start:stop] = digests[order[start:stop]] != digests[order[start - 1:stop - 1]]
    return flags


def split_fraction(sha256: str, seed: int) -> float:
    """A number in [0, 1) fixed by the content and the seed alone."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


Splits = dict[str, np.ndarray]      # split name -> table rows


def assign_splits(table: ImageTable, kept: np.ndarray, cfg: PrepareParams) -> Splits:
    """Stable, stratified split: each image's split depends only on its hash and the seed, cut per class.

    A class of at least three images that would leave a split empty gives it its closest image: only such tiny
    classes ever see an image move when new data arrives. Rows are listed class by class, each by fraction."""
    fractions = np.fromiter((split_fraction(table.sha256(row), cfg.seed) for row in kept.tolist()),
                            dtype=np.float64, count=len(kept))
    labels = table.labels[kept]
    classes, first_seen = np.unique(labels, return_index=True)
    rank = np.empty(int(classes.max(initial=0)) + 1, dtype=np.int64)
    rank[classes[np.argsort(first_seen)]] = np.arange(len(classes))
    order = np.lexsort((fractions, rank[labels]))      # by class, then fraction; ties keep kept's order
    ranks = rank[labels][order]
    bounds = np.flatnonzero(np.concatenate([[True], ranks[1:] != ranks[:-1], [True]])) if len(ranks) else []
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for start, stop in zip(bounds[:-1], bounds[1:]):
        for split, chosen in _split_class(kept[order[start:stop]], fractions[order[start:stop]], cfg).items():
            parts[split].append(chosen)
    return {s: np.concatenate(chunks) if chunks else np.zeros(0, np.int64) for s, chunks in parts.items()}


def _split_class(members: np.ndarray, fractions: np.ndarray, cfg: PrepareParams) -> dict[str, np.ndarray]:
    """One class's rows (sorted by fraction) cut at the split thresholds; a tiny class's empty split gets a donor."""
    cuts = np.searchsorted(fractions, (cfg.train, cfg.train + cfg.val), side="left")
    parts = dict(zip(SPLITS, np.split(members, cuts)))
    if len(members) >= len(SPLITS) and any(len(p) == 0 for p in parts.values()):
        lists = {s: p.tolist() for s, p in parts.items()}
        for split in SPLITS:
            if not lists[split]:
                donor = max(lists, key=lambda s: len(lists[s]))
                # test takes from the top of the order, the others from the bottom: the nearest neighbour.
                lists[split].append(lists[donor].pop(-1 if split == "test" or donor == "train" else 0))
        parts = {s: np.asarray(rows, dtype=np.int64) for s, rows in lists.items()}
    return parts


def check_leakage(table: ImageTable, splits: Splits, cfg: PrepareParams) -> dict[str, Any]:
    """No content hash in two splits (asserted); optionally near-duplicates by dHash, reported."""
    rows = np.concatenate([splits[s] for s in SPLITS])
    prefixes = _prefixes(table, rows)           # 8 bytes a row instead of 32: sorting them needs no copy of the hashes
    order = np.argsort(prefixes, kind="stable")
    starts = np.flatnonzero(_new_content(prefixes, order))
    for start, stop in zip(starts, np.append(starts[1:], len(order))):
        if stop - start > 1:          # same first 8 bytes: compare the whole hashes (almost never needed)
            group = rows[order[start:stop]]
            if len({table.sha256(row) for row in group}) < len(group):
                raise AssertionError(f"leakage: {table.paths[group[-1]]} has the content of an image "
                                     "in another split")
    report: dict[str, Any] = {"exact_cross_split": 0, "checked_near_duplicates": cfg.near_duplicates}
    if cfg.near_duplicates:
        report["near_duplicates"] = find_near_duplicates(table, splits, cfg.near_duplicate_distance)
    return report


def _prefixes(table: ImageTable, rows: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each row's sha256 as one number (big-endian: they sort as the hashes do)."""
    return table.digests.view(np.uint8).reshape(-1, 32)[rows, :8].copy().view(">u8").ravel()


def find_near_duplicates(table: ImageTable, splits: Splits, max_distance: int) -> list[dict[str, Any]]:
    """Pairs of images in different splits whose dHashes differ in at most max_distance bits."""
    train = splits["train"][table.has_dhash[splits["train"]]]
    train_hashes = table.dhashes[train]
    pairs = []
    for split in ("val", "test"):
        for row in splits[split][table.has_dhash[splits[split]]].tolist():
            distances = np.bitwise_count(train_hashes ^ table.dhashes[row])
            for hit in np.flatnonzero(distances <= max_distance).tolist():
                pairs.append({"path": table.paths[row], "split": split, "train_path": table.paths[train[hit]],
                              "distance": int(distances[hit])})
    return pairs


def per_class(classes: list[str], table: ImageTable, splits: Splits) -> dict[str, dict[str, int]]:
    ids = {name: i for i, name in enumerate(table.label_names)}
    counts = {split: np.bincount(table.labels[rows], minlength=len(table.label_names)) for split, rows in splits.items()}
    return {name: {split: int(counts[split][ids[name]]) if name in ids else 0 for split in SPLITS} for name in classes}


def predefined_splits(table: ImageTable, kept: np.ndarray) -> Splits:
    codes = np.maximum(table.splits[kept], 0)       # an image outside the split folders counts as train
    return {split: kept[codes == SPLIT_ORDER[split]] for split in SPLITS}
