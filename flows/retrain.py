"""The `retrain` flow: data version -> DVC stages -> (push) -> gate and publish.

DVC decides what is stale, this flow when and where: one `dvc status` finds the stale stages, then each runs
as its own Prefect task (`dvc repro --single-item`, output streamed into the run log) in dvc.yaml's order.
Overrides (-S) and other data versions run in an isolated git worktree, so the user's params.yaml, dvc.lock
and outputs are never written, whatever happens to the run.

    python -m flows.retrain [--data-rev v1] [-S train.head.epochs=3] [--push] [--no-publish]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.approval import ask_a_person
from flows.data_version import (DataVersionError, dvc_file, is_workspace_version, isolated_copy, md5_in_workspace,
                                raw_has_files)
from flows.dvc_runner import TransientFailure, read_stages, run_checked, run_streamed, stage_outcome
from flows.lock import describe_holder, retrain_lock
from flows.server import run_flow_command
from flows.summary import metrics_markdown, outputs_markdown, result_line, summarize
from tasks.lib.config import Params, apply_overrides_to_file, load_params

# The one retry layer around a stage: a stage that exits 75 (EX_TEMPFAIL, tasks.lib.errors.TransientError:
# a download or remote storage failed and may work later) runs again; any other failure would repeat, and
# a training bug retried only wastes hours. Transfers (`dvc pull`/`dvc push`) are retried request by
# request inside DVC's remote clients, so the flow adds no layer around them.
RETRIES = 3
BACKOFF = exponential_backoff(backoff_factor=5)  # 5 s, 10 s, 20 s (with jitter)
TIMED_STAGES = frozenset({"train"})  # bounded by train.timeout_minutes


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a stage that exited 75, never a failure that would repeat."""
    return isinstance(state.result(raise_on_failure=False), TransientFailure)


class DataChanged(RuntimeError):
    """The data folder differs from the version its .dvc file pins."""


@task(name="make data version present", cache_policy=NO_CACHE)
def pull_data(workdir: Path, raw_dir: Path) -> str:
    """Check out (from the cache) or pull (from the remote) the data that the .dvc file pins; its hash."""
    log = get_run_logger()
    md5 = md5_in_workspace(workdir, raw_dir)
    target = str(dvc_file(raw_dir))
    if raw_has_files(workdir / raw_dir):
        log.info("Data %s present; training on the version %s pins (DVC hash %s)", raw_dir, target, md5)
        return md5
    checkout = run_streamed(["dvc", "checkout", target], workdir, log)
    if checkout.returncode != 0 or not raw_has_files(workdir / raw_dir):
        log.info("%s is not in the local DVC cache; pulling it from the remote", raw_dir)
        run_checked(["dvc", "pull", target], workdir, log, f"dvc pull {target}")
    log.info("Data %s checked out (DVC hash %s)", raw_dir, md5)
    return md5


@task(name="dvc status", cache_policy=NO_CACHE)
def stale_stages(workdir: Path, stages: list[str], raw_dir: Path) -> list[str]:
    """One `dvc status` over the whole pipeline: the stages to reproduce, from the first stale one on. Data changed
    but not recorded in its .dvc file stops the run: `dvc repro` would train on an unnamed version."""
    log = get_run_logger()
    result = run_checked(["dvc", "status", "--json"], workdir, log, "dvc status")
    status = json.loads("".join(result.stdout_tail) or "{}")
    target = str(dvc_file(raw_dir))
    if target in status:
        raise DataChanged(
            f"{raw_dir} differs from the data version {target} pins ({md5_in_workspace(workdir, raw_dir)}): "
            f"record it with `dvc add {raw_dir} && git add {target} && git commit -m 'data vN'` to train on it, "
            f"or restore the pinned version with `dvc checkout {target}`")
    stale = [stage for stage in stages if stage in status]
    first = stages.index(stale[0]) if stale else len(stages)
    log.info("Stale stages: %s", ", ".join(stale) or "none (everything up to date)")
    return stages[first:]


