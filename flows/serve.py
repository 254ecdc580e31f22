"""Serve the scheduled deployments on the project's Prefect server: `retrain` on cron, `watch` on an interval.

    make serve        # or: python -m flows.serve [--port 4200] [--paused]

Prefect's ephemeral server runs no scheduler, so this starts (or reuses) a real one and serves both
deployments from a child process. One Ctrl-C or SIGTERM stops the runner, its flow runs and the server;
each dies with this process even if it is SIGKILLed. `prefect.yaml` holds the same deployments for a work pool.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from flows.processes import spawn, stop_process_group
from flows.server import ServerError, project_server, project_setting, usable_home
from tasks.lib.config import load_params

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

RUNNER_STOP_GRACE_S = 4.0  # the runner cancels its flow runs on SIGTERM; then its process group is killed


def deployments(params_path: Path, paused: bool = False) -> list[RunnerDeployment]:
    """The two deployments, with their schedules taken from params.yaml's schedule section."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from flows.retrain import retrain
    from flows.watch import watch

    schedule = load_params(params_path).schedule
    root = str(params_path.resolve().parent)
    common = {"paused": paused, "tags": ["retrain"],
              "concurrency_limit": 1,  # a late run waits for the one before; the flow's own lock covers manual runs
              "entrypoint_type": EntrypointType.MODULE_PATH}  # e.g. flows.retrain:retrain, importable from any cwd
    return [
        retrain.to_deployment(
            name="scheduled",
            schedule=Cron(schedule.cron, timezone=schedule.timezone),
            parameters={"root": root},
            description=f"Retrain {root} on cron {schedule.cron!r} ({schedule.timezone}).",
            **common,
        ),
        watch.to_deployment(
            name="data-change",
            schedule=Interval(timedelta(minutes=schedule.watch_interval_minutes), timezone=schedule.timezone),
            parameters={"root": root, "branch": schedule.data_branch},
            description=f"Retrain {root} when data/raw changes on {schedule.data_branch}.",
            **common,
        ),
    ]


class Stop(Exception):
    """Ctrl-C or SIGTERM arrived."""


def _stop_on_signals() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def serve_deployments(params_path: Path, paused: bool) -> int:
    """The runner (child process): register both deployments and run their flow runs until SIGTERM."""
    from prefect import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches it alone
    serve(*deployments(params_path, paused=paused), limit=2, print_starting_message=False)
    return 0


def supervise(root: Path, args: argparse.Namespace) -> int:
    """Server, then runner; on Ctrl-C/SIGTERM stop the runner (and its flow runs), then the server."""
    _stop_on_signals()
    runner: subprocess.Popen | None = None
    try:
        with project_server(root, args.port, advertised=True) as url:
            try:
                cmd = [sys.executable, "-m", "flows.serve", "--runner", "--params", str(args.params.resolve())]
                runner = spawn(cmd + (["--paused"] if args.paused else []), root,
                               {**os.environ, "PREFECT_API_URL": url})
                print(f"Serving retrain/scheduled and watch/data-change against {url}\n"
                      f"Prefect UI: {url.removesuffix('/api')}   (Ctrl-C stops)", file=sys.stderr, flush=True)
                code = runner.wait()
                print(f"the runner exited with code {code}; see its messages above", file=sys.stderr)
                return 1
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if runner is not None:
                    stop_process_group(runner, RUNNER_STOP_GRACE_S)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Stop as stop:
        print(f"{stop}: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        print("flows.serve stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--port", type=int, default=None,
                        help="port of the server this command starts on 127.0.0.1 (default: Prefect's "
                             "server.api.port: PREFECT_SERVER_API_PORT, then prefect.toml, then 4200)")
    parser.add_argument("--paused", action="store_true",
                        help="register the schedules paused: runs start only when triggered (UI, CLI, API)")
    parser.add_argument("--runner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:  # bad params fail here, before any server starts
        params = load_params(args.params)
        if not args.runner:   # the model builder imports torchvision: seconds the runner does not spend
            from tasks.lib.models import check_arch

            check_arch(params.model.arch)
    except ValueError as err:   # ParamsError, or a model.arch the model builder does not know
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.runner:
        return serve_deployments(args.params, args.paused)
    root = args.params.resolve().parent
    if args.port is None:
        try:
            args.port = int(project_setting(root, "PREFECT_SERVER_API_PORT", ("server", "api", "port"), "4200"))
        except (ServerError, ValueError) as err:
            print(f"error: the Prefect server port (PREFECT_SERVER_API_PORT or prefect.toml server.api.port): "
                  f"{err}", file=sys.stderr)
            return 2
    try:
        usable_home(root)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return supervise(root, args)


if __name__ == "__main__":
    sys.exit(main())
