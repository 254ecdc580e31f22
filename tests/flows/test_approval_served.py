"""gate.approval in a served deployment: a run that waits for a person suspends (its process exits), the next
run is not blocked by it, and an approval starts the waiting run again, which promotes its candidate."""

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.runner import Runner
from prefect.runtime import flow_run

from flows.approval import ask_a_person
from flows.approval import main as approval_cli
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import open_registry
from tasks.lib.config import Params
from tests.flows.test_approval import borderline_project

pytestmark = pytest.mark.usefixtures("prefect_harness")


# No `from __future__ import annotations` here: the runner loads this flow from its file and checks its
# parameters against the annotations, which must then be real types (and JSON: a dict, a str).
@flow(name="publish and ask, served")
def publish_and_ask_served(params: dict, root: str) -> dict:
    """The retrain flow's last steps, as a deployment runs them."""
    settings, project = Params.model_validate(params), Path(root)
    published = publish_candidate(settings, project, str(flow_run.id))
    return ask_a_person(settings, published, project) if published["awaiting_approval"] else published


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Params, Path, str]]:
    """A runner serving the flow (as `make serve` does), in a thread; stopped at the end."""
    root, params, before = borderline_project(tmp_path, timeout_hours=0.1)
    runner = Runner(query_seconds=1, prefetch_seconds=1)
    runner.add_flow(publish_and_ask_served, name="served",
                    parameters={"params": params.model_dump(mode="json"), "root": str(root)})
    done = threading.Event()

    async def serve() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(runner.start)
            await anyio.to_thread.run_sync(done.wait)
            await runner.astop()   # ends runner.start; the second run stays suspended, its process long gone

    thread = threading.Thread(target=contextvars.copy_context().run, args=(lambda: anyio.run(serve),))
    thread.start()
    try:
        yield params, root, before
    finally:
        done.set()
        thread.join(30)


def state_of(run_id: UUID) -> State:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def wait_for(run_id: UUID, check: Callable[[State], bool], what: str, timeout: float = 120) -> State:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(state := state_of(run_id)):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{what}; the run is {state!r}")


def start_run() -> UUID:
    """One scheduled run of the served deployment (the runner registers it once it starts: polled)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return run_deployment("publish and ask, served/served", timeout=0).id
        except Exception:   # ObjectNotFound until the runner has registered the deployment
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow(seconds=60)
def test_a_served_run_suspends_without_blocking_the_next_and_an_approval_promotes(served) -> None:
    params, root, before = served
    first = start_run()
    assert wait_for(first, State.is_paused, "the first run never waited").name == "Suspended"
    second = start_run()        # the next schedule runs while the first waits: no process or lock holds it up
    assert wait_for(second, State.is_paused, "the second run was blocked").name == "Suspended"
    assert open_registry(params, root).production() == before

    assert approval_cli(["approve", str(first), "--comment", "ok", "--by", "dan"]) == 0
    assert wait_for(first, State.is_final, "the approved run never finished", 180).is_completed()
    registry = open_registry(params, root)
    assert registry.production() != before
    [record] = registry.approvals(registry.production())
    assert (record["status"], record["by"], record["flow_run_id"]) == ("approved", "dan", str(first))
