"""The evaluate stage: metrics against hand-checked cases and scikit-learn, plots, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.evaluate import run as evaluate
from tasks.evaluate import worst_mistakes
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import sha256_file, write_json
from tasks.lib.metrics import compute_metrics, confusion_matrix, reliability_bins
from tasks.lib.models import build_model, default_preprocessing, save_checkpoint
from tasks.lib.split_files import SplitRow, write_split
from tests.conftest import write_image_folder

CLASSES = ["class_0", "class_1", "class_2"]


def make_project(root: Path, arch: str = "resnet18", size: int = 32, per_class: int = 4, seed: int = 0,
                 temperature: float | None = None) -> Params:
    """Raw images, split files and an untrained checkpoint laid out as upstream stages would; params for them."""
    raw = write_image_folder(root / "data" / "raw", classes=len(CLASSES), per_class=per_class, size=size + 8, seed=seed)
    rows = [SplitRow(f"{name}/img_{i:03d}.png", c, sha256_file(raw / name / f"img_{i:03d}.png"))
            for c, name in enumerate(CLASSES) for i in range(per_class)]
    prepared = root / "data" / "prepared"
    write_split(prepared / "train.csv", rows[::per_class])     # one per class: what the pixel baseline fits
    write_split(prepared / "val.csv", rows[1:2])
    write_split(prepared / "test.csv", rows)
    write_json(prepared / "classes.json", CLASSES)
    torch.manual_seed(seed)
    save_checkpoint(root / "artifacts" / "train" / "model.pt", build_model(arch, len(CLASSES)), arch=arch,
                    class_names=CLASSES, preprocessing=default_preprocessing(arch, size),
                    weights={"arch": arch, "weights": "packaged", "sha256": "ab" * 32, "source": "test"},
                    extra={"data_sha256": "cd" * 32, **({"temperature": temperature} if temperature else {})})
    return Params.model_validate({
        "data": {"raw_dir": str(raw), "prepared_dir": str(prepared)},
        "train": {"out_dir": str(root / "artifacts" / "train")},
        "evaluate": {"out_dir": str(root / "artifacts" / "evaluate"), "device": "cpu", "batch_size": 5},
        "reports": {"dir": str(root / "metrics")},
        "export": {"out_dir": str(root / "artifacts" / "export"), "latency_runs": 5},
    })


# --------------------------------------------------------------------------- compute_metrics

# Four samples, three classes. Predictions: 0 (right, p=.9), 1 (right, .7), 1 (wrong: true 2, .6), 2 (right, .55).
PROBS = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.3, 0.15, 0.55]])
LABELS = np.array([0, 1, 2, 2])


def test_metrics_match_hand_computed_values() -> None:
    m = compute_metrics(PROBS, LABELS, CLASSES, top_k=2, bins=4)
    assert m["accuracy"] == 0.75
    # recall per class 1, 1, 1/2 -> mean 5/6
    assert m["balanced_accuracy"] == pytest.approx(5 / 6, abs=1e-6)
    # F1 per class: 1, 2/3 (P 1/2, R 1), 2/3 (P 1, R 1/2); supports 1, 1, 2
    assert m["macro_f1"] == pytest.approx(7 / 9, abs=1e-6)
    assert m["weighted_f1"] == pytest.approx((1 + 2 / 3 + 2 * 2 / 3) / 4, abs=1e-6)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == 1.0  # the wrong one has the truth second
    assert m["log_loss"] == pytest.approx(-np.log([0.9, 0.7, 0.3, 0.55]).mean(), abs=1e-6)
    # bins of width .25: [.5,.75) holds .7 .6 .55 (acc 2/3, conf .61667), [.75,1] holds .9 (acc 1)
    assert m["ece"] == pytest.approx(3 / 4 * abs(2 / 3 - 1.85 / 3) + 1 / 4 * 0.1, abs=1e-6)
    assert m["n_test"] == 4
    assert m["per_class"]["class_1"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3, abs=1e-6),
                                         "support": 1}
    assert m["per_class"]["class_2"]["recall"] == 0.5 and m["per_class"]["class_2"]["support"] == 2
    json.dumps(m, allow_nan=False)  # JSON-ready


def test_metrics_agree_with_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5)) + np.eye(5)[rng.integers(0, 5, 200)] * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 5, 200)
    names = [f"c{i}" for i in range(5)]
    m = compute_metrics(probs, labels, names, top_k=3, bins=10)
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, pred), abs=1e-6)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, pred), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(labels, pred, average="macro"), abs=1e-6)
    assert m["weighted_f1"] == pytest.approx(sk.f1_score(labels, pred, average="weighted"), abs=1e-6)
    assert m["top_k_accuracy"] == pytest.approx(sk.top_k_accuracy_score(labels, probs, k=3), abs=1e-6)
    assert m["log_loss"] == pytest.approx(sk.log_loss(labels, probs), abs=1e-6)
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, pred)
    assert [m["per_class"][n]["recall"] for n in names] == pytest.approx(recall, abs=1e-6)
    assert [m["per_class"][n]["support"] for n in names] == list(support)
    # The reliability diagram's bins are exactly those behind the ECE.
    diagram = reliability_bins(probs, labels, 10)
    ece = sum(b["count"] / 200 * abs(b["accuracy"] - b["confidence"]) for b in diagram)
    assert m["ece"] == pytest.approx(ece, abs=1e-5)


def test_top_k_is_capped_at_the_number_of_classes() -> None:
    m = compute_metrics(PROBS, LABELS, CLASSES, top_k=5, bins=4)
    assert m["top_k"] == 3 and m["top_k_accuracy"] == 1.0


def test_confusion_matrix_rows_are_actual() -> None:
    assert confusion_matrix(PROBS, LABELS, CLASSES).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_reliability_bins_fold_certain_predictions_into_the_top_bin() -> None:
    probs = np.array([[1.0, 0.0], [0.9, 0.1], [0.4, 0.6]])
    bins = reliability_bins(probs, np.array([0, 1, 1]), 2)
    assert [(b["bin"], b["count"]) for b in bins] == [(1, 3)]
    assert bins[0]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert bins[0]["confidence"] == pytest.approx((1.0 + 0.9 + 0.6) / 3, abs=1e-6)


@pytest.mark.parametrize(("probs", "labels", "fragment"), [
    (np.array([[2.0, -1.0, 0.5]]), np.array([0]), "softmax probabilities"),
    (np.array([[0.5, 0.5]]), np.array([0]), "2 columns but there are 3"),
    (PROBS, np.array([0, 1, 2, 3]), "labels must lie in"),
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "non-empty"),
])
def test_bad_inputs_are_rejected_with_a_reason(probs: np.ndarray, labels: np.ndarray, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        compute_metrics(probs, labels, CLASSES, top_k=1, bins=4)


def test_worst_mistakes_are_most_confident_first() -> None:
    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.95, 0.05], [0.3, 0.7]])
    assert worst_mistakes(probs, np.array([1, 1, 1, 0]), 10) == [2, 3, 0]
    assert worst_mistakes(probs, np.array([1, 1, 1, 0]), 1) == [2]


# --------------------------------------------------------------------------- the stage


def test_evaluate_writes_metrics_and_plots_deterministically(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    first = evaluate(params)
    reports = tmp_path / "metrics"
    text = (reports / "evaluate.json").read_text()
    assert set(json.loads(text)) >= {"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "top_k_accuracy",
                                     "top_k", "log_loss", "ece", "n_test", "test_split_sha256", "per_class"}
    assert first["n_test"] == 12
    assert first["test_split_sha256"] == sha256_file(Path(params.data.prepared_dir) / "test.csv")
    plots = reports / "evaluate"
    confusion = json.loads((plots / "confusion.json").read_text())
    assert len(confusion) == 12 and set(confusion[0]) == {"actual", "predicted"}
    assert [r["class"] for r in json.loads((plots / "per_class_f1.json").read_text())] == CLASSES
    assert sum(b["count"] for b in json.loads((plots / "reliability.json").read_text())) == 12
    pngs = {name: (plots / name).read_bytes() for name in ("confusion.png", "per_class_f1.png", "reliability.png")}
    for name, data in pngs.items():     # static pictures: they open offline, and travel in the model card
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width >= 300, name
    with Image.open(Path(params.evaluate.out_dir) / "worst_mistakes.png") as grid:
        assert grid.format == "PNG" and grid.width >= 128
    evaluate(params)
    assert (reports / "evaluate.json").read_text() == text  # same checkpoint and data -> identical metrics
    assert {name: (plots / name).read_bytes() for name in pngs} == pngs     # and identical pictures


def test_evaluate_reports_intervals_calibration_and_the_pixel_baseline(tmp_path: Path) -> None:
    params = make_project(tmp_path, temperature=3.0)
    metrics = evaluate(params)
    out = Path(params.evaluate.out_dir)
    plots = tmp_path / "metrics" / "evaluate"
    # 95% intervals around the point estimates.
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
    assert metrics["macro_f1_ci_low"] <= metrics["macro_f1"] <= metrics["macro_f1_ci_high"]
    # Calibrated (logits / 3) headline numbers beside the raw softmax's; the same predictions either way.
    raw = make_project(tmp_path / "raw")
    plain = evaluate(raw)
    assert metrics["temperature"] == 3.0 and plain["temperature"] == 1.0
    assert metrics["ece_uncalibrated"] == plain["ece"] and metrics["log_loss_uncalibrated"] == plain["log_loss"]
    assert metrics["log_loss"] != plain["log_loss"] and metrics["accuracy"] == plain["accuracy"]
    uncalibrated = json.loads((plots / "reliability_uncalibrated.json").read_text())
    assert sum(b["count"] for b in uncalibrated) == 12
    # The baseline: fitted on the one train image per class, scored on the same 12 test images.
    assert 0 <= metrics["baseline_accuracy"] <= 1 and metrics["lift"] == pytest.approx(
        metrics["accuracy"] - metrics["baseline_accuracy"], abs=1e-6)
    assert metrics["baseline"] == "logistic regression on 28x28 RGB pixels, 3 train images"
    # Each test image's prediction, in split order, for the gate's paired test.
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["test_split_sha256"] == metrics["test_split_sha256"]
    assert predictions["label"] == [c for c in range(3) for _ in range(4)] and len(predictions["predicted"]) == 12
    assert np.mean(np.array(predictions["predicted"]) == np.array(predictions["label"])) == metrics["accuracy"]


def test_evaluate_refuses_a_checkpoint_trained_on_other_classes(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    write_json(Path(params.data.prepared_dir) / "classes.json", ["a", "b", "c"])
    with pytest.raises(StageError, match="classes.json"):
        evaluate(params)
    assert not (tmp_path / "metrics" / "evaluate.json").exists()


def test_evaluate_refuses_a_test_image_changed_since_prepare(tmp_path: Path) -> None:
    """A file rewritten after prepare (a sync, an edit, a dvc checkout) is never scored as if it were the
    image the split file lists: the stage names it and says to re-run prepare."""
    params = make_project(tmp_path)
    raw = Path(params.data.raw_dir)
    changed = raw / CLASSES[2] / "img_003.png"
    changed.write_bytes((raw / CLASSES[0] / "img_000.png").read_bytes())   # another class's pixels
    with pytest.raises(StageError, match=r"img_003\.png.*changed_since_prepare.*dvc repro prepare"):
        evaluate(params)
    assert not (tmp_path / "metrics" / "evaluate.json").exists()
