"""One retrain at a time per project: a lock file in the project's .dvc/tmp (`filelock`, an flock on Linux).

An flock belongs to an open file, so two flows in one process exclude each
other as well as two processes do, and the kernel drops the lock when its
holder dies: a crashed run never leaves a stale lock behind. The file records
who holds it, so a waiting run can say what it waits for.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

LOCK_NAME = "retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retrain of this project holds the lock and did not finish in time."""


def lock_path(root: Path) -> Path:
    """Where a project's retrain lock lives (.dvc/tmp is DVC's own ignored scratch folder)."""
    return root / ".dvc" / "tmp" / LOCK_NAME


@contextmanager
def retrain_lock(root: Path, wait_s: float, owner: dict[str, Any],
                 on_wait: Callable[[dict[str, Any]], None] = lambda holder: None) -> Iterator[Path]:
    """Hold the project's retrain lock; wait up to wait_s for it (0: fail at once), else raise RetrainBusy."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({**owner, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()},
                        default=str).encode()
    # The holder's record goes into the locked file itself, the moment it holds it; emptied on release.
    lock = FileLock(path, preserve_lock_file=True, on_acquired=lambda fd: _write(fd, record))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        on_wait(read_owner(path))
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise RetrainBusy(f"another retrain of this project is running ({describe_holder(read_owner(path))}); "
                              f"it holds {path}. Wait for it to finish, or raise lock_wait_minutes "
                              f"to queue behind it") from None
    try:
        yield path
    finally:
        path.write_bytes(b"")
        lock.release()


def _write(fd: int, record: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


def read_owner(path: Path) -> dict[str, Any]:
    """Who holds the lock, as its holder wrote it ({} when unknown)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("flow_run_id"):
        parts.append(f"flow run {holder['flow_run_id']}")
    if holder.get("since"):
        parts.append(f"for {time.time() - float(holder['since']):.0f} s")
    return ", ".join(parts)
