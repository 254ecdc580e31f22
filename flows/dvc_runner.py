"""Run `dvc`/`git` commands with their output streamed, line by line, into a logger.

The retrain flow runs every DVC stage through `run_streamed`: each line the
stage prints reaches the Prefect run log as it is printed (not after the stage
ends), the last lines are kept for the error message, and a timeout kills the
whole process group (dvc and the stage's python under it), not just dvc.
`read_stages` lists dvc.yaml's stages; nothing here imports Prefect.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import yaml

from flows.processes import GUARD_GRACE_S, guarded, spawn, stop_process_group
from tasks.lib.errors import EX_TEMPFAIL

TAIL_LINES = 40
# A progress bar redraws with '\r'; log a redraw at most this often so the run log stays readable.
PROGRESS_LOG_INTERVAL_S = 5.0
# The guard SIGKILLs a group that ignores SIGTERM GUARD_GRACE_S after passing it on; a SIGKILL to the guard
# before then would leave that group running, orphaned: so wait longer.
KILL_GRACE_S = GUARD_GRACE_S + 5.0
DVC_STAGE_LINE = re.compile(r"^(Running stage '|Stage ')")
# DVC's hints after each stage that wrote files; the flow says what changed itself and pushes when asked
# (--push). `dvc repro` prints the push hint unconditionally (DVC 3 has no setting for it; -q would also
# drop the stage lines the flow reads), so it is filtered here.
DVC_HINT_LINES = re.compile(r"^(To track the changes with git, run:|To enable auto staging, run:|"
                            r"dvc config core\.autostage true|git add \S+|"
                            r"Use `dvc push` to send your updates to remote storage\.)")
# `dvc repro` exits 255 whatever its stage exited with; its error line says the stage's own status.
DVC_STAGE_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)$")

StageOutcome = Literal["ran", "skipped"]


class CommandFailed(RuntimeError):
    """A command exited non-zero (or timed out); the message carries its own last error lines."""


class TransientFailure(CommandFailed):
    """The command (or the stage under `dvc repro`) exited 75, EX_TEMPFAIL: its failure may pass on a retry
    (network, remote storage), the only kind the flow retries. The stage decides, not its output's words."""


@dataclass
class CommandResult:
    """What a finished command left: exit code and the tails of its two streams."""

    returncode: int
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    timed_out: bool = False
    dvc_stage_lines: list[str] = field(default_factory=list)


def read_stages(workdir: Path) -> list[str]:
    """Stage names in dvc.yaml's order, which must be the order they run in: the retrain flow runs each with
    `dvc repro --single-item`, from the first stale one on, so a stage listed before one whose output it reads
    is refused here."""
    path = workdir / "dvc.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the retrain flow runs the stages of a DVC project")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    if not stages:
        raise ValueError(f"{path} defines no stages")
    params_file = workdir / "params.yaml"
    check_stage_order(path, stages, (yaml.safe_load(params_file.read_text()) if params_file.exists() else {}) or {})
    return list(stages)


