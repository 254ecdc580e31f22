"""The retrain flow on a tiny real DVC project, against the session's Prefect test server."""

from __future__ import annotations

import logging
import threading
from typing import Any
from pathlib import Path

import pytest
import yaml

from flows.lock import lock_path, retrain_lock
from flows.retrain import retrain, stage_timeout_s
from tasks.lib.config import load_params
from tests.conftest import REPO_ROOT, run
from tests.flows.conftest import add_data_version, snapshot
from tests.flows.helpers import run_artifacts, run_logs, state_of
from tests.flows.test_demo import damage_onnx, published_project

STAGES = ["prepare", "fetch_weights", "train", "evaluate", "export"]
pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_bad_override_fails_before_anything_runs(tiny_project: Path) -> None:
    before = snapshot(tiny_project)
    state = retrain(root=str(tiny_project), overrides=["train.head.epocs=3", "train.batch_size=-1"],
                    publish=False, return_state=True)
    name, message, _ = state_of(state)
    assert name == "Failed"
    assert "train.head.epocs: unknown key" in message and "train.batch_size" in message
    assert snapshot(tiny_project) == before  # no stage ran, no dvc.lock, params.yaml as it was


@pytest.mark.slow
def test_stage_failure_fails_the_flow_with_the_stage_message_and_leaves_the_workspace_alone(
        tiny_project: Path) -> None:
    before = snapshot(tiny_project)
    state = retrain(root=str(tiny_project), overrides=["train.head.epochs=0"], publish=False, return_state=True)
    name, message, _ = state_of(state)
    assert name == "Failed"
    assert "stage train failed" in message
    assert "error: train.head.epochs is 0, so there is nothing to train" in message
    # The overrides ran in an isolated copy: params.yaml, dvc.lock and every output are as they were.
    assert snapshot(tiny_project) == before
    assert not (tiny_project / "dvc.lock").exists()


@pytest.mark.slow
def test_unrecorded_data_changes_stop_the_run_and_no_dvc_file_is_rewritten(tiny_project: Path) -> None:
    (tiny_project / "data" / "raw" / "class_0" / "img_000.png").write_bytes(
        (tiny_project / "data" / "raw" / "class_1" / "img_000.png").read_bytes())
    before = snapshot(tiny_project)
    name, message, _ = state_of(retrain(root=str(tiny_project), publish=False, return_state=True))
    assert name == "Failed"
    assert "data/raw differs from the data version data/raw.dvc pins" in message
    assert "dvc add data/raw" in message and "dvc checkout data/raw.dvc" in message
    assert snapshot(tiny_project) == before  # data/raw.dvc not rewritten, no stage ran


def test_only_train_has_a_timeout_and_it_comes_from_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml", ["train.timeout_minutes=0.5"])
    assert stage_timeout_s("train", params) == 30
    assert stage_timeout_s("prepare", params) is None and stage_timeout_s("export", params) is None


@pytest.mark.slow
def test_older_data_rev_trains_in_an_isolated_copy_and_leaves_the_workspace_untouched(tiny_project: Path) -> None:
    add_data_version(tiny_project, "v2", seed=5)
    v1_md5 = yaml.safe_load(run(["git", "show", "v1:data/raw.dvc"], tiny_project).stdout)["outs"][0]["md5"]
    before = snapshot(tiny_project)

    state = retrain(root=str(tiny_project), data_rev="v1", overrides=["train.head.epochs=2"],
                    publish=False, return_state=True)
    name, message, result = state_of(state)
    assert name == "Completed", message
    assert result["isolated"] and result["data_md5"] == v1_md5
    assert result["stages_run"] + result["stages_skipped"] == STAGES
    assert snapshot(tiny_project) == before
    assert "workdir" not in result   # a temporary folder that no longer exists is not reported
    worktrees = run(["git", "worktree", "list", "--porcelain"], tiny_project).stdout
    assert worktrees.count("worktree ") == 1


def test_unknown_data_rev_is_a_clear_error(tiny_project: Path) -> None:
    name, message, _ = state_of(retrain(root=str(tiny_project), data_rev="v9", publish=False, return_state=True))
    assert name == "Failed" and "data_rev 'v9' is not a commit, branch or tag" in message


