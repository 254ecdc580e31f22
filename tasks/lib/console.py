"""What the command-line tools print: text from untrusted files made safe for a terminal (an ANSI escape or a
bidi override in a class or file name must not reach it raw), and a quiet exit when the reader of stdout goes
away (`registry show | head`).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

# C0 and C1 control characters (tab and newline kept apart), DEL, and the Unicode
# format characters that reorder or hide text (bidi overrides, zero-width joiners).
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_LINE_BREAKS = re.compile(r"[\t\n]")
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)

F = TypeVar("F", bound=Callable[..., int])


def terminal_safe(text: object, *, one_line: bool = False) -> str:
    """`text` with every control or reordering character shown as an escape (`\\x1b`, `\\u202e`); one_line also
    escapes tabs and newlines, for a value in one cell of a table."""
    shown = _UNSAFE.sub(_escape, str(text))
    return _LINE_BREAKS.sub(_escape, shown) if one_line else shown


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def quiet_broken_pipe(main: F) -> F:
    """Wrap a CLI main: when stdout's reader has gone (`| head`), stop quietly instead of a BrokenPipeError."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int:
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return result
        except BrokenPipeError:
            # Point stdout at /dev/null so the interpreter's last flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE

    return wrapper  # type: ignore[return-value]
