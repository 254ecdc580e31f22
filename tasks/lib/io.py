"""Small file helpers every stage shares: atomic writes, hashes, disk errors a person can act on.

Nothing here imports torch, so the predict command and the registry can use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tasks.lib.errors import StorageError

CHUNK = 1 << 20

# errno -> (what happened, what to do): the failures of a write that are the disk's or the
# permissions' fault, not the program's. Anything else keeps its own message and traceback.
_DISK, _PERMISSION = "free space on that disk (or choose another location)", (
    "check the owner and permissions of the folder (and that the file system is writable), "
    "or choose another location")
STORAGE_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", _DISK),
    errno.EDQUOT: ("the disk quota is exceeded", _DISK),
    errno.EACCES: ("permission denied", _PERMISSION),
    errno.EPERM: ("operation not permitted (permissions, or an immutable file or folder)", _PERMISSION),
    errno.EROFS: ("the file system is read-only", _PERMISSION),
}


def storage_error(err: OSError, path: Path | str) -> OSError:
    """`err` re-worded for a person when it is a disk or permission problem (a StorageError), else `err` itself."""
    if isinstance(err, StorageError) or err.errno not in STORAGE_PROBLEMS:
        return err
    what, todo = STORAGE_PROBLEMS[err.errno]
    where = err.filename if isinstance(err.filename, str) and err.filename else str(path)
    return StorageError(err.errno, f"{where}: cannot write: {what} ({err.strerror or err}); {todo}", where)


@contextlib.contextmanager
def explained_storage_errors(path: Path | str) -> Iterator[None]:
    """Raise disk-full and permission errors of the block as a StorageError naming `path`."""
    try:
        yield
    except OSError as err:
        mapped = storage_error(err, path)
        if mapped is err:
            raise
        raise mapped from err


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`: a crash leaves the old
    file untouched and nothing half-written under the final name. Disk and permission errors name the path."""
    path = Path(path)
    with explained_storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            # mkstemp creates 0600; artifacts are shared files, so take the usual umask-based mode.
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically, keys in a stable order so DVC hashes stay stable."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it first (dvc repro)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it and re-run the stage that writes it") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle: BinaryIO) -> str:
    """SHA-256 of everything left in a binary file object (local or fsspec), read in chunks."""
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts): is a temporary folder or lock still in use?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
