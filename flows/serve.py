"""Serve the scheduled deployments locally: `retrain` on schedule.cron and `watch` every few minutes.

    make serve        # or: python -m flows.serve

No work pool or worker is needed: `prefect.serve` registers both deployments
with the Prefect API (PREFECT_API_URL, or the embedded server) and runs their
flow runs in subprocesses of this process. Ctrl-C or SIGTERM stops it cleanly
(schedules are paused on shutdown). `prefect.yaml` holds the same deployments
for a work pool (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.retrain import retrain
from flows.watch import watch
from tasks.config import ParamsError, load_params


def deployments(params_path: Path, paused: bool = False) -> list[RunnerDeployment]:
    """The two deployments, with their schedules taken from params.yaml's schedule section."""
    schedule = load_params(params_path).schedule
    root = str(params_path.resolve().parent)
    return [
        retrain.to_deployment(
            name="scheduled",
            schedule=Cron(schedule.cron, timezone=schedule.timezone),
            paused=paused,
            parameters={"root": root},
            description=f"Retrain {root} on cron {schedule.cron!r} ({schedule.timezone}).",
            tags=["retrain"],
            concurrency_limit=1,  # a late run waits for the one before; the flow's own lock covers manual runs
            entrypoint_type=EntrypointType.MODULE_PATH,  # flows.retrain:retrain, importable from any cwd
        ),
        watch.to_deployment(
            name="data-change",
            schedule=Interval(timedelta(minutes=schedule.watch_interval_minutes), timezone=schedule.timezone),
            paused=paused,
            parameters={"root": root, "branch": schedule.data_branch},
            description=f"Retrain {root} when data/raw changes on {schedule.data_branch}.",
            tags=["retrain"],
            concurrency_limit=1,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]


def _stop_on_sigterm() -> None:
    """SIGTERM before the runner starts stops like Ctrl-C; once started, Prefect's runner handles it the same way."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--paused", action="store_true",
                        help="register the schedules paused: runs start only when triggered (UI, CLI, API)")
    args = parser.parse_args(argv)
    try:
        served = deployments(args.params, paused=args.paused)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    _stop_on_sigterm()
    try:
        serve(*served, limit=2)
    except KeyboardInterrupt:
        pass
    print("flows.serve stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
