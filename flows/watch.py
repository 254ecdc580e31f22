"""The `watch` flow: retrain when the data version on a branch changes.

It reads the DVC hash `schedule.data_branch` commits for data/raw (`git show`, nothing checked out) and
retrains only when it differs from production's lineage and from the last version it triggered (a state
file, so a restart does not retrain the same data twice).

    python -m flows.watch [--branch main]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.data_version import DataVersionError, check_rev, md5_at
from flows.retrain import retrain
from flows.server import run_flow_command
from tasks.handoff.registry import open_registry
from tasks.lib.config import Params, load_params
from tasks.lib.io import read_json, write_json

STATE_NAME = "watch-state.json"


def state_path(root: Path) -> Path:
    """Where the watch records the data versions it triggered (DVC's ignored scratch folder)."""
    return root / ".dvc" / "tmp" / STATE_NAME


@task(name="read data version", cache_policy=NO_CACHE)
def read_data_version(root: Path, branch: str, raw_dir: Path) -> str:
    """DVC hash of raw_dir committed on branch."""
    md5 = md5_at(root, branch, raw_dir)
    get_run_logger().info("%s on %s: DVC hash %s", raw_dir, branch, md5)
    return md5


@task(name="read production data version", cache_policy=NO_CACHE)
def production_data_version(params: Params, root: Path) -> str | None:
    """The data hash in the production model's lineage; None when there is no production model (yet)."""
    log = get_run_logger()
    registry = open_registry(params, root)
    version = registry.production()
    if version is None:
        log.info("No production model of %s in %s yet", params.project.name, registry.url())
        return None
    md5 = (registry.read_json(version, "lineage.json") or {}).get("data_hash")
    log.info("Production model %s was trained on data %s", version, md5)
    return md5


def read_state(root: Path) -> dict[str, Any]:
    path = state_path(root)
    try:
        return read_json(path) if path.exists() else {}
    except ValueError:  # a damaged state file only costs one extra retrain check
        return {}


@flow(name="watch", description="Retrain when the data version on the data branch changes.")
def watch(branch: str | None = None, root: str | None = None, overrides: list[str] | None = None,
          push: bool = False, publish: bool = True) -> dict[str, Any]:
    """Compare the branch's data version with production's and the last triggered; retrain when new."""
    log = get_run_logger()
    project = Path(root or os.getcwd()).resolve()
    params = load_params(project / "params.yaml", overrides)
    branch = check_rev(branch or params.schedule.data_branch, "branch")
    current = read_data_version(project, branch, params.data.raw_dir)
    production = production_data_version(params, project)
    state = read_state(project)
    if current == production:
        log.info("Production was trained on %s already; nothing to do", current)
        return {"triggered": False, "data_md5": current, "reason": "production has this data version"}
    if current == state.get("data_md5"):
        log.info("Data %s was already retrained by flow run %s (%s); nothing to do",
                 current, state.get("flow_run_id"), state.get("state"))
        return {"triggered": False, "data_md5": current, "reason": "already triggered for this data version"}
    log.info("New data version %s on %s (production: %s); retraining", current, branch, production)
    run = retrain(data_rev=branch, overrides=overrides, push=push, publish=publish, root=str(project),
                  return_state=True)
    result = run.result(raise_on_failure=False)
    # Recorded whatever the outcome: a failing data version is not retried every few minutes;
    # a fix comes as a new data version or a manual retrain.
    write_json(state_path(project), {"data_md5": current, "branch": branch, "state": run.name,
                                     "flow_run_id": str(run.state_details.flow_run_id), "time": time.time()})
    if not run.is_completed():
        raise RuntimeError(f"retrain of data {current} ended {run.name}: {run.message}")
    return {"triggered": True, "data_md5": current, "retrain": result}


def _branch(value: str) -> str:
    try:
        return check_rev(value, "--branch")
    except DataVersionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", type=_branch, help="git branch holding the data version "
                        "(default: schedule.data_branch)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    from tasks.lib.models import check_arch   # imports torchvision (seconds): only when a person runs the command

    try:  # a bad params.yaml fails here, in a second, before any server starts
        check_arch(load_params(root / "params.yaml").model.arch)
    except ValueError as err:   # ParamsError, or a model.arch the model builder does not know
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = run_flow_command(root, lambda: watch(branch=args.branch, root=str(root), return_state=True),
                             "watch interrupted; the retrain it started (if any) is stopped")
    if isinstance(state, int):
        return state
    if not state.is_completed():
        print(f"watch {state.name}: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
