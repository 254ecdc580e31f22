"""Stage prepare: validate every image, dedupe, split stably and check for leakage.

Input: data.raw_dir, an ImageFolder or a folder with train/, val/ and test/ ImageFolders (read under
`tasks.lib.scan`'s policy and `tasks.lib.images.ImageLimits`). Output (data.prepared_dir): the split files,
classes.json and report.json (what was rejected, merged or excluded, and why), moved in together at the
end. Splits follow content hash and seed, so adding images never moves one to another split. Each image's
hash and check are kept in `prepare.cache_dir`: only new or changed content is decoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageOps

from tasks.lib.check_store import CheckResult, CheckStore, Signature, lookup_check
from tasks.lib.cli import stage_main
from tasks.lib.config import Params, PrepareParams
from tasks.lib.errors import StageError
from tasks.lib.images import BadImage, ImageLimits, decode, open_checked, read_file, to_rgb
from tasks.lib.io import process_alive, write_json
from tasks.lib.parallel import batched, imap_unordered, worker_count
from tasks.lib.progress import progress
from tasks.lib.scan import FoundFile, FolderScan
from tasks.lib.split_files import SplitRow, write_split
from tasks.lib.splits import (Checked, ImageTable, Splits, assign_splits, check_leakage, dedupe, per_class,
                              predefined_splits)

log = logging.getLogger("prepare")

LOOKUP_BLOCK = 2048      # candidates stat-ed and looked up in the cache at a time
WINDOW = 8 * LOOKUP_BLOCK    # candidates looked up before their misses are checked (what a run holds at most)
CHUNK = 32               # files per task sent to a worker
STAGING_PREFIX = ".prepare-staging-"


@dataclass
class Counts:
    """How much work the cache saved in one run (logged; not part of the report, which must not depend on it)."""

    unchanged: int = 0        # stat signature matched: not read at all
    hashed: int = 0           # read and hashed, check found by content hash: not decoded
    decoded: int = 0


# --------------------------------------------------------------------------- checking one file (in a worker)


@dataclass(frozen=True)
class Job:
    raw_dir: Path
    paths: tuple[str, ...]
    limits: ImageLimits
    want_dhash: bool
    db_path: Path
    settings: str


@dataclass(frozen=True, slots=True)
class Fresh:
    """A file read in this run: what the cache records about it."""

    path: str
    signature: Signature | None
    read_ns: int
    sha256: str
    check: CheckResult
    decoded: bool


def check_chunk(job: Job) -> list[Fresh]:
    return [check_file(job, rel) for rel in job.paths]


def check_file(job: Job, rel: str) -> Fresh:
    """Read (bounded), hash, and decode fully unless the content was checked before."""
    path = os.path.join(job.raw_dir, rel)     # a str: pathlib would intern every file name (memory grows)
    read_ns = time.time_ns()
    try:
        data, info = read_file(path, job.limits.max_file_bytes)
    except BadImage as err:
        return Fresh(rel, None, read_ns, "", CheckResult(err.reason, err.detail, None), False)
    except OSError as err:   # vanished, permission denied
        return Fresh(rel, None, read_ns, "", CheckResult("unreadable", err.strerror or str(err), None), False)
    sha = hashlib.sha256(data).hexdigest()
    known = lookup_check(job.db_path, sha, job.settings)
    if known is not None and (known.reason or known.dhash is not None or not job.want_dhash):
        return Fresh(rel, Signature.of(info), read_ns, sha, known, False)
    return Fresh(rel, Signature.of(info), read_ns, sha, decode_check(data, path, job.limits, job.want_dhash), True)


def decode_check(data: bytes, path: str, limits: ImageLimits, want_dhash: bool) -> CheckResult:
    """Decode every pixel once (no conversion unless a dHash is wanted); the reason when it fails."""
    try:
        img = decode(open_checked(data, path, limits), path)
    except BadImage as err:
        return CheckResult(err.reason, err.detail, None)
    return CheckResult("", "", dhash(to_rgb(ImageOps.exif_transpose(img))) if want_dhash else None)


def dhash(img: Any) -> int:
    """64-bit difference hash: robust to resizing and re-encoding, for near-duplicate search."""
    pixels = np.asarray(img.convert("L").resize((9, 8)), dtype=np.int16)
    return int.from_bytes(np.packbits(pixels[:, :-1] > pixels[:, 1:]).tobytes(), "big")   # row by row, MSB first


# --------------------------------------------------------------------------- checking every file (streamed)


@dataclass
class Checker:
    """Streams candidates through the cache and a process pool; never holds more than a window of them."""

    raw_dir: Path
    cfg: PrepareParams
    store: CheckStore
    counts: Counts = field(default_factory=Counts)

    def run(self, candidates: Iterator[FoundFile]) -> Iterator[Checked]:
        """A window at a time: what the cache answers from the stat at once, the rest checked by the pool."""
        for window in batched(candidates, WINDOW):
            misses: list[FoundFile] = []
            for block in batched(window, LOOKUP_BLOCK):
                yield from self._lookup(block, misses)
            yield from self._check(misses)

    def _check(self, misses: list[FoundFile]) -> Iterator[Checked]:
        labels = {c.path: c for c in misses}
        limits = self.cfg.limits()
        jobs = (Job(self.raw_dir, tuple(c.path for c in chunk), limits, self.cfg.near_duplicates,
                    self.store.path, self.store.settings) for chunk in batched(misses, CHUNK))
        pending: list[tuple[str, Signature, int, str, CheckResult]] = []     # what the cache records, batched
        for fresh in imap_unordered(check_chunk, jobs, worker_count(self.cfg.num_workers)):
            pending += [(f.path, f.signature, f.read_ns, f.sha256, f.check) for f in fresh if f.signature is not None]
            if len(pending) >= 1024:
                self.store.record(pending)
                pending.clear()
            for item in fresh:
                self.counts.decoded += item.decoded
                self.counts.hashed += not item.decoded and item.signature is not None
                yield Checked.of(labels.pop(item.path), item.sha256, item.check)
        self.store.record(pending)

    def _lookup(self, block: list[FoundFile], misses: list[FoundFile]) -> list[Checked]:
        """The block's files the cache can answer from their stat; the others go to misses."""
        signatures, root = [], str(self.raw_dir)
        for c in block:
            try:
                signatures.append((c.path, Signature.of(os.stat(os.path.join(root, c.path)))))
            except OSError:
                pass   # the worker reports it
        hashes = self.store.hashes(signatures)
        checks = self.store.checks(hashes.values())
        hits = []
        for c in block:
            check = checks.get(hashes.get(c.path, ""))
            if check is None or (self.cfg.near_duplicates and not check.reason and check.dhash is None):
                misses.append(c)
                continue
            self.counts.unchanged += 1
            hits.append(Checked.of(c, hashes[c.path], check))
        return hits


