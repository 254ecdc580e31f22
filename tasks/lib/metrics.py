"""Classification metrics from predicted probabilities, computed by torchmetrics in float64 on the CPU.

`compute_metrics` is pure (numpy in, JSON-ready dict out), so evaluate (PyTorch outputs) and the registry (a
production ONNX model's outputs) judge models by exactly the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.functional.classification.calibration_error import _binning_bucketize

DIGITS = 6  # rounding keeps metrics.json stable across BLAS thread counts (differences ~1e-12)
PROB_SUM_TOLERANCE = 1e-3


def compute_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str], top_k: int, bins: int) -> dict:
    """Accuracy, balanced accuracy, macro/weighted F1, top-k accuracy, log loss, ECE and per-class scores."""
    p, y = _as_tensors(probs, labels, class_names)
    c = len(class_names)
    k = min(top_k, c)  # top-k with k >= classes would be trivially 1.0; report the k actually used
    per_class = _per_class(p, y, class_names)
    return {
        "accuracy": _r(multiclass_accuracy(p, y, num_classes=c, average="micro")),
        # Macro-averaged per-class accuracy is per-class recall averaged: balanced accuracy.
        "balanced_accuracy": _r(multiclass_accuracy(p, y, num_classes=c, average="macro")),
        "macro_f1": _r(multiclass_f1_score(p, y, num_classes=c, average="macro")),
        "weighted_f1": _r(multiclass_f1_score(p, y, num_classes=c, average="weighted")),
        "top_k_accuracy": _r(multiclass_accuracy(p, y, num_classes=c, average="micro", top_k=k)),
        "top_k": k,
        "log_loss": _r(_log_loss(p, y)),
        "ece": _r(multiclass_calibration_error(p, y, num_classes=c, n_bins=bins, norm="l1")),
        "n_test": int(y.numel()),
        "per_class": per_class,
    }


def confusion_matrix(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    p, y = _as_tensors(probs, labels, class_names)
    return multiclass_confusion_matrix(p, y, num_classes=len(class_names)).numpy()


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """The reliability diagram: per confidence bin, mean confidence, accuracy and count, in torchmetrics' own
    bins, exactly those behind the reported ECE."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    confidences, predicted = p.max(dim=1)
    boundaries = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    acc, conf, prop = _binning_bucketize(confidences, (predicted == y).double(), boundaries)
    counts = torch.round(prop * len(y)).long()
    # torchmetrics puts confidence == 1.0 into an extra last bin; fold it into the top bin.
    acc, conf, counts = _fold_last_bin(acc, conf, counts)
    return [
        {"bin": i, "bin_lower": _r(boundaries[i]), "bin_upper": _r(boundaries[i + 1]), "confidence": _r(conf[i]),
         "accuracy": _r(acc[i]), "count": int(counts[i])}
        for i in range(bins)
        if counts[i] > 0
    ]


def _fold_last_bin(acc: torch.Tensor, conf: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    acc, conf, counts = acc.clone(), conf.clone(), counts.clone()
    n_top, n_extra = counts[-2], counts[-1]
    if n_extra > 0:
        total = n_top + n_extra
        acc[-2] = (acc[-2] * n_top + acc[-1] * n_extra) / total
        conf[-2] = (conf[-2] * n_top + conf[-1] * n_extra) / total
        counts[-2] = total
    return acc[:-1], conf[:-1], counts[:-1]


def _per_class(p: torch.Tensor, y: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, float | int]]:
    c = len(class_names)
    precision = multiclass_precision(p, y, num_classes=c, average=None)
    recall = multiclass_recall(p, y, num_classes=c, average=None)
    f1 = multiclass_f1_score(p, y, num_classes=c, average=None)
    support = torch.bincount(y, minlength=c)
    return {
        name: {"precision": _r(precision[i]), "recall": _r(recall[i]), "f1": _r(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }


def _log_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the true class; probabilities clipped like scikit-learn's log_loss."""
    eps = torch.finfo(torch.float64).eps
    return F.nll_loss(torch.log(p.clamp(eps, 1 - eps)), y)


def _as_tensors(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and values, then float64 / int64 CPU tensors."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (n_samples, n_classes) array, got shape {probs.shape}")
    if probs.shape[1] != len(class_names) or len(class_names) < 2:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {len(class_names)} class names")
    if labels.shape != (probs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {probs.shape[0]} integers, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must lie in [0, {len(class_names) - 1}], got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative; pass softmax probabilities, not logits")
    worst = np.abs(probs.sum(axis=1) - 1).max()
    if worst > PROB_SUM_TOLERANCE:
        raise ValueError(f"probs rows must sum to 1 (worst row is off by {worst:.3g}); pass softmax probabilities")
    return torch.from_numpy(probs), torch.from_numpy(labels.astype(np.int64))


def _r(value: torch.Tensor | float) -> float:
    return round(float(value), DIGITS)