def check_stage_order(path: Path, stages: dict, params: dict) -> None:
    """ValueError when a stage depends on a path that a stage listed after it writes."""
    writers: list[tuple[str, int, str]] = []     # (path, stage index, stage name)
    for i, (name, spec) in enumerate(stages.items()):
        for key in ("outs", "metrics", "plots"):
            writers += [(out, i, name) for out in _stage_paths((spec or {}).get(key), params)]
    for i, (name, spec) in enumerate(stages.items()):
        for dep in _stage_paths((spec or {}).get("deps"), params):
            for out, j, writer in writers:
                if j > i and (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")):
                    raise ValueError(f"{path}: stage {name!r} depends on {dep}, which stage {writer!r}, listed "
                                     f"after it, writes; list the stages in the order they run (the retrain flow "
                                     f"runs them in dvc.yaml's order)")


def _stage_paths(entries: object, params: dict) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (plain strings or one-key mappings), ${...} filled in."""
    def fill(match: re.Match[str]) -> str:
        value: object = params
        for key in match.group(1).split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return match.group(0) if value is None else str(value)

    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries or [] if isinstance(e, (str, dict)) and e]
    return [os.path.normpath(re.sub(r"\$\{([^}]+)\}", fill, str(name))) for name in names]


def subprocess_env() -> dict[str, str]:
    """The environment of every child: unbuffered python, this venv first on PATH, tools offline."""
    offline = {"DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true", "DO_NOT_TRACK": "1", "ORT_DISABLE_TELEMETRY": "1"}
    return {**offline, **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1"}   # unbuffered: stage output must arrive as it is printed


def run_streamed(cmd: list[str], cwd: Path, log: logging.Logger | logging.LoggerAdapter,
                 timeout_s: float | None = None) -> CommandResult:
    """Run cmd in its own process group, logging each output line as it arrives."""
    log.info("$ %s   (in %s)", " ".join(cmd), cwd)
    proc = spawn(guarded(cmd), cwd, subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout_tail: deque[str] = deque(maxlen=TAIL_LINES)
    stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)
    stage_lines: list[str] = []  # dvc's "Running stage"/"Stage ... skipping" lines, however long the output
    # Each reader runs in a copy of this context: Prefect's run logger finds its flow run and API
    # settings there (a bare thread would fall back to the import-time settings).
    readers = [threading.Thread(target=contextvars.copy_context().run,
                                args=(_pump, stream, log, tail, stage_lines), daemon=True)
               for stream, tail in ((proc.stdout, stdout_tail), (proc.stderr, stderr_tail))]
    for reader in readers:
        reader.start()
    timed_out = _wait(proc, timeout_s)
    for reader in readers:
        reader.join(timeout=30)
    return CommandResult(proc.returncode, list(stdout_tail), list(stderr_tail), timed_out, stage_lines)


def _wait(proc: subprocess.Popen, timeout_s: float | None) -> bool:
    """Wait for proc; past the deadline, stop its whole process group. True when it timed out."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        stop_process_group(proc, KILL_GRACE_S)
        return True
    except BaseException:  # the flow itself is cancelled or interrupted: do not leave the stage running
        stop_process_group(proc, KILL_GRACE_S)
        raise


def _pump(stream: IO[bytes], log: logging.Logger | logging.LoggerAdapter, tail: deque[str],
          stage_lines: list[str]) -> None:
    """Forward a stream to the log; '\\n' ends a line, '\\r' a progress redraw (rate-limited)."""
    buffer = b""
    last_progress = 0.0
    while chunk := stream.read1(65536):
        buffer += chunk
        while (match := re.search(rb"[\r\n]", buffer)) is not None:
            raw, sep, buffer = buffer[:match.start()], buffer[match.start():match.end()], buffer[match.end():]
            text = raw.decode(errors="replace").rstrip()
            if not text or DVC_HINT_LINES.match(text.strip()):
                continue
            if sep == b"\r":
                now = time.monotonic()
                if now - last_progress < PROGRESS_LOG_INTERVAL_S:
                    continue
                last_progress = now
            else:
                _keep(text, tail, stage_lines)
            log.info("%s", text)
    if text := buffer.decode(errors="replace").rstrip():
        _keep(text, tail, stage_lines)
        log.info("%s", text)


def _keep(line: str, tail: deque[str], stage_lines: list[str]) -> None:
    tail.append(line)
    if DVC_STAGE_LINE.match(line):
        stage_lines.append(line)


def run_checked(cmd: list[str], cwd: Path, log: logging.Logger | logging.LoggerAdapter, what: str,
                timeout_s: float | None = None) -> CommandResult:
    """run_streamed, raising CommandFailed with the command's own last error lines when it fails."""
    result = run_streamed(cmd, cwd, log, timeout_s=timeout_s)
    if result.timed_out:
        raise CommandFailed(f"{what} timed out after {timeout_s:g} s and was stopped; "
                            f"last output: {error_summary(result)}")
    if result.returncode != 0:
        status = exit_status(result)
        kind = TransientFailure if status == EX_TEMPFAIL else CommandFailed
        raise kind(f"{what} failed (exit {status}): {error_summary(result)}")
    return result


def exit_status(result: CommandResult) -> int:
    """The failed command's own exit status or, under `dvc repro`, its stage's."""
    for line in reversed(result.stderr_tail):
        if (match := DVC_STAGE_STATUS.search(line.strip())) is not None:
            return int(match.group(1))
    return result.returncode


def error_summary(result: CommandResult, max_lines: int = 6) -> str:
    """The lines that say what went wrong: the stage's own 'error:' lines and tracebacks' last line first."""
    lines = [line.strip() for line in result.stderr_tail or result.stdout_tail if line.strip()]
    own = [line for line in lines if re.match(r"^(error:|\w*(Error|Exception)\b)", line)]
    dvc = dvc_error(lines)
    chosen = own[-max_lines:] + dvc if own or dvc else lines[-max_lines:]
    return " | ".join(dict.fromkeys(chosen)) or "(no output)"


def dvc_error(lines: list[str], max_lines: int = 30) -> list[str]:
    """DVC's last 'ERROR:' whole: the WARNING lines just before it (which files are missing), the error
    and the lines that continue it (the targets a checkout missed, DVC's advice)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("ERROR:")]
    if not starts:
        return []
    first = starts[-1]
    for i in range(starts[-1] - 1, max(-1, starts[-1] - 20), -1):   # the earliest WARNING since the last error
        if lines[i].startswith("ERROR:"):
            break
        if lines[i].startswith("WARNING:"):
            first = i
    block = [line for line in lines[first:] if not DVC_HINT_LINES.match(line)]
    return block[:max_lines]


def stage_outcome(stage: str, lines: list[str]) -> StageOutcome:
    """Did `dvc repro <stage>` run the stage or skip it (unchanged, or restored from the run cache)?"""
    name = re.escape(stage)
    if any(re.search(rf"Running stage '{name}'", line) for line in lines):
        return "ran"
    if any(re.search(rf"Stage '{name}' (didn't change|is cached)", line) for line in lines):
        return "skipped"
    raise CommandFailed(f"could not tell from dvc's output whether stage {stage!r} ran or was skipped: "
                        + " | ".join(lines[-5:]))
