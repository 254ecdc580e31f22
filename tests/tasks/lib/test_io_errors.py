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
    (tmp_path / "params.yaml").write_text("{}\n")  # every default
    proc = run([sys.executable, "-m", "tasks.fetch_weights", "-S", "model.weights=none",
                "-S", f"model.out_dir={full_disk}/weights"], tmp_path, check=False,
               env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {full_disk}/weights") and "the disk is full" in last


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 KiB tmpfs with room for a few files but not for a decoded cache; unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_decode_cache_blames_a_full_disk_not_the_data(tmp_path: Path, small_disk: Path):
    from tasks.decode_cache import build_cache
    from tasks.lib.errors import StageError
    from tests.tasks.test_decode_cache import PREPS, write_photos

    rows = write_photos(tmp_path / "raw") * 4                      # 48 rows of 24 and 28 px: ~300 KiB of arrays
    for name in ("train", "val", "test"):
        from tasks.lib.split_files import write_split

        write_split(tmp_path / "prepared" / f"{name}.csv", rows if name == "train" else rows[:1])
    with pytest.raises((StageError, StorageError)) as err:
        build_cache(tmp_path / "prepared", tmp_path / "raw", tmp_path / "decoded", PREPS, workers=1,
                    store_dir=small_disk / "rows")
    message = str(err.value)
    assert f"{small_disk}/rows" in message and "cannot write: the disk is full" in message, message
    assert "re-run" not in message and "raw data changed" not in message


def test_any_stage_write_that_hits_permissions_is_one_line_naming_the_path(immutable_dir: Path,
                                                                          capsys: pytest.CaptureFixture):
    # A cache or store folder that cannot be created (the feature store, the row store, an output
    # folder): every stage goes through stage_main, which names the path and the fix.
    from tasks.lib.cli import stage_main

    def stage(params: object) -> None:
        (immutable_dir / "features").mkdir()

    assert stage_main(stage, "a stage", ["--params", str(REPO_ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {immutable_dir}/features: cannot write: operation not permitted")

    def buggy(params: object) -> None:
        raise IsADirectoryError(21, "Is a directory", str(immutable_dir))   # not a disk problem: a traceback

    with pytest.raises(IsADirectoryError):
        stage_main(buggy, "a stage", ["--params", str(REPO_ROOT / "params.yaml")])
