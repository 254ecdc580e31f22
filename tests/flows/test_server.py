"""Against a real `prefect server start` on 127.0.0.1: serve the schedules, deploy prefect.yaml to a
process worker, trigger retrain from the CLI, wait for Completed, read its artifacts; stop all by PID."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.lib.config import load_params
from tests.conftest import REPO_ROOT, VENV_BIN, run
from tests.flows.conftest import free_port, git_commit, stop

STAGES = ["prepare", "fetch_weights", "train", "evaluate", "export"]


class Server:
    """A Prefect server process and the environment that points clients at it."""

    def __init__(self, home: Path, port: int):
        self.url = f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_CLI_PROMPT": "false", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        self.procs: list[subprocess.Popen] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], cwd: Path) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def cli(self, *args: str, cwd: Path) -> str:
        proc = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, f"prefect {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def api(self, method: str, path: str, body: dict | None = None) -> object:
        import json

        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "prefect-home", free_port())
    port = srv.url.split(":")[-1].split("/")[0]
    proc = srv.start("server", [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                "--port", port], tmp_path)
    try:
        wait_for(lambda: _healthy(srv), 180, lambda: f"prefect server did not start:\n{srv.log('server')}",
                 proc=proc)
        yield srv
    finally:
        for started in reversed(srv.procs):  # worker and serve first, the server last
            stop(started, timeout=30)


def _healthy(srv: Server) -> bool:
    try:
        return srv.api("GET", "/health") is True
    except OSError:
        return False


def wait_for(check, timeout: float, describe, proc: subprocess.Popen | None = None, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(every)
    raise AssertionError(describe())


@pytest.mark.slow(seconds=55)
@pytest.mark.timeout(600)
def test_serve_schedules_then_worker_runs_a_triggered_retrain(server: Server, tiny_project: Path) -> None:
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:  # no scheduled run may start in the middle of the test
        deployment["schedules"][0]["active"] = False
    (tiny_project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    git_commit(tiny_project, "prefect.yaml")

    # 1. `make serve`: both deployments registered with their schedules; SIGTERM stops it cleanly.
    serve = server.start("serve", [str(VENV_BIN / "python"), "-m", "flows.serve", "--paused"], tiny_project)
    deployments = wait_for(lambda: _deployments(server, {"scheduled", "data-change"}), 180,
                           lambda: f"serve did not register its deployments:\n{server.log('serve')}", proc=serve)
    schedule = load_params(tiny_project / "params.yaml").schedule
    assert deployments["scheduled"]["schedules"][0]["schedule"]["cron"] == schedule.cron
    assert deployments["data-change"]["schedules"][0]["schedule"]["interval"] == schedule.watch_interval_minutes * 60
    assert (deployments["scheduled"].get("global_concurrency_limit") or {}).get("limit") == 1
    serve.terminate()
    assert serve.wait(timeout=60) == 0, server.log("serve")

    # 2. prefect.yaml on a process work pool; a run triggered from the CLI.
    server.cli("work-pool", "create", "retrain-pool", "--type", "process", cwd=tiny_project)
    server.cli("deploy", "--all", cwd=tiny_project)
    worker = server.start("worker", [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "retrain-pool"],
                          tiny_project)
    out = server.cli("deployment", "run", "retrain/scheduled", "--param", "publish=false", cwd=tiny_project)
    run_id = next(word for line in out.splitlines() if "UUID" in line for word in line.split()
                  if word.count("-") == 4)
    flow_run = wait_for(lambda: _finished(server, run_id), 300,
                        lambda: f"flow run {run_id} did not finish:\n{server.log('worker')}", proc=worker, every=2)
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], server.log("worker"))

    artifacts = server.api("POST", "/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    by_key = {a["key"]: a["data"] for a in artifacts}
    assert "| macro_f1 | 0.7000 |" in by_key["fashion-demo-test-metrics"]
    assert "model.onnx" in by_key["fashion-demo-outputs"]
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES  # the worker ran in the project directory

    worker.terminate()
    try:   # a worker that ignores SIGTERM raises TimeoutExpired here and fails the test
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # Prefect's worker turns a first SIGTERM into an interrupt of itself, and on a loaded machine that
        # interrupt can be lost (its event loop idles on, nothing left to run); a second SIGTERM is its own
        # escalation to SIGKILL, which is what a service manager sends next.
        worker.terminate()
        worker.wait(timeout=60)


def _deployments(server: Server, names: set[str]) -> dict[str, dict] | None:
    try:
        found = server.api("POST", "/deployments/filter", {})
    except OSError:
        return None
    by_name = {d["name"]: d for d in found}
    return by_name if names <= set(by_name) and all(by_name[n]["schedules"] for n in names) else None


def _finished(server: Server, run_id: str) -> dict | None:
    flow_run = server.api("GET", f"/flow_runs/{run_id}")
    return flow_run if flow_run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None


def test_prefect_yaml_schedule_matches_params() -> None:
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    params = load_params(REPO_ROOT / "params.yaml")
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["scheduled"]["schedules"][0]["cron"] == params.schedule.cron
    assert by_name["data-change"]["schedules"][0]["interval"] == params.schedule.watch_interval_minutes * 60
    assert by_name["data-change"]["parameters"]["branch"] == params.schedule.data_branch
    assert run(["git", "check-ignore", "-q", "prefect.yaml"], REPO_ROOT, check=False).returncode == 1


def test_server_settings_come_from_the_environment_then_the_projects_prefect_toml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.server import ServerError, prefect_home, project_setting, startup_timeout_s

    for name in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert prefect_home(tmp_path) == Path("~/.prefect").expanduser()   # no prefect.toml: Prefect's default
    assert startup_timeout_s(tmp_path) == 90

    (tmp_path / "prefect.toml").write_text('home = "state/prefect"\n[server.ephemeral]\n'
                                           'startup_timeout_seconds = 240\n[server.api]\nport = 4321\n')
    assert prefect_home(tmp_path) == tmp_path / "state" / "prefect"
    assert startup_timeout_s(tmp_path) == 240
    assert project_setting(tmp_path, "PREFECT_SERVER_API_PORT", ("server", "api", "port"), "4200") == "4321"

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "12")
    assert prefect_home(tmp_path) == tmp_path / "elsewhere" and startup_timeout_s(tmp_path) == 12

    (tmp_path / "prefect.toml").write_text("home = \n")
    monkeypatch.delenv("PREFECT_HOME")
    with pytest.raises(ServerError, match="prefect.toml cannot be read"):
        prefect_home(tmp_path)
