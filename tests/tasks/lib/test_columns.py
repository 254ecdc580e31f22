"""Per-image columns: packed strings sort exactly as Python sorts str, and a split file reads back the same."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tasks.lib import columns
from tasks.lib.columns import PackedStrings
from tasks.lib.split_files import SplitRow, read_split, read_split_columns, write_split


def awkward_names(n: int, seed: int = 0) -> list[str]:
    """Names where '/' and '-' meet (a folder walk orders those differently from a sort), non-ASCII, prefixes."""
    rng = random.Random(seed)
    names = ["", "a", "a/b", "a-b", "a/b/c", "a.b", "ü", "z", "é/x", "ab" * 59 + "b", "ab" * 60 + "c", "ab" * 60]
    return names + ["".join(rng.choice("ab/-é.") for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_packed_strings_give_back_what_went_in() -> None:
    names = awkward_names(200)
    packed = PackedStrings(names)
    assert len(packed) == len(names) and list(packed) == names and packed[3] == "a-b"


@pytest.mark.parametrize(("key_budget", "span_chunk"), [(columns.SORT_KEY_MIN_BYTES, columns.SPAN_CHUNK), (0, 7)])
def test_sort_order_is_pythons_order_for_all_rows_and_for_a_subset(monkeypatch, key_budget: int,
                                                                   span_chunk: int) -> None:
    """key_budget 0: keys are cut at twice the mean length, so the long names can only be told apart by the
    whole-string pass over the runs the cut left equal; span_chunk 7: the keys are built in many chunks."""
    monkeypatch.setattr(columns, "SORT_KEY_MIN_BYTES", key_budget)
    monkeypatch.setattr(columns, "SPAN_CHUNK", span_chunk)
    names = awkward_names(3000)
    packed = PackedStrings(names)
    assert [names[i] for i in packed.sort_order()] == sorted(names)
    subset = np.array([9, 10, 11, 5, 3, 3, 700, 1])
    assert packed.sort_order(subset).tolist() == sorted(subset.tolist(), key=lambda i: names[i])
    assert packed.sort_order(np.array([], dtype=np.int64)).tolist() == []


def test_equal_strings_keep_the_given_order() -> None:
    packed = PackedStrings(["b", "a", "b", "a"])
    assert packed.sort_order(np.array([2, 0, 3, 1])).tolist() == [3, 1, 2, 0]


def test_split_columns_hold_what_read_split_reads(tmp_path) -> None:
    rows = [SplitRow(f"class_{i % 3}/ïmg {i}.png", i % 3, f"{i:064x}") for i in range(50)]
    write_split(tmp_path / "train.csv", rows)
    cols = read_split_columns(tmp_path / "train.csv")
    assert len(cols) == 50 and list(cols) == read_split(tmp_path / "train.csv") == rows
    assert cols.labels.tolist() == [r.label for r in rows]
    assert cols.sha256.tolist() == [r.sha256.encode() for r in rows]
    write_split(tmp_path / "empty.csv", [])
    assert len(read_split_columns(tmp_path / "empty.csv")) == 0
