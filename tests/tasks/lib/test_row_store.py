"""The decoded-row store's index: 16 raw bytes of each content hash, read from the keys files a chunk at a time."""

from __future__ import annotations

import hashlib

import numpy as np

from tasks.lib import row_store
from tasks.lib.row_store import StoredRows, _read_index_keys, index_keys


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
    index = StoredRows([], index_keys(stored)[order], np.zeros(30, np.int32), np.arange(30, dtype=np.int32)[order])
    found, _, row = index.find(index_keys(np.concatenate([stored[[4, 17]], new])))
    assert found.tolist() == [True, True] + [False] * 5 and row[:2].tolist() == [4, 17]
