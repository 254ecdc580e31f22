"""What a person sees of the metrics and plots through DVC's own commands, on this project's dvc.yaml and .dvc/."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, init_dvc_repo, run

# A slice of each metrics file as the stages write them (write_json sorts the keys).
METRICS = {
    "train.json": {"best_epoch": 4, "epochs": 6, "train_seconds": 12.5, "val_accuracy": 0.81, "val_macro_f1": 0.8},
    "evaluate.json": {"accuracy": 0.86, "ece": 0.04, "lift": 0.07, "macro_f1": 0.85},
    "export.json": {"max_abs_diff": 3e-6, "onnx_ms_per_image": 4.2},
}


@pytest.fixture
def reports_repo(tmp_path: Path) -> Path:
    """The project's dvc.yaml, params.yaml and .dvc settings, with metrics and one plot file committed."""
    repo = init_dvc_repo(tmp_path / "repo")
    shutil.copy(REPO_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(REPO_ROOT / ".dvc" / "plots.html", repo / ".dvc" / "plots.html")
    for name, values in METRICS.items():
        (repo / "metrics" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "metrics" / name).write_text(json.dumps(values, sort_keys=True))
    per_class = repo / "metrics" / "evaluate" / "per_class_f1.json"
    per_class.parent.mkdir(parents=True)
    per_class.write_text(json.dumps([{"class": "a", "f1": 0.9}, {"class": "b", "f1": 0.8}]))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reports"], repo)
    return repo


@pytest.mark.slow(seconds=15)
def test_experiments_open_on_the_held_out_test_metrics(reports_repo: Path) -> None:
    """`dvc exp show` lists evaluate's test metrics before export's and train's, and the README's focused
    command keeps exactly accuracy, macro-F1, lift and ECE."""
    table = run(["dvc", "exp", "show", "--csv"], reports_repo).stdout
    header = next(csv.reader(io.StringIO(table)))
    metrics = [column for column in header if column in {k for values in METRICS.values() for k in values}]
    assert metrics[:4] == ["accuracy", "ece", "lift", "macro_f1"], header
    assert metrics.index("max_abs_diff") < metrics.index("val_accuracy"), header

    focused = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep",
                   "Experiment|Created|^accuracy$|^macro_f1$|^lift$|^ece$"], reports_repo).stdout
    header = next(csv.reader(io.StringIO(focused)))
    assert [c for c in header if c not in {"Experiment", "Created"}] == ["accuracy", "ece", "lift", "macro_f1"]


@pytest.mark.slow(seconds=15)
def test_the_plots_page_says_which_charts_need_network_access(reports_repo: Path) -> None:
    run(["dvc", "plots", "show", "metrics/evaluate/per_class_f1.json"], reports_repo)
    page = (reports_repo / "dvc_plots" / "index.html").read_text()
    assert "without network" in page and "need no network" in page
    assert "vega" in page.lower()            # the charts are still there, after the note
