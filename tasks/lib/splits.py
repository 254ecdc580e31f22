"""The prepare stage's split tables: one flat record per checked image, deduplicated by content
and assigned to train/val/test by content hash and seed.

Splits depend only on each image's content hash and the seed, never on its
position or name: adding images never moves an existing image to another split
(except in classes too small to fill every split), so test sets stay comparable
across retrains.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from tasks.lib.check_store import CheckResult
from tasks.lib.config import PrepareParams
from tasks.lib.io import SPLITS
from tasks.lib.scan import Candidate

SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of checking one candidate (one flat object per image: these make up the split tables)."""

    path: str             # relative to raw_dir, POSIX separators
    label_name: str
    split: str | None     # predefined layouts only
    sha256: str = ""
    dhash: int | None = None
    reason: str = ""
    detail: str = ""

    @classmethod
    def of(cls, c: Candidate, sha256: str, check: CheckResult) -> Checked:
        return cls(c.path, c.label_name, c.split, sha256, check.dhash, check.reason, check.detail)


def dedupe(good: list[Checked]) -> tuple[list[Checked], dict[str, Any], list[dict[str, Any]]]:
    """One copy per content hash; content under two classes is a label conflict and excluded.

    Sorts `good` in place by content (grouping without a dict of lists keeps memory flat).
    """
    # Three stable sorts with keys that are existing objects: no per-image key tuples (memory stays flat).
    good.sort(key=attrgetter("path"))
    good.sort(key=lambda c: SPLIT_ORDER.get(c.split, 0))
    good.sort(key=attrgetter("sha256"))
    kept: list[Checked] = []
    conflicts: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for sha, group in itertools.groupby(good, key=lambda c: c.sha256):
        first = next(group)
        copies = list(group)
        labels = sorted({first.label_name, *(c.label_name for c in copies)})
        if len(labels) > 1:
            conflicts.append({"sha256": sha, "classes": labels,
                              "paths": [first.path, *(c.path for c in copies)]})
            continue
        kept.append(first)
        removed += [{"path": c.path, "same_as": first.path} for c in copies]
    removed.sort(key=lambda r: r["path"])
    conflicts.sort(key=lambda c: c["paths"][0])
    duplicates = {"n_removed": len(removed), "removed": removed}
    return kept, duplicates, conflicts


def split_fraction(sha256: str, seed: int) -> float:
    """A number in [0, 1) fixed by the content and the seed alone."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(items: list[Checked], cfg: PrepareParams) -> dict[str, list[Checked]]:
    """Stable, stratified split: each image's split depends only on its hash and the seed.

    Thresholds are applied per class, so each class gets about the requested
    fractions. A class with at least three images that would leave a split
    empty gets that split's closest image instead; only such tiny classes ever
    see an image move when new data arrives.
    """
    by_class: dict[str, list[Checked]] = defaultdict(list)
    for item in items:
        by_class[item.label_name].append(item)
    splits: dict[str, list[Checked]] = {s: [] for s in SPLITS}
    for members in by_class.values():
        members.sort(key=lambda c: split_fraction(c.sha256, cfg.seed))
        for split, chosen in _split_class(members, cfg).items():
            splits[split] += chosen
    return splits


def _split_class(members: list[Checked], cfg: PrepareParams) -> dict[str, list[Checked]]:
    bounds = (cfg.train, cfg.train + cfg.val)
    parts: dict[str, list[Checked]] = {s: [] for s in SPLITS}
    for item in members:  # sorted by fraction
        u = split_fraction(item.sha256, cfg.seed)
        parts["train" if u < bounds[0] else "val" if u < bounds[1] else "test"].append(item)
    if len(members) >= len(SPLITS):
        for split in SPLITS:
            if not parts[split]:
                donor = max(parts, key=lambda s: len(parts[s]))
                # test takes from the top of the order, the others from the bottom: the nearest neighbour.
                parts[split].append(parts[donor].pop(-1 if split == "test" or donor == "train" else 0))
    return parts


def check_leakage(splits: dict[str, list[Checked]], cfg: PrepareParams) -> dict[str, Any]:
    """No content hash in two splits (asserted); optionally near-duplicates by dHash, reported."""
    seen: set[str] = set()
    for split, items in splits.items():
        for item in items:
            if item.sha256 in seen:
                raise AssertionError(f"leakage: {item.path} ({split}) has the content of an image in another split")
            seen.add(item.sha256)
    del seen
    report: dict[str, Any] = {"exact_cross_split": 0, "checked_near_duplicates": cfg.near_duplicates}
    if cfg.near_duplicates:
        report["near_duplicates"] = find_near_duplicates(splits, cfg.near_duplicate_distance)
    return report


def find_near_duplicates(splits: dict[str, list[Checked]], max_distance: int) -> list[dict[str, Any]]:
    """Pairs of images in different splits whose dHashes differ in at most max_distance bits."""
    train = [(i.dhash, i.path) for i in splits["train"] if i.dhash is not None]
    pairs = []
    for split in ("val", "test"):
        for item in splits[split]:
            for other_hash, other_path in train:
                distance = bin(item.dhash ^ other_hash).count("1")
                if distance <= max_distance:
                    pairs.append({"path": item.path, "split": split, "train_path": other_path,
                                  "distance": distance})
    return pairs


def per_class(classes: list[str], splits: dict[str, list[Checked]]) -> dict[str, dict[str, int]]:
    counts = {split: Counter(i.label_name for i in items) for split, items in splits.items()}
    return {name: {split: counts[split][name] for split in SPLITS} for name in classes}


def predefined_splits(kept: list[Checked]) -> dict[str, list[Checked]]:
    splits: dict[str, list[Checked]] = {s: [] for s in SPLITS}
    for item in kept:
        splits[item.split or "train"].append(item)
    return splits
