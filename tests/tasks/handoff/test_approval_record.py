"""A person's decision on a candidate (gate.approval) without Prefect: publish holds it, settle_approval records it
beside the version and promotes only an approval; `registry show` lists it."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.handoff.publish import publish_candidate, settle_approval
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
    assert "Approval: approved by carol at 2026-12-08T00:00:00Z (flow run run-1): first model" in shown
    assert registry_cli([*where, "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approvals"][0]["by"] == "carol"
