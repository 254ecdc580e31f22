"""Stage `prepare`: validate every image, dedupe, split stably and check for leakage.

Input: data.raw_dir, an ImageFolder (one sub-folder per class), or a folder that
already has train/, val/ and test/ sub-folders, each an ImageFolder.
Output (data.prepared_dir): train.csv, val.csv, test.csv (path, label, sha256),
classes.json (names in index order) and report.json (everything that was
rejected, merged or excluded, and why).

Splits are assigned by content hash and seed, not by position: adding images
never moves an existing image to another split, so the test set stays
comparable across retrains.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.cli import StageError, progress, stage_main
from tasks.config import Params, PrepareParams
from tasks.images import BadImage, is_hidden, is_image_name, load_rgb
from tasks.io import SPLITS, SplitRow, write_json, write_split

log = logging.getLogger("prepare")


@dataclass(frozen=True)
class Candidate:
    """A file found in the raw folder: where it is, its class and (for predefined layouts) its split."""

    path: str  # relative to raw_dir, POSIX separators
    label_name: str
    split: str | None = None


@dataclass(frozen=True)
class Checked:
    """The outcome of decoding one candidate."""

    candidate: Candidate
    sha256: str = ""
    dhash: int | None = None
    reason: str = ""
    detail: str = ""


# --------------------------------------------------------------------------- finding files


def find_candidates(raw_dir: Path) -> tuple[list[Candidate], list[str], str]:
    """Every image-named file under the class folders; also files ignored and the layout found."""
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir}: input folder not found; put one sub-folder of images per class there "
                         f"(or run `make demo` for the demo data)")
    top = sorted(p for p in raw_dir.iterdir() if p.is_dir() and not is_hidden(p))
    if {p.name for p in top} == set(SPLITS):
        layout = "predefined"
        groups = [(split, c) for split in SPLITS for c in _class_dirs(raw_dir / split)]
    else:
        layout = "imagefolder"
        groups = [(None, c) for c in top]
    candidates: list[Candidate] = []
    ignored: list[str] = []
    for split, class_dir in groups:
        for file in _visible_files(class_dir):
            rel = file.relative_to(raw_dir).as_posix()
            if is_image_name(file):
                candidates.append(Candidate(rel, class_dir.name, split))
            else:
                ignored.append(rel)
    return candidates, ignored, layout


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def _visible_files(folder: Path) -> list[Path]:
    """Files under folder, recursively, skipping hidden files and hidden folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


# --------------------------------------------------------------------------- decoding


def check_file(raw_dir: Path, candidate: Candidate, max_pixels: int, want_dhash: bool) -> Checked:
    """Hash the bytes, decode fully once; a file that fails is returned with the reason."""
    path = raw_dir / candidate.path
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        img = load_rgb(path, max_pixels)
    except BadImage as err:
        return Checked(candidate, sha, reason=err.reason, detail=err.detail)
    return Checked(candidate, sha, dhash=dhash(img) if want_dhash else None)


def dhash(img: Any) -> int:
    """64-bit difference hash: robust to resizing and re-encoding, for near-duplicate search."""
    small = img.convert("L").resize((9, 8))
    pixels = np.asarray(small, dtype=np.int16).ravel()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | int(pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def _check_one(args: tuple[Path, Candidate, int, bool]) -> Checked:
    return check_file(*args)


def check_all(raw_dir: Path, candidates: list[Candidate], cfg: PrepareParams) -> list[Checked]:
    """Decode every candidate, in parallel across cores, with a progress bar."""
    workers = cfg.num_workers or os.cpu_count() or 1
    jobs = [(raw_dir, c, cfg.max_pixels, cfg.near_duplicates) for c in candidates]
    if workers == 1 or len(jobs) < 64:
        return [_check_one(j) for j in progress(jobs, desc="checking images", unit="img")]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_one, jobs, chunksize=32)
        return list(progress(results, desc="checking images", total=len(jobs), unit="img"))


# --------------------------------------------------------------------------- dedupe and split


def dedupe(good: list[Checked]) -> tuple[list[Checked], dict[str, Any], list[dict[str, Any]]]:
    """One copy per content hash; content under two classes is a label conflict and excluded."""
    by_hash: dict[str, list[Checked]] = defaultdict(list)
    for item in good:
        by_hash[item.sha256].append(item)
    kept: list[Checked] = []
    conflicts: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for sha, copies in by_hash.items():
        copies.sort(key=lambda c: (SPLITS.index(c.candidate.split) if c.candidate.split else 0, c.candidate.path))
        labels = sorted({c.candidate.label_name for c in copies})
        if len(labels) > 1:
            conflicts.append({"sha256": sha, "classes": labels, "paths": [c.candidate.path for c in copies]})
            continue
        kept.append(copies[0])
        removed += [{"path": c.candidate.path, "same_as": copies[0].candidate.path} for c in copies[1:]]
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
        by_class[item.candidate.label_name].append(item)
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
    seen: dict[str, str] = {}
    for split, items in splits.items():
        for item in items:
            if item.sha256 in seen and seen[item.sha256] != split:
                raise AssertionError(f"leakage: {item.candidate.path} is in {split} and {seen[item.sha256]}")
            seen[item.sha256] = split
    report: dict[str, Any] = {"exact_cross_split": 0, "checked_near_duplicates": cfg.near_duplicates}
    if cfg.near_duplicates:
        report["near_duplicates"] = find_near_duplicates(splits, cfg.near_duplicate_distance)
    return report