@task(name="dvc repro", retries=RETRIES, retry_delay_seconds=BACKOFF, retry_jitter_factor=0.5,
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def repro_stage(workdir: Path, stage: str, timeout_s: float | None = None) -> str:
    """'ran' or 'skipped' (unchanged, or from the run cache). The stages upstream are current (the flow runs them
    in order), so --single-item spares DVC checking them again (hashing the data once per stage)."""
    log = get_run_logger()
    result = run_checked(["dvc", "repro", "--single-item", stage], workdir, log, f"stage {stage}",
                         timeout_s=timeout_s)
    outcome = stage_outcome(stage, result.dvc_stage_lines)
    log.info("Stage %s %s", stage, outcome)
    return outcome


@task(name="dvc push", cache_policy=NO_CACHE)
def push_outputs(workdir: Path, remote: str | None = None) -> None:
    """Send the data and every stage output to the DVC remote."""
    cmd = ["dvc", "push"] + (["-r", remote] if remote else [])
    run_checked(cmd, workdir, get_run_logger(), " ".join(cmd))


@task(name="gate and publish", cache_policy=NO_CACHE)
def gate_and_publish(params: Params, workdir: Path, flow_run_id: str, registry_root: Path) -> dict[str, Any]:
    """Compare the candidate with production on the same test split; publish (and maybe promote) it."""
    from tasks.handoff.publish import publish_candidate  # the registry side; imported late so the flow loads without it

    result = publish_candidate(params, workdir, flow_run_id, registry_root=registry_root)
    get_run_logger().info("Registry version %s: promoted=%s (%s)", result.get("registry_version"),
                          result.get("promoted"), result.get("reason"))
    return result


@task(name="attach report", cache_policy=NO_CACHE)
def attach_report(summary: dict[str, Any], params: Params, workdir: Path) -> None:
    """Markdown artifacts on the flow run: test metrics, output paths, stage outcomes."""
    key = re.sub(r"[^a-z0-9-]+", "-", params.project.name.lower()).strip("-") or "model"
    create_markdown_artifact(key=f"{key}-test-metrics", markdown=metrics_markdown(summary),
                             description="Held-out test metrics of the candidate")
    create_markdown_artifact(key=f"{key}-outputs", markdown=outputs_markdown(summary, workdir),
                             description="Stages, ONNX file, model card and reports of this retrain")


@flow(name="retrain", description="Retrain on a data version through the DVC stages, then gate and publish.")
def retrain(data_rev: str | None = None, overrides: list[str] | None = None, push: bool = False,
            publish: bool = True, root: str | None = None, remote: str | None = None,
            lock_wait_minutes: float = 60.0) -> dict[str, Any]:
    """Retrain on data_rev (default: the workspace's data) with params overrides (key=value)."""
    log = get_run_logger()
    project = Path(root or os.getcwd()).resolve()
    overrides = list(overrides or [])
    params = load_params(project / "params.yaml", overrides)  # bad overrides fail here, before any work
    run_id = str(flow_run.id)
    owner = {"flow_run_id": run_id, "data_rev": data_rev}

    def waiting(holder: dict[str, Any]) -> None:
        log.warning("Another retrain of %s is running (%s); waiting up to %g min for it to finish",
                    project, describe_holder(holder), lock_wait_minutes)

    with retrain_lock(project, lock_wait_minutes * 60, owner, on_wait=waiting):
        with working_copy(project, data_rev, overrides, params.data.raw_dir, log) as workdir:
            run_params = apply_overrides_to_file(workdir / "params.yaml", overrides) if overrides else params
            if overrides:
                log.info("Params overrides for this run (in the isolated copy): %s", ", ".join(overrides))
            return run_pipeline(project, workdir, data_rev, run_params, run_id, push, publish, remote)


def run_pipeline(project: Path, workdir: Path, data_rev: str | None, params: Params, run_id: str,
                 push: bool, publish: bool, remote: str | None) -> dict[str, Any]:
    """The steps in order, once the lock is held and the working copy and params are in place."""
    log = get_run_logger()
    data_md5 = pull_data(workdir, params.data.raw_dir)
    stages = read_stages(workdir)
    to_run = stale_stages(workdir, stages, params.data.raw_dir)
    outcomes = {stage: "skipped" for stage in stages}
    for stage in to_run:
        outcomes[stage] = repro_stage.with_options(name=f"dvc repro {stage}")(workdir, stage,
                                                                             stage_timeout_s(stage, params))
    if push:
        push_outputs(workdir, remote)
    published = gate_and_publish(params, workdir, run_id, registry_root=project) if publish else None
    if published and published["awaiting_approval"]:
        published = ask_a_person(params, published, registry_root=project)
    summary = summarize(project, workdir, data_rev, data_md5, params, outcomes, published, run_id, push)
    attach_report(summary, params, workdir)
    log.info("Stages run: %s; skipped: %s", ", ".join(summary["stages_run"]) or "none",
             ", ".join(summary["stages_skipped"]) or "none")
    return summary


@contextmanager
def working_copy(project: Path, data_rev: str | None, overrides: list[str], raw_dir: Path,
                 log: Any) -> Iterator[Path]:
    """The project itself for its own data version without overrides; otherwise an isolated git worktree
    (for overrides, of the workspace as it is), so the user's params.yaml is never written."""
    own = is_workspace_version(project, data_rev, raw_dir)
    if own and not overrides:
        log.info("Training on the workspace's data version in %s", project)
        yield project
        return
    with isolated_copy(project, data_rev or "HEAD", log, with_workspace_changes=own) as workdir:
        yield workdir


def stage_timeout_s(stage: str, params: Params) -> float | None:
    return params.train.timeout_minutes * 60 if stage in TIMED_STAGES else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-rev", help="git revision (tag, branch, commit) of the data version")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--push", action="store_true", help="dvc push the data and outputs afterwards")
    parser.add_argument("--no-publish", action="store_true", help="skip the gate and publish step")
    parser.add_argument("--lock-wait-minutes", type=float, default=60.0)
    return parser.parse_args(argv)


