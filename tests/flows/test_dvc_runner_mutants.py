"""What the stage runner tells a user from dvc.yaml and from a failed command's output, case by case."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from flows import dvc_runner
from flows.dvc_runner import CommandResult, _stage_paths, error_summary, read_stages, run_checked


@pytest.mark.parametrize("key", ["outs", "metrics", "plots"])
def test_a_stage_listed_before_the_one_that_writes_its_metrics_or_plots_file_is_refused(tmp_path: Path,
                                                                                       key: str) -> None:
    """A file a stage declares as a metric or a plot is as much its output as one under outs."""
    stages = {"report": {"cmd": "make-report", "deps": ["${reports.dir}/scores.json"]},
              "score": {"cmd": "score", key: [{"${reports.dir}/scores.json": {"cache": False}}]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"reports": {"dir": "metrics"}}))
    with pytest.raises(ValueError, match=r"stage 'report' depends on metrics/scores\.json, which stage 'score', "
                                         r"listed after it, writes"):
        read_stages(tmp_path)
    stages = {"score": stages["score"], "report": stages["report"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    assert read_stages(tmp_path) == ["score", "report"]


def test_a_path_whose_variable_params_yaml_does_not_define_stays_as_dvc_yaml_writes_it() -> None:
    """DVC fills such a variable from its own `vars:`; the runner compares it as written, never half-filled."""
    paths = _stage_paths(["${vars_only.dir}/x.csv", {"${data.dir}/y.csv": {"cache": False}}, "${data.missing}/z"],
                         {"data": {"dir": "data/prepared"}})
    assert paths == ["${vars_only.dir}/x.csv", "data/prepared/y.csv", "${data.missing}/z"]


NOISE = [f"WARNING: a progress note {i}" for i in range(8)]


def test_a_failure_is_summarised_by_the_stages_own_error_even_among_many_later_lines() -> None:
    result = CommandResult(1, [], ["error: data/raw/cat is empty; add images", *NOISE])
    assert error_summary(result) == "error: data/raw/cat is empty; add images"


def test_a_failure_with_only_dvcs_error_is_summarised_by_it_and_without_either_by_the_last_lines() -> None:
    hints = [f"hint {i}" for i in range(4)]
    result = CommandResult(255, [], ["Running stage 'train':", *NOISE[:3], "ERROR: failed to reproduce 'train'",
                                     *hints])
    assert error_summary(result) == " | ".join([*NOISE[:3], "ERROR: failed to reproduce 'train'", *hints])
    assert error_summary(CommandResult(1, [], NOISE)) == " | ".join(NOISE[-6:])
    assert error_summary(CommandResult(1, ["only stdout"], [])) == "only stdout"
    assert error_summary(CommandResult(1, [], [])) == "(no output)"


OFFLINE = {"DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true", "DO_NOT_TRACK": "1", "ORT_DISABLE_TELEMETRY": "1"}


def test_every_stage_runs_offline_unbuffered_with_this_environments_tools_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who never exported the offline switches still gets them in every stage; one they set wins."""
    for name in OFFLINE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "yes, mine")
    code = ("import json, os, shutil; print(json.dumps({k: os.environ.get(k) for k in [*%r, 'PYTHONUNBUFFERED']} "
            "| {'python': shutil.which('python')}))" % (list(OFFLINE),))
    result = run_checked([sys.executable, "-c", code], tmp_path, logging.getLogger("test-env"), "env")
    seen = json.loads(result.stdout_tail[-1])
    assert seen == {**OFFLINE, "DO_NOT_TRACK": "yes, mine", "PYTHONUNBUFFERED": "1",
                    "python": str(Path(sys.executable).parent / "python")}


def test_the_log_names_the_command_and_its_folder_and_keeps_a_last_line_that_is_not_utf8(
        tmp_path: Path) -> None:
    """A stage's last line without a newline, in another encoding (a Latin-1 file name, say), still reaches the
    log and the tail, its undecodable byte replaced."""
    lines: list[str] = []
    logger = logging.getLogger("test-last-line")
    logger.setLevel(logging.INFO)
    logger.addHandler(type("Keep", (logging.Handler,), {"emit": lambda self, r: lines.append(r.getMessage())})())
    cmd = [sys.executable, "-c", r"import sys; sys.stdout.buffer.write(b'done\ncaf\xe9 au lait')"]
    result = run_checked(cmd, tmp_path, logger, "latin")
    assert lines[0] == f"$ {' '.join(cmd)}   (in {tmp_path})"
    assert lines[1:] == ["done", "caf\ufffd au lait"] and result.stdout_tail == ["done", "caf\ufffd au lait"]


@pytest.mark.slow(seconds=15)
def test_a_timed_out_command_that_ignores_sigterm_is_killed_not_left_running(tmp_path: Path) -> None:
    """A stage that ignores SIGTERM (a stuck data loader, a shell trap) gets SIGKILL from the guard it runs under
    after the guard's grace period; the runner must not kill the guard first, which would leave the stage
    running on its own after its timeout (it did, most times: KILL_GRACE_S was the guard's grace, and the
    runner's clock starts first)."""
    code = ("import os, pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path('pid').write_text(str(os.getpid())); time.sleep(60)")
    result = dvc_runner.run_streamed([sys.executable, "-c", code], tmp_path, logging.getLogger("test-kill"),
                                     timeout_s=1)
    assert result.timed_out and result.returncode == 128 + signal.SIGTERM      # the guard stopped its group
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
