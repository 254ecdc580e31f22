"""Per-image columns for tables with one entry per image: a Python object per image costs far more than its data
(a path and a hex hash as `str` in a small dataclass: over 250 bytes), so these keep flat buffers and numpy arrays.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

import numpy as np

SORT_KEY_MIN_BYTES = 16 * 2**20    # a sort may use this much for its fixed-width keys, or twice the strings' size
SPAN_CHUNK = 65536                 # rows whose offsets are worked out at a time


class PackedStrings:
    """Many strings in one UTF-8 buffer: about len + 8 bytes each. Append-only; index like a list."""

    def __init__(self, strings: Iterable[str] = ()) -> None:
        self._data = bytearray()
        self._ends = array("q")
        for s in strings:
            self.append(s)

    def append(self, s: str) -> None:
        self._data += s.encode()
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        return self._bytes(int(i)).decode()

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def _bytes(self, i: int) -> bytes:
        start = self._ends[i - 1] if i else 0
        return bytes(self._data[start:self._ends[i]])

    def sort_order(self, rows: np.ndarray | None = None) -> np.ndarray:
        """rows (default: all) ordered by their strings, ties in the given order; as `sorted(key=str)` would.

        UTF-8 bytes compare in code-point order, so fixed-width byte keys sort them in numpy; the keys are cut to
        stay within SORT_KEY_MIN_BYTES (or twice the strings' size), and strings only the cut made equal are then
        ordered in Python."""
        rows = np.arange(len(self), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) < 2:
            return rows
        longest, total = 0, 0
        for _, lengths in self._spans(rows):
            longest, total = max(longest, int(lengths.max())), total + int(lengths.sum())
        width = max(1, min(longest, max(SORT_KEY_MIN_BYTES, 2 * total) // len(rows)))
        keys = np.zeros((len(rows), width), dtype=np.uint8)
        cut = np.zeros(len(rows), dtype=bool)
        data = np.frombuffer(self._data, dtype=np.uint8)
        try:
            for at, (starts, lengths) in zip(range(0, len(rows), SPAN_CHUNK), self._spans(rows)):
                block = keys[at:at + len(starts)]
                for col in range(min(width, int(lengths.max()))):
                    longer = np.flatnonzero(lengths > col)
                    block[longer, col] = data[starts[longer] + col]
                cut[at:at + len(starts)] = lengths > width
        finally:
            del data          # the buffer may grow again once no view of it is left
        keys = keys.view(f"S{width}").ravel()
        order = np.argsort(keys, kind="stable")
        if cut.any():
            self._order_cut_ties(order, keys[order], cut[order], rows)
        return rows[order]

    def _spans(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(start offsets, lengths) of the rows' strings, SPAN_CHUNK rows at a time."""
        ends = np.frombuffer(self._ends, dtype=np.int64)
        try:
            for at in range(0, len(rows), SPAN_CHUNK):
                chunk = rows[at:at + SPAN_CHUNK]
                stops = ends[chunk]
                starts = np.where(chunk > 0, ends[np.maximum(chunk - 1, 0)], 0)
                yield starts, stops - starts
        finally:
            del ends

    def _order_cut_ties(self, order: np.ndarray, sorted_keys: np.ndarray, cut: np.ndarray, rows: np.ndarray) -> None:
        """In place: within each run of equal keys that holds a cut string, order by the whole strings."""
        starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
        stops = np.concatenate([starts[1:], [len(order)]])
        for start, stop in zip(starts.tolist(), stops.tolist()):
            if stop - start > 1 and cut[start:stop].any():
                run = order[start:stop].tolist()
                order[start:stop] = sorted(run, key=lambda j: self._bytes(int(rows[j])))
