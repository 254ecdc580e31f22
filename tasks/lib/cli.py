"""The command-line entry every stage shares: `python -m tasks.<stage> [--params F] [-S key=value]`.

Expected failures (bad params, missing inputs, bad data, a full disk or a
permission problem) print one clear message naming the file or key and exit 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from tasks.lib.config import DEFAULT_PARAMS, Params, ParamsError, load_params
from tasks.lib.images import set_image_limits
from tasks.lib.io import StorageError, storage_error

T = TypeVar("T")


class StageError(RuntimeError):
    """A stage cannot go on; the message says what is wrong and what to do."""


# StorageError: a full disk or a permission problem, named with its path (tasks.lib.io).
EXPECTED_ERRORS = (StageError, ParamsError, FileNotFoundError, StorageError)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def stage_main(run: Callable[[Params], Any], description: str, argv: list[str] | None = None) -> int:
    """Parse --params / -S, load and validate params, run the stage, map expected errors to exit 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. -S train.head.epochs=3")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, args.set)
        set_image_limits(params.prepare.limits())   # prepare's limits in every stage process (evaluate, export too)
        run(params)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # A full disk or a permission problem anywhere (a cache, a store, an output folder) is
        # named with its path in one line; any other OSError is a bug and keeps its traceback.
        mapped = storage_error(err, err.filename or "?")
        if mapped is err:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        return 1
    return 0


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on a terminal; in a log (stderr not a terminal) one line per 25 % or 30 s at most."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.1,
                        file=sys.stderr)
        return
    yield from LogProgress(iterable, desc, total, unit)


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
