"""Writing one registry version all-or-nothing, on a local disk or an object store.

Local disk: the files go into a hidden `.tmp-*` folder beside the versions, each
fsynced, then the folder is renamed into place (rename(2) of a directory is
atomic). Object stores have no rename: the files are written under their final
names and `COMPLETE` (the manifest of every file's sha256) is written last.
Either way a reader that looks for COMPLETE never sees a half-written version.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
STALE_TMP_S = 3600   # a temp folder this old has no writer left: a killed publish's leftovers
# Test hook: called with a stage name ("version_files_written", "version_committed") so a
# test can kill the process or raise exactly there and prove a crash leaves no half state.
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


def sweep_stale_tmp(model_dir: Path, max_age_s: float = STALE_TMP_S) -> None:
    """Remove temp folders a killed writer left behind (old enough that no writer still owns them)."""
    for tmp in model_dir.glob(".tmp-*"):
        if time.time() - tmp.stat().st_mtime > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
