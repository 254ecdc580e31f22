"""Writing registry files all-or-nothing, on a local disk or an object store.

A version: locally a hidden `.tmp-*` folder renamed into place; on an object store (no rename) the files
under their final names, `COMPLETE` last. A promotion log entry: locally a temp file hard-linked to its
name (`link_new`), which appears whole or not at all and never replaces another entry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
STALE_TMP_S = 3600   # a temp folder this old has no writer left: a killed publish's leftovers
# Test hook: called with a stage name ("version_files_written", "version_committed",
# "production_log_write", "production_logged") so a test can kill the process or raise
# exactly there and prove a crash leaves no half state.
CRASH_HOOK: Callable[[str], None] | None = None


def crash_point(stage: str) -> None:
    if CRASH_HOOK is not None:
        CRASH_HOOK(stage)


def write_local(model_dir: Path, version_dir: str, files: dict[str, bytes], marker: bytes) -> None:
    """Write a version into a temp folder of model_dir, then rename it to version_dir."""
    sweep_stale_tmp(model_dir)
    tmp = model_dir / f".tmp-{Path(version_dir).name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, data in files.items():
            write_synced(tmp / name, data)
        crash_point("version_files_written")
        write_synced(tmp / MARKER, marker)
        # rename(2) of a directory is atomic and fails if the target exists and is non-empty.
        os.rename(tmp, version_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("version_committed")


def write_object_store(fs: Any, version_dir: str, files: dict[str, bytes], marker: bytes) -> None:
    """Write a version's files under their final names, COMPLETE last (readers check it)."""
    for name, data in files.items():
        fs.pipe_file(f"{version_dir}/{name}", data)
    crash_point("version_files_written")
    fs.pipe_file(f"{version_dir}/{MARKER}", marker)
    crash_point("version_committed")


def link_new(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, whole or not at all; False if it exists (link(2) lets one racer win)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path.parent)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    write_synced(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(path.parent)
    return True


def sweep_stale_tmp(folder: Path) -> None:
    """Remove temp files and folders a killed writer left behind (old enough that no writer still owns them)."""
    for tmp in folder.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # its writer finished with it meanwhile
            if time.time() - tmp.lstat().st_mtime > STALE_TMP_S:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink()


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_dir(folder: Path) -> None:
    """Make a new name in `folder` durable (it survives a power loss, not only a crash)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