def missing_data(root: Path, raw_dir: Path) -> str | None:
    """Why the workspace has no data to train on (a fresh clone: nothing added, or nothing pulled); None when
    it has images, or its .dvc file's version is in the DVC cache or may be on a remote this cannot look into."""
    if raw_has_files(root / raw_dir):
        return None
    pointer = dvc_file(raw_dir)
    todo = (f"run `make demo` for the demo data, or put one folder of images per class in {raw_dir} and run "
            f"`dvc add {raw_dir}` (then `git add {pointer}` and commit it)")
    if not (root / pointer).exists():
        return f"no data: {raw_dir} has no images and {pointer} does not exist; {todo}"
    try:
        md5 = md5_in_workspace(root, raw_dir)
    except DataVersionError:   # a broken .dvc file: the flow's data step says what is wrong with it
        return None
    places = dvc_storage(root)
    if places is None or any(holds(place, md5) for place in places):
        return None
    return (f"no data: {raw_dir} has no images, and the version {pointer} pins ({md5}) is neither in the DVC cache "
            f"nor on a DVC remote ({', '.join(map(str, places[1:])) or 'none configured'}); `dvc pull` it if "
            f"another remote has it, or {todo}")


def dvc_storage(root: Path) -> list[Path] | None:
    """The DVC cache folder and local remote folders; None when a remote is not a local folder (then only
    `dvc pull` can tell whether it holds the data) or the DVC config cannot be read."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo  # a second to import: only on the path where data/raw is empty

    try:
        with Repo(str(root)) as repo:
            urls = [conf.get("url", "") for conf in repo.config.get("remote", {}).values()]
            cache = Path(repo.cache.local_cache_dir)
    except DvcException:
        return None
    if any("://" in url for url in urls):
        return None
    return [cache] + [Path(url) for url in urls]   # DVC resolves a local remote's url to an absolute path


def holds(place: Path, md5: str) -> bool:
    """Whether a DVC cache or local remote holds the object (DVC 3's files/md5/ layout, or DVC 2's)."""
    return any((place / sub / md5[:2] / md5[2:]).exists() for sub in ("files/md5", "."))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path.cwd()
    try:  # a bad params.yaml or -S, no data or an unknown model.arch fail here, before any server starts
        params = load_params(root / "params.yaml", args.set)
        # A fresh clone has no data: say so now, not after a server start and a DVC traceback.
        if args.data_rev is None and (problem := missing_data(root, params.data.raw_dir)):
            raise ValueError(problem)
        from tasks.lib.models import check_arch   # imports torchvision (seconds): after the cheap checks

        check_arch(params.model.arch)
    except ValueError as err:   # ParamsError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = run_flow_command(root, lambda: retrain(
        data_rev=args.data_rev, overrides=args.set, push=args.push, publish=not args.no_publish, root=str(root),
        lock_wait_minutes=args.lock_wait_minutes, return_state=True),
        "retrain interrupted; its stage, lock, working copy and temporary server are stopped or removed")
    if isinstance(state, int):
        return state
    result = state.result(raise_on_failure=False)
    if state.is_completed():
        print(json.dumps(result_line(result), default=str))
        return 0
    print(f"retrain {state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
