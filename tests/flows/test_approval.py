"""gate.approval on a real Prefect server: a borderline candidate waits in a paused flow run for a person, who
answers from the command line (the UI's form is the same run input); a timeout rejects."""

from __future__ import annotations

import contextvars
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.input.actions import read_flow_run_input
from prefect.runtime import flow_run

from flows.approval import ask_a_person, pending
from flows.approval import main as approval_cli
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import open_registry
from tasks.lib.config import Params
from tests.tasks.handoff.test_publish import make_project, set_candidate

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow(name="publish and ask")
def publish_and_ask(params: Params, root: Path) -> dict[str, Any]:
    """The retrain flow's last steps (run_pipeline): publish, then ask a person when the gate says so."""
    published = publish_candidate(params, root, str(flow_run.id))
    return ask_a_person(params, published, root) if published["awaiting_approval"] else published


def borderline_project(tmp_path: Path, timeout_hours: float = 1 / 60) -> tuple[Path, Params, str]:
    """Production right on 80% of the 60 test images, then a candidate right on 85%: better, not significant.
    A minute to answer: the paused run polls the server every 2 s (every 10 s for the default 72 h)."""
    params = Params.model_validate({"registry": {"uri": "registry"}, "gate": {
        "significance": 0.05, "approval": "borderline", "approval_timeout_hours": timeout_hours}})
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="v1", macro_f1=0.80)
    production = publish_candidate(params, root, None)
    assert production["promoted"] is True and production["awaiting_approval"] is False  # a first model: no person
    set_candidate(root, tag="v2", macro_f1=0.85)
    return root, params, production["registry_version"]


def run_in_thread(params: Params, root: Path) -> tuple[threading.Thread, dict[str, Any]]:
    # The session's server may still hold runs other tests left waiting (a served run suspended on purpose):
    # this test's run is the one that was not there before.
    out: dict[str, Any] = {"waiting_before": {run["flow_run_id"] for run in pending()}}
    context = contextvars.copy_context()   # the test server's settings live in context variables
    thread = threading.Thread(target=context.run, args=(lambda: out.update(result=publish_and_ask(params, root)),))
    thread.start()
    return thread, out


def waiting_run(thread: threading.Thread, out: dict[str, Any]) -> str:
    """The paused run's id, once the server shows it (polled: the flow pauses when its publish is done)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        if runs := [run for run in pending() if run["flow_run_id"] not in out["waiting_before"]]:
            return runs[0]["flow_run_id"]
        time.sleep(0.2)
    raise AssertionError("no flow run paused for approval")


def form_description(run_id: str) -> str:
    with get_client(sync_client=True) as client:
        keyset = client.read_flow_run(UUID(run_id)).state.state_details.run_input_keyset
    return read_flow_run_input(keyset["description"], UUID(run_id))


@pytest.mark.slow(seconds=10)
def test_an_approved_borderline_candidate_is_promoted_with_who_when_and_why_on_record(tmp_path: Path) -> None:
    root, params, before = borderline_project(tmp_path)
    thread, out = run_in_thread(params, root)
    run_id = waiting_run(thread, out)
    evidence = form_description(run_id)
    assert "(borderline): not significant" in evidence and "McNemar p = " in evidence
    assert "| candidate " in evidence and f"| production {before} |" in evidence and "| class_0 |" in evidence
    assert open_registry(params, root).production() == before       # nothing moves while the person thinks

    assert approval_cli(["approve", run_id, "--comment", "fixes the shirts", "--by", "alice"]) == 0
    thread.join(60)
    result = out["result"]
    registry = open_registry(params, root)
    assert result["promoted"] is True and registry.production() == result["registry_version"]
    [record] = registry.approvals(result["registry_version"])
    assert (record["status"], record["by"], record["comment"], record["flow_run_id"]) == (
        "approved", "alice", "fixes the shirts", run_id)
    entry = registry.pointer()["events"][-1]
    assert {**entry["approval"], "version": record["version"]} == record
    assert entry["reason"].startswith("approved by alice at ")
    assert "gate: not significant" in entry["reason"]


@pytest.mark.slow(seconds=10)
def test_a_rejected_borderline_candidate_stays_out_of_production(tmp_path: Path) -> None:
    root, params, before = borderline_project(tmp_path)
    thread, out = run_in_thread(params, root)
    assert approval_cli(["reject", waiting_run(thread, out), "--comment", "too few images", "--by", "bob"]) == 0
    thread.join(60)
    registry = open_registry(params, root)
    assert out["result"]["promoted"] is False and registry.production() == before
    [record] = registry.approvals(out["result"]["registry_version"])
    assert (record["status"], record["by"], record["comment"]) == ("rejected", "bob", "too few images")
    assert out["result"]["reason"].startswith("rejected by bob at ")


@pytest.mark.slow(seconds=8)
def test_nobody_answering_in_time_rejects_and_says_it_timed_out(tmp_path: Path) -> None:
    root, params, before = borderline_project(tmp_path, timeout_hours=2 / 3600)   # two seconds
    result = publish_and_ask(params, root)
    registry = open_registry(params, root)
    assert result["promoted"] is False and registry.production() == before
    [record] = registry.approvals(result["registry_version"])
    assert record["status"] == "timed out" and "within gate.approval_timeout_hours=0.000555556" in record["comment"]
    assert approval_cli(["approve", record["flow_run_id"]]) == 1     # too late: the run no longer waits
