"""Prepare's per-image cache: content hash and decode check, kept across runs so only new files are decoded.

Two tables in one SQLite file (`prepare.cache_dir/checks.sqlite`):

- `files`: a file's stat signature -> its sha256, the fast path that skips
  re-reading unchanged files. The signature is (device, inode, size,
  mtime_ns, ctime_ns): ctime cannot be set from user space, so a rewrite
  that restores the old mtime (cp -p, rsync -t, touch -r) still changes it.
  A file modified less than RACY_SECONDS before it was read is not trusted
  on the next run (a second write in the same clock tick might leave its
  timestamps unchanged), so it is re-hashed (not re-decoded); this is git's
  "racy clean" rule.
- `checks`: sha256 + the settings that decide a check (the limits, Pillow's
  version, CHECK_VERSION) -> reason, detail and dHash. Keyed by content, so
  a renamed, copied or re-checked-out file is never decoded again.

SQLite gives atomic commits (a crash loses at most the batch in flight),
concurrent readers (WAL) and a lock between concurrent writers. The cache is
never a DVC output and can be deleted at any time: the next run rebuilds it.

Bounded: after a successful run, `files` rows of that data folder that the
run did not see are deleted, rows of data folders that no longer exist are
deleted, and `checks` rows no file refers to any more are deleted. So the
cache holds the images present in existing data folders, nothing more.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL

from tasks.lib.images import ImageLimits

# Bump when what a check computes changes (reasons, dHash): old entries then no longer match.
CHECK_VERSION = 1
RACY_SECONDS = 2.0
LOOKUP_BATCH = 500       # SQLite's default limit on host parameters is 32766; keep queries small


@dataclass(frozen=True, slots=True)
class Signature:
    """What stat says about a file; equal signatures mean unchanged content (see the module docstring)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> Signature:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def racy(self, read_ns: int) -> bool:
        """Changed so shortly before it was read that a later change might keep the same timestamps."""
        return read_ns - max(self.mtime_ns, self.ctime_ns) < RACY_SECONDS * 1e9


@dataclass(frozen=True, slots=True)
class CheckResult:
    reason: str
    detail: str
    dhash: int | None


def settings_key(limits: ImageLimits) -> str:
    return (f"v{CHECK_VERSION}/pillow{PIL.__version__}/px{limits.max_pixels}/ar{limits.max_aspect_ratio:g}"
            f"/bytes{limits.max_file_bytes}")


def _signed(value: int | None) -> int | None:
    """dHashes are unsigned 64-bit; SQLite integers are signed."""
    return None if value is None else value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int | None) -> int | None:
    return None if value is None else value + (1 << 64) if value < 0 else value


class CheckStore:
    """The cache of one data folder (root) under given limits; use as a context manager."""

    def __init__(self, cache_dir: Path | str, root: Path | str, limits: ImageLimits) -> None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.root = str(Path(os.path.realpath(root)))
        self.settings = settings_key(limits)
        self.path = (Path(cache_dir) / "checks.sqlite").absolute()
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: a power cut loses the last commits, never the file
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS files (root TEXT, path TEXT, dev INT, ino INT, size INT, mtime_ns INT,
                ctime_ns INT, read_ns INT, sha256 TEXT, PRIMARY KEY (root, path)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS checks (sha256 TEXT, settings TEXT, reason TEXT, detail TEXT, dhash INT,
                PRIMARY KEY (sha256, settings)) WITHOUT ROWID;
            CREATE TEMP TABLE seen (path TEXT PRIMARY KEY) WITHOUT ROWID;
        """)

    def __enter__(self) -> CheckStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    # ---- reading
    def hashes(self, items: Sequence[tuple[str, Signature]]) -> dict[str, str]:
        """path -> sha256 for the files whose recorded signature still matches; marks every path as seen."""
        found: dict[str, str] = {}
        with self.transaction():
            self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((p,) for p, _ in items))
            for start in range(0, len(items), LOOKUP_BATCH):
                part = dict(items[start:start + LOOKUP_BATCH])
                marks = ",".join("?" * len(part))
                rows = self.db.execute(f"SELECT path, dev, ino, size, mtime_ns, ctime_ns, read_ns, sha256 "
                                       f"FROM files WHERE root = ? AND path IN ({marks})", (self.root, *part))
                for path, dev, ino, size, mtime_ns, ctime_ns, read_ns, sha in rows:
                    recorded = Signature(dev, ino, size, mtime_ns, ctime_ns)
                    if recorded == part[path] and not recorded.racy(read_ns):
                        found[path] = sha
        return found

    def checks(self, hashes: Iterable[str]) -> dict[str, CheckResult]:
        """sha256 -> the stored check under these settings."""
        wanted = sorted(set(hashes))
        found: dict[str, CheckResult] = {}
        for start in range(0, len(wanted), LOOKUP_BATCH):
            part = wanted[start:start + LOOKUP_BATCH]
            rows = self.db.execute(f"SELECT sha256, reason, detail, dhash FROM checks WHERE settings = ? "
                                   f"AND sha256 IN ({','.join('?' * len(part))})", (self.settings, *part))
            found |= {sha: CheckResult(reason, detail, _unsigned(dhash)) for sha, reason, detail, dhash in rows}
        return found

    # ---- writing
    def record(self, results: Iterable[tuple[str, Signature, int, str, CheckResult]]) -> None:
        """Store (path, signature, time it was read, sha256, check) of freshly read files, in one transaction."""
        rows = list(results)
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (self.root, path, sig.dev, sig.ino, sig.size, sig.mtime_ns, sig.ctime_ns, read_ns, sha)
                for path, sig, read_ns, sha, _ in rows])
            self.db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)", [
                (sha, self.settings, check.reason, check.detail, _signed(check.dhash)) for *_, sha, check in rows])

    def prune(self) -> None:
        """Forget files this run did not see, data folders that are gone and checks nothing refers to."""
        with self.transaction():
            self.db.execute("DELETE FROM files WHERE root = ? AND path NOT IN (SELECT path FROM seen)", (self.root,))
            gone = [r for (r,) in self.db.execute("SELECT DISTINCT root FROM files") if not os.path.isdir(r)]
            self.db.executemany("DELETE FROM files WHERE root = ?", ((r,) for r in gone))
            self.db.execute("DELETE FROM checks WHERE sha256 NOT IN (SELECT sha256 FROM files)")
            self.db.execute("DELETE FROM seen")

    def transaction(self) -> sqlite3.Connection:
        """`with store.transaction():` one atomic write (BEGIN IMMEDIATE takes the write lock up front)."""
        return _Transaction(self.db)


def lookup_check(db_path: Path, sha256: str, settings: str) -> CheckResult | None:
    """A worker's read-only look-up of one content hash (a connection per process, opened once)."""
    global _READER
    if _READER is None or _READER[0] != db_path:
        if not db_path.exists():
            return None
        _READER = (db_path, sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=60))
    row = _READER[1].execute("SELECT reason, detail, dhash FROM checks WHERE sha256 = ? AND settings = ?",
                             (sha256, settings)).fetchone()
    return None if row is None else CheckResult(row[0], row[1], _unsigned(row[2]))


_READER: tuple[Path, sqlite3.Connection] | None = None


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
