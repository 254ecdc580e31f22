"""A full disk and a permission problem are named with their path, for real: a tiny tmpfs that fills up and an
immutable folder (tests run as root, which bypasses plain file modes, but not the immutable attribute)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lib.io import StorageError, atomic_write_bytes, storage_error, write_json
from tests.conftest import REPO_ROOT, run


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, already full; unmounted afterwards. Skipped where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the mapping is tested directly below")
    try:
        (mount_point / "keep.json").write_text('{"old": true}\n')
        with open(mount_point / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 4096)
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def immutable_dir(tmp_path: Path):
    """A folder with the immutable attribute: creating a file in it fails with EPERM even for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "keep.json").write_text('{"old": true}\n')
    proc = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i is not possible here ({proc.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_full_disk_is_named_and_the_old_file_survives(full_disk: Path):
    target = full_disk / "keep.json"
    with pytest.raises(StorageError) as err:
        atomic_write_bytes(target, b"x" * 100_000)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith(f"{full_disk}/") and "cannot write: the disk is full" in str(err.value)
    assert "free space on that disk" in str(err.value)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "keep.json"]  # no temp file left behind


def test_a_folder_that_refuses_writes_is_named(immutable_dir: Path):
    with pytest.raises(StorageError) as err:
        write_json(immutable_dir / "keep.json", {"new": True})
    assert err.value.errno == errno.EPERM and str(immutable_dir) in str(err.value)
    assert "operation not permitted" in str(err.value) and "permissions of the folder" in str(err.value)
    assert (immutable_dir / "keep.json").read_text() == '{"old": true}\n'


@pytest.mark.parametrize(("code", "words"), [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                             (errno.EDQUOT, "quota"), (errno.ENOSPC, "disk is full")])
def test_every_disk_or_permission_errno_is_mapped(code: int, words: str):
    mapped = storage_error(OSError(code, "os message", "/data/out.json"), "/data")
    assert isinstance(mapped, StorageError) and mapped.errno == code
    assert str(mapped).startswith("/data/out.json: cannot write: ") and words in str(mapped)


def test_other_errors_keep_their_own_type():
    err = FileNotFoundError(errno.ENOENT, "gone", "/x")
    assert storage_error(err, "/x") is err


@pytest.mark.slow
def test_a_stage_reports_a_full_disk_in_one_line(full_disk: Path, tmp_path: Path):
    (tmp_path / "params.yaml").write_text("")
    proc = run([sys.executable, "-m", "tasks.fetch_weights", "-S", "model.weights=none",
                "-S", f"model.out_dir={full_disk}/weights"], tmp_path, check=False,
               env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {full_disk}/weights") and "the disk is full" in last