def find_near_duplicates(splits: dict[str, list[Checked]], max_distance: int) -> list[dict[str, Any]]:
    """Pairs of images in different splits whose dHashes differ in at most max_distance bits."""
    train = [(i.dhash, i.candidate.path) for i in splits["train"] if i.dhash is not None]
    pairs = []
    for split in ("val", "test"):
        for item in splits[split]:
            for other_hash, other_path in train:
                distance = bin(item.dhash ^ other_hash).count("1")
                if distance <= max_distance:
                    pairs.append({"path": item.candidate.path, "split": split, "train_path": other_path,
                                  "distance": distance})
    return pairs


# --------------------------------------------------------------------------- the stage


def prepare(raw_dir: Path, out_dir: Path, cfg: PrepareParams) -> dict[str, Any]:
    """Run the whole stage; returns the data report (also written to out_dir/report.json)."""
    candidates, ignored, layout = find_candidates(raw_dir)
    checked = check_all(raw_dir, candidates, cfg)
    rejected = [{"path": c.candidate.path, "reason": c.reason, "detail": c.detail} for c in checked if c.reason]
    kept, duplicates, conflicts = dedupe([c for c in checked if not c.reason])
    classes = _classes_or_fail(candidates, kept, raw_dir)
    splits = _predefined_splits(kept) if layout == "predefined" else assign_splits(kept, cfg)
    report = {
        "layout": layout,
        "policy": cfg.bad_files,
        "classes": classes,
        "n_files_scanned": len(candidates),
        "ignored_non_image_names": ignored,
        "rejected": rejected,
        "n_rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "leakage": check_leakage(splits, cfg),
        "n_images": {s: len(items) for s, items in splits.items()},
        "per_class": {name: {s: sum(i.candidate.label_name == name for i in splits[s]) for s in SPLITS}
                      for name in classes},
    }
    write_json(out_dir / "report.json", report)
    if rejected and cfg.bad_files == "fail":
        listing = "; ".join(f"{r['path']} ({r['reason']})" for r in rejected)
        raise StageError(f"{len(rejected)} bad file(s) in {raw_dir} and prepare.bad_files is 'fail': {listing}. "
                         f"Fix or remove them, or set prepare.bad_files: skip (details in {out_dir / 'report.json'})")
    _write_outputs(out_dir, classes, splits)
    return report


def _classes_or_fail(candidates: list[Candidate], kept: list[Checked], raw_dir: Path) -> list[str]:
    """Class names in sorted order; a class left empty, or fewer than two, stops the stage."""
    all_classes = sorted({c.label_name for c in candidates} | {p.name for p in _class_dirs_any(raw_dir)})
    usable = Counter(k.candidate.label_name for k in kept)
    empty = [name for name in all_classes if usable[name] == 0]
    if empty:
        raise StageError(f"class folder(s) with no usable image in {raw_dir}: {', '.join(empty)}; "
                         f"add images or remove the folder(s) (see {raw_dir} and the data report)")
    if len(all_classes) < 2:
        raise StageError(f"{raw_dir} has {len(all_classes)} class folder(s) ({', '.join(all_classes) or 'none'}); "
                         f"a classifier needs at least two: one sub-folder of images per class")
    return all_classes


def _class_dirs_any(raw_dir: Path) -> list[Path]:
    top = _class_dirs(raw_dir)
    if {p.name for p in top} == set(SPLITS):
        return [c for split in SPLITS for c in _class_dirs(raw_dir / split)]
    return top


def _predefined_splits(kept: list[Checked]) -> dict[str, list[Checked]]:
    splits: dict[str, list[Checked]] = {s: [] for s in SPLITS}
    for item in kept:
        splits[item.candidate.split or "train"].append(item)
    return splits


def _write_outputs(out_dir: Path, classes: list[str], splits: dict[str, list[Checked]]) -> None:
    index = {name: i for i, name in enumerate(classes)}
    for split, items in splits.items():
        rows = sorted((SplitRow(i.candidate.path, index[i.candidate.label_name], i.sha256) for i in items),
                      key=lambda r: r.path)
        write_split(out_dir / f"{split}.csv", rows)
    write_json(out_dir / "classes.json", classes)


def run(params: Params) -> dict[str, Any]:
    report = prepare(params.data.raw_dir, params.data.prepared_dir, params.prepare)
    print(f"prepare: {report['n_images']} images in {len(report['classes'])} classes, "
          f"{report['n_rejected']} rejected, {report['duplicates']['n_removed']} duplicates merged, "
          f"{len(report['label_conflicts'])} label conflicts -> {params.data.prepared_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Validate, dedupe and split the raw image folder.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
