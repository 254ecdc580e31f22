"""Streaming, error messages, timeouts and stage outcomes of flows.dvc_runner (no Prefect needed)."""

from __future__ import annotations

import logging
import os
import select
import sys
import time
from pathlib import Path

import pytest

import yaml

from flows.dvc_runner import (CommandFailed, CommandResult, TransientFailure, dvc_error, error_summary, read_stages,
                              run_checked, run_streamed, stage_outcome)
from tests.conftest import REPO_ROOT


class Recorder(logging.Handler):
    """Keeps (arrival time, message) of every record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record.getMessage()))


@pytest.fixture
def log() -> tuple[logging.Logger, Recorder]:
    logger = logging.getLogger(f"test-runner-{time.monotonic_ns()}")
    logger.setLevel(logging.INFO)
    recorder = Recorder()
    logger.addHandler(recorder)
    return logger, recorder


class TouchOn(logging.Handler):
    """Creates a file when a record with the given message arrives: an event a child process can wait for."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__()
        self.message, self.path = message, path

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.path.touch()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lines_reach_the_log_while_the_command_still_runs(log, tmp_path: Path) -> None:
    """The command cannot finish before its first line was logged: it waits for the file the log creates."""
    logger, recorder = log
    seen = tmp_path / "first-was-logged"
    logger.addHandler(TouchOn("first", seen))
    code = ("import pathlib, sys, time\n"
            "print('first', flush=True)\n"
            "deadline = time.monotonic() + 30\n"
            f"while not pathlib.Path({str(seen)!r}).exists():\n"
            "    if time.monotonic() > deadline:\n"
            "        sys.exit('first was not logged while the command ran')\n"
            "    time.sleep(0.05)\n"
            "print('second')")
    result = run_streamed(python(code), tmp_path, logger)
    assert result.returncode == 0, result.stderr_tail
    assert [message for _, message in recorder.records][-2:] == ["first", "second"]


def test_progress_redraws_are_rate_limited_and_stderr_is_kept(log, tmp_path: Path) -> None:
    logger, recorder = log
    code = "import sys\nfor i in range(200): sys.stderr.write(f'\\rbar {i}')\nsys.stderr.write('\\ndone\\n')"
    result = run_streamed(python(code), tmp_path, logger)
    bars = [m for _, m in recorder.records if m.startswith("bar")]
    assert 1 <= len(bars) <= 3
    assert result.stderr_tail[-1] == "done"


def test_a_failure_names_the_commands_own_error_lines(log, tmp_path: Path) -> None:
    logger, _ = log
    code = "import sys\nprint('working')\nprint('error: data/raw/cat is empty; add images', file=sys.stderr)\nsys.exit(1)"
    with pytest.raises(CommandFailed, match=r"stage prepare failed \(exit 1\): error: data/raw/cat is empty"):
        run_checked(python(code), tmp_path, logger, "stage prepare")


def test_error_summary_prefers_the_stage_error_and_keeps_dvcs_line() -> None:
    from flows.dvc_runner import CommandResult

    result = CommandResult(1, [], ["Traceback (most recent call last):", '  File "x.py"',
                                   "ValueError: bad value", "ERROR: failed to reproduce 'train'"])
    assert error_summary(result) == "ValueError: bad value | ERROR: failed to reproduce 'train'"


def test_timeout_stops_the_whole_process_group(log, tmp_path: Path) -> None:
    """The child (like a stage under `dvc repro`) must die too, not only the direct process.

    The child holds the write end of a FIFO the test reads: the read ends (EOF) exactly when
    every process holding it is gone, so the test waits for the death itself, not a guess of it.
    """
    logger, _ = log
    fifo = tmp_path / "child-alive"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # first, so the command's open does not block
    code = ("import os, subprocess, sys\n"
            f"fd = os.open({str(fifo)!r}, os.O_WRONLY)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], pass_fds=[fd])\n"
            "os.write(fd, f'{child.pid}\\n'.encode())\n"
            "child.wait()")
    start = time.monotonic()
    try:
        with pytest.raises(CommandFailed, match="stage train timed out after 2 s"):
            run_checked(python(code), tmp_path, logger, "stage train", timeout_s=2)
        assert time.monotonic() - start < 20
        written = read_until_closed(reader, deadline_s=30)
    finally:
        os.close(reader)
    assert written.strip().isdigit(), "the command was stopped before it started its child: raise timeout_s"


def read_until_closed(fd: int, deadline_s: float) -> str:
    """What was written to a non-blocking FIFO until its last writer closed it; fails after deadline_s."""
    chunks, deadline = [], time.monotonic() + deadline_s
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:   # EOF: no process holds the write end any more
                return b"".join(chunks).decode()
            chunks.append(chunk)
    raise AssertionError(f"a process still holds the FIFO {deadline_s:g} s after the timeout: the child survived")


@pytest.mark.parametrize(("lines", "outcome"), [
    (["Running stage 'train':", "> python -m tasks.train"], "ran"),
    (["Stage 'prepare' didn't change, skipping", "Stage 'train' didn't change, skipping"], "skipped"),
    (["Stage 'train' is cached - skipping run, checking out outputs"], "skipped"),
])
def test_stage_outcome(lines: list[str], outcome: str) -> None:
    assert stage_outcome("train", lines) == outcome


def test_stage_outcome_unknown_is_an_error() -> None:
    with pytest.raises(CommandFailed, match="could not tell"):
        stage_outcome("train", ["Stage 'prepare' didn't change, skipping"])


