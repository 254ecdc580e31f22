"""The one progress display every stage uses, and the log format: a tqdm bar on a terminal; in a log, one line
per quarter of the total or per 30 s, not a bar redrawn with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def progress(iterable: Iterable[T] | None = None, desc: str = "progress", total: int | None = None,
             unit: str = "it", *, show: bool = True, unit_scale: bool = False) -> Any:
    """Iterate `iterable` with progress shown, or drive it by hand (`update`, `set_postfix`, `close`).
    `show=False` (a worker that is not the main process) shows nothing; `unit_scale` prints bytes as KiB/MiB."""
    if not show:
        return tqdm(iterable, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.1,
                    file=sys.stderr, unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000)
    return LogProgress(iterable, desc, total, unit)


class LogProgress:
    """Progress for logs: a line at each quarter of the total and at least 30 s apart otherwise."""

    INTERVAL_S = 30.0

    def __init__(self, iterable: Iterable[T] | None, desc: str | None, total: int | None = None,
                 unit: str = "it") -> None:
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.done, self.postfix = 0, ""
        self.started = self.last = time.monotonic()
        self.next_quarter = 1

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        quarter = self.total and self.done * 4 >= self.next_quarter * self.total
        if quarter or now - self.last >= self.INTERVAL_S:
            if quarter:
                self.next_quarter = self.done * 4 // self.total + 1
            self.last = now
            self._write(now)

    def close(self) -> None:
        pass

    def _write(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s {self.postfix}".rstrip(),
              file=sys.stderr, flush=True)
