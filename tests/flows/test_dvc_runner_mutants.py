"""What the stage runner tells a user from dvc.yaml and from a failed command's output, case by case."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

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
