"""An S3 DVC remote (moto_server on 127.0.0.1): the flow pushes data and stage outputs, a clone pulls them."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow

from flows.retrain import pull_data, retrain
from tests.conftest import VENV_BIN, run
from tests.flows.conftest import free_port, git_commit, stop

BUCKET = "dvc-remote"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """moto_server on a free local port with an empty bucket; stopped by PID afterwards."""
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)  # the flow's dvc subprocesses inherit them
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint, proc)
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")  # create the bucket
        urllib.request.urlopen(request, timeout=10).close()
        yield endpoint
    finally:
        stop(proc)
        log.close()


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout} s")


@flow
def pull_only(root: str) -> str:
    """Just the flow's data step, in a clone that has no cache."""
    return pull_data(Path(root), Path("data/raw"))


@pytest.mark.slow(seconds=70)
def test_push_to_s3_then_a_fresh_clone_pulls_data_and_outputs(tiny_project: Path, s3_endpoint: str,
                                                              tmp_path: Path) -> None:
    run(["dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/store"], tiny_project)
    run(["dvc", "remote", "modify", "s3", "endpointurl", s3_endpoint], tiny_project)
    git_commit(tiny_project, "S3 remote")

    state = retrain(root=str(tiny_project), push=True, publish=False, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["pushed"]
    git_commit(tiny_project, "trained")  # dvc.lock, as a user would commit it

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(tiny_project), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    md5 = pull_only(str(clone))  # checkout fails (empty cache), so the data comes from S3
    assert md5 == state.result()["data_md5"]
    assert sorted(p.name for p in (clone / "data" / "raw").rglob("*.png")) == \
        sorted(p.name for p in (tiny_project / "data" / "raw").rglob("*.png"))

    run(["dvc", "pull"], clone)  # the stage outputs
    for stage in ("prepare", "train", "export"):
        assert (clone / "out" / f"{stage}.txt").read_text() == (tiny_project / "out" / f"{stage}.txt").read_text()
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
