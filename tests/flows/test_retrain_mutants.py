"""The retrain flow's steps, called in this process on a small real git + DVC project: what each returns, raises
and logs (tests/flows/test_retrain.py runs the whole flow against a Prefect server, stage by stage).

The steps are Prefect tasks; `.fn` is the function under the task. Their run logger needs a Prefect server
(about 20 s to start, which mutation testing would pay per mutant), so `get_run_logger` is pointed at a plain
logger here: the lines are the same, read with caplog.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from prefect import flow
from prefect.states import Completed, Failed

from flows import retrain as retrain_module
from flows.data_version import md5_in_workspace
from flows.dvc_runner import CommandFailed, TransientFailure
from flows.retrain import (DataChanged, dvc_storage, holds, main, missing_data, parse_args, pull_data, push_outputs,
                           repro_stage, run_pipeline, stage_timeout_s, stale_stages, transient_only, working_copy)
from tasks.lib.config import load_params
from tests.conftest import REPO_ROOT, run
from tests.flows.conftest import git_commit

RAW = Path("data/raw")
STAGES = ["count", "double", "report"]
DVC_YAML = {"stages": {
    "count": {"cmd": "ls data/raw > count.txt", "deps": ["data/raw"], "outs": ["count.txt"]},
    "double": {"cmd": "cat count.txt count.txt > double.txt", "deps": ["count.txt"], "params": ["double.factor"],
               "outs": ["double.txt"]},
    "report": {"cmd": "wc -l double.txt > report.txt", "deps": ["double.txt"], "params": ["report.title"],
               "outs": ["report.txt"]},
}}
LOG = "tests.flows.retrain_steps"


@pytest.fixture(autouse=True)
def plain_run_logger(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(retrain_module, "get_run_logger", lambda: logging.getLogger(LOG))
    caplog.set_level(logging.INFO, logger=LOG)


def reproduced_project(root: Path, spec: dict, params_text: str) -> Path:
    """The stages of spec over data/raw (tracked by DVC), reproduced once and committed."""
    (root / RAW).mkdir(parents=True)
    (root / RAW / "a.txt").write_text("a\n")
    (root / RAW / "b.txt").write_text("b\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "params.yaml").write_text(params_text)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "tests@example.invalid"], root)
    run(["git", "config", "user.name", "tests"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["dvc", "add", "-q", str(RAW)], root)
    run(["dvc", "repro", "-q"], root)
    git_commit(root, "data v1 and its run")
    return root


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three stages in a line over data/raw, each reading its own params."""
    return reproduced_project(tmp_path_factory.mktemp("retrain-steps") / "project", DVC_YAML,
                              yaml.safe_dump({"double": {"factor": 2}, "report": {"title": "a"}}))


@pytest.fixture
def project(reproduced: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reproduced, tmp_path / "project", symlinks=True))


