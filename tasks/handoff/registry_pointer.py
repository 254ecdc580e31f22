"""Production: the promotion log, an append-only log of moves whose newest complete entry *is* production.

    <registry>/<name>/promotion-log/0000000001.json, 0000000002.json, ...

Moving production is one atomic step, creating entry n+1 after reading entry n: a hard link locally
(`registry_files.link_new`), a PUT with `If-None-Match: *` on S3, exists-then-write (no race guarantee)
elsewhere. A writer that finds n+1 taken reads the log and decides again, so no writer waits.
`<registry>/<name>/production` is only a cache of the newest entry, rewritten one writer at a time.
A registry from before the log (a `production` pointer, maybe `promotions/` records) is migrated by its
first reader into entry 1, created exclusively so it happens once. docs/registry.md has the whole story.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem

from tasks.handoff.registry_files import crash_point, link_new
from tasks.lib.io import StorageError, atomic_write_bytes, explained_storage_errors

LOG = "promotion-log"
CACHE = "production"
LOCK = "production.lock"
OLD_RECORDS = "promotions"   # written before the log: one record per move, read once to migrate
ENTRY_RE = re.compile(r"^(\d{10})\.json$")
VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
ATTEMPTS = 50   # each failed try means another writer moved production: far more than racing writers
REPAIR_HINT = "`registry repair` rewrites it from the promotion log"

log = logging.getLogger("registry")


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class ProductionLog:
    """The promotion log of one model name, and its `production` cache."""

    def __init__(self, fs: Any, root: str, url: str, model: str):
        self.fs, self.root, self.model = fs, root, model
        self.url, self.cache_url = f"{url}/{LOG}", f"{url}/{CACHE}"
        self.local = isinstance(fs, LocalFileSystem)
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def head(self) -> dict[str, Any] | None:
        """Production's entry: the newest complete one; None when production never moved."""
        return self._head(self._listing())

    def read(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every complete entry, oldest first, and what is wrong with the others (named by URL)."""
        read = [self._read(seq, path) for seq, path in self._listing()]
        return [entry for entry, _ in read if entry], [problem for entry, problem in read if not entry]

    def _head(self, listing: list[tuple[int, str]]) -> dict[str, Any] | None:
        for seq, path in reversed(listing):
            entry, _ = self._read(seq, path)
            if entry:
                return entry
        if listing:
            raise RegistryError(f"{self.url}: no entry of the promotion log can be read, so which version is "
                                "production is unknown; restore the entries from a backup (`registry list` names them)")
        return None

    def _listing(self) -> list[tuple[int, str]]:
        """(number, path) of every entry, oldest first; an older registry is migrated first."""
        self.fs.invalidate_cache()
        try:
            paths = self.fs.ls(self._path(LOG), detail=False)
        except FileNotFoundError:
            paths = []
        listing = sorted((int(m[1]), p) for p in paths if (m := ENTRY_RE.match(p.rstrip("/").rsplit("/", 1)[-1])))
        if not listing and self._migrate():
            return self._listing()
        return listing

    def _read(self, seq: int, path: str) -> tuple[dict[str, Any] | None, str]:
        url = f"{self.url}/{seq:010d}.json"
        try:
            entry = json.loads(self.fs.cat_file(path))   # an I/O error is raised: it says nothing about the entry
            problem = _entry_problem(entry, seq)
        except ValueError as err:
            problem = type(err).__name__
        return (None, f"{url}: damaged ({problem}), not counted; restore it from a backup") if problem else (entry, "")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def append(self, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Apply `change` (production's entry or None -> the next entry, or None for no move) as one atomic step."""
        for _ in range(ATTEMPTS):
            listing = self._listing()
            entry = change(self._head(listing))
            if entry is None:
                return None
            seq = listing[-1][0] + 1 if listing else 1
            entry = {"seq": seq, "at": utcnow(), **entry}
            if self.create(seq, entry):
                crash_point("production_logged")
                self._refresh_cache_or_warn()
                return entry
        raise RegistryError(f"{self.url}: {ATTEMPTS} other writers moved production while this one tried; try again")

    def create(self, seq: int, entry: dict[str, Any]) -> bool:
        """Write entry `seq` unless it exists (False); RegistryError saying production did not move if it fails."""
        name = f"{seq:010d}.json"
        path, data = self._path(LOG, name), encode(entry)
        try:
            with explained_storage_errors(f"{self.url}/{name}"):
                crash_point("production_log_write")
                if self.local:
                    return link_new(Path(path), data)
                if not self.s3 and self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data, **({"mode": "create"} if self.s3 else {}))
                return True
        except OSError as err:
            if _lost_race(err):
                return False
            raise RegistryError(f"{_named(err, f'{self.url}/{name}')}; production was not moved") from None

    def cache_of(self, head: dict[str, Any]) -> bytes:
        return encode({"model": self.model, "version": head["version"], "seq": head["seq"],
                       "updated_at": head["at"], "reason": head["reason"], "previous": head["previous"]})

    def cache_problem(self, head: dict[str, Any] | None) -> str | None:
        """Why the `production` file does not show `head` (production's entry), None when it does."""
        if head is None or self._read_cache() == self.cache_of(head):
            return None
        return f"{self.cache_url}: does not say what the promotion log says (production is {head['version']}); " \
            + REPAIR_HINT

    def refresh_cache(self) -> bytes | None:
        """Rewrite the `production` file from the newest entry; its new bytes, or None if it said that already."""
        if self.head() is None:   # nothing to cache; also migrates an older registry, before the lock is taken
            return None

        def wanted(cached: bytes | None) -> bytes | None:
            head = self.head()   # read after the cache: the last writer writes the newest entry
            new = self.cache_of(head) if head else None
            return None if new == cached else new

        try:
            with explained_storage_errors(self.cache_url):
                if self.local:
                    with FileLock(self._path(LOCK), preserve_lock_file=True):   # an flock: dropped if we die
                        if (new := wanted(self._read_cache())) is not None:
                            atomic_write_bytes(Path(self._path(CACHE)), new)
                        return new
                return self._refresh_object(wanted)
        except OSError as err:
            raise RegistryError(_named(err, self.cache_url)) from None

    def _refresh_object(self, wanted: Callable[[bytes | None], bytes | None]) -> bytes | None:
        for _ in range(ATTEMPTS):
            etag = self._etag() if self.s3 else None   # before the bytes: a write in between fails the PUT
            new = wanted(self._read_cache())
            if new is None:
                return None
            condition = ({"IfMatch": etag} if etag else {"mode": "create"}) if self.s3 else {}
            try:
                self.fs.pipe_file(self._path(CACHE), new, **condition)
                return new
            except OSError as err:
                if not _lost_race(err):
                    raise
        raise RegistryError(f"{self.cache_url}: {ATTEMPTS} other writers rewrote it while this one tried; "
                            "run `registry repair`")

    def _refresh_cache_or_warn(self) -> None:
        """After a move: production moved and is recorded whatever happens here, so a failure only warns."""
        try:
            self.refresh_cache()
        except RegistryError as err:
            log.warning("production moved and is recorded in %s, but %s; %s", self.url, err, REPAIR_HINT)

    def _read_cache(self) -> bytes | None:
        self.fs.invalidate_cache()
        try:
            return self.fs.cat_file(self._path(CACHE))
        except FileNotFoundError:
            return None

    def _etag(self) -> str | None:
        self.fs.invalidate_cache()
        try:
            return self.fs.info(self._path(CACHE)).get("ETag")
        except FileNotFoundError:
            return None

    def _migrate(self) -> bool:
        """Write entry 1 from an older registry's pointer or records; False when there is nothing to migrate."""
        entry = self._old_state()
        if entry is None:
            return False
        try:
            created = self.create(1, entry)
        except RegistryError as err:
            raise RegistryError(f"this registry was written before the promotion log and is migrated by the "
                                f"first command that can write to it: {err}") from None
        if created:
            self._refresh_cache_or_warn()
        return True

    def _old_state(self) -> dict[str, Any] | None:
        raw = self._read_cache()
        pointer, problem = _old_pointer(raw)
        records = self._old_records()
        if pointer:
            version, previous, history = pointer["version"], pointer["previous"], pointer.get("events", [])
            source = self.cache_url
        elif records:
            version, history = records[-1]["version"], records
            earlier = [r["version"] for r in records[:-1] if r["version"] != version]
            previous = list(reversed(dict.fromkeys(reversed(earlier))))   # each once, where it was last
            source = f"the last of {len(records)} records in {self.cache_url.rsplit('/', 1)[0]}/{OLD_RECORDS}"
        elif raw is not None:
            raise RegistryError(f"{self.cache_url}: the production pointer {problem}, and no promotion log or "
                                "promotion record says which version is production; fix the file, or delete it and "
                                "`registry promote VERSION`")
        else:
            return None
        return {"seq": 1, "at": utcnow(), "action": "migrate", "from": None, "version": version,
                "previous": previous, "reason": f"migrated from {source}", "history": history}

    def _old_records(self) -> list[dict[str, Any]]:
        """The `promotions/` records, oldest first (their names sort by time); damaged ones add nothing."""
        try:
            paths = sorted(self.fs.ls(self._path(OLD_RECORDS), detail=False))
        except FileNotFoundError:
            return []
        records = []
        for path in paths:
            try:
                record = json.loads(self.fs.cat_file(path))
            except ValueError:
                continue
            if isinstance(record, dict) and _is_version(record.get("version")):
                records.append(record)
        return records


