"""The project's local Prefect server: reuse the one that runs, or start one that dies with its starter.

In order: the server `PREFECT_API_URL` names; `make serve`'s (`.prefect/server.json` names it); else a
`prefect server start` on a free 127.0.0.1 port for the length of the command, with its database in the
project. Unlike Prefect's ephemeral server it runs the scheduler, and it gets the parent-death signal, so a
SIGKILLed command never leaves it running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable

from flows.processes import sigterm_as_interrupt, spawn, stop_process_group
from tasks.lib.io import process_alive

STATE_NAME = "server.json"
STOP_GRACE_S = 8.0


class ServerError(RuntimeError):
    """The local Prefect server could not be started; the message says why and where its log is."""


def project_setting(root: Path, env: str, keys: tuple[str, ...], default: str) -> str:
    """A Prefect setting as Prefect resolves it: the environment variable, then the project's
    prefect.toml (keys: its table path), then Prefect's default."""
    if value := os.environ.get(env):
        return value
    try:
        table: object = tomllib.loads((root / "prefect.toml").read_text())
    except FileNotFoundError:
        return default
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ServerError(f"{root / 'prefect.toml'} cannot be read ({err}); fix it or delete it") from None
    for key in keys:
        table = table.get(key) if isinstance(table, dict) else None
    return default if table is None else str(table)


def prefect_home(root: Path) -> Path:
    """The Prefect home the project's settings name (PREFECT_HOME, then prefect.toml's `home`)."""
    home = Path(project_setting(root, "PREFECT_HOME", ("home",), "~/.prefect")).expanduser()
    return home if home.is_absolute() else root / home


def usable_home(root: Path) -> Path:
    """The Prefect home, created if it is missing; ServerError, in one line, when it cannot be a folder."""
    home = prefect_home(root)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ServerError(f"{home} is a file, not a folder: Prefect keeps this project's database and server logs "
                          f"there (prefect.toml `home`, or PREFECT_HOME); move that file away or delete it") from None
    except OSError as err:
        raise ServerError(f"{home}: cannot create Prefect's home folder there ({err.strerror or err}); fix it or "
                          "set PREFECT_HOME to another folder") from None
    return home


def state_path(root: Path) -> Path:
    return prefect_home(root) / STATE_NAME


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at url."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return json.loads(response.read() or b"null") is True
    except (OSError, ValueError):
        return False


def running_server(root: Path) -> str | None:
    """The API address of the project's advertised server (`make serve`) when it answers, else None."""
    try:
        state = json.loads(state_path(root).read_text())
        alive = process_alive(int(state["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state["url"] if alive and healthy(state["url"]) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def start_server(root: Path, port: int, timeout_s: float) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port with the project's settings; wait until it answers."""
    url = api_url(port)
    home = usable_home(root)
    log_path = home / f"server-{port}.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url, "PREFECT_API_URL": url}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    print(f"Starting a Prefect server on {url.removesuffix('/api')} (database in {home}; log {log_path})",
          file=sys.stderr)
    with log_path.open("ab") as log:
        # SIGKILL on our death: a server still starting up defers SIGTERM for tens of seconds on busy
        # cores (measured), and SQLite's journal makes a killed server safe to restart.
        process = spawn(cmd, root, env, stdout=log, stderr=subprocess.STDOUT, death_signal=signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while not healthy(url, timeout_s=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process, STOP_GRACE_S)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"the Prefect server on port {port} did not start within {timeout_s:g} s "
                              f"(log {log_path}):\n{tail}")
        time.sleep(0.5)
    return process


def startup_timeout_s(root: Path) -> float:
    """How long a starting server may take: Prefect's own setting (environment, then prefect.toml)."""
    value = project_setting(root, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                            ("server", "ephemeral", "startup_timeout_seconds"), "90")
    try:
        return float(value)
    except ValueError:
        raise ServerError(f"server.ephemeral.startup_timeout_seconds (prefect.toml) or "
                          f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is {value!r}: give seconds") from None


@contextmanager
def project_server(root: Path, port: int | None = None, advertised: bool = False) -> Iterator[str]:
    """The API address every Prefect call of this command uses; a server started here stops on exit.
    advertised: other commands reuse the server started here while it runs (`make serve`)."""
    usable_home(root)   # Prefect's clients keep files there too, whichever server they talk to
    if url := os.environ.get("PREFECT_API_URL"):
        yield url
        return
    if url := running_server(root):
        print(f"Using the project's running Prefect server {url.removesuffix('/api')}", file=sys.stderr)
        yield url
        return
    if port is not None and port_in_use(port):
        raise ServerError(f"port {port} on 127.0.0.1 is taken by another program; "
                          f"choose another with `python -m flows.serve --port N` (make serve PORT=N)")
    port = port or free_port()
    process = start_server(root, port, startup_timeout_s(root))
    path = state_path(root)
    if advertised:
        path.write_text(json.dumps({"url": api_url(port), "pid": process.pid}))
    try:
        yield api_url(port)
    finally:
        with suppress(OSError, ValueError):   # withdrawn only while it still names this server
            if advertised and json.loads(path.read_text()).get("pid") == process.pid:
                path.unlink()
        stop_process_group(process, STOP_GRACE_S)   # its whole process group, by its process id


@contextmanager
def prefect_api(root: Path) -> Iterator[str]:
    """project_server, made the Prefect API of this whole process, as Prefect's test harness does: the
    environment and the global settings context name it (else background workers start an ephemeral server),
    and the workers are drained before the server stops (else they retry a dead server at exit)."""
    from prefect.context import (
        _temporary_global_settings_context,
        get_settings_context,
        refresh_global_settings_context,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with project_server(root) as url:
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        refresh_global_settings_context()  # rebuilt from the environment, as if Prefect were imported now
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}), \
                    _temporary_global_settings_context(get_settings_context()):
                try:
                    yield url
                finally:   # interrupted runs too: their crash logs go out while the server still runs
                    drain_prefect_workers()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            refresh_global_settings_context()


def run_flow_command(root: Path, start: Callable[[], Any], interrupted: str) -> Any | int:
    """What a flow's command line does around its flow: `start()` against the project's server, with
    SIGTERM unwinding like Ctrl-C. Its final state, or the exit code after saying why on stderr:
    1 when no server could be had, 130 when interrupted (`interrupted` says what was stopped)."""
    try:
        with sigterm_as_interrupt(), prefect_api(root):
            return start()
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # the copy, the lock and the server are already cleaned up by their `finally`s
        print(interrupted, file=sys.stderr)
        return 130


def drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send the logs and events still queued to the server while it still runs."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with suppress(RuntimeError):  # never started
            worker.drain_all(timeout=timeout_s)
