"""The evaluate stage: metrics against hand-checked cases and scikit-learn, each reported number against an
independent oracle (scipy, scikit-learn, plain torch), plots, determinism, the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from scipy.stats import binomtest
from sklearn import metrics as sk_metrics
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from tasks import evaluate as evaluate_module
from tasks.evaluate import run as evaluate
from tasks.evaluate import worst_mistakes
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import sha256_file, write_json
from tasks.lib.metrics import compute_metrics, confusion_matrix, reliability_bins
from tasks.lib.models import build_model, default_preprocessing, save_checkpoint
from tasks.lib.split_files import SplitRow, write_split
from tests.conftest import write_image_folder
from tests.realistic import CLASS_NAMES, COLOURS, Written, make_image, oracle_input, oracle_rgb, write_realistic_folder

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


def test_evaluate_reports_intervals_calibration_and_the_pixel_baseline(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    params = make_project(tmp_path, temperature=3.0)
    with caplog.at_level("INFO", logger="tasks.evaluate"):
        metrics = evaluate(params)
    # The one summary line a person reads in the stage's log, every number in its place.
    m = metrics
    assert (f"test accuracy {m['accuracy']:.4f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}], "
            f"macro F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} ({m['ece_uncalibrated']:.4f} before calibration, "
            f"T=3.000) on 12 images; pixel baseline {m['baseline_accuracy']:.4f} (lift {m['lift']:+.4f})"
            ) in [record.getMessage() for record in caplog.records]
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


# --------------------------------------------------------------------------- each number against an oracle
#
# The pieces of the stage called one by one on data shaped like a user's (tests.realistic), each
# number compared with one computed here by other code: scipy's Wilson interval, a bootstrap of
# scikit-learn's macro-F1, scikit-learn's own logistic regression, plain torch on pixels decoded by
# the test's oracle. Metrics are stored to 6 decimals (stable across BLAS thread counts), so the
# oracle's numbers are rounded to 6 decimals and compared exactly.


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One BLAS and one torch thread: on 2 shared cores, threads spinning against each other turn the
    fits here (a second each) into a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def six_decimals(values: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 6) for key, value in values.items()}


def test_intervals_are_wilson_for_accuracy_and_a_seeded_bootstrap_for_macro_f1(one_thread: None) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, 47)
    predicted = labels.copy()
    wrong = rng.choice(47, 10, replace=False)
    predicted[wrong] = (labels[wrong] + rng.integers(1, 6, 10)) % 6    # 10 mistakes, each to another class
    wilson = binomtest(37, 47).proportion_ci(confidence_level=0.95, method="wilson")
    # The documented bootstrap: 1000 resamples of the 47 images drawn with seed 0, percentiles 2.5 and 97.5.
    picks = np.random.default_rng(0).integers(0, 47, size=(1000, 47))
    f1 = [sk_metrics.f1_score(labels[p], predicted[p], average="macro", zero_division=0.0) for p in picks]
    f1_low, f1_high = np.percentile(f1, [2.5, 97.5])
    expected = {"accuracy_ci_low": wilson.low, "accuracy_ci_high": wilson.high,
                "macro_f1_ci_low": f1_low, "macro_f1_ci_high": f1_high}
    assert all(round(v, 7) != round(v, 6) for v in expected.values())   # so 7 decimals kept would show
    assert evaluate_module.intervals(predicted, labels, 6) == six_decimals(expected)


def test_calibration_reports_the_raw_softmax_beside_the_temperature() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    logits = rng.normal(size=(60, 4)) * 3 + np.eye(4)[labels] * 2
    raw = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # ECE with 5 equal-width bins of the top probability: |accuracy - confidence| weighted by the bin's share.
    top, right = raw.max(axis=1), raw.argmax(axis=1) == labels
    bins = np.minimum((top * 5).astype(int), 4)
    ece = sum((bins == b).mean() * abs(right[bins == b].mean() - top[bins == b].mean())
              for b in range(5) if (bins == b).any())
    assert evaluate_module.calibration_metrics(raw, labels, ["a", "b", "c", "d"], 5, 1.7320508075688772) == \
        six_decimals({"temperature": 1.7320508075688772, "ece_uncalibrated": ece,
                      "log_loss_uncalibrated": sk_metrics.log_loss(labels, raw)})


def baseline_project(root: Path) -> tuple[Params, list[SplitRow], list[SplitRow], np.ndarray]:
    """A realistic folder: 4 train and 2 test images per class, and 2 test images that look like another class."""
    raw = root / "raw"
    written = write_realistic_folder(raw, per_class=6, seed=1)
    rng = np.random.default_rng(11)
    # Mislabelled look-alikes, as real data has: a "Zebra" image in apple's colour, an "éclair" in 2 items'.
    for name, colour, size in (("Zebra", 3, (45, 30)), ("éclair", 1, (32, 56))):
        make_image(size, COLOURS[colour], "RGB", rng).save(raw / name / "look-alike.png")
        written.append(Written(f"{name}/look-alike.png", name, written[0].kind, size))
    rows = [SplitRow(w.path, CLASS_NAMES.index(w.label_name), sha256_file(raw / w.path)) for w in written]
    train = [row for n, row in enumerate(rows[:36]) if n % 6 < 4]
    test = [row for n, row in enumerate(rows) if n >= 36 or n % 6 >= 4]
    write_split(root / "prepared" / "train.csv", train)
    params = Params.model_validate({"data": {"raw_dir": str(raw), "prepared_dir": str(root / "prepared")}})
    return params, train, test, np.array([row.label for row in test])


def oracle_pixels(path: Path) -> np.ndarray:
    """What the baseline documents: the image squashed to 28x28 (bilinear), RGB, in [0, 1]."""
    resized = Image.fromarray(oracle_rgb(path)).resize((28, 28), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64).ravel() / 255


def test_pixel_baseline_is_scikit_learns_logistic_regression_on_the_same_images(tmp_path: Path, one_thread: None
                                                                               ) -> None:
    params, train_rows, test_rows, labels = baseline_project(tmp_path)
    raw = Path(params.data.raw_dir)
    scaler = StandardScaler().fit([oracle_pixels(raw / row.path) for row in train_rows])
    model = LogisticRegression(C=1.0, max_iter=5000).fit(
        scaler.transform([oracle_pixels(raw / row.path) for row in train_rows]), [row.label for row in train_rows])
    expected = model.predict(scaler.transform([oracle_pixels(raw / row.path) for row in test_rows]))
    oracle_accuracy = float((expected == labels).mean())
    assert 0.5 < oracle_accuracy < 1    # the look-alikes fool it: a baseline that is right and wrong
    got = evaluate_module.baseline_metrics(params, test_rows, labels, 0.95, len(CLASS_NAMES))
    assert got == {**six_decimals({"baseline_accuracy": oracle_accuracy, "lift": 0.95 - oracle_accuracy}),
                   "baseline": "logistic regression on 28x28 RGB pixels, 24 train images"}


def test_pixel_baseline_names_a_train_image_broken_since_prepare(tmp_path: Path) -> None:
    params, train_rows, test_rows, labels = baseline_project(tmp_path)
    broken = Path(params.data.raw_dir) / train_rows[5].path
    broken.write_bytes(broken.read_bytes()[:200])      # a sync cut short after prepare ran
    with pytest.raises(StageError) as caught:
        evaluate_module.baseline_metrics(params, test_rows, labels, 0.9, len(CLASS_NAMES))
    message = str(caught.value)
    assert message.startswith(f"{broken}: ") and message.endswith(
        "; the raw data changed since prepare ran: re-run it (dvc repro prepare)")


# --------------------------------------------------------------------------- probabilities of a model on files

# Resize the shorter side to 32 and keep the central 24 x 24: the realistic sizes scale to whole pixels.
CROPPED = default_preprocessing("resnet18", 24, crop_pct=0.75)


def realistic_split(raw: Path) -> list[SplitRow]:
    written = write_realistic_folder(raw, per_class=2, seed=2)
    return [SplitRow(w.path, CLASS_NAMES.index(w.label_name), sha256_file(raw / w.path)) for w in written]


def small_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, len(CLASS_NAMES))).eval()


def test_predict_probs_is_the_softmax_of_the_logits_over_the_temperature(tmp_path: Path) -> None:
    """What benchmarks score every model with: plain torch on the oracle's pixels, softmax(logits / T) in
    float64, rows in split order; no temperature means none (T = 1)."""
    rows, network = realistic_split(tmp_path), small_network()
    inputs = torch.from_numpy(np.stack([oracle_input(tmp_path / row.path, CROPPED.to_dict()) for row in rows]))
    with torch.no_grad():
        logits = network(inputs).double()
    calibrated = torch.softmax(logits / 2.5, dim=1).numpy()
    plain = torch.softmax(logits, dim=1).numpy()
    assert np.abs(calibrated - plain).max() > 0.01    # the temperature moves the numbers well past the tolerance
    for temperature, expected in ((2.5, calibrated), (None, plain)):
        got = evaluate_module.predict_probs(network, rows, tmp_path, CROPPED, 5, torch.device("cpu"), temperature)
        assert got.dtype == np.float64 and got.shape == (12, len(CLASS_NAMES))
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"temperature {temperature}")


def test_predict_probs_runs_the_model_on_the_device_it_is_given(tmp_path: Path) -> None:
    # A CPU-only machine has no second real device; on "meta" tensors have no data, so the model must
    # move there and its output cannot come back: the call fails where a model left on the CPU would not.
    rows, network = realistic_split(tmp_path), small_network()
    with pytest.raises(NotImplementedError, match="meta tensor"):
        evaluate_module.predict_probs(network, rows, tmp_path, CROPPED, 5, torch.device("meta"), 2.0)
    assert {p.device.type for p in network.parameters()} == {"meta"}


# --------------------------------------------------------------------------- the mistakes grid, when empty


@pytest.mark.parametrize(("limit", "mistakes", "message"), [(8, 0, "no mistakes among 12 test images"),
                                                             (0, 3, "worst_mistakes is 0")])
def test_an_empty_mistakes_grid_says_why(tmp_path: Path, limit: int, mistakes: int, message: str) -> None:
    labels = np.arange(12) % len(CLASS_NAMES)
    predicted = labels.copy()
    predicted[:mistakes] = (labels[:mistakes] + 1) % len(CLASS_NAMES)
    probs = np.full((12, len(CLASS_NAMES)), 0.02)
    probs[np.arange(12), predicted] = 0.9
    path = tmp_path / "worst_mistakes.png"
    evaluate_module.write_mistakes_grid(path, probs, labels, list(CLASS_NAMES), [], tmp_path, limit)
    # One line of black text, 8 px in and 12 down, on a white strip as wide as a row of four 128 px tiles.
    expected = Image.new("RGB", (512, 40), (255, 255, 255))
    ImageDraw.Draw(expected).text((8, 12), message, fill=(0, 0, 0))
    with Image.open(path) as grid:
        assert (grid.format, grid.mode, grid.size) == ("PNG", "RGB", (512, 40))
        assert np.array_equal(np.asarray(grid), np.asarray(expected))


# --------------------------------------------------------------------------- the command line


def params_file(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def test_command_line_help_describes_the_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        evaluate_module.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "\n\nEvaluate the trained model on the held-out test split.\n\n" in out
    assert "--params PARAMS       params file (default: params.yaml)" in out and "-S KEY=VALUE, --set KEY=VALUE" in out


def test_command_line_evaluates_with_overrides_and_exits_0(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    path = params_file(params, tmp_path / "params.yaml")
    assert evaluate_module.main(["--params", str(path), "-S", "evaluate.top_k=2"]) == 0
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert metrics["n_test"] == 12 and metrics["top_k"] == 2


def test_command_line_names_a_missing_checkpoint_and_exits_1(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path)
    checkpoint = tmp_path / "artifacts" / "train" / "model.pt"
    checkpoint.unlink()
    assert evaluate_module.main(["--params", str(params_file(params, tmp_path / "params.yaml"))]) == 1
    assert capsys.readouterr().err == \
        f"error: {checkpoint}: checkpoint not found; run the train stage first (dvc repro train)\n"
    assert not (tmp_path / "metrics" / "evaluate.json").exists()


# --------------------------------------------------------------------------- the record, the grid and the device


def test_the_predictions_record_lists_each_test_image_by_content_hash_label_and_prediction_in_split_order() -> None:
    rows = [SplitRow(f"{name}/IMG {i:04d}.jpg", i, f"{i + 1:064x}") for i, name in enumerate(CLASS_NAMES[:3])]
    probs = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert evaluate_module.predictions_record(rows, probs, "ab" * 32) == {
        "test_split_sha256": "ab" * 32, "sha256": [f"{1:064x}", f"{2:064x}", f"{3:064x}"],
        "label": [0, 1, 2], "predicted": [1, 0, 2]}


def test_the_mistakes_grid_shows_each_image_on_a_white_tile(tmp_path: Path) -> None:
    written = write_realistic_folder(tmp_path / "raw", per_class=1)[:3]
    rows = [SplitRow(w.path, CLASS_NAMES.index(w.label_name), "0" * 64) for w in written]
    labels = np.array([row.label for row in rows])
    probs = np.full((3, len(CLASS_NAMES)), 0.02)
    probs[np.arange(3), (labels + 1) % len(CLASS_NAMES)] = 0.9   # all three wrong
    path = tmp_path / "worst_mistakes.png"
    evaluate_module.write_mistakes_grid(path, probs, labels, list(CLASS_NAMES), rows, tmp_path / "raw", 8)
    with Image.open(path) as grid:
        assert grid.size == (3 * 128, 128 + 30)
        pixels = np.asarray(grid.convert("RGB"))
    # The 2 px frame around every tile and the caption strip's right end are background: white.
    for tile in range(3):
        assert (pixels[:2, tile * 128:(tile + 1) * 128] == 255).all()
        assert (pixels[-4:, (tile + 1) * 128 - 8:(tile + 1) * 128] == 255).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_evaluate_on_cuda_without_a_cuda_device_says_what_to_set() -> None:
    with pytest.raises(StageError) as err:
        evaluate_module._device("cuda")
    assert str(err.value) == "evaluate.device is cuda but no CUDA device is available; set evaluate.device=cpu"
    assert evaluate_module._device("auto") == torch.device("cpu")


def test_a_mistake_tile_is_captioned_true_label_in_black_then_prediction_in_red(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.png")      # neither black nor red itself
    labels = np.array([0, 1])
    probs = np.array([[0.1, 0.9] + [0.0] * (len(CLASS_NAMES) - 2), [0.0, 1.0] + [0.0] * (len(CLASS_NAMES) - 2)])
    rows = [SplitRow("blue.png", 0, "0" * 64), SplitRow("blue.png", 1, "0" * 64)]
    path = tmp_path / "worst_mistakes.png"
    evaluate_module.write_mistakes_grid(path, probs, labels, list(CLASS_NAMES), rows, tmp_path, 8)
    with Image.open(path) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    tile = evaluate_module.TILE
    true_line, pred_line = pixels[tile + 2: tile + 14], pixels[tile + 15: tile + 28]
    assert pixels.shape[:2] == (tile + evaluate_module.CAPTION, tile)          # one tile: the one mistake
    dark = (true_line < 100).all(axis=-1)                    # Pillow's font is anti-aliased: the ink's core
    red = (pred_line[..., 0] == 255) & (pred_line[..., 1:] < 100).all(axis=-1)
    assert dark.sum() > 20 and red.sum() > 20                # readable on white: black, then red, ink
    assert not (pred_line < 100).all(axis=-1).any() and not ((true_line[..., 0] == 255) & (true_line[..., 1] < 100)).any()