def test_the_guard_passes_sigterm_on_and_exits_as_soon_as_its_group_is_gone(tmp_path: Path) -> None:
    import signal

    import psutil

    from flows.processes import guarded, spawn

    marker = tmp_path / "started"
    script = f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('x'); time.sleep(60)"
    proc = spawn(guarded([sys.executable, "-c", script]), tmp_path, dict(os.environ))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    family = psutil.Process(proc.pid).children(recursive=True)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 3      # not after the SIGKILL grace: the child died at once
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []


# What `dvc pull` prints on a fresh clone whose remote lies in the (git-ignored) workspace.
MISSING_CACHE = [
    "Collecting",
    "WARNING: Some of the cache files do not exist neither locally nor on remote. Missing cache files:",
    "name: data/raw, md5: 0123456789abcdef0123456789abcdef.dir",
    "ERROR: failed to pull data from the cloud - Checkout failed for following targets:",
    "data/raw",
    "Is your cache up to date?",
    "<https://error.dvc.org/missing-files>",
]


def test_dvc_error_keeps_the_warning_that_names_the_missing_files_and_the_whole_error() -> None:
    assert dvc_error(MISSING_CACHE) == MISSING_CACHE[1:]
    assert dvc_error(["ERROR: first", "WARNING: about the second", "ERROR: second"]) == [
        "WARNING: about the second", "ERROR: second"]
    assert dvc_error(["nothing went wrong"]) == []


@pytest.mark.parametrize("code, transient", [
    ("sys.exit(75)", True),                                                  # EX_TEMPFAIL: the stage says retry
    ("print('ConnectionResetError: Connection reset by peer', file=sys.stderr); sys.exit(1)", False),
    ("print('HTTP 503 Service Unavailable', file=sys.stderr); sys.exit(1)", False),
    ("sys.exit(1)", False),
])
def test_only_exit_status_75_counts_as_transient_not_the_words_of_the_error(log, tmp_path: Path, code: str,
                                                                            transient: bool) -> None:
    """The stage knows whether its failure may pass (tasks.lib.errors.TransientError exits 75); its output's
    words do not decide, so a stage that prints a network error while failing for good is not retried."""
    logger, _ = log
    with pytest.raises(CommandFailed) as failed:
        run_checked(python(f"import sys; {code}"), tmp_path, logger, "stage fetch_weights")
    assert isinstance(failed.value, TransientFailure) is transient


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("status, transient", [(75, True), (1, False)])
def test_the_status_of_a_stage_under_dvc_repro_is_the_stages_own(log, tiny_project: Path, status: int,
                                                                 transient: bool) -> None:
    """`dvc repro` exits 255 whatever its stage exited with, and says the stage's status in its error line."""
    logger, _ = log
    with (tiny_project / "dvc.yaml").open("a") as f:
        f.write(f"  flaky:\n    cmd: python -c 'import sys; sys.exit({status})'\n")
    with pytest.raises(CommandFailed, match=f"exited with {status}") as failed:
        run_checked(["dvc", "repro", "--single-item", "flaky"], tiny_project, logger, "stage flaky")
    assert isinstance(failed.value, TransientFailure) is transient


def test_a_hopeless_dvc_failure_is_not_retried_and_its_whole_message_is_shown(log, tmp_path: Path) -> None:
    logger, _ = log
    code = "import sys; print(*%r, sep='\\n', file=sys.stderr); sys.exit(1)" % (MISSING_CACHE,)
    with pytest.raises(CommandFailed) as failed:
        run_checked(python(code), tmp_path, logger, "dvc pull data/raw.dvc")
    assert not isinstance(failed.value, TransientFailure)
    message = str(failed.value)
    assert "Missing cache files" in message and "name: data/raw" in message
    assert "Is your cache up to date?" in message and "error.dvc.org/missing-files" in message


def test_the_projects_stages_are_listed_in_the_order_they_run() -> None:
    assert read_stages(REPO_ROOT) == ["prepare", "decode_cache", "fetch_weights", "train", "evaluate", "export"]


@pytest.mark.parametrize("first, second, dep", [
    ("evaluate", "export", "metrics/evaluate.json"),       # a metrics file, named through ${reports.dir}
    ("train", "evaluate", "artifacts/train/model.pt"),
    ("prepare", "decode_cache", "data/prepared/train.csv"),
])
def test_a_stage_listed_before_one_it_reads_from_is_refused(tmp_path: Path, first: str, second: str,
                                                            dep: str) -> None:
    """The flow runs stages in dvc.yaml's order with --single-item: a wrong order would read stale outputs."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    names = list(spec["stages"])
    i, j = names.index(first), names.index(second)
    names[i], names[j] = names[j], names[i]
    spec["stages"] = {name: spec["stages"][name] for name in names}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    with pytest.raises(ValueError, match=rf"stage '{second}' depends on {dep}, which stage '{first}'.*order"):
        read_stages(tmp_path)


@pytest.mark.slow(seconds=15)
def test_a_stage_run_by_dvc_logs_its_lines_without_dvcs_push_hint(log, tiny_project: Path) -> None:
    """The flow pushes when asked (--push): DVC's 'Use `dvc push`' after every repro is noise in its log."""
    logger, recorder = log
    result = run_checked(["dvc", "repro", "--single-item", "prepare"], tiny_project, logger, "stage prepare")
    assert stage_outcome("prepare", result.dvc_stage_lines) == "ran"
    messages = [message for _, message in recorder.records]
    assert "tiny stage prepare working" in messages
    assert not [m for m in messages if "dvc push" in m], messages
