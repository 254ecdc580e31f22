"""The command-line entry every stage shares: `python -m tasks.<stage> [--params F] [-S key=value]`.

Expected failures (bad params, missing inputs, bad data) print one clear
message naming the file or key and exit 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from tasks.config import DEFAULT_PARAMS, Params, ParamsError, load_params

T = TypeVar("T")


class StageError(RuntimeError):
    """A stage cannot go on; the message says what is wrong and what to do."""


EXPECTED_ERRORS = (StageError, ParamsError, FileNotFoundError)


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
        run(load_params(args.params, args.set))
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on stderr; redrawn at most every few seconds when stderr is a log, not a terminal."""
    interactive = sys.stderr.isatty()
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True,
                    mininterval=0.1 if interactive else 5.0, file=sys.stderr)
