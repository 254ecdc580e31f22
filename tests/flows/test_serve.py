"""`python -m flows.serve` as a user runs it: it starts a real Prefect server, a schedule fires by itself,
and one SIGINT stops serve, its runner and its server within seconds (no traceback, nothing left over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from flows.data_version import md5_in_workspace
from flows.watch import state_path
from tasks.lib.config import apply_overrides_to_file
from tests.conftest import VENV_BIN
from tests.flows.conftest import free_port, git_commit, stop


def api(url: str, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if (value := check()):
                return value
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"{what}; serve's output:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.slow(seconds=90)
@pytest.mark.timeout(600)
def test_serve_starts_a_server_whose_schedule_fires_and_one_sigint_stops_everything(
        tiny_project: Path, tmp_path: Path) -> None:
    # A one-minute watch that finds nothing to do: its state already names the current data version.
    apply_overrides_to_file(tiny_project / "params.yaml", ["schedule.watch_interval_minutes=1"])
    git_commit(tiny_project, "watch every minute")
    state_path(tiny_project).parent.mkdir(parents=True, exist_ok=True)
    state_path(tiny_project).write_text(json.dumps({"data_md5": md5_in_workspace(tiny_project, Path("data/raw"))}))

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # the test need not wait a minute for it
               PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([str(VENV_BIN / "python"), "-m", "flows.serve", "--port", str(port)],
                                 cwd=tiny_project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: f"Prefect UI: http://127.0.0.1:{port}" in log.read_text(), 240,
                 "serve did not print the UI address", serve, log)
        completed = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        runs = wait_for(lambda: api(url, "/flow_runs/filter", completed), 300,
                        "no scheduled flow run completed", serve, log)
        deployments = {d["id"]: d["name"] for d in api(url, "/deployments/filter")}
        assert deployments[runs[0]["deployment_id"]] == "data-change"
        assert runs[0]["auto_scheduled"] is True  # made by the server's scheduler, not triggered

        family = psutil.Process(serve.pid).children(recursive=True)
        assert len(family) >= 2  # the server and the runner
        started = time.monotonic()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        gone, alive = psutil.wait_procs(family, timeout=2)
        assert alive == [], [p.cmdline() for p in alive]
        output = log.read_text(errors="replace")
        assert "Traceback" not in output, output[-3000:]
        assert "flows.serve stopped" in output
        assert not (tmp_path / "prefect-home" / "server.json").exists()
    finally:
        stop(serve)


def test_serve_rejects_bad_params_before_starting_anything(tiny_project: Path) -> None:
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["schedule"]["watch_interval_minutes"] = 0
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    home = tiny_project.parent / "prefect-home"
    proc = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.serve"], cwd=tiny_project, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PREFECT_HOME": str(home)})
    assert proc.returncode == 2
    assert "schedule.watch_interval_minutes" in proc.stderr and "Traceback" not in proc.stderr
    # No server was started before the message: it would have left its database and server.json in PREFECT_HOME.
    assert not (home / "server.json").exists() and not list(home.rglob("*.db*"))
