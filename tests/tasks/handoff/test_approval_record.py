"""A person's decision on a candidate (gate.approval) without Prefect: publish holds it, settle_approval records it
beside the version and promotes only an approval; `registry show` lists it."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from tasks.handoff.publish import note_expired_approvals, publish_candidate, settle_approval
from tasks.handoff.registry import open_registry
from tasks.handoff.registry_cli import main as registry_cli
from tasks.lib.config import Params
from tests.tasks.handoff.test_publish import make_project, set_candidate


def test_an_always_approval_holds_a_passing_candidate_until_a_person_approves_it(tmp_path: Path, capsys) -> None:
    params = Params.model_validate({"registry": {"uri": "registry"}, "gate": {"significance": None,
                                                                              "approval": "always"}})
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, macro_f1=0.8)
    held = publish_candidate(params, root, "run-1")
    registry = open_registry(params, root)
    assert held["awaiting_approval"] is True and held["promoted"] is False and registry.production() is None
    assert held["decision"]["passed"] is True       # the gate's own verdict stays what it was
    outcome = {"status": "approved", "by": "carol", "comment": "first model", "at": "2026-12-08T00:00:00Z",
               "flow_run_id": "run-1"}
    settled = settle_approval(params, root, held, outcome)
    assert settled["promoted"] is True and registry.production() == held["registry_version"]
    assert settled["reason"] == "approved by carol at 2026-12-08T00:00:00Z: first model; gate: bootstrap: first " \
                                "model of fashion-demo (gate.bootstrap=promote)"
    where = ["--params", str(root / "params.yaml"), "-S", f"registry.uri={root / 'registry'}"]
    capsys.readouterr()
    assert registry_cli([*where, "show"]) == 0
    shown = capsys.readouterr().out
    assert "Approval (flow run run-1): approved by carol at 2026-12-08T00:00:00Z: first model" in shown
    assert registry_cli([*where, "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approvals"][0]["by"] == "carol"
    assert registry_cli([*where, "list", "--json"]) == 0   # the history of decisions, rejections and timeouts too
    assert json.loads(capsys.readouterr().out)[0]["approval"] == "approved by carol at 2026-12-08T00:00:00Z: first model"


def test_a_candidate_nobody_answered_is_recorded_timed_out_by_the_next_publish(tmp_path: Path, capsys) -> None:
    # A suspended deployment run that nobody resumes is failed by Prefect's server at the deadline, and no code
    # of the project runs then: the next publish notes it, once the deadline and its grace have passed.
    hours = 0.5
    params = Params.model_validate({"registry": {"uri": "registry"},
                                    "gate": {"significance": None, "approval": "always",
                                             "approval_timeout_hours": hours}})
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, macro_f1=0.8)
    held = publish_candidate(params, root, "run-1")
    version, registry = held["registry_version"], open_registry(params, root)
    deadline = dt.datetime.fromisoformat(held["decision"]["approval_deadline"])
    assert dt.timedelta(hours=hours - 0.01) < deadline - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=hours)

    assert note_expired_approvals(registry, now=deadline) == []                       # not yet late
    assert note_expired_approvals(registry, now=deadline + dt.timedelta(minutes=29)) == []   # within the grace
    assert registry.approvals(version) == []
    capsys.readouterr()
    assert registry_cli(["--params", str(root / "params.yaml"), "-S", f"registry.uri={root / 'registry'}",
                         "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["approval"] == "waits for a person"
    assert note_expired_approvals(registry, now=deadline + dt.timedelta(minutes=31)) == [version]
    [note] = registry.approvals(version)
    assert note["status"] == "timed out" and note["by"] is None and note["at"] == held["decision"]["approval_deadline"]
    assert note["comment"] == "nobody approved or rejected it within gate.approval_timeout_hours=0.5"
    assert note_expired_approvals(registry, now=deadline + dt.timedelta(days=9)) == []   # noted once
    assert registry.production() is None

    where = ["--params", str(root / "params.yaml"), "-S", f"registry.uri={root / 'registry'}"]
    capsys.readouterr()
    assert registry_cli([*where, "show", version]) == 0
    assert f"Approval: timed out at {note['at']}: nobody approved" in capsys.readouterr().out
    assert registry_cli([*where, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["approval"].startswith(f"timed out at {note['at']}: nobody")


def test_publish_notes_the_timeouts_that_passed_and_leaves_answered_candidates_alone(tmp_path: Path) -> None:
    params = Params.model_validate({"registry": {"uri": "registry"},
                                    "gate": {"significance": None, "approval": "always",
                                             "approval_timeout_hours": 1e-6}})   # 3.6 ms, and as much grace
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, macro_f1=0.8, tag="a")
    answered = publish_candidate(params, root, "run-1")
    settle_approval(params, root, answered, {"status": "rejected", "by": "dan", "comment": "", "flow_run_id": "run-1",
                                             "at": "2026-12-08T00:00:00Z"})
    set_candidate(root, macro_f1=0.8, tag="b")
    unanswered = publish_candidate(params, root, "run-2")
    time.sleep(0.01)   # the 3.6 ms deadline and grace pass
    set_candidate(root, macro_f1=0.8, tag="c")
    publish_candidate(params, root, "run-3")
    registry = open_registry(params, root)
    assert [n["status"] for n in registry.approvals(answered["registry_version"])] == ["rejected"]
    assert [n["status"] for n in registry.approvals(unanswered["registry_version"])] == ["timed out"]
