"""The real dvc.yaml and stage code through the retrain flow, then `python -m flows.demo` on unchanged data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from flows.retrain import retrain
from tasks.lib.config import apply_overrides_to_file
from tests.conftest import init_dvc_repo, run, write_image_folder
from tests.flows.conftest import git_commit
from tests.flows.helpers import run_artifacts, state_of

# A model small enough to train in seconds on 2 CPU cores; the stage code is the real one.
TINY_MODEL = ["model.arch=mobilenet_v3_small", "model.weights=none", "train.image_size=32",
              "train.batch_size=16", "train.head.epochs=1", "train.finetune.epochs=0", "train.num_workers=0",
              "evaluate.worst_mistakes=0", "export.latency_runs=5", "export.parity_batch_sizes=[1,2]",
              # 30 synthetic images: a random-init net need not beat the pixel baseline; the flow is what is tested
              "gate.min_lift_over_baseline=null"]
SUMMARY_KEYS = {"stages", "stages_run", "stages_skipped", "data_md5", "n_images", "rejected", "wall_s", "arch",
                "weights_sha256", "val_accuracy", "epochs", "train_img_per_s", "test_accuracy", "test_accuracy_ci95",
                "macro_f1", "macro_f1_ci95", "ece", "ece_uncalibrated", "baseline_accuracy", "lift_over_baseline",
                "onnx", "onnx_max_abs_diff", "ort_latency_ms_p50", "registry_version", "promoted", "reason",
                "model_card", "flow_run_id", "flow_state"}
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One project for the module: the experiment test reuses the stages the flow test ran (DVC's run cache)."""
    root = init_dvc_repo(tmp_path_factory.mktemp("real") / "project")
    apply_overrides_to_file(root / "params.yaml", TINY_MODEL)  # committed, as a user sets their params
    write_image_folder(root / "data" / "raw", classes=3, per_class=10, size=32)
    (root / ".gitignore").write_text("__pycache__/\n")
    run(["dvc", "add", "-q", "data/raw"], root)
    git_commit(root, "tiny model on 30 images")
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_stages_then_demo_on_unchanged_data_skips_all_and_does_not_promote(project: Path) -> None:
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    name, message, result = state_of(retrain(root=str(project), return_state=True))
    assert name == "Completed", message
    assert result["stages_run"] == stages
    published = result["publish"]
    assert published["promoted"] is True and "bootstrap" in published["reason"]
    assert Path(published["model_card"]).exists()
    assert (project / result["paths"]["onnx"]).exists()   # paths are relative to the project root
    artifacts = run_artifacts(result["flow_run_id"])
    assert f"| accuracy | {result['test_metrics']['accuracy']:.4f} |" in artifacts["fashion-demo-test-metrics"]
    assert published["model_card"] in artifacts["fashion-demo-outputs"]

    # `make demo` again on the same data: through the demo entry point, against this session's server.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "flows.demo"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_KEYS
    assert summary["stages"] == stages and summary["stages_run"] == [] and summary["stages_skipped"] == stages
    assert summary["promoted"] is False and summary["reason"] == "no improvement"
    assert summary["registry_version"] == published["registry_version"]
    assert summary["flow_state"] == "Completed" and summary["arch"] == "mobilenet_v3_small"
    assert sum(summary["n_images"].values()) == 30 and summary["rejected"] == 0
    assert summary["onnx_max_abs_diff"] <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_experiment_at_a_desk_shows_its_numbers_and_never_leaves_params_changed(project: Path) -> None:
    # What `make exp ARGS='-S ...'` runs: the experiment in DVC's temporary copy of the workspace.
    # After the test above, the stages before train come from DVC's run cache.
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