# --------------------------------------------------------------------------- the stage


def prepare(raw_dir: Path, out_dir: Path, cfg: PrepareParams, counts: Counts | None = None,
            input_size: int | None = None) -> dict[str, Any]:
    """Run the whole stage; returns the data report (also written to out_dir/report.json). counts is filled with
    what the cache answered; input_size (train.image_size) warns of images far smaller than the network's input."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir}: input folder not found; put one sub-folder of images per class there "
                         f"(or run `make demo` for the demo data)")
    scan = FolderScan(raw_dir)
    with CheckStore(cfg.cache_dir, raw_dir, cfg.limits()) as store:
        checker = Checker(raw_dir, cfg, store, counts or Counts())
        checked = progress(checker.run(scan.candidates()), desc="checking images", unit="img")
        table = ImageTable()
        rejected: list[dict[str, str]] = []
        for item in checked:
            if item.reason:
                rejected.append({"path": item.path, "reason": item.reason, "detail": item.detail})
            else:
                table.add(item)
        table.freeze()
        rejected = sorted(rejected + [p.as_dict() for p in scan.problems], key=lambda r: r["path"])
        store.prune()
    log.info("cache: %d unchanged, %d hashed only, %d decoded", checker.counts.unchanged, checker.counts.hashed,
             checker.counts.decoded)
    kept, duplicates, conflicts = dedupe(table)
    classes = _classes_or_fail(scan.classes, table, kept, raw_dir)
    splits = predefined_splits(table, kept) if scan.layout == "predefined" else assign_splits(table, kept, cfg)
    report = {
        "layout": scan.layout,
        "policy": cfg.bad_files,
        "classes": classes,
        "n_files_scanned": scan.n_candidates,
        "ignored_non_image_names": scan.ignored,
        "rejected": rejected,
        "n_rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "leakage": check_leakage(table, splits, cfg),
        "n_images": {s: len(rows) for s, rows in splits.items()},
        "per_class": per_class(classes, table, splits),
        **image_size_report(raw_dir, table, kept, cfg.limits(), input_size),
    }
    if rejected and cfg.bad_files == "fail":
        write_json(out_dir / FAILED_REPORT, report)
        listing = "; ".join(f"{r['path']} ({r['reason']})" for r in rejected)
        raise StageError(f"{len(rejected)} bad file(s) in {raw_dir} and prepare.bad_files is 'fail': {listing}. "
                         f"Fix or remove them, or set prepare.bad_files: skip (details in {out_dir / FAILED_REPORT}; "
                         f"the previous outputs are untouched)")
    write_outputs(out_dir, classes, table, splits, report)
    return report


SIZE_SAMPLE = 64          # images whose size is read for the report (headers only)
# Beyond this upscale the network sees interpolation, not detail: 48 px icons at 96 px (2x) already
# train slower for nothing, and Fashion-MNIST's 28 px at 96 px (3.4x) is the demo's honest case.
MAX_UPSCALE = 1.5


def image_size_report(raw_dir: Path, table: ImageTable, kept: np.ndarray, limits: ImageLimits,
                      input_size: int | None) -> dict[str, Any]:
    """The median short side of a sample of images, and a warning when the network's input is far larger:
    upscaled images give the pretrained features little they were trained to see, at a higher cost."""
    sample = table.paths.sort_order(kept)[:: max(1, len(kept) // SIZE_SAMPLE)][:SIZE_SAMPLE]
    sides = []
    for row in sample.tolist():
        path = os.path.join(raw_dir, table.paths[row])
        try:
            sides.append(min(open_checked(read_file(path, limits.max_file_bytes)[0], path, limits).size))
        except (BadImage, OSError):   # changed since it was checked: the next run reports it
            continue
    if not sides:
        return {"median_short_side": None, "warnings": []}
    median = int(np.median(sides))
    warnings = []
    smaller = max(32, round(median / 32) * 32)   # near the images' own, a multiple of what backbones downsample by
    if input_size and median * MAX_UPSCALE < input_size:
        warnings.append(f"images are upscaled {input_size / median:.1f}x: median short side {median} px, "
                        f"train.image_size {input_size}; the network sees interpolation rather than detail, so "
                        f"consider a smaller train.image_size (e.g. -S train.image_size={smaller}, "
                        "faster) and compare the lift over the pixel baseline that evaluate reports")
    return {"median_short_side": median, "warnings": warnings}


def _classes_or_fail(class_names: set[str], table: ImageTable, kept: np.ndarray, raw_dir: Path) -> list[str]:
    """Class names in sorted order; a class left empty, or fewer than two, stops the stage."""
    all_classes = sorted(class_names)
    counts = np.bincount(table.labels[kept], minlength=len(table.label_names))
    usable = Counter({name: int(count) for name, count in zip(table.label_names, counts)})
    empty = [name for name in all_classes if usable[name] == 0]
    if empty:
        raise StageError(f"class folder(s) with no usable image in {raw_dir}: {', '.join(empty)}; "
                         f"add images or remove the folder(s) (see {raw_dir} and the data report)")
    if len(all_classes) < 2:
        raise StageError(f"{raw_dir} has {len(all_classes)} class folder(s) ({', '.join(all_classes) or 'none'}); "
                         f"a classifier needs at least two: one sub-folder of images per class")
    return all_classes


# --------------------------------------------------------------------------- writing, all or nothing

OUTPUTS = ("train.csv", "val.csv", "test.csv", "classes.json", "report.json")
FAILED_REPORT = "report.failed.json"


def write_outputs(out_dir: Path, classes: list[str], table: ImageTable, splits: Splits, report: dict[str, Any]
                  ) -> None:
    """Write every output into a staging folder beside them, then move them in; nothing changes on a failure.
    DVC declares the files (not the folder) and keeps a .gitignore there, so they are renamed one by one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        index = {name: i for i, name in enumerate(classes)}
        for split, rows in splits.items():
            write_split(staging / f"{split}.csv", (      # streamed: no list of rows
                SplitRow(table.paths[row], index[table.label(row)], table.sha256(row))
                for row in table.paths.sort_order(rows).tolist()))
        write_json(staging / "classes.json", classes)
        write_json(staging / "report.json", report)
        for name in OUTPUTS:
            os.replace(staging / name, out_dir / name)
        (out_dir / FAILED_REPORT).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(out_dir: Path) -> None:
    """Staging folders left by a run that was killed (its process is gone)."""
    for folder in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX)
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def run(params: Params) -> dict[str, Any]:
    counts = Counts()
    report = prepare(params.data.raw_dir, params.data.prepared_dir, params.prepare, counts, params.train.image_size)
    print(f"prepare: {report['n_images']} images in {len(report['classes'])} classes, "
          f"{rejected_text(report, params.data.prepared_dir / 'report.json')}, "
          f"{report['duplicates']['n_removed']} duplicates merged, "
          f"{len(report['label_conflicts'])} label conflicts -> {params.data.prepared_dir} "
          f"({counts.decoded} decoded, {counts.hashed} re-hashed, {counts.unchanged} unchanged)")
    for warning in report["warnings"]:
        log.warning("%s", warning)
    return report


def rejected_text(report: dict[str, Any], report_path: Path, top: int = 3) -> str:
    """'3 rejected (2 not_an_image, 1 truncated): see data/prepared/report.json', or '0 rejected'."""
    if not report["n_rejected"]:
        return "0 rejected"
    reasons = Counter(report["rejected_by_reason"]).most_common()   # count first; ties keep the report's order
    shown = ", ".join(f"{count} {reason}" for reason, count in reasons[:top])
    others = len(reasons) - top
    more = f", {others} other reason{'s' * (others > 1)}" if others > 0 else ""
    return f"{report['n_rejected']} rejected ({shown}{more}): see {report_path.as_posix()}"


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Validate, dedupe and split the raw image folder.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
