"""Stage `evaluate`: score the best checkpoint on the held-out test split.

Reads `<train.out_dir>/model.pt` and `<data.prepared_dir>/test.csv` (the test
split was never used for model selection; train.csv only fits the pixel
baseline and the feature distance of tasks.lib.abstention; val.csv only chooses the
abstention thresholds, when export.abstain_at_accuracy or _coverage asks for them).
Writes `<reports.dir>/evaluate.json` (DVC metrics), `<evaluate.out_dir>/feature_distance.npz` (export reads it) and, in
`<reports.dir>/evaluate/`, the data of the DVC plots declared in dvc.yaml
(confusion matrix, reliability diagrams, per-class F1) with the same as PNG
figures; in `<evaluate.out_dir>`, each test image's prediction and a PNG grid
of the most confident mistakes.

Deterministic: fixed image order, deterministic kernels, float64 metrics.
Run: `python -m tasks.evaluate [--params params.yaml] [-S evaluate.top_k=5]`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader

from tasks.lib import abstention, figures
from tasks.lib.baseline import fit_pixel_baseline
from tasks.lib.cli import stage_main
from tasks.lib.config import Params
from tasks.lib.data import EvalDataset
from tasks.lib.errors import StageError
from tasks.lib.images import BadImage, load_rgb
from tasks.lib.io import atomic_path, sha256_file, write_json
from tasks.lib.metrics import compute_metrics, confusion_matrix, reliability_bins
from tasks.lib.models import load_checkpoint
from tasks.lib.onnx_classifier import answered, softmax
from tasks.lib.progress import progress
from tasks.lib.split_files import SplitRow, labels_of, read_classes, read_split, split_digest, split_path
from tasks.lib.uncertainty import bootstrap_macro_f1, interval_text, wilson_interval

log = logging.getLogger(__name__)
TILE = 128          # side of one image in the worst-mistakes grid
CAPTION = 30        # caption height under each tile (two lines of Pillow's default font)
GRID_COLUMNS = 4


def run(params: Params) -> dict[str, Any]:
    """Evaluate the checkpoint on the test split; write metrics.json, predictions.json and the plot files."""
    cfg = params.evaluate
    model, meta = load_checkpoint(Path(params.train.out_dir) / "model.pt")
    class_names = list(meta["class_names"])
    _check_classes(params.data.prepared_dir, class_names)
    test_file = split_path(params.data.prepared_dir, "test")
    rows = read_split(test_file)
    if not rows:
        raise StageError(f"{test_file} lists no images; the test split needs at least one "
                         "(add data or raise prepare.test)")
    device = _device(cfg.device)
    distance = fit_feature_distance(params, model, meta, device)
    logits, test_distance = predict_scores(model, rows, params.data.raw_dir, meta["preprocessing"], cfg.batch_size,
                                           device, distance)
    labels = np.array([row.label for row in rows], dtype=np.int64)
    temperature = float(meta.get("temperature") or 1.0)
    probs, raw_probs = softmax(logits / temperature), softmax(logits)
    metrics = compute_metrics(probs, labels, class_names, cfg.top_k, cfg.calibration_bins)
    metrics.update(intervals(probs.argmax(axis=1), labels, len(class_names)))
    metrics.update(calibration_metrics(raw_probs, labels, class_names, cfg.calibration_bins, temperature))
    metrics.update(baseline_metrics(params, rows, labels, metrics["accuracy"], len(class_names)))
    metrics["test_split_sha256"] = split_digest(test_file)
    metrics["abstention"] = abstention_metrics(params, model, meta, (probs, labels, test_distance), distance, device)
    reports = params.report_paths(Path("."))
    write_plots(reports["evaluate_plots"], probs, labels, class_names, metrics["per_class"],
                bins=cfg.calibration_bins, uncalibrated=raw_probs)
    write_mistakes_grid(reports["worst_mistakes"], probs, labels, class_names, rows, params.data.raw_dir,
                        cfg.worst_mistakes)
    write_json(reports["test_predictions"], predictions_record(rows, probs, metrics["test_split_sha256"]))
    write_json(reports["test_metrics"], metrics)
    log.info("test accuracy %.4f %s, macro F1 %.4f, ECE %.4f (%.4f before calibration, T=%.3f) on %d images; "
             "pixel baseline %.4f (lift %+.4f)", metrics["accuracy"],
             interval_text(metrics["accuracy_ci_low"], metrics["accuracy_ci_high"]), metrics["macro_f1"],
             metrics["ece"], metrics["ece_uncalibrated"], temperature, metrics["n_test"],
             metrics["baseline_accuracy"], metrics["lift"])
    log.info("abstention: %s", abstention.summary(metrics["abstention"]))
    return metrics


def fit_feature_distance(params: Params, model: torch.nn.Module, meta: dict[str, Any], device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature distance of abstention.fit_distance, fitted on the training split and written where export
    reads it (evaluate.json records its sha256); (whitening, whitened class means) on `device`."""
    train_file = split_path(params.data.prepared_dir, "train")
    rows = read_split(train_file)
    if not rows:
        raise StageError(f"{train_file} lists no images; the feature distance is fitted on them: re-run prepare")
    labels, size = labels_of(rows), params.evaluate.batch_size
    batches = forward_batches(model, rows, params.data.raw_dir, meta["preprocessing"], size, device)
    stats = abstention.fit_distance(((features.double().cpu().numpy(), labels[n * size:(n + 1) * size])
                                     for n, (_, features) in enumerate(batches)), len(meta["class_names"]))
    with atomic_path(params.report_paths(Path("."))["feature_distance"]) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **stats)
    return torch.from_numpy(stats["whiten"]).to(device), torch.from_numpy(stats["centres"]).to(device)