@pytest.mark.slow
def test_two_concurrent_triggers_run_one_after_the_other_and_the_second_skips_every_stage(
        tiny_project: Path) -> None:
    states = []
    threads = [threading.Thread(target=lambda: states.append(
        retrain(root=str(tiny_project), publish=False, return_state=True))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    results = [state_of(s) for s in states]
    assert [r[0] for r in results] == ["Completed", "Completed"], results
    first, second = sorted((r[2] for r in results), key=lambda r: -len(r["stages_run"]))
    assert first["stages"] == second["stages"] == STAGES
    assert first["stages_run"] == STAGES and first["stages_skipped"] == []
    # The second waited for the lock, then found nothing to do on the unchanged data.
    assert second["stages_run"] == [] and second["stages_skipped"] == STAGES
    assert any("Another retrain of" in line for line in run_logs(second["flow_run_id"]))
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    run(["dvc", "status", "--quiet"], tiny_project)  # dvc.lock matches the workspace

    artifacts = run_artifacts(first["flow_run_id"])
    assert "| macro_f1 | 0.7000 |" in artifacts["fashion-demo-test-metrics"]
    assert "| class_0 |" in artifacts["fashion-demo-test-metrics"]
    assert "model.onnx" in artifacts["fashion-demo-outputs"]
    logs = run_logs(first["flow_run_id"])
    assert "tiny stage train working" in logs  # the stage's own stdout, streamed into the run log
    assert "Stage train ran" in logs


def test_a_busy_project_exits_with_a_clear_message_when_told_not_to_wait(tiny_project: Path) -> None:
    with retrain_lock(tiny_project, 0, {"flow_run_id": "the-other-run"}):
        state = retrain(root=str(tiny_project), publish=False, lock_wait_minutes=0, return_state=True)
    name, message, _ = state_of(state)
    assert name == "Failed"
    assert "another retrain of this project is running" in message and "the-other-run" in message
    assert str(lock_path(tiny_project)) in message


@pytest.mark.slow(seconds=45)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_signal_during_a_stage_leaves_params_and_no_process_behind(tiny_project: Path, tmp_path: Path,
                                                                     sig: str) -> None:
    import os
    import signal
    import subprocess
    import time

    import psutil

    from flows.data_version import sweep_stale_copies
    from tests.conftest import VENV_BIN

    before = snapshot(tiny_project)
    params_bytes = (tiny_project / "params.yaml").read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["TMPDIR"] = str(tmp_path / "tmp")            # where the -S run's isolated copy goes
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "retrain.log"
    with log.open("wb") as out:  # train sleeps train.seed seconds in the tiny pipeline
        proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "flows.retrain", "-S", "train.seed=60",
                                 "--no-publish"], cwd=tiny_project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        while "tiny stage train working" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert "prefect server start" in names and "tiny_stage.py train" in names
        assert len(list((tmp_path / "tmp").glob("retrain-*"))) == 1
        stopped_at = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=20)
        assert alive == [], [p.cmdline() for p in alive]  # server, dvc and the stage all stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    copies = list((tmp_path / "tmp").glob("retrain-*"))
    if sig == "SIGTERM":      # cleaned up at once, within seconds, without a traceback
        assert code == 130 and time.monotonic() - stopped_at < 20
        assert copies == [] and "Traceback" not in log.read_text(errors="replace")
    else:                     # SIGKILL cannot clean up: the next run removes what the dead one left
        assert len(copies) == 1
        sweep_stale_copies(tiny_project, logging.getLogger("test"))
        assert list((tmp_path / "tmp").glob("retrain-*")) == []
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=tiny_project, capture_output=True, text=True).stdout
    assert worktrees.count("\n") == 1, worktrees        # only the project itself
    assert (tiny_project / "params.yaml").read_bytes() == params_bytes
    after = snapshot(tiny_project)
    assert after == before


@pytest.mark.slow(seconds=40)
def test_a_stage_that_exits_75_is_retried_and_the_run_completes(tiny_project: Path) -> None:
    """fetch_weights fails once with EX_TEMPFAIL (what tasks.lib.errors.TransientError exits with): Prefect
    runs it again after a backoff, and the run goes on as if nothing happened."""
    (tiny_project / "fail-once-transient").touch()
    state = retrain(root=str(tiny_project), publish=False, return_state=True)
    name, message, result = state_of(state)
    assert name == "Completed", message
    assert result["stages_run"] == STAGES
    logs = run_logs(str(state.state_details.flow_run_id))
    assert sum("$ dvc repro --single-item fetch_weights" in line for line in logs) == 2


def test_transfers_are_not_retried_by_the_flow(tmp_path: Path) -> None:
    """`dvc push` outside a DVC project fails the same way every time: one attempt. DVC's remote clients
    retry their own requests, so the flow adds no second layer around a transfer."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.retrain import push_outputs

    states: list[Any] = []

    @flow
    def push_once() -> None:
        states.append(push_outputs(tmp_path, return_state=True))

    push_once(return_state=True)
    task_state = states[0]
    assert task_state.is_failed()
    assert "not inside of a DVC repository" in str(task_state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_state.state_details.task_run_id).run_count == 1


@pytest.mark.slow
def test_a_hung_train_stage_is_stopped_at_its_timeout_and_not_retried(tiny_project: Path) -> None:
    import time

    import psutil

    before = snapshot(tiny_project)
    started = time.monotonic()   # the tiny train sleeps train.seed seconds: 300 s, against a 6 s timeout
    state = retrain(root=str(tiny_project), overrides=["train.seed=300", "train.timeout_minutes=0.1"],
                    publish=False, return_state=True)
    name, message, _ = state_of(state)
    assert name == "Failed"
    assert "stage train timed out after 6 s and was stopped" in message
    assert time.monotonic() - started < 120
    assert not any("tiny_stage.py" in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))   # the sleeping stage is gone, not orphaned
    logs = run_logs(str(state.state_details.flow_run_id))
    assert sum("$ dvc repro --single-item train" in line for line in logs) == 1     # one attempt: no retry
    assert snapshot(tiny_project) == before


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("damage", ["edited", "deleted"])
def test_a_retrain_with_nothing_to_do_fails_loudly_when_production_is_damaged(tmp_path: Path, damage: str) -> None:
    """Every stage current and the candidate already production: the gate still verifies production's files."""
    root, params, version = published_project(tmp_path)
    damage_onnx(root, params, version, damage)
    name, message, _ = state_of(retrain(root=str(root), return_state=True))
    assert name == "Failed"
    assert f"production version {version} of {params.project.name}" in message
    assert ("model.onnx sha256" if damage == "edited" else "model.onnx is missing") in message
    assert f"`registry verify {version}`" in message and "`registry rollback`" in message
