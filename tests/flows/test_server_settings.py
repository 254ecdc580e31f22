"""The commands that start the project's Prefect server: params are refused before any server starts, a Prefect
home that is a file is one line of error, and `make serve` takes its port from prefect.toml."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, VENV_BIN
from tests.flows.conftest import free_port

COMMANDS = {"serve": ["-m", "flows.serve"], "retrain": ["-m", "flows.retrain", "--no-publish"]}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user has: no server named, Prefect's settings from the project's prefect.toml."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "DO_NOT_TRACK": "1", **extra}


def run_command(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120
                ) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout stop the whole group (a server it started included)."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} still ran after {timeout:g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port of 127.0.0.1 that another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


BAD_PARAMS = {
    "empty": ("# every setting commented out\n", "params.yaml: has no settings"),
    "duplicate": ("train:\n  seed: 1\n  seed: 2\n", "line 3: train.seed is set twice (first on line 2)"),
    "quoted": ('train:\n  head:\n    epochs: "3"\n', "train.head.epochs = '3': expected a number, got the string"),
}


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("kind", sorted(BAD_PARAMS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_params_are_refused_before_any_server_starts(tiny_project: Path, command: str, kind: str) -> None:
    text, message = BAD_PARAMS[kind]
    (tiny_project / "params.yaml").write_text(text)
    home = tiny_project.parent / "prefect-home"
    proc = run_command([str(VENV_BIN / "python"), *COMMANDS[command]], tiny_project, clean_env(PREFECT_HOME=str(home)))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    # A server would have left its database and server.json there (importing Prefect may make the folder).
    assert not (home / "server.json").exists() and not list(home.rglob("*.db*"))


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_prefect_home_that_is_a_file_is_one_line_of_error(tiny_project: Path, command: str) -> None:
    (tiny_project / "prefect.toml").write_text('home = ".prefect"\n')
    (tiny_project / ".prefect").write_text("not a folder")
    args = [str(VENV_BIN / "python"), *COMMANDS[command]] + (["--port", str(free_port())] if command == "serve"
                                                               else [])
    proc = run_command(args, tiny_project, clean_env())
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tiny_project / '.prefect'} is a file, not a folder: Prefect keeps this project's database and "
        "server logs there (prefect.toml `home`, or PREFECT_HOME); move that file away or delete it"]


@pytest.mark.slow(seconds=20)
def test_make_serve_uses_the_port_in_prefect_toml(tiny_project: Path, taken_port: int) -> None:
    """Seen with a port taken: make serve tries prefect.toml's port, not a port of its own (4200)."""
    for name in ("Makefile", ".venv"):
        (tiny_project / name).symlink_to(REPO_ROOT / name)
    (tiny_project / "prefect.toml").write_text(f'home = ".prefect"\n[server.api]\nport = {taken_port}\n')
    make = ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", "serve"]   # installed already
    proc = run_command(make, tiny_project, clean_env())
    assert proc.returncode != 0
    assert f"port {taken_port} on 127.0.0.1 is taken by another program" in proc.stderr
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = run_command([*make, f"PORT={port}"], tiny_project, clean_env())    # PORT=N still wins
    assert f"port {port} on 127.0.0.1 is taken by another program" in proc.stderr
