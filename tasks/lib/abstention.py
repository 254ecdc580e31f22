"""Abstention: the confidence below which the handed-off model says "not sure", and what that costs and buys.

The threshold is chosen on the validation split only (the test split must stay unseen by every choice);
the test split then reports the risk-coverage curve (accuracy of the answered images against the share
answered) and an out-of-domain image set reports how many strangers the threshold turns away.
The rule itself (answer when the top calibrated probability is at least the threshold) is
tasks.lib.onnx_classifier.answered, the one predict applies to the exported model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from tasks.lib.io import sha256_file
from tasks.lib.onnx_classifier import answered
from tasks.lib.split_files import SplitRow
from tasks.lib.uncertainty import wilson_interval

COVERAGES = (1.0, 0.95, 0.9, 0.8)   # the curve's key points the card shows
# At most as many strangers as test images: the AUROC compares like-sized sets, and the check never costs more
# than scoring the test split. 300 (30 of each digit) measure a rejection rate to within about 6 points.
OOD_IMAGES = 300
OOD_SIDE = 28                       # upscaled to a Fashion-MNIST-sized file; the model's preprocessing does the rest
OOD_SOURCE = f"scikit-learn digits (8x8 grey, upscaled to {OOD_SIDE}x{OOD_SIDE} PNG, made RGB as any image is)"


def threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence threshold whose answered images are at least `target` accurate; None if none is."""
    order = np.argsort(-confidence, kind="stable")
    conf, right = confidence[order], correct[order]
    accuracy = np.cumsum(right) / np.arange(1, len(conf) + 1)
    # A threshold answers every image at or above it: only the last of a run of equal confidences is a cut.
    cut = np.append(conf[1:] != conf[:-1], True)
    reaching = np.flatnonzero((accuracy >= target - 1e-12) & cut)
    return float(conf[reaching[-1]]) if reaching.size else None


def threshold_for_coverage(confidence: np.ndarray, coverage: float) -> float:
    """The highest threshold that still answers at least `coverage` of the images (ties answered together)."""
    k = max(1, math.ceil(coverage * len(confidence) - 1e-9))
    return float(np.sort(confidence)[::-1][k - 1])


def choose_threshold(val_probs: np.ndarray, val_labels: np.ndarray, at_accuracy: float | None,
                     at_coverage: float | None) -> tuple[float | None, str | None]:
    """The threshold for the configured target, from the validation split alone, or None and why not (a model
    too weak for the target gets no threshold, said plainly in the log and on the card, rather than a made-up one)."""
    if at_accuracy is None and at_coverage is None:
        return None, None
    if not len(val_labels):
        return None, "the validation split lists no images, so no abstention threshold was chosen"
    confidence = val_probs.max(axis=1)
    if at_coverage is not None:
        return threshold_for_coverage(confidence, at_coverage), None
    threshold = threshold_for_accuracy(confidence, val_probs.argmax(axis=1) == val_labels, at_accuracy)
    if threshold is None:
        return None, (f"no confidence threshold makes the model {at_accuracy:g} accurate on the validation images "
                      "it answers, so it has no abstention threshold: lower export.abstain_at_accuracy or set "
                      "export.abstain_at_coverage instead")
    return threshold, None


def operating_point(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Coverage, and accuracy with a Wilson 95% interval, of the images the threshold answers."""
    keep = answered(probs, threshold)
    n, right = int(keep.sum()), int((probs.argmax(axis=1) == labels)[keep].sum())
    low, high = wilson_interval(right, n) if n else (None, None)
    return {"threshold": threshold, "answered": n, "coverage": round(n / len(labels), 6),
            "accuracy": round(right / n, 6) if n else None,
            "accuracy_ci_low": None if low is None else round(low, 6),
            "accuracy_ci_high": None if high is None else round(high, 6)}


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> list[dict[str, float | int | None]]:
    """The curve's key points on these images: the operating point that answers each share in COVERAGES."""
    confidence = probs.max(axis=1)
    return [{"target_coverage": c, **operating_point(probs, labels, threshold_for_coverage(confidence, c))}
            for c in COVERAGES]


def out_of_domain(in_probs: np.ndarray, ood_probs: np.ndarray, threshold: float | None) -> dict[str, object]:
    """How well confidence tells the test images from strangers: the AUROC of max confidence (in-domain positive;
    0.5 is chance) and the share of strangers the threshold rejects."""
    confidence = np.concatenate([in_probs.max(axis=1), ood_probs.max(axis=1)])
    domain = np.concatenate([np.ones(len(in_probs)), np.zeros(len(ood_probs))])
    rejected = None if threshold is None else round(float((~answered(ood_probs, threshold)).mean()), 6)
    return {"source": OOD_SOURCE, "n_images": len(ood_probs), "auroc": round(float(roc_auc_score(domain, confidence)), 6),
            "mean_confidence": round(float(ood_probs.max(axis=1).mean()), 6), "rejected": rejected}


def write_ood_images(folder: Path, count: int = OOD_IMAGES) -> list[SplitRow]:
    """`count` scikit-learn digits (shipped with scikit-learn, so offline) as grey PNG files, as split rows."""
    digits = load_digits()
    rows = []
    for i in range(count):
        pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)   # digits are 0..16, ink bright
        name = f"digit_{i:03d}_{digits.target[i]}.png"
        Image.fromarray(pixels, mode="L").resize((OOD_SIDE, OOD_SIDE), Image.Resampling.BILINEAR).save(folder / name)
        rows.append(SplitRow(name, int(digits.target[i]), sha256_file(folder / name)))
    return rows


def summary(record: dict) -> str:
    """One line for the log and the card: the operating point at the threshold, and the out-of-domain check."""
    ood = record["out_of_domain"]
    strangers = f"confidence tells {ood['source'].split(' (')[0]} from test images with AUROC {ood['auroc']:.3f}"
    point = record.get("test")
    if not point:
        why = record.get("note") or "export.abstain_at_accuracy and export.abstain_at_coverage are null"
        return f"no threshold ({why}); {strangers}"
    accuracy = "no image answered" if point["accuracy"] is None else (
        f"{100 * point['accuracy']:.1f}% accurate [{100 * point['accuracy_ci_low']:.1f}, "
        f"{100 * point['accuracy_ci_high']:.1f}]")
    return (f"below p={point['threshold']:.4f} the model says unknown: it answers {100 * point['coverage']:.1f}% of "
            f"the test images, {accuracy}; it rejects {100 * ood['rejected']:.1f}% of {ood['n_images']} out-of-domain "
            f"images; {strangers}")