def set_param(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


# --------------------------------------------------------------------------- dvc status, dvc repro


def test_nothing_stale_means_no_stage_to_run_and_says_so(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert stale_stages.fn(project, STAGES, RAW) == []
    assert "Stale stages: none (everything up to date)" in logged(caplog)


def test_the_run_starts_at_the_first_stale_stage_and_goes_on_to_the_last(project: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    set_param(project, "double", "factor", 3)          # double alone is stale; report reads what it writes
    assert stale_stages.fn(project, STAGES, RAW) == ["double", "report"]
    assert "Stale stages: double" in logged(caplog)
    caplog.clear()
    set_param(project, "report", "title", "b")
    assert stale_stages.fn(project, STAGES, RAW) == ["double", "report"]
    assert "Stale stages: double, report" in logged(caplog)


def test_data_changed_but_not_recorded_stops_the_run_and_says_how_to_record_or_restore_it(project: Path) -> None:
    (project / RAW / "c.txt").write_text("c\n")
    md5 = md5_in_workspace(project, RAW)
    with pytest.raises(DataChanged) as caught:
        stale_stages.fn(project, STAGES, RAW)
    assert str(caught.value) == (
        f"data/raw differs from the data version data/raw.dvc pins ({md5}): record it with `dvc add data/raw && "
        f"git add data/raw.dvc && git commit -m 'data vN'` to train on it, or restore the pinned version with "
        f"`dvc checkout data/raw.dvc`")


def test_a_stage_reproduced_says_it_ran_then_that_it_was_skipped(project: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    set_param(project, "report", "title", "b")
    assert repro_stage.fn(project, "report") == "ran"
    assert repro_stage.fn(project, "report") == "skipped"
    lines = logged(caplog)
    assert "Stage report ran" in lines and "Stage report skipped" in lines
    assert f"$ dvc repro --single-item report   (in {project})" in lines


def test_a_failing_stage_names_itself_and_a_hung_one_its_timeout(project: Path) -> None:
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["report"]["cmd"] = "echo 'error: the report broke' >&2; exit 3"
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CommandFailed, match=r"^stage report failed \(exit 3\): error: the report broke"):
        repro_stage.fn(project, "report")
    spec["stages"]["report"]["cmd"] = "sleep 30"
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CommandFailed, match=r"^stage report timed out after 0\.5 s and was stopped"):
        repro_stage.fn(project, "report", timeout_s=0.5)


def test_only_a_stage_that_exited_75_is_retried() -> None:
    assert transient_only(None, None, Failed(data=TransientFailure("stage fetch_weights failed (exit 75)")))
    assert not transient_only(None, None, Failed(data=CommandFailed("stage train failed (exit 1)")))
    assert not transient_only(None, None, Completed(data="ran"))


def test_only_train_is_timed_and_by_its_own_param() -> None:
    params = load_params(REPO_ROOT / "params.yaml", ["train.timeout_minutes=2.5"])
    assert stage_timeout_s("train", params) == 150.0
    assert [stage_timeout_s(s, params) for s in ("prepare", "evaluate", "export")] == [None, None, None]


# --------------------------------------------------------------------------- the data version


def test_present_data_is_used_as_it_is(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    md5 = md5_in_workspace(project, RAW)
    assert pull_data.fn(project, RAW) == md5
    assert logged(caplog) == [f"Data data/raw present; training on the version data/raw.dvc pins (DVC hash {md5})"]


@pytest.mark.slow(seconds=15)
def test_absent_data_is_checked_out_from_the_cache_or_else_pulled_from_the_remote(
        project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    md5 = md5_in_workspace(project, RAW)
    shutil.rmtree(project / RAW)
    assert pull_data.fn(project, RAW) == md5
    assert (project / RAW / "a.txt").read_text() == "a\n"
    assert f"Data data/raw checked out (DVC hash {md5})" in logged(caplog)

    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], project)
    push_outputs.fn(project, "store")
    shutil.rmtree(project / RAW)
    shutil.rmtree(project / ".dvc" / "cache")
    caplog.clear()
    assert pull_data.fn(project, RAW) == md5
    assert (project / RAW / "b.txt").read_text() == "b\n"
    assert "data/raw is not in the local DVC cache; pulling it from the remote" in logged(caplog)


def test_outputs_are_pushed_to_the_named_remote(project: Path, tmp_path: Path) -> None:
    run(["dvc", "remote", "add", "-d", "default", str(tmp_path / "default")], project)
    run(["dvc", "remote", "add", "other", str(tmp_path / "other")], project)
    push_outputs.fn(project, "other")
    assert holds(tmp_path / "other", md5_in_workspace(project, RAW)) and not (tmp_path / "default").exists()


def test_a_dvc_cache_or_remote_holds_an_object_in_dvc_3s_layout_or_dvc_2s(tmp_path: Path) -> None:
    md5 = "0123456789abcdef0123456789abcdef.dir"
    (tmp_path / "v3/files/md5/01").mkdir(parents=True)
    (tmp_path / "v3/files/md5/01" / md5[2:]).write_text("[]")
    (tmp_path / "v2/01").mkdir(parents=True)
    (tmp_path / "v2/01" / md5[2:]).write_text("[]")
    assert holds(tmp_path / "v3", md5) and holds(tmp_path / "v2", md5)
    assert not holds(tmp_path / "v3", "ff" + md5[2:]) and not holds(tmp_path / "v2", md5[:-5])


ADVICE = ("run `make demo` for the demo data, or put one folder of images per class in data/raw and run "
          "`dvc add data/raw` (then `git add data/raw.dvc` and commit it)")


def test_missing_data_is_explained_only_when_nothing_could_bring_it(project: Path, tmp_path: Path) -> None:
    assert missing_data(project, RAW) is None                       # images present
    md5 = md5_in_workspace(project, RAW)
    shutil.rmtree(project / RAW)
    assert missing_data(project, RAW) is None                       # in the DVC cache: checked out
    shutil.rmtree(project / ".dvc" / "cache")
    assert missing_data(project, RAW) == (
        f"no data: data/raw has no images, and the version data/raw.dvc pins ({md5}) is neither in the DVC cache "
        f"nor on a DVC remote (none configured); `dvc pull` it if another remote has it, or {ADVICE}")
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], project)
    assert missing_data(project, RAW).endswith(f"nor on a DVC remote ({remote}); `dvc pull` it if another remote "
                                               f"has it, or {ADVICE}")
    (remote / "files/md5" / md5[:2]).mkdir(parents=True)
    (remote / "files/md5" / md5[:2] / md5[2:]).write_text("[]")
    assert missing_data(project, RAW) is None                       # on the local remote: pulled
    run(["dvc", "remote", "add", "-f", "-d", "store", "s3://bucket/dvc"], project)
    assert missing_data(project, RAW) is None                       # only `dvc pull` can look there


