"""The quality benchmark runs every model it compares on a small real dataset and reports what it claims."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run

# The project's real stages with a model small enough for seconds on 2 CPU cores.
TINY = ["model.arch=mobilenet_v3_small", "model.weights=none", "train.image_size=32", "train.batch_size=64",
        "train.head.epochs=1", "train.finetune.epochs=1", "train.num_workers=0", "evaluate.worst_mistakes=0"]


@pytest.mark.slow(seconds=50)
def test_cpu_run_on_digits_scores_baselines_tutorial_and_project_on_the_same_images(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/quality.py", "--dataset", "digits", "--device", "cpu", "--tutorial-epochs",
           "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = run(cmd + [arg for item in TINY for arg in ("-S", item)], REPO_ROOT, env={"OMP_NUM_THREADS": "1"})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "quality.json").read_text())
    assert report["dataset"] == "digits" and report["classes"] == 10 and report["test_sets"] == ["test split"]
    assert sum(report["images"].values()) == 1797                    # scikit-learn's digits, none rejected
    models = report["models"]
    assert set(models) == {"logistic_regression", "rbf_svm", "tutorial_recipe", "project"}
    n_test = report["images"]["test"]
    for name, model in models.items():
        m = model["test_sets"]["test split"]
        assert m["n"] == n_test, name                                 # every model on the same test images
        assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1], name
        assert m["macro_f1_ci95"][0] <= m["macro_f1"] <= m["macro_f1_ci95"][1], name
        assert 0 <= m["ece"] <= 1 and m["seconds"] >= 0, name
    assert models["logistic_regression"]["test_sets"]["test split"]["accuracy"] > 0.9   # digits are easy for it
    assert models["logistic_regression"]["pixels"] == "8x8 grey pixels"
    assert models["tutorial_recipe"]["epochs"] == 1
    assert models["project"]["temperature"] > 0 and set(models["project"]["stage_seconds"]) >= {"train", "evaluate"}
    project = models["project"]["test_sets"]["test split"]["accuracy"]
    assert report["margins"]["test split"]["rbf_svm"] == pytest.approx(
        project - models["rbf_svm"]["test_sets"]["test split"]["accuracy"], abs=1e-4)
    assert "project - rbf_svm" in proc.stdout                         # the table, before the JSON line


@pytest.mark.slow(seconds=60)
def test_fashion_run_also_scores_the_official_test_images_through_evaluate(tmp_path: Path) -> None:
    # The official images are written by the benchmark, not prepare: their split rows must carry the hashes
    # evaluate checks, or the project's model cannot be scored on them at all.
    cmd = [sys.executable, "benchmarks/quality.py", "--dataset", "fashion-10-1", "--device", "cpu",
           "--tutorial-epochs", "1", "--official-test", "on", "--official-limit", "40",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    proc = run(cmd + [arg for item in TINY for arg in ("-S", item)], REPO_ROOT, env={"OMP_NUM_THREADS": "1"})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["test_sets"] == ["test split", "official Fashion-MNIST test"]
    for name, model in report["models"].items():
        assert model["test_sets"]["official Fashion-MNIST test"]["n"] == 40, name
