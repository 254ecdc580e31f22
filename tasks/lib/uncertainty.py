"""How sure a test-set figure is: confidence intervals and the paired test the gate uses.

A few hundred test images give an accuracy good to about +/- 2 to 4 points, so every figure comes with its 95%
interval, and the gate asks whether a candidate is better on the *same* images than chance would explain.
Pure numpy and the standard library: the registry and the gate use it too.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of successes/n; (0, 1) when n is 0. Unlike the textbook normal interval it
    stays inside [0, 1] and keeps its coverage near 0 or 1 and for small n."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices (..., C, C) with rows = actual, columns = predicted; as in torchmetrics, a
    class neither present nor predicted (tp + fp + fn = 0) is left out of the average."""
    counts = np.asarray(counts, dtype=np.float64)
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    fp = counts.sum(axis=-2) - tp
    fn = counts.sum(axis=-1) - tp
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def bootstrap_macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int, *,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of macro-F1 (it has no closed form): `samples` seeded resamples of the
    images, with replacement."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return 0.0, 1.0
    picks = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    cell = labels[picks] * num_classes + predicted[picks]                 # (samples, n) confusion cell per pick
    offset = np.arange(samples)[:, None] * num_classes * num_classes
    counts = np.bincount((cell + offset).ravel(), minlength=samples * num_classes * num_classes)
    scores = macro_f1_from_counts(counts.reshape(samples, num_classes, num_classes))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_exact(candidate_right: np.ndarray, production_right: np.ndarray) -> dict[str, float | int]:
    """Exact two-sided McNemar test of two models' per-image correctness on the same images: the discordant
    counts (`wins`: only the candidate is right, `losses`: only production is) and the p-value of "equally good"."""
    a, b = np.asarray(candidate_right, dtype=bool), np.asarray(production_right, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions differ in length: {a.shape} vs {b.shape}")
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    return {"wins": wins, "losses": losses, "p_value": binomial_two_sided(wins, wins + losses)}


def binomial_two_sided(k: int, n: int) -> float:
    """P-value of k successes in n fair coin flips, two-sided (exact; Python integers, no overflow)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def interval_text(low: float, high: float, digits: int = 3) -> str:
    """'[0.812, 0.874]' for tables and the model card."""
    return f"[{low:.{digits}f}, {high:.{digits}f}]"
