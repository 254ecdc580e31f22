"""Prepare's per-image cache: content hash and decode check, kept across runs so only new files are decoded.

Two tables in one SQLite file (`prepare.cache_dir/checks.sqlite`): `files` maps a file's stat signature
(device, inode, size, mtime_ns, ctime_ns: ctime cannot be set from user space, so `cp -p` or `touch -r` still
change it) to its sha256, and a file modified less than RACY_SECONDS before it was read is re-hashed next run
(git's "racy clean" rule); `checks` maps sha256 + the settings that decide a check to its result, so a renamed or
copied file is never decoded again. SQLite gives atomic commits, concurrent readers (WAL) and a writers' lock.

The cache is optional and bounded: when it cannot be used (full disk, damaged or read-only file) the run warns
once, naming it, and checks every file; after a run, rows of files and data folders no longer there are deleted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import PIL

from tasks.lib.images import ImageLimits

# Bump when what a check computes changes (reasons, dHash): old entries then no longer match.
CHECK_VERSION = 1
RACY_SECONDS = 2.0
LOOKUP_BATCH = 500       # SQLite's default limit on host parameters is 32766; keep queries small

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _cache_failure(err: BaseException) -> bool:
    """A problem of the cache's file or disk (full, I/O error, read-only, locked too long, damaged), not a bug
    (a ProgrammingError or IntegrityError stays one)."""
    return isinstance(err, (OSError, sqlite3.OperationalError)) or type(err) is sqlite3.DatabaseError


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


def _signed(value: int | None) -> int | None:
    """dHashes are unsigned 64-bit; SQLite integers are signed."""
    return None if value is None else value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int | None) -> int | None:
    return None if value is None else value + (1 << 64) if value < 0 else value


def _or_without_cache(empty: Callable[[], Any]) -> Callable[[F], F]:
    """A CheckStore method that answers empty() once the cache is unusable, or when it fails now."""
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def run(self: CheckStore, *args: Any) -> Any:
            if not self.usable:
                return empty()
            try:
                return method(self, *args)
            except (OSError, sqlite3.Error) as err:
                if not _cache_failure(err):
                    raise
                self._give_up(err)
                return empty()
        return run  # type: ignore[return-value]
    return wrap


class CheckStore:
    """The cache of one data folder (root) under given limits; use as a context manager."""

    def __init__(self, cache_dir: Path | str, root: Path | str, limits: ImageLimits) -> None:
        self.root = str(Path(os.path.realpath(root)))
        self.settings = (f"v{CHECK_VERSION}/pillow{PIL.__version__}/px{limits.max_pixels}"
                         f"/ar{limits.max_aspect_ratio:g}/bytes{limits.max_file_bytes}")
        self.path = (Path(cache_dir) / "checks.sqlite").absolute()
        self.db: sqlite3.Connection | None = None
        self.usable = True
        self._open()

    @_or_without_cache(lambda: None)
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")   # with WAL: a power cut loses the last commits, never the file
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
        if self.db is not None:
            self.db.close()

    def _give_up(self, err: BaseException) -> None:
        """Warn once and run on without the cache: it only saves work, so it must never stop the stage."""
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        with contextlib.suppress(OSError):   # SQLite says "disk I/O error" when its -shm file cannot grow
            if shutil.disk_usage(self.path.parent).free < 2**20:
                reason += ", no space left on its disk"
        log.warning("prepare's check cache %s cannot be used (%s); going on without it: every image is read "
                    "and checked this run. Free space there or delete the file; the next run rebuilds it.",
                    self.path, reason)
        self.usable = False
        if self.db is not None:
            try:
                self.db.close()   # rolls back a transaction left open by the failure
            except sqlite3.Error:
                pass
        self.db = None

    # ---- reading
    @_or_without_cache(dict)
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

    @_or_without_cache(dict)
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
    @_or_without_cache(lambda: None)
    def record(self, results: Iterable[tuple[str, Signature, int, str, CheckResult]]) -> None:
        """Store (path, signature, time it was read, sha256, check) of freshly read files, in one transaction."""
        rows = list(results)
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (self.root, path, sig.dev, sig.ino, sig.size, sig.mtime_ns, sig.ctime_ns, read_ns, sha)
                for path, sig, read_ns, sha, _ in rows])
            self.db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)", [
                (sha, self.settings, check.reason, check.detail, _signed(check.dhash)) for *_, sha, check in rows])

    @_or_without_cache(lambda: None)
    def prune(self) -> None:
        """Forget files this run did not see, data folders that are gone and checks nothing refers to."""
        with self.transaction():
            self.db.execute("DELETE FROM files WHERE root = ? AND path NOT IN (SELECT path FROM seen)", (self.root,))
            gone = [r for (r,) in self.db.execute("SELECT DISTINCT root FROM files") if not os.path.isdir(r)]
            self.db.executemany("DELETE FROM files WHERE root = ?", ((r,) for r in gone))
            self.db.execute("DELETE FROM checks WHERE sha256 NOT IN (SELECT sha256 FROM files)")
            self.db.execute("DELETE FROM seen")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """`with store.transaction():` one atomic write (BEGIN IMMEDIATE takes the write lock up front)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:   # SQLite has rolled back already after some errors (a full disk)
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def lookup_check(db_path: Path, sha256: str, settings: str) -> CheckResult | None:
    """A worker's read-only look-up of one content hash (a connection per process, opened once)."""
    global _READER
    try:
        if _READER is None or _READER[0] != db_path:
            if not db_path.exists():
                return None
            _READER = (db_path, sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=60))
        row = _READER[1].execute("SELECT reason, detail, dhash FROM checks WHERE sha256 = ? AND settings = ?",
                                 (sha256, settings)).fetchone()
    except sqlite3.Error as err:
        if not _cache_failure(err):
            raise
        return None   # an unusable cache is a miss: the file is checked (the main process warns about it)
    return None if row is None else CheckResult(row[0], row[1], _unsigned(row[2]))


_READER: tuple[Path, sqlite3.Connection] | None = None

