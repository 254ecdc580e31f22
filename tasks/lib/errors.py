"""The failures a stage expects, each with a message that names the file or key and says what to do.

It imports nothing from the project, so every module and the flows can raise and catch these;
`tasks.lib.cli.stage_main` maps them to exit statuses.
"""

from __future__ import annotations

EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, the user is invited to retry"


class StageError(RuntimeError):
    """A stage cannot go on; the message says what is wrong and what to do."""


class TransientError(StageError):
    """A failure worth retrying as it is (a network or remote-storage hiccup): the stage exits 75."""


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message lists every problem."""


class StorageError(OSError):
    """A write failed because of the disk (full, quota) or permissions; the message names the path and what to do."""

    def __init__(self, code: int, message: str, path: str):
        super().__init__(code, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


EXPECTED_ERRORS = (StageError, ParamsError, FileNotFoundError, StorageError)
