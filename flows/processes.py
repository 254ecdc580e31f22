"""Child processes that never outlive their parent: process groups, the parent-death signal, a guard.

A command may be stopped by SIGKILL at any moment (a crash, the OOM killer, an
impatient user). Everything it started must stop with it, without anyone
cleaning up: each child gets its own process group and the kernel's
parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`). That signal reaches one
process only, so a command with children of its own (`dvc repro` and the
stage under it) runs under `python -m flows.processes CMD...`, a guard that
passes the signal on to the whole group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable

PR_SET_PDEATHSIG = 1
GUARD_GRACE_S = 10.0


def _own_group_dying_with_parent(death_signal: int) -> Callable[[], None]:
    """In the child, before exec: its own process group; death_signal when the parent dies."""
    def setup() -> None:
        os.setsid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)

    return setup


def spawn(cmd: list[str], cwd: Path, env: dict[str, str], stdout: IO[Any] | int | None = None,
          stderr: IO[Any] | int | None = None, death_signal: int = signal.SIGTERM) -> subprocess.Popen:
    """Start cmd in its own process group, stopped by the kernel if this process dies."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=_own_group_dying_with_parent(death_signal))


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


def guard(cmd: list[str]) -> int:
    """Run cmd in its own group; on SIGTERM/SIGINT/SIGHUP (or the parent's death) stop that group."""
    child = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        stop_process_group(child, GUARD_GRACE_S)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    return child.wait()


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:]))
