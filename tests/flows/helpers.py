"""Reading what a flow run left in the Prefect API (artifacts, logs) in tests."""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler


def run_artifacts(flow_run_id: str) -> dict[str, str]:
    """key -> markdown of the artifacts attached to a flow run."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {artifact.key: str(artifact.data) for artifact in found}


def run_logs(flow_run_id: str) -> list[str]:
    """Every log message of a flow run and its task runs, in order."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def state_of(state: Any) -> tuple[str, str, Any]:
    """(name, message, result or None) of a flow's final state."""
    return state.name, state.message or "", state.result(raise_on_failure=False)
