"""Fixtures of the flow tests: one Prefect test server per session, and tiny real DVC projects."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import init_dvc_repo, run, write_image_folder

# A five-stage pipeline with the real stage names whose stages take a fraction of a second,
# so the flow's own logic (skipping, isolation, locking, failures) is tested quickly. The
# real dvc.yaml runs in test_retrain_real_pipeline. Stage behaviour is driven by params
# so that DVC sees every change: train fails when train.head.epochs is 0 and sleeps
# train.seed seconds (for the timeout test); fetch_weights exits 75 (a transient failure)
# once when the project holds a file fail-once-transient.
TINY_DVC_YAML = """\
stages:
  prepare:
    cmd: python tiny_stage.py prepare
    deps: [tiny_stage.py, data/raw]
    outs: [out/prepare.txt]
  fetch_weights:
    cmd: python tiny_stage.py fetch_weights
    deps: [tiny_stage.py]
    params: [model.arch]
    outs: [out/fetch_weights.txt]
  train:
    cmd: python tiny_stage.py train
    deps: [tiny_stage.py, out/prepare.txt, out/fetch_weights.txt]
    params: [train.head.epochs, train.seed]
    outs: [out/train.txt]
  evaluate:
    cmd: python tiny_stage.py evaluate
    deps: [tiny_stage.py, out/train.txt]
    outs: [out/evaluate.txt]
    metrics:
      - metrics/evaluate.json:
          cache: false
  export:
    cmd: python tiny_stage.py export
    deps: [tiny_stage.py, out/evaluate.txt]
    outs: [out/export.txt]
"""

TINY_STAGE = '''\
"""A stand-in stage: hashes its inputs into out/<stage>.txt; train and fetch_weights can fail on purpose."""
import hashlib, json, pathlib, sys, time
import yaml

stage = sys.argv[1]
params = yaml.safe_load(open("params.yaml"))
print(f"tiny stage {stage} working", flush=True)
digest = hashlib.sha256(stage.encode())
for path in sorted(pathlib.Path("data/raw").rglob("*")) + sorted(pathlib.Path("out").glob("*.txt")):
    if path.is_file():
        digest.update(path.read_bytes())
if stage == "train":
    if params["train"]["head"]["epochs"] == 0:
        print("some progress before the failure", flush=True)
        sys.exit("error: train.head.epochs is 0, so there is nothing to train; set it to 1 or more")
    time.sleep(params["train"]["seed"])
if stage == "fetch_weights" and pathlib.Path("fail-once-transient").exists():   # a network hiccup, once
    pathlib.Path("fail-once-transient").unlink()
    sys.exit(75)
if stage == "evaluate":
    pathlib.Path("metrics").mkdir(parents=True, exist_ok=True)
    json.dump({"accuracy": 0.75, "macro_f1": 0.7, "ece": 0.05, "n_test": 4,
               "per_class": {"class_0": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}}},
              open("metrics/evaluate.json", "w"))
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path(f"out/{stage}.txt").write_text(digest.hexdigest())
'''


def git_commit(root: Path, message: str, tag: str | None = None) -> str:
    """Commit everything in root (a test repo), optionally tag it; the commit sha."""
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", message], root)
    if tag:
        run(["git", "tag", tag], root)
    return run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def make_tiny_project(root: Path) -> Path:
    """A git + DVC repo with the tiny pipeline and 3 classes x 3 PNGs tracked as data version v1."""
    init_dvc_repo(root)
    (root / "dvc.yaml").write_text(TINY_DVC_YAML)
    (root / "tiny_stage.py").write_text(TINY_STAGE)
    (root / ".gitignore").write_text("__pycache__/\n")
    write_image_folder(root / "data" / "raw", classes=3, per_class=3, size=16)
    run(["dvc", "add", "-q", "data/raw"], root)
    git_commit(root, "data v1", tag="v1")
    return root


def add_data_version(root: Path, tag: str, seed: int) -> None:
    """A new data version: one more image per class, `dvc add`, committed and tagged."""
    for c in range(3):
        write_image_folder(root / "data" / "extra", classes=3, per_class=1, size=16, seed=seed)
        src = root / "data" / "extra" / f"class_{c}" / "img_000.png"
        src.rename(root / "data" / "raw" / f"class_{c}" / f"img_new_{tag}.png")
    run(["dvc", "add", "-q", "data/raw"], root)
    git_commit(root, f"data {tag}", tag=tag)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the workspace (DVC's cache and scratch excluded), plus git's HEAD and status."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith((".git/", ".dvc/cache/", ".dvc/tmp/")):
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    files["git HEAD"] = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    files["git status"] = run(["git", "status", "--porcelain"], root).stdout
    files["git branch"] = run(["git", "branch", "--show-current"], root).stdout.strip()
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 20) -> int | None:
    """Stop a process the test started (SIGTERM, then SIGKILL), by its PID only."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server and database for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    with prefect_test_harness(server_startup_timeout=timeout):
        yield


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project, made once per session (git + dvc init + dvc add cost ~10 s on 2 busy cores)."""
    return make_tiny_project(tmp_path_factory.mktemp("template") / "project")


@pytest.fixture
def tiny_project(tiny_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny project for one test (git and DVC keep only relative paths inside)."""
    return Path(shutil.copytree(tiny_template, tmp_path / "project", symlinks=True))