def abstention_metrics(params: Params, model: torch.nn.Module, meta: dict[str, Any],
                       test: tuple[np.ndarray, np.ndarray, np.ndarray], distance: tuple[torch.Tensor, torch.Tensor],
                       device: torch.device) -> dict[str, Any]:
    """The abstention thresholds chosen on the validation split (confidence and feature distance), their operating
    point and the risk-coverage curve on the test split, and how they treat out-of-domain images
    (tasks.lib.abstention). `test` is the test split's (probabilities, labels, feature distances)."""
    cfg, prep, size = params.export, meta["preprocessing"], params.evaluate.batch_size
    test_probs, test_labels, test_distance = test
    temperature = float(meta.get("temperature") or 1.0)

    def score(rows: list[SplitRow], raw_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        logits, far = predict_scores(model, rows, raw_dir, prep, size, device, distance)
        return softmax(logits / temperature), far

    threshold, max_distance, note = None, None, None
    if cfg.abstain_target is not None:
        val_rows = read_split(split_path(params.data.prepared_dir, "val"))
        val_probs, val_distance = score(val_rows, params.data.raw_dir) if val_rows else (
            np.empty((0, test_probs.shape[1])), np.empty(0))
        threshold, note = abstention.choose_threshold(val_probs, labels_of(val_rows), cfg.abstain_at_accuracy,
                                                      cfg.abstain_at_coverage)
        max_distance = abstention.distance_threshold(val_distance)
    with tempfile.TemporaryDirectory(prefix="ood-") as folder:
        digits = abstention.write_ood_images(Path(folder), min(abstention.OOD_IMAGES, len(test_labels)))
        noise = abstention.write_noise_images(Path(folder))
        digit_probs, digit_distance = score(digits, Path(folder))
        noise_probs, noise_distance = score(noise, Path(folder))
    train_sha256 = {row.sha256 for row in read_split(split_path(params.data.prepared_dir, "train"))}
    return {
        "target": cfg.abstain_target,   # on the validation split; export writes the threshold into the ONNX metadata
        "threshold": threshold,   # unrounded: the validation image at the cut must stay answered
        "note": note,             # why a target was set and no threshold chosen
        "checkpoint_sha256": sha256_file(Path(params.train.out_dir) / "model.pt"),   # export checks it
        "distance": {"threshold": max_distance, "keep": abstention.DISTANCE_KEEP, "shrinkage": abstention.SHRINKAGE,
                     "sha256": sha256_file(params.report_paths(Path("."))["feature_distance"])},   # export checks it
        "test": None if threshold is None else operating_point(test_probs, test_labels, threshold,
                                                                                  test_distance, max_distance),
        "risk_coverage": risk_coverage(test_probs, test_labels),   # confidence alone
        "out_of_domain": {**abstention.out_of_domain(test_probs, digit_probs, threshold, test_distance,
                                                     digit_distance, max_distance),
                          "not_applicable": abstention.digits_not_applicable(meta["class_names"], train_sha256, digits)},
        "noise": abstention.out_of_domain(test_probs, noise_probs, threshold, test_distance, noise_distance,
                                          max_distance, abstention.NOISE_SOURCE),
    }


def operating_point(probs: np.ndarray, labels: np.ndarray, threshold: float, distance: np.ndarray | None = None,
                    max_distance: float | None = None) -> dict[str, float | int | None]:
    """Coverage, and accuracy with a Wilson 95% interval, of the images the rule answers."""
    keep = answered(probs, threshold, distance, max_distance)
    n, right = int(keep.sum()), int((probs.argmax(axis=1) == labels)[keep].sum())
    low, high = wilson_interval(right, n) if n else (None, None)
    return {"threshold": threshold, "answered": n, "coverage": round(n / len(labels), 6),
            "accuracy": round(right / n, 6) if n else None,
            "accuracy_ci_low": None if low is None else round(low, 6),
            "accuracy_ci_high": None if high is None else round(high, 6)}


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> list[dict[str, float | int | None]]:
    """The curve's key points on these images: the operating point that answers each share in abstention.COVERAGES."""
    confidence = probs.max(axis=1)
    return [{"target_coverage": c, **operating_point(probs, labels, abstention.threshold_for_coverage(confidence, c))}
            for c in abstention.COVERAGES]


def intervals(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """95% intervals: Wilson for accuracy, a seeded percentile bootstrap for macro-F1."""
    acc_low, acc_high = wilson_interval(int((predicted == labels).sum()), len(labels))
    f1_low, f1_high = bootstrap_macro_f1(labels, predicted, num_classes)
    return {"accuracy_ci_low": round(acc_low, 6), "accuracy_ci_high": round(acc_high, 6),
            "macro_f1_ci_low": round(f1_low, 6), "macro_f1_ci_high": round(f1_high, 6)}


def calibration_metrics(raw_probs: np.ndarray, labels: np.ndarray, class_names: list[str], bins: int,
                        temperature: float) -> dict[str, float]:
    """ECE and log loss of the raw softmax, beside the temperature that calibrates it (the headline metrics)."""
    raw = compute_metrics(raw_probs, labels, class_names, 1, bins)
    return {"temperature": round(temperature, 6), "ece_uncalibrated": raw["ece"],
            "log_loss_uncalibrated": raw["log_loss"]}


def baseline_metrics(params: Params, test_rows: list[SplitRow], labels: np.ndarray, accuracy: float,
                     num_classes: int) -> dict[str, Any]:
    """Pixel logistic regression fitted on the train split, scored on the same test images (tasks.lib.baseline)."""
    train_rows = read_split(split_path(params.data.prepared_dir, "train"))
    raw_dir = Path(params.data.raw_dir)
    try:
        baseline = fit_pixel_baseline(train_rows, raw_dir, num_classes, params.evaluate.baseline_max_images)
        predicted = baseline.predict([raw_dir / row.path for row in test_rows])
    except BadImage as err:
        raise StageError(f"{err}; the raw data changed since prepare ran: re-run it (dvc repro prepare)") from None
    baseline_accuracy = float((predicted == labels).mean())
    return {"baseline_accuracy": round(baseline_accuracy, 6), "lift": round(accuracy - baseline_accuracy, 6),
            "baseline": f"logistic regression on {baseline.geometry.describe()}, {baseline.train_images} train images"}


def predictions_record(rows: list[SplitRow], probs: np.ndarray, split_sha256: str) -> dict[str, Any]:
    """Each test image's predicted class (split order, keyed by content hash): the gate's paired test reads it."""
    return {"test_split_sha256": split_sha256, "sha256": [row.sha256 for row in rows],
            "label": [row.label for row in rows], "predicted": [int(p) for p in probs.argmax(axis=1)]}


def _check_classes(prepared_dir: Path, class_names: list[str]) -> None:
    """The checkpoint must score the classes the split files' label indices refer to."""
    path = Path(prepared_dir) / "classes.json"
    if path.exists() and read_classes(prepared_dir) != class_names:
        raise StageError(f"{path} lists classes {read_classes(prepared_dir)} but the checkpoint was trained on "
                         f"{class_names}; re-run training on the current data (dvc repro train)")


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("evaluate.device is cuda but no CUDA device is available; set evaluate.device=cpu")
    return torch.device(choice)


@torch.no_grad()
def forward_batches(model: torch.nn.Module, rows: list[SplitRow], raw_dir: Path, prep: Any, batch_size: int,
                    device: torch.device = torch.device("cpu")) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's logits and the features its head took in (abstention.HeadInput), in split order."""
    # Deterministic kernels: the same checkpoint and data must give identical metrics. TF32 off:
    # on an H200 it moved log loss and ECE by ~1e-4 against the CPU, and the gate compares these
    # numbers with a production model re-scored in fp32 by onnxruntime on a CPU.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model.to(device).eval()
    loader = DataLoader(EvalDataset(rows, raw_dir, prep), batch_size=batch_size, shuffle=False, num_workers=0)
    head = abstention.HeadInput(model)
    try:
        for images, _ in progress(loader, desc="evaluate", total=len(loader), unit="batch"):
            yield model(images.to(device)), head.value
    except BadImage as err:
        raise StageError(f"{err}; a split lists an unreadable image: re-run prepare (dvc repro prepare)") from None
    finally:
        head.handle.remove()


def predict_scores(model: torch.nn.Module, rows: list[SplitRow], raw_dir: Path, prep: Any, batch_size: int,
                   device: torch.device, distance: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (float64, rows in split order) and, given the fitted (whitening, centres), each feature distance."""
    logits, far = [], []
    for out, features in forward_batches(model, rows, raw_dir, prep, batch_size, device):
        logits.append(out.double().cpu().numpy())
        if distance is not None:
            far.append(abstention.squared_distance(features, *distance).double().cpu().numpy())
    return np.concatenate(logits), np.concatenate(far) if distance is not None else None


def predict_logits(model: torch.nn.Module, rows: list[SplitRow], raw_dir: Path, prep: Any, batch_size: int,
                   device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Logits (float64, rows in split order) of the model on the listed images."""
    return predict_scores(model, rows, raw_dir, prep, batch_size, device)[0]


def predict_probs(model: torch.nn.Module, rows: list[SplitRow], raw_dir: Path, prep: Any, batch_size: int,
                  device: torch.device = torch.device("cpu"), temperature: float | None = None) -> np.ndarray:
    """Softmax probabilities (float64) of the logits divided by `temperature` (the checkpoint's calibration)."""
    return softmax(predict_logits(model, rows, raw_dir, prep, batch_size, device) / (temperature or 1.0))


# --------------------------------------------------------------------------- plots


def write_plots(out: Path, probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                per_class: dict[str, dict[str, Any]], *, bins: int, uncalibrated: np.ndarray | None = None) -> None:
    """The data files of the DVC plots declared in dvc.yaml, and the same as PNG figures (tasks.lib.figures).

    reliability.json holds the bins of the calibrated probabilities (what the model
    hands out), reliability_uncalibrated.json those of the raw softmax, when given.
    """
    predicted = probs.argmax(axis=1)
    write_json(out / "confusion.json", [
        {"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(labels, predicted, strict=True)
    ])
    curves = {"calibrated": reliability_bins(probs, labels, bins)}
    if uncalibrated is not None:
        curves["raw softmax"] = reliability_bins(uncalibrated, labels, bins)
    for name, rows in zip(("reliability.json", "reliability_uncalibrated.json"), curves.values()):
        write_json(out / name, [{**row, "perfect": row["confidence"]} for row in rows])
    f1 = [per_class[name]["f1"] for name in class_names]   # compute_metrics' per-class table
    write_json(out / "per_class_f1.json", [{"class": name, "f1": value} for name, value in zip(class_names, f1)])
    figures.confusion(confusion_matrix(probs, labels, class_names), class_names, out / "confusion.png")
    figures.per_class_f1(class_names, f1, out / "per_class_f1.png")
    figures.reliability(curves, out / "reliability.png")


def worst_mistakes(probs: np.ndarray, labels: np.ndarray, limit: int) -> list[int]:
    """Indices of wrong predictions, most confident first (ties by split order, so the grid is stable)."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))
    return [int(i) for i in wrong[order][:limit]]


def write_mistakes_grid(path: Path, probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                        rows: list[SplitRow], raw_dir: Path, limit: int) -> None:
    """A PNG grid: each tile is a misclassified image with its true and predicted label."""
    picks = worst_mistakes(probs, labels, limit)
    if not picks:
        grid = _message_image(f"no mistakes among {len(labels)} test images" if limit else "worst_mistakes is 0")
    else:
        columns = min(GRID_COLUMNS, len(picks))
        grid_rows = -(-len(picks) // columns)
        grid = Image.new("RGB", (columns * TILE, grid_rows * (TILE + CAPTION)), "white")
        draw = ImageDraw.Draw(grid)
        for n, i in enumerate(picks):
            x, y = (n % columns) * TILE, (n // columns) * (TILE + CAPTION)
            # Scale up as well as down: a 28x28 Fashion-MNIST image must be readable in the grid.
            tile = ImageOps.contain(load_rgb(Path(raw_dir) / rows[i].path), (TILE - 4, TILE - 4))
            grid.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
            pred = int(probs[i].argmax())
            draw.text((x + 2, y + TILE + 2), f"true: {class_names[labels[i]]}"[:22], fill="black")
            draw.text((x + 2, y + TILE + 15), f"pred: {class_names[pred]} {probs[i, pred]:.2f}"[:22], fill="red")
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def _message_image(text: str) -> Image.Image:
    img = Image.new("RGB", (4 * TILE, 40), "white")
    ImageDraw.Draw(img).text((8, 12), text, fill="black")
    return img


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Evaluate the trained model on the held-out test split.", argv)


if __name__ == "__main__":
    sys.exit(main())