def _old_pointer(raw: bytes | None) -> tuple[dict[str, Any] | None, str]:
    """An older registry's pointer (or a cache) when it is usable, else why not."""
    if raw is None:
        return None, "is missing"
    try:
        pointer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "is not valid JSON"
    if not isinstance(pointer, dict) or not _is_version(pointer.get("version")) or not _versions(pointer.get("previous")):
        return None, "is damaged (no version id and rollback stack)"
    return pointer, ""


def _entry_problem(entry: Any, seq: int) -> str | None:
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    if entry.get("seq") != seq:
        return f"seq {entry.get('seq')!r} is not its number {seq}"
    if not _is_version(entry.get("version")) or not (entry.get("from") is None or _is_version(entry["from"])):
        return "version or from is not a version id"
    if not _versions(entry.get("previous")):
        return "previous is not a list of version ids"
    if not isinstance(entry.get("action"), str) or not isinstance(entry.get("reason"), str):
        return "action or reason is not text"
    return None


def _is_version(value: Any) -> bool:
    return isinstance(value, str) and VERSION_RE.match(value) is not None


def _versions(value: Any) -> bool:
    return isinstance(value, list) and all(_is_version(v) for v in value)


def _named(err: OSError, url: str) -> str:
    return str(err) if isinstance(err, StorageError) else f"{url}: {err}"   # a StorageError names its path


def _lost_race(err: BaseException | None) -> bool:
    """A create or conditional PUT refused because another writer got there first (HTTP 412): s3fs raises
    FileExistsError, or an OSError caused by botocore's ClientError with the code PreconditionFailed."""
    while err is not None:
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        if isinstance(err, FileExistsError) or code == "PreconditionFailed":
            return True
        err = err.__cause__ or err.__context__
    return False
