"""tasks.lib.io: atomic writes never leave a half file, JSON is strict and stable, split files round-trip."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from tasks.lib.io import CHUNK, atomic_path, atomic_write_text, read_json, sha256_file, write_json
from tasks.lib.split_files import SplitRow, read_split, split_digest, write_split


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new content")
        raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_finished_write_replaces_the_file_with_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "folder" / "out.txt"   # parents are created
    previous = os.umask(0o022)
    try:
        atomic_write_text(target, "new")
    finally:
        os.umask(previous)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: artifacts are shared files


def test_json_is_stable_and_strict(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"b": 1, "a": [1.5, "x"]})
    first = path.read_bytes()
    write_json(path, {"a": [1.5, "x"], "b": 1})
    assert path.read_bytes() == first and first.index(b'"a"') < first.index(b'"b"')  # key order is fixed
    with pytest.raises(ValueError):
        write_json(path, {"loss": math.nan})  # NaN is not JSON; the old file stays
    assert json.loads(path.read_text()) == {"a": [1.5, "x"], "b": 1}


def test_reading_json_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json: not found; run the stage that writes it"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "torn.json").write_text('{"accuracy": 0.8')
    with pytest.raises(ValueError, match=r"torn\.json: not valid JSON .*delete it and re-run"):
        read_json(tmp_path / "torn.json")


def test_split_files_round_trip_awkward_names(tmp_path: Path) -> None:
    rows = [SplitRow("cats/a,b.png", 0, "0" * 64), SplitRow('dogs/"quoted" name.jpg', 1, "1" * 64),
            SplitRow("vögel/ünïcode.png", 2, "2" * 64)]
    write_split(tmp_path / "train.csv", rows)
    assert read_split(tmp_path / "train.csv") == rows
    with pytest.raises(FileNotFoundError, match=r"val\.csv: split file not found; run the prepare stage"):
        read_split(tmp_path / "val.csv")


def test_hashes_stream_large_files_and_follow_content(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 17)  # several chunks and a partial one
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    write_split(tmp_path / "test.csv", [SplitRow("a.png", 0, "a" * 64)])
    before = split_digest(tmp_path / "test.csv")
    write_split(tmp_path / "test.csv", [SplitRow("a.png", 1, "a" * 64)])
    assert split_digest(tmp_path / "test.csv") != before
