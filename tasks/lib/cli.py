"""The command-line entry every stage shares: `python -m tasks.<stage> [--params F] [-S key=value]`.

An expected failure (tasks.lib.errors) prints one line and exits 1; a transient one exits 75 (EX_TEMPFAIL) so
the flow retries the stage; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.lib.config import DEFAULT_PARAMS, Params, load_params
from tasks.lib.errors import EX_TEMPFAIL, EXPECTED_ERRORS, TransientError
from tasks.lib.images import set_image_limits
from tasks.lib.io import storage_error
from tasks.lib.progress import setup_logging


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
    except TransientError as err:   # worth retrying as it is: the flow retries on this exit status
        print(f"error: {err}", file=sys.stderr)
        return EX_TEMPFAIL
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

