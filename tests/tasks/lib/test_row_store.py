"""The decoded-row store: its index (16 raw bytes of each content hash, read a chunk at a time) and how a build
lays out a split's rows over kept segments and one new segment."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from tasks.lib import row_store
from tasks.lib.row_store import StoredRows, _read_index_keys, copy_runs, index_keys, plan_split
from tasks.lib.segment_checks import seal_segment


def hex_digests(n: int, salt: str = "") -> np.ndarray:
    return np.array([hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)], dtype="S64")


def test_index_keys_are_the_raw_first_bytes_and_sort_as_the_hex_does(monkeypatch) -> None:
    monkeypatch.setattr(row_store, "INDEX_CHUNK", 7)
    shas = hex_digests(100)
    keys = index_keys(shas)
    raw = keys.view(np.uint8).reshape(-1, 16)
    assert [raw[i].tobytes() for i in range(100)] == [bytes.fromhex(s.decode())[:16] for s in shas]
    assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(shas, kind="stable"))
    assert np.array_equal(index_keys(np.char.upper(shas)), keys)


def test_a_keys_file_reads_back_in_chunks_as_its_index_keys(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(row_store, "INDEX_CHUNK", 9)
    shas = hex_digests(50)
    np.save(tmp_path / "train.1.keys.npy", shas)
    np.save(tmp_path / "empty.1.keys.npy", np.empty(0, dtype="S64"))
    assert np.array_equal(_read_index_keys(tmp_path / "train.1.keys.npy"), index_keys(shas))
    assert len(_read_index_keys(tmp_path / "empty.1.keys.npy")) == 0


def test_find_tells_stored_rows_from_new_ones() -> None:
    stored, new = hex_digests(30), hex_digests(5, salt="new")
    order = np.argsort(index_keys(stored), kind="stable")
    index = StoredRows([], [30], index_keys(stored)[order], np.zeros(30, np.int32),
                       np.arange(30, dtype=np.int32)[order])
    found, _, row = index.find(index_keys(np.concatenate([stored[[4, 17]], new])))
    assert found.tolist() == [True, True] + [False] * 5 and row[:2].tolist() == [4, 17]


def test_a_stored_key_is_found_in_the_first_segment_that_has_it(tmp_path) -> None:
    shas = hex_digests(6)
    for name, part in (("old", shas[:4]), ("new", shas[2:])):
        np.save(tmp_path / f"{name}.npy", np.zeros((len(part), 1, 1, 3), np.uint8))
        np.save(tmp_path / f"{name}.keys.npy", part)
        seal_segment(tmp_path / f"{name}.npy")
    (tmp_path / "half.npy").write_bytes(b"")        # no checksums: unfinished, never read
    np.save(tmp_path / "half.keys.npy", shas)
    for prefer, owner in ((["old"], "old"), (["new"], "new")):
        index = row_store.stored_rows(tmp_path, prefer=prefer)
        assert sorted(p.name for p in index.files) == ["new.npy", "old.npy"]
        found, file_index, _ = index.find(index_keys(shas[2:4]))      # stored in both
        assert found.all() and {index.files[i].stem for i in file_index} == {owner}
    # 4 bytes a stored row for where it lies, not 8: a store of millions of images keeps its index small
    assert index.file_index.dtype == index.row.dtype == np.int32


def where(file_index: list[int], row: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found = np.array([f >= 0 for f in file_index])
    return found, np.array([max(f, 0) for f in file_index], np.int32), np.array(row, np.int32)


def test_a_build_from_scratch_is_one_new_segment_in_split_order() -> None:
    plan = plan_split([], *where([-1] * 5, [0] * 5))
    assert plan.kept == [] and plan.new_rows.tolist() == [0, 1, 2, 3, 4] and len(plan.copies) == 0
    assert plan.position.tolist() == [0, 1, 2, 3, 4]


def test_added_images_go_into_a_new_segment_and_the_stored_ones_stay_where_they_are() -> None:
    # rows 0, 2, 3 are stored in segment 0 (of 3 rows) at 2, 0, 1; rows 1 and 4 are new
    plan = plan_split([3], *where([0, -1, 0, 0, -1], [2, 0, 0, 1, 0]))
    assert plan.kept == [0] and plan.new_rows.tolist() == [1, 4] and len(plan.copies) == 0
    assert plan.slots(np.array([4, 1])).tolist() == [1, 0]
    assert plan.position.tolist() == [2, 3, 0, 1, 4]
    assert list(copy_runs(plan)) == []


def test_too_many_segments_keep_the_largest_and_merge_the_rest(monkeypatch) -> None:
    monkeypatch.setattr(row_store, "MAX_SEGMENTS", 3)
    # segment 0 holds rows 0-3 (4 rows), segments 1 and 2 one row each; row 6 is new
    plan = plan_split([4, 1, 1], *where([0, 0, 0, 0, 1, 2, -1], [0, 1, 2, 3, 0, 0, 0]))
    assert plan.kept == [0] and plan.new_rows.tolist() == [4, 5, 6]
    assert plan.copies.tolist() == [0, 1] and plan.position.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert list(copy_runs(plan)) == [(1, 0, 0, 1), (2, 0, 1, 1)]
    kept_all = plan_split([4, 1], *where([0, 0, 0, 0, 1, -1], [0, 1, 2, 3, 0, 0]))   # 3 segments: still allowed
    assert kept_all.kept == [0, 1] and kept_all.new_rows.tolist() == [5]


def test_a_segment_mostly_of_removed_images_is_merged_into_the_new_one() -> None:
    # 2 of segment 0's 10 rows are still used: they are copied into one new segment, in split order
    plan = plan_split([10], *where([0, -1, 0], [7, 0, 8]))
    assert plan.kept == [] and plan.new_rows.tolist() == [0, 1, 2] and plan.copies.tolist() == [0, 2]
    assert plan.position.tolist() == [0, 1, 2]
    assert list(copy_runs(plan)) == [(0, 7, 0, 1), (0, 8, 2, 1)]
    adjacent = plan_split([10], *where([0, 0, 0], [7, 8, 9]))
    assert list(copy_runs(adjacent)) == [(0, 7, 0, 3)]          # consecutive rows: one copy
    half = plan_split([10, 4], *where([0] * 5 + [1], [0, 1, 2, 3, 4, 0]))      # half of 0 used: kept; 1 of 4 not
    assert half.kept == [0] and half.new_rows.tolist() == [5] and half.position.tolist() == [0, 1, 2, 3, 4, 10]


def test_rows_copied_from_another_filesystem_land_at_their_offsets(tmp_path) -> None:
    """copy_file_range refuses a copy between filesystems (EXDEV), as from a store on another disk: the rows then
    go through pread/pwrite, which must read at the source offset and write at the target offset, not at the
    files' positions. The source is a memfd (an in-memory file, never on tmp_path's filesystem)."""
    source = np.arange(1000, dtype=np.uint32).astype(np.uint8).tobytes()
    src = os.memfd_create("segment")
    os.write(src, source)                     # leaves the file position at the end
    target = tmp_path / "segment.npy"
    target.write_bytes(b"\xff" * 400)
    with open(target, "rb+") as dst:
        dst.seek(300)                         # a position that is not the offset
        row_store._copy_range(src, dst.fileno(), 37, 11, 250)
    os.close(src)
    assert target.read_bytes() == b"\xff" * 11 + source[37:287] + b"\xff" * 139
