"""Child processes that never outlive their parent: process groups, the parent-death signal, a guard.

Each child gets its own process group and the kernel's parent-death signal, so a SIGKILLed command leaves
nothing running. That signal reaches one process only, so a command with children of its own (`dvc repro`
and its stage) runs under `python -m flows.processes CMD...`, a guard that passes it on to the whole group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO, Any

PR_SET_PDEATHSIG = 1
GUARD_GRACE_S = 10.0


def _own_group_dying_with_parent(death_signal: int) -> None:
    """In the child, before exec: its own process group; death_signal when the parent dies."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)


def spawn(cmd: list[str], cwd: Path, env: dict[str, str], stdout: IO[Any] | int | None = None,
          stderr: IO[Any] | int | None = None, death_signal: int = signal.SIGTERM) -> subprocess.Popen:
    """Start cmd in its own process group, stopped by the kernel if this process dies."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=partial(_own_group_dying_with_parent, death_signal))


def guarded(cmd: list[str]) -> list[str]:
    """cmd run under the guard, so its whole process tree stops when this process dies."""
    return [sys.executable, "-m", "flows.processes", *cmd]


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM proc's process group, SIGKILL what is left after grace_s; proc's exit code."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`, a CI timeout) unwinds like Ctrl-C: every `finally` runs, so the
    isolated working copy is removed and the temporary Prefect server stopped before the command exits."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guard(cmd: list[str]) -> int:
    """Run cmd in its own group; on SIGTERM/SIGINT/SIGHUP (or the parent's death) stop that group.

    The handler only passes the signal on (waiting in it would deadlock on Popen's lock with the interrupted
    wait()), and arms a SIGKILL for a group that ignores it."""
    child = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        _signal_group(child.pid, signal.SIGTERM)
        timer = threading.Timer(GUARD_GRACE_S, _signal_group, args=(child.pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    code = child.wait()
    if received:
        _signal_group(child.pid, signal.SIGKILL)   # what is left of the group once its leader is gone
        return 128 + received[0]
    return code


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:]))
