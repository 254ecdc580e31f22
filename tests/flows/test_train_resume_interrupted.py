"""An interrupted train stage finishes when run again, through `dvc repro` and through the retrain flow.

`dvc repro` deletes the stage's outputs (model.pt) before it re-runs the stage,
so whatever a resumed run needs must live in the resume state, outside DVC's
outputs. These tests stop the real stage after its best epoch (SIGTERM and
SIGKILL to the whole `dvc repro` process group, as a terminal, a timeout or a
container stop does; SIGTERM and SIGKILL of the stage alone under the flow), run it again,
and compare model.pt with an uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tasks.lib.config import apply_overrides_to_file
from tasks.lib.split_files import write_split
from tests.conftest import init_dvc_repo, run, write_image_folder
from tests.flows.conftest import git_commit
from tests.tasks.test_train import ARCH, write_project, write_weights

# Head only with augmentation (the backbone runs every step, so an epoch takes a fraction of a
# second rather than milliseconds), early stopping well after the best epoch, and a seed of its own.
PARAMS = {
    "model.arch": ARCH, "train.image_size": 32, "train.batch_size": 8, "train.head.epochs": 20,
    "train.head.lr": 0.01, "train.head.augment": True, "train.finetune.unfreeze": "none",
    "train.early_stopping_patience": 6, "train.seed": 7, "train.device": "cpu", "train.num_workers": 1,
    "train.channels_last": False,
}
THREADS = {"OMP_NUM_THREADS": "1"}   # the same arithmetic in every run: equal weights, not merely close
EPOCH_LINE = re.compile(r" INFO epoch (\d+) \(head\)")


def best_model(root: Path) -> dict[str, Any]:
    return torch.load(root / "artifacts" / "train" / "model.pt", weights_only=True)


def resume_state(root: Path) -> dict[str, Any]:
    return torch.load(root / "artifacts" / "train" / "resume" / "last.pt", weights_only=True)


def assert_same_model(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert (got["epoch"], got["phase"], got["temperature"]) == \
        (expected["epoch"], expected["phase"], expected["temperature"])
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None, what: str, timeout_s: float = 240,
             log: Path | None = None) -> None:
    """Poll until condition() holds; fail at once if proc ends first (what it printed is in the message)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        assert proc is None or proc.poll() is None, f"ended before {what}:\n{tail}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{tail}"
        time.sleep(0.02)


# --------------------------------------------------------------------------- dvc repro


@pytest.fixture(scope="module")
def stage_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DVC project (this repository's dvc.yaml and stages) with split files, weights and the decoded
    images in place, so `dvc repro --single-item train` has only training to do. Never run train here:
    DVC's run cache would then restore its output instead of training."""
    repo = init_dvc_repo(tmp_path_factory.mktemp("interrupt") / "repo")
    write_project(repo, per_class=40)
    apply_overrides_to_file(repo / "params.yaml", PARAMS)
    write_split(repo / "data" / "prepared" / "test.csv", [])   # decode_cache reads all three splits
    run(["dvc", "repro", "--single-item", "decode_cache"], repo, env=THREADS)
    return repo


@pytest.fixture(scope="module")
def uninterrupted(stage_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """model.pt of the same run left alone, in a copy of the project."""
    copy = Path(shutil.copytree(stage_project, tmp_path_factory.mktemp("straight") / "repo", symlinks=True))
    run(["dvc", "repro", "--single-item", "train"], copy, env=THREADS)
    model = best_model(copy)
    epochs = resume_state(copy)["progress"]["global_epoch"]
    # The interruption must come after the best epoch and before the end, with epochs to spare.
    assert model["epoch"] + 3 <= epochs, (model["epoch"], epochs)
    return model


@pytest.mark.slow(seconds=45)   # each; the first also builds the project and the uninterrupted run (25 s)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_dvc_repro_stopped_after_the_best_epoch_finishes_with_the_same_model_when_run_again(
        stage_project: Path, uninterrupted: dict[str, Any], tmp_path: Path, sig: signal.Signals) -> None:
    repo = Path(shutil.copytree(stage_project, tmp_path / "repo", symlinks=True))
    log = tmp_path / "repro.log"
    stop_after = uninterrupted["epoch"] + 1   # the first epoch after the best one is saved: stop there

    def logged_epochs() -> list[int]:
        return [int(n) for n in EPOCH_LINE.findall(log.read_text(errors="replace"))]

    with log.open("wb") as out:
        proc = subprocess.Popen(["dvc", "repro", "--single-item", "train"], cwd=repo, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **THREADS}, start_new_session=True)
    try:
        wait_for(lambda: stop_after in logged_epochs(), proc, f"epoch {stop_after}", log=log)
        os.killpg(proc.pid, sig)   # the whole group, dvc and the stage under it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    half = resume_state(repo)
    assert not half["finished"] and half["progress"]["best_epoch"] == uninterrupted["epoch"]
    assert half["progress"]["global_epoch"] > uninterrupted["epoch"], "stopped before its best epoch"
    assert not (repo / "metrics" / "train.json").exists()

    rerun = run(["dvc", "repro", "--single-item", "train"], repo, env=THREADS)
    assert "resuming from" in rerun.stdout + rerun.stderr
    assert_same_model(best_model(repo), uninterrupted)
    assert resume_state(repo)["finished"]
    assert "Stage 'train' didn't change" in run(["dvc", "repro", "--single-item", "train"], repo).stdout


