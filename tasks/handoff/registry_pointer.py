"""The production pointer of a registry: read strictly, changed by one writer at a time, rebuilt when lost.

`<registry>/<name>/production` is one small JSON object: the current version, the
rollback stack (`previous`, oldest first) and the event log. Every change (promote,
rollback, repair, a gated publish) is a read-modify-write, made safe per store:

- a local directory: an exclusive `fcntl` lock on `production.lock` beside the pointer is
  held from the read to the `os.replace` of the new pointer, so concurrent commands and
  publishes queue up and none loses another's change;
- S3 (s3fs): a conditional PUT, `If-Match` the ETag that was read (`If-None-Match: *`
  when creating it); a writer that lost the race reads again and retries. This needs a
  store that honours conditional writes (AWS S3 does since 2024, as does moto; some
  S3-compatible servers ignore them, and then two racing writers can still lose one change);
- any other fsspec store: no guarantee; the retrain flow's one-run-at-a-time lock
  serialises its publishes, and manual promotes must not race each other.

A pointer that is not valid JSON, or does not have the expected shape, is never
overwritten by a normal move: the error names it and `registry repair` rebuilds it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.lib.io import StorageError, atomic_write_bytes, explained_storage_errors

POINTER = "production"
LOCK = "production.lock"
VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
CAS_ATTEMPTS = 50
REPAIR_HINT = "run `registry repair` to rebuild it from the versions' own decision records"


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def parse_pointer(data: bytes, url: str) -> dict[str, Any]:
    """The pointer's content, checked; RegistryError naming the file and the repair command otherwise."""
    try:
        pointer = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{url}: the production pointer is not valid JSON ({err}); {REPAIR_HINT}") from None
    problem = _shape_problem(pointer)
    if problem:
        raise RegistryError(f"{url}: the production pointer is damaged ({problem}); {REPAIR_HINT}")
    return pointer


def _shape_problem(pointer: Any) -> str | None:
    if not isinstance(pointer, dict):
        return f"a JSON {type(pointer).__name__}, not an object"
    if not isinstance(pointer.get("version"), str) or not VERSION_RE.match(pointer["version"]):
        return f"version {pointer.get('version')!r} is not a version id"
    previous = pointer.get("previous")
    if not isinstance(previous, list) or not all(isinstance(v, str) and VERSION_RE.match(v) for v in previous):
        return "previous is not a list of version ids"
    if not isinstance(pointer.get("events"), list):
        return "events is not a list"
    return None


def encode(pointer: dict[str, Any]) -> bytes:
    return (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()


class PointerFile:
    """The pointer object of one model name and how to change it safely on its store."""

    def __init__(self, fs: Any, path: str, url: str, local: bool):
        self.fs, self.path, self.url, self.local = fs, path, url, local
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def read(self) -> bytes | None:
        """The pointer's bytes, or None when there is none."""
        self.fs.invalidate_cache()
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def update(self, change: Callable[[bytes | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Apply `change` (current bytes -> new pointer, or None for no change) as one atomic step."""
        if self.local:
            with self._locked():
                return self._apply(change, self.read())
        if self.s3:
            return self._update_s3(change)
        return self._apply(change, self.read())  # no guarantee on this store: see the module docstring

    def _apply(self, change: Callable[[bytes | None], dict[str, Any] | None], raw: bytes | None) -> dict[str, Any] | None:
        new = change(raw)
        if new is not None:
            self.write(encode(new))
        return new

    def write(self, data: bytes, **conditions: Any) -> None:
        try:
            if self.local:
                atomic_write_bytes(Path(self.path), data)  # temp file + os.replace: old or new, never torn
            else:
                with explained_storage_errors(self.url):
                    self.fs.pipe_file(self.path, data, **conditions)  # one PUT: readers see the old or the new
        except StorageError as err:
            raise RegistryError(str(err)) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = Path(self.path).with_name(LOCK)
        try:
            with explained_storage_errors(lock_path):
                lock_path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except StorageError as err:
            raise RegistryError(str(err)) from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if the process dies
            yield

    def _update_s3(self, change: Callable[[bytes | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        for attempt in range(CAS_ATTEMPTS):
            self.fs.invalidate_cache()
            # ETag first, then the bytes: if a write lands in between, the PUT below fails and we retry,
            # where the other order could overwrite the newer pointer with a change based on the older one.
            etag = self._etag()
            raw = self.read()
            new = change(raw)
            if new is None:
                return None
            condition = {"IfMatch": etag} if etag is not None else {"mode": "create"}
            try:
                self.fs.pipe_file(self.path, encode(new), **condition)
                return new
            except (FileExistsError, OSError) as err:
                if not _lost_race(err):
                    raise
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise RegistryError(f"{self.url}: {CAS_ATTEMPTS} other writers changed the pointer while this one tried; "
                            "try again")

    def _etag(self) -> str | None:
        try:
            return self.fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None

    def keep_damaged_copy(self, raw: bytes) -> str:
        """Set a damaged pointer's bytes aside (`production.damaged-<time>`) before it is replaced; returns its URL."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{POINTER}.damaged-{stamp}"
        path, url = self.path.rsplit("/", 1)[0] + "/" + name, self.url.rsplit("/", 1)[0] + "/" + name
        try:
            with explained_storage_errors(url):
                if self.local:
                    atomic_write_bytes(Path(path), raw)
                else:
                    self.fs.pipe_file(path, raw)
        except StorageError as err:
            raise RegistryError(str(err)) from None
        return url


def _lost_race(err: BaseException | None) -> bool:
    """A conditional PUT refused because another writer changed the pointer first (HTTP 412).

    s3fs turns it into FileExistsError (If-None-Match) or a plain OSError(EINVAL) whose cause
    is botocore's ClientError with the code PreconditionFailed.
    """
    while err is not None:
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        if isinstance(err, FileExistsError) or code == "PreconditionFailed":
            return True
        err = err.__cause__ or err.__context__
    return False


def rebuilt_pointer(model: str, target: str, promoted: list[str], reason: str,
                    damaged_copy: str | None) -> dict[str, Any]:
    """A pointer rebuilt from the versions' records: `target` is production, the rollback stack holds the
    other versions the gate promoted (oldest first), and the event log starts again with this repair."""
    event = {"at": utcnow(), "action": "repair", "from": None, "to": target, "reason": reason,
             "rebuilt_from": promoted, "damaged_copy": damaged_copy}
    previous = [v for v in promoted if v != target and v < target]
    return {"model": model, "version": target, "updated_at": event["at"], "reason": reason,
            "previous": previous, "events": [event]}
