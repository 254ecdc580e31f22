"""The real dvc.yaml and stage code as a DVC experiment at a desk.

The real stages through the flows (`make demo`, then a retrain on unchanged data that skips every
stage and promotes nothing) are checked by tests/test_readme.py, which runs the README's commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.lib.config import apply_overrides_to_file
from tests.conftest import init_dvc_repo, run, write_image_folder
from tests.flows.conftest import git_commit

# A model small enough to train in seconds on 2 CPU cores; the stage code is the real one.
TINY_MODEL = ["model.arch=mobilenet_v3_small", "model.weights=none", "train.image_size=32",
              "train.batch_size=16", "train.head.epochs=1", "train.finetune.epochs=0", "train.num_workers=0",
              "evaluate.worst_mistakes=0", "export.latency_runs=5", "export.parity_batch_sizes=[1,2]",
              # 30 synthetic images: a random-init net need not beat the pixel baseline; the flow is what is tested
              "gate.min_lift_over_baseline=null"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = init_dvc_repo(tmp_path / "project")
    apply_overrides_to_file(root / "params.yaml", TINY_MODEL)  # committed, as a user sets their params
    write_image_folder(root / "data" / "raw", classes=3, per_class=10, size=32)
    (root / ".gitignore").write_text("__pycache__/\n")
    run(["dvc", "add", "-q", "data/raw"], root)
    git_commit(root, "tiny model on 30 images")
    return root


@pytest.mark.slow(seconds=75)
@pytest.mark.timeout(900)
def test_an_experiment_at_a_desk_shows_its_numbers_and_never_leaves_params_changed(project: Path) -> None:
    # What `make exp ARGS='-S ...'` runs: the experiment in DVC's temporary copy of the workspace.
    params_before = (project / "params.yaml").read_bytes()
    run(["dvc", "exp", "run", "--temp", "-S", "train.head.epochs=2", "--name", "two-epochs"], project)
    assert (project / "params.yaml").read_bytes() == params_before
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    revs = [rev for exp in experiments for rev in exp.get("revs", [])]
    found = [rev for rev in revs if rev.get("name") == "two-epochs"]
    assert found, shown
    metrics = found[0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert isinstance(metrics["accuracy"], float) and isinstance(metrics["macro_f1"], float)
    assert found[0]["data"]["params"]["params.yaml"]["data"]["train"]["head"]["epochs"] == 2

    # A failing experiment (nothing to train) leaves params.yaml as it was, too.
    failed = run(["dvc", "exp", "run", "--temp", "-S", "train.head.epochs=0"], project, check=False)
    assert failed.returncode != 0 and "no epoch was trained" in failed.stdout + failed.stderr
    assert (project / "params.yaml").read_bytes() == params_before