def test_missing_data_without_a_dvc_file_and_a_broken_one(project: Path) -> None:
    shutil.rmtree(project / RAW)
    (project / "data/raw.dvc").write_text("outs: [")
    assert missing_data(project, RAW) is None                       # the flow's data step says what is wrong
    (project / "data/raw.dvc").unlink()
    assert missing_data(project, RAW) == f"no data: data/raw has no images and data/raw.dvc does not exist; {ADVICE}"


def test_dvc_storage_is_the_cache_then_the_local_remotes(project: Path, tmp_path: Path) -> None:
    run(["dvc", "remote", "add", "-d", "a", str(tmp_path / "a")], project)
    run(["dvc", "remote", "add", "b", str(tmp_path / "b")], project)
    assert dvc_storage(project) == [project / ".dvc" / "cache", tmp_path / "a", tmp_path / "b"]
    (project / ".dvc" / "config").write_text("[core\n")
    assert dvc_storage(project) is None


# --------------------------------------------------------------------------- the working copy, the command


def test_the_workspace_version_without_overrides_trains_in_place_else_in_an_isolated_copy(
        project: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger(LOG)
    with working_copy(project, None, [], RAW, log) as workdir:
        assert workdir == project
    assert f"Training on the workspace's data version in {project}" in logged(caplog)
    with working_copy(project, "HEAD", [], RAW, log) as workdir:
        assert workdir == project
    with working_copy(project, None, ["double.factor=5"], RAW, log) as workdir:
        assert workdir != project and (workdir / "dvc.yaml").exists()
    assert not workdir.exists()


def test_the_command_line_defaults_and_options() -> None:
    args = parse_args([])
    assert (args.data_rev, args.set, args.push, args.no_publish, args.lock_wait_minutes) == (None, [], False, False,
                                                                                              60.0)
    args = parse_args(["--data-rev", "v1", "-S", "a=1", "--set", "b=2", "--push", "--no-publish",
                       "--lock-wait-minutes", "0.5"])
    assert (args.data_rev, args.set, args.push, args.no_publish, args.lock_wait_minutes) == ("v1", ["a=1", "b=2"],
                                                                                              True, True, 0.5)


HELP = """\
usage: python -m flows.retrain [-h] [--data-rev DATA_REV] [-S KEY=VALUE] [--push] [--no-publish]
                               [--lock-wait-minutes LOCK_WAIT_MINUTES]

The `retrain` flow: data version -> DVC stages -> (push) -> gate and publish.

options:
  -h, --help            show this help message and exit
  --data-rev DATA_REV   git revision (tag, branch, commit) of the data version
  -S KEY=VALUE, --set KEY=VALUE
                        params override
  --push                dvc push the data and outputs afterwards
  --no-publish          skip the gate and publish step
  --lock-wait-minutes LOCK_WAIT_MINUTES
"""


def test_the_command_help_says_what_each_option_does(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "100")        # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out == HELP


@pytest.fixture
def bare_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's params.yaml alone, as the working directory."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_command_refuses_bad_params_no_data_and_an_unknown_network_before_any_server(
        bare_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-S", "train.head.epocs=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.head.epocs" in err
    assert main([]) == 2
    assert capsys.readouterr().err == f"error: no data: data/raw has no images and data/raw.dvc does not exist; " \
                                      f"{ADVICE}\n"
    (bare_project / RAW / "cat").mkdir(parents=True)
    (bare_project / RAW / "cat" / "1.png").write_bytes(b"")
    assert main(["-S", "model.arch=no_such_net"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_net" in err
    assert not list(bare_project.glob(".prefect/*.db"))


# --------------------------------------------------------------------------- the steps in order, in a flow

PIPELINE = {"stages": {
    "count": {"cmd": "ls data/raw > count.txt", "deps": ["data/raw"], "outs": ["count.txt"]},
    "train": {"cmd": "cat count.txt > model.txt", "deps": ["count.txt"], "params": ["train.head.lr"],
              "outs": ["model.txt"]},
    "report": {"cmd": "wc -l model.txt > report.txt", "deps": ["model.txt"], "params": ["evaluate.calibration_bins"],
               "outs": ["report.txt"]},
}}


@flow(name="run the pipeline's steps")
def pipeline_steps(workdir: str, data_rev: str, push: bool, remote: str | None) -> dict:
    root = Path(workdir)
    return run_pipeline(root, root, data_rev, load_params(root / "params.yaml"), "run-1", push, False, remote)


@pytest.mark.slow(seconds=25)
@pytest.mark.usefixtures("prefect_harness")
def test_the_pipeline_runs_the_stale_stages_in_order_pushes_to_the_remote_named_and_says_what_ran(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The project's params.yaml; a change to train.head.lr stales train (timed by train.timeout_minutes), which
    writes what it wrote before, so report, after it, is run by DVC's judgement: skipped."""
    project = reproduced_project(tmp_path / "project", PIPELINE, (REPO_ROOT / "params.yaml").read_text())
    run(["dvc", "remote", "add", "-d", "default", str(tmp_path / "default")], project)
    run(["dvc", "remote", "add", "other", str(tmp_path / "other")], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["head"]["lr"] *= 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    summary = pipeline_steps(str(project), "v7", True, "other")
    assert (summary["stages"], summary["stages_run"], summary["stages_skipped"]) == (
        ["count", "train", "report"], ["train"], ["count", "report"])
    assert (summary["flow_run_id"], summary["data_rev"], summary["data_md5"], summary["pushed"], summary["publish"],
            summary["isolated"]) == ("run-1", "v7", md5_in_workspace(project, RAW), True, None, False)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert holds(tmp_path / "other", lock["stages"]["report"]["outs"][0]["md5"])
    assert not (tmp_path / "default").exists()
    assert "Stages run: train; skipped: count, report" in logged(caplog)

    caplog.clear()
    summary = pipeline_steps(str(project), "v7", False, None)
    assert (summary["stages_run"], summary["pushed"]) == ([], False)
    assert "Stages run: none; skipped: count, train, report" in logged(caplog)


@pytest.mark.slow(seconds=40)
@pytest.mark.usefixtures("prefect_harness")
def test_the_command_trains_on_the_data_version_asked_for_and_says_why_a_run_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.settings import PREFECT_API_URL

    project = reproduced_project(tmp_path / "project", PIPELINE, (REPO_ROOT / "params.yaml").read_text())
    run(["git", "tag", "v1"], project)
    v1 = md5_in_workspace(project, RAW)
    (project / RAW / "c.txt").write_text("c\n")
    run(["dvc", "add", "-q", str(RAW)], project)
    git_commit(project, "data v2")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())   # the session's server, not one per command

    assert main(["--data-rev", "v1", "--no-publish"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["data_md5"] == v1 != md5_in_workspace(project, RAW)
    assert sorted(line["stages_run"] + line["stages_skipped"]) == sorted(PIPELINE["stages"])

    assert main(["--data-rev", "no-such-rev", "--no-publish"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("retrain Failed: ") and "no-such-rev" in err