# --------------------------------------------------------------------------- the retrain flow


@pytest.fixture
def flow_project(tmp_path: Path) -> Path:
    """A real project the retrain flow runs end to end: images tracked by DVC as a committed data version,
    and a local 'pretrained' backbone that fetch_weights verifies by its sha256."""
    from tasks.lib.io import sha256_file

    repo = init_dvc_repo(tmp_path / "project")
    write_image_folder(repo / "data" / "raw", classes=3, per_class=40, size=36)
    write_weights(repo / "pretrained", ARCH)
    backbone = repo / "pretrained" / "backbone.pt"
    apply_overrides_to_file(repo / "params.yaml", {**PARAMS, "model.weights": "pretrained/backbone.pt", "model.sha256": sha256_file(backbone),
                      # This random backbone's logits run into the hundreds: parity to 1e-3, not 1e-4.
                      "export.latency_runs": 5, "export.atol": 1e-3})
    (repo / ".gitignore").write_text("__pycache__/\n")
    run(["dvc", "add", "-q", "data/raw"], repo)
    git_commit(repo, "data v1", tag="v1")
    return repo


def stop_stage_after_its_best_epoch(project: Path, stopped: dict[str, Any], flow_done: threading.Event,
                                    sig: signal.Signals) -> None:
    """Watch the resume state; two epochs after the best one, send sig to the train stage (only that process)."""
    last = project / "artifacts" / "train" / "resume" / "last.pt"
    seen = None
    while not flow_done.is_set():
        if last.exists() and last.stat().st_mtime_ns != seen:
            seen = last.stat().st_mtime_ns
            progress = torch.load(last, weights_only=True)["progress"]
            if progress["bad_epochs"] >= 2:
                for stage in train_stages():
                    stage.send_signal(sig)
                    stopped["progress"] = progress
                return
        time.sleep(0.02)


def train_stages() -> list[psutil.Process]:
    """The `python -m tasks.train` processes this test started (under the flow, dvc and its guard)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "tasks.train" in child.cmdline():
                found.append(child)
        except psutil.Error:   # exited while we looked
            pass
    return found


@pytest.mark.slow(seconds=140)   # each: two flow runs over the real stages, export included, and a straight train
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_retrain_flow_finishes_a_train_stage_killed_after_its_best_epoch(
        flow_project: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals) -> None:
    from flows.retrain import retrain
    from tests.flows.helpers import state_of

    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the stages and the reference run below: the same arithmetic
    stopped: dict[str, Any] = {}
    flow_done = threading.Event()
    watcher = threading.Thread(target=stop_stage_after_its_best_epoch, args=(flow_project, stopped, flow_done, sig))
    watcher.start()
    try:
        name, message, _ = state_of(retrain(root=str(flow_project), publish=False, return_state=True))
    finally:
        flow_done.set()
        watcher.join()
    assert stopped, f"the train stage was not stopped: {name} {message}"
    assert name == "Failed" and "stage train failed" in message, message
    assert not resume_state(flow_project)["finished"]

    name, message, result = state_of(retrain(root=str(flow_project), publish=False, return_state=True))
    assert name == "Completed", message
    assert result["stages_run"] == ["train", "evaluate", "export"]
    assert (flow_project / "artifacts" / "export" / "model.onnx").exists()

    # The same run left alone, in a folder of its own.
    run(["python", "-m", "tasks.train", "-S", "train.out_dir=straight", "-S", "reports.dir=straight/metrics"],
        flow_project)
    expected = torch.load(flow_project / "straight" / "model.pt", weights_only=True)
    assert expected["epoch"] == stopped["progress"]["best_epoch"] < stopped["progress"]["global_epoch"]
    assert_same_model(best_model(flow_project), expected)
