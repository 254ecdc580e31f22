"""The watch flow retrains on a new data version on the branch, and not otherwise."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.watch import state_path, watch
from tasks.handoff.lineage import REQUIRED
from tasks.handoff.registry import VERSION_FILES, Registry, new_version_id
from tests.conftest import run
from tests.flows.conftest import add_data_version

pytestmark = pytest.mark.usefixtures("prefect_harness")


def md5_at(root: Path, rev: str) -> str:
    return yaml.safe_load(run(["git", "show", f"{rev}:data/raw.dvc"], root).stdout)["outs"][0]["md5"]


def make_production(root: Path, data_hash: str) -> str:
    """A production version in the project's registry whose lineage says it was trained on data_hash."""
    onnx = b"not a real model; the watch reads only the lineage"
    sha = hashlib.sha256(onnx).hexdigest()
    lineage = {key: f"test-{key}" for key in REQUIRED} | {
        "data_hash": data_hash, "onnx_sha256": sha, "git_dirty": False, "params": {"x": 1},
        "packages": {"dvc": "3"}, "flow_run_id": None}
    registry = Registry(str(root / "registry"), "fashion-demo")
    version = new_version_id(sha)
    files = {name: b"{}" for name in VERSION_FILES} | {"model.onnx": onnx, "lineage.json": json.dumps(lineage).encode()}
    registry.write_version(version, files)
    registry.promote(version, "test production model", expected=None)
    return version


@pytest.mark.slow
def test_watch_triggers_on_a_data_change_and_not_otherwise(tiny_project: Path) -> None:
    make_production(tiny_project, md5_at(tiny_project, "main"))

    unchanged = watch(root=str(tiny_project), publish=False)
    assert unchanged == {"triggered": False, "data_md5": md5_at(tiny_project, "main"),
                         "reason": "production has this data version"}
    assert not (tiny_project / "dvc.lock").exists()  # nothing ran

    add_data_version(tiny_project, "v2", seed=7)
    changed = watch(root=str(tiny_project), publish=False)
    assert changed["triggered"] and changed["data_md5"] == md5_at(tiny_project, "v2")
    assert changed["retrain"]["stages_run"][0] == "prepare"
    assert json.loads(state_path(tiny_project).read_text())["state"] == "Completed"

    # A restarted watch reads the state file: the same data version is not retrained twice,
    # even though production (not promoted here) still has the old data.
    again = watch(root=str(tiny_project), publish=False)
    assert again["triggered"] is False and again["reason"] == "already triggered for this data version"


def test_watch_names_a_missing_branch(tiny_project: Path) -> None:
    state = watch(root=str(tiny_project), branch="data-updates", publish=False, return_state=True)
    assert state.is_failed()
    assert "data/raw.dvc does not exist at revision 'data-updates'" in state.message


def test_the_watch_command_rejects_bad_params_in_seconds_before_any_server_starts(tiny_project: Path) -> None:
    params = tiny_project / "params.yaml"
    params.write_text(params.read_text() + "\nscheduel: {}\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.watch"], cwd=tiny_project, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "scheduel: unknown key" in proc.stderr and "params.yaml" in proc.stderr
    assert "Prefect" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60
