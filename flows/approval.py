"""A person approves or rejects a gated candidate (`gate.approval`), through Prefect's human-in-the-loop input.

The retrain flow waits with a typed form whose description is the gate's evidence: an in-process run pauses
(it blocks, polling the server), a deployment run suspends (its process exits, so the worker is free for the
next schedule; the approval starts the run again, which finds its stages up to date and reads the answer).
The Prefect UI shows the form; people without the UI answer from a shell in the project (the server is
PREFECT_API_URL's, which the waiting run's log line gives, else `make serve`'s):

    python -m flows.approval pending
    python -m flows.approval approve FLOW_RUN_ID [--comment TEXT] [--by NAME]
    python -m flows.approval reject FLOW_RUN_ID [--comment TEXT] [--by NAME]

No answer within gate.approval_timeout_hours rejects the candidate. tasks.handoff.publish.settle_approval
writes the decision beside the version and, if approved, promotes it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import FlowPauseTimeout, PrefectException
from prefect.flow_runs import pause_flow_run, resume_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_API_URL

from flows.server import prefect_api
from tasks.handoff.registry_pointer import utcnow
from tasks.lib.config import Params
from tasks.lib.uncertainty import interval_text, wilson_interval


class ApprovalInput(RunInput):
    """The form: approve or reject, why, and who (Prefect's open-source server does not record who resumed)."""

    approve: bool = False
    comment: str = ""
    approver: str = ""


def ask_a_person(params: Params, published: dict[str, Any], registry_root: Path) -> dict[str, Any]:
    """Wait for a person's approval of the published candidate, then record it and promote or not."""
    log = get_run_logger()
    version = published["registry_version"]
    timeout_s = max(1, round(params.gate.approval_timeout_hours * 3600))
    log.warning("Registry version %s waits for a person (gate.approval=%s, %g h): approve or reject it in the "
                "Prefect UI (%s), or `PREFECT_API_URL=%s python -m flows.approval approve|reject %s`", version,
                params.gate.approval, params.gate.approval_timeout_hours, flow_run.ui_url, PREFECT_API_URL.value(),
                flow_run.id)
    form = ApprovalInput.with_initial_data(description=evidence_markdown(published))
    try:
        if deployment.id:   # a served or worker run: free the worker rather than block it for days
            answer = suspend_flow_run(wait_for_input=form, timeout=timeout_s)
        else:               # the server's answer is polled; a short timeout (tests) polls more often
            answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=min(10, 1 + timeout_s // 60))
        outcome = {"status": "approved" if answer.approve else "rejected", "by": answer.approver or None,
                   "comment": answer.comment}
    except FlowPauseTimeout:
        outcome = {"status": "timed out", "by": None, "comment": "nobody approved or rejected it within "
                   f"gate.approval_timeout_hours={params.gate.approval_timeout_hours:g}"}
    settled = settle(params, registry_root, published, {**outcome, "at": utcnow(), "flow_run_id": str(flow_run.id)})
    log.info("Registry version %s: %s", version, settled["reason"])
    return settled


@task(name="record the approval", cache_policy=NO_CACHE)
def settle(params: Params, registry_root: Path, published: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """Write the person's decision beside the version; promote it if approved."""
    from tasks.handoff.publish import settle_approval  # the registry side, imported late like gate_and_publish's

    return settle_approval(params, registry_root, published, outcome)


def evidence_markdown(published: dict[str, Any]) -> str:
    """What the person decides on: both models' accuracy with 95% intervals, wins and losses, p-value, the gate's
    reason, the per-class recalls and the candidate's card."""
    decision = published["decision"]
    candidate, production = decision.get("candidate_metrics") or {}, decision.get("production_metrics") or {}
    paired = decision.get("paired_test") or {}
    lines = [f"# Approve registry version {published['registry_version']}?", "",
             f"Gate: **{'passed' if decision['passed'] else 'refused'}**"
             f"{' (borderline)' if decision.get('borderline') else ''}: {decision['reason']}", "",
             f"Model card: `{published['model_card']}`", "",
             "| model | accuracy [95% CI] | " + decision["metric"] + " |", "|---|---|---|",
             _model_row(f"candidate {published['registry_version']}", candidate, decision["metric"])]
    if production:
        lines.append(_model_row(f"production {decision.get('production_version')}", production, decision["metric"]))
    if paired:
        lines += ["", f"Same {paired['n']} test images: candidate right where production is wrong on "
                  f"{paired['wins']}, wrong where it is right on {paired['losses']}; exact McNemar "
                  f"p = {paired['p_value']:.3g}."]
    classes = sorted(candidate.get("per_class", {}))
    if classes:
        lines += ["", "| class | candidate recall | production recall |", "|---|---|---|"]
        lines += [f"| {name} | {_recall(candidate, name)} | {_recall(production, name)} |" for name in classes]
    return "\n".join(lines) + "\n"


def _model_row(label: str, metrics: dict[str, Any], metric: str) -> str:
    accuracy, n = metrics.get("accuracy"), metrics.get("n_test")
    if isinstance(accuracy, (int, float)) and isinstance(n, int) and n > 0:
        accuracy_text = f"{accuracy:.4f} {interval_text(*wilson_interval(round(accuracy * n), n))}"
    else:
        accuracy_text = str(accuracy)
    value = metrics.get(metric)
    return f"| {label} | {accuracy_text} | {f'{value:.4f}' if isinstance(value, float) else value} |"


def _recall(metrics: dict[str, Any], name: str) -> str:
    row = metrics.get("per_class", {}).get(name) or {}
    recall = row.get("recall")
    return f"{recall:.3f}" if isinstance(recall, (int, float)) else "-"


def answer(flow_run_id: str, approve: bool, comment: str, by: str) -> None:
    """Resume a waiting retrain run with a decision (prefect.flow_runs.resume_flow_run)."""
    resume_flow_run(UUID(flow_run_id), run_input={"approve": approve, "comment": comment, "approver": by})


def pending() -> list[dict[str, Any]]:
    """The flow runs that wait for a person (paused or suspended), oldest first."""
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=paused, sort=FlowRunSort.START_TIME_ASC)
    return [{"flow_run_id": str(run.id), "name": run.name, "since": str(run.state.timestamp if run.state else ""),
             "parameters": run.parameters} for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.approval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pending", help="list the runs waiting for a person")
    for name in ("approve", "reject"):
        sub = commands.add_parser(name, help=f"{name} the candidate a waiting retrain run published")
        sub.add_argument("flow_run_id")
        sub.add_argument("--comment", default="", help="why (kept in the registry beside the version)")
        sub.add_argument("--by", default=getpass.getuser(), help="who decides (default: this user)")
    args = parser.parse_args(argv)
    if PREFECT_API_URL.value():   # the environment (or a test server) names the server the run waits on
        return run_command(args)
    with prefect_api(Path.cwd()):  # else `make serve`'s server, or one on the project's database
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    if args.command == "pending":
        for run in pending():
            print(f"{run['flow_run_id']}  {run['name']}  waiting since {run['since']}")
        return 0
    try:
        answer(args.flow_run_id, args.command == "approve", args.comment, args.by)
    except (ValueError, PrefectException) as err:   # a bad id; not waiting (NotPausedError), or too late
        print(f"error: flow run {args.flow_run_id}: {err}; `python -m flows.approval pending` lists the runs "
              "that wait for a person", file=sys.stderr)
        return 1
    print(f"flow run {args.flow_run_id}: {'approved' if args.command == 'approve' else 'rejected'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
