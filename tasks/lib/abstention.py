"""Abstention: the confidence below which the handed-off model says "not sure", and what that costs and buys.

The threshold is chosen on the validation split only (the test split must stay unseen by every choice);
the test split then reports the risk-coverage curve (accuracy of the answered images against the share
answered) and an out-of-domain image set reports how many strangers the threshold turns away.
Confidence alone cannot turn away confident nonsense (uniform noise was called `bag` with p=0.95), so the rule
also bounds how far the image's features lie from what training saw: the squared Mahalanobis distance of the
features the head takes in to the nearest class mean, with one shared covariance shrunk toward its mean variance
(Lee et al. 2018), fitted on the training split; its threshold keeps DISTANCE_KEEP of the validation images.
The rule (answer when the top calibrated probability is at least its threshold and the distance at most its own)
is tasks.lib.onnx_classifier.answered, the one predict applies to the exported model's two outputs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import read_json, sha256_file
from tasks.lib.models import head_module
from tasks.lib.onnx_classifier import ABSTAIN_KEY, DISTANCE_KEY, DISTANCE_NAME, PROBABILITIES_NAME, answered
from tasks.lib.split_files import SplitRow

log = logging.getLogger(__name__)
COVERAGES = (1.0, 0.95, 0.9, 0.8)   # the curve's key points the card shows
# At most as many strangers as test images: the AUROC compares like-sized sets, and the check never costs more
# than scoring the test split. 300 (30 of each digit) measure a rejection rate to within about 6 points.
OOD_IMAGES = 300
OOD_SIDE = 28                       # upscaled to a Fashion-MNIST-sized file; the model's preprocessing does the rest
OOD_SOURCE = f"scikit-learn digits (8x8 grey, upscaled to {OOD_SIDE}x{OOD_SIDE} PNG, made RGB as any image is)"
NOISE_IMAGES = 50                   # half grey, half RGB: enough to say "rejects 48 of 50", cheap to score
NOISE_SOURCE = f"uniform noise ({OOD_SIDE}x{OOD_SIDE} PNG, half grey, half RGB, seeded)"
# Measured on the demo model (efficientnet_lite0, 1371 train images, 1280 features): keeping 99% of validation
# rejected 2% of uniform noise, 95% rejected 94% of it and 91% of the digits at 5% of test images (docs/registry.md).
DISTANCE_KEEP = 0.95
# Shrinkage toward the mean variance: a 1280x1280 covariance from a few thousand images is singular without it.
# On the demo, 0.01 told noise from test images with AUROC 0.975 (0.1: 0.939, Ledoit-Wolf's 0.066: 0.948) and
# rejected 94% of it (0.1: 48%); on a draw half that size 0.1 did better (92% against 72%): less data, more shrinkage.
SHRINKAGE = 0.01


class HeadInput:
    """What the model's head took in on its last call: the penultimate features, (N, D) (a 1x1-conv head's input
    averaged over its positions). A forward pre-hook, so any architecture that models.find_head knows works."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = head_module(model).register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        features = args[0]
        self.value = features.mean(dim=(2, 3)) if features.ndim == 4 else features.flatten(1)


def squared_distance(features: torch.Tensor, whiten: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance to the nearest class mean: |f W - c|^2 with W whitening the shared covariance
    and c the whitened class means, expanded so no (N, classes, D) tensor is made. In float64: the expansion
    subtracts squared norms of ~1e3 that fp32 keeps to ~1e-4. The same code runs in evaluate and in the exported
    graph (whose fp32 weights onnxruntime's int8 quantizer then leaves alone: they reach MatMul through a Cast)."""
    z, c = features.double() @ whiten.double(), centres.double()
    return ((z * z).sum(dim=1, keepdim=True) - 2 * z @ c.T + (c * c).sum(dim=1)).min(dim=1).values


def fit_distance(batches: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict[str, np.ndarray]:
    """Whitening matrix and whitened class means from (features, labels) batches of the training split, summed as
    they stream by (a few hundred thousand images never sit in memory at once). Classes without images drop out."""
    sums, counts, scatter = None, np.zeros(num_classes), None
    for features, labels in batches:
        f = np.asarray(features, dtype=np.float64)
        if sums is None:
            sums, scatter = np.zeros((num_classes, f.shape[1])), np.zeros((f.shape[1], f.shape[1]))
        np.add.at(sums, labels, f)
        counts += np.bincount(labels, minlength=num_classes)
        scatter += f.T @ f
    seen = counts > 0
    means = sums[seen] / counts[seen, None]
    cov = (scatter - (means.T * counts[seen]) @ means) / counts.sum()
    spread = np.trace(cov) / len(cov) or 1.0   # 0 when each class has one image: distance is then Euclidean
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * spread * np.eye(len(cov))
    values, vectors = np.linalg.eigh(cov)
    whiten = vectors / np.sqrt(values)   # cov^-1 = W W^T
    return {"whiten": whiten.astype(np.float32), "centres": (means @ whiten).astype(np.float32)}


def distance_threshold(val_distance: np.ndarray) -> float | None:
    """The distance that keeps DISTANCE_KEEP of the validation images (ties kept together); None without any."""
    if not len(val_distance):
        return None
    return float(np.sort(val_distance)[max(0, math.ceil(DISTANCE_KEEP * len(val_distance) - 1e-9) - 1)])


def digits_not_applicable(class_names: list[str], train_sha256: set[str], ood_rows: list[SplitRow]) -> str | None:
    """Why the digits are no strangers to this model, or None: its classes are the ten digits (a model trained on
    scikit-learn's digits, as benchmarks/quality.py --dataset digits makes one), or it trained on these very files."""
    if len(class_names) == 10 and {re.sub(r"\D", "", name) for name in class_names} == set("0123456789"):
        return "the model's classes are the ten digits, so the digits are its own domain"
    if train_sha256 & {row.sha256 for row in ood_rows}:
        return "the training split holds some of these very digit images"
    return None


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


def out_of_domain(in_probs: np.ndarray, ood_probs: np.ndarray, threshold: float | None, in_distance: np.ndarray | None,
                  ood_distance: np.ndarray | None, max_distance: float | None, source: str = OOD_SOURCE
                  ) -> dict[str, object]:
    """How well confidence, and the feature distance, tell the test images from strangers: AUROC (in-domain
    positive; 0.5 is chance), and how many strangers the rule rejects."""
    domain = np.concatenate([np.ones(len(in_probs)), np.zeros(len(ood_probs))])
    auroc = roc_auc_score(domain, np.concatenate([in_probs.max(axis=1), ood_probs.max(axis=1)]))
    auroc_distance = None if in_distance is None else roc_auc_score(domain, -np.concatenate([in_distance, ood_distance]))
    rejected = None if threshold is None else int((~answered(ood_probs, threshold, ood_distance, max_distance)).sum())
    return {"source": source, "n_images": len(ood_probs), "auroc": round(float(auroc), 6),
            "auroc_distance": None if auroc_distance is None else round(float(auroc_distance), 6),
            "mean_confidence": round(float(ood_probs.max(axis=1).mean()), 6),
            "rejected": None if rejected is None else round(rejected / len(ood_probs), 6), "rejected_count": rejected}


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


def write_noise_images(folder: Path, count: int = NOISE_IMAGES) -> list[SplitRow]:
    """`count` uniform-noise PNG files (even ones grey, odd ones RGB), seeded so every run scores the same pixels."""
    rng, rows = np.random.default_rng(0), []
    for i in range(count):
        shape = (OOD_SIDE, OOD_SIDE) if i % 2 == 0 else (OOD_SIDE, OOD_SIDE, 3)
        name = f"noise_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
        rows.append(SplitRow(name, 0, sha256_file(folder / name)))
    return rows


def onnx_metadata(params: Params) -> tuple[dict[str, str], tuple[torch.Tensor, torch.Tensor] | None]:
    """The abstention thresholds evaluate chose on the validation split, the test split's operating point and
    risk-coverage key points, and the fitted feature distance the graph computes, when export.abstain_at_accuracy
    or export.abstain_at_coverage asks for them. Taken from evaluate's files only after checking they were computed
    for this checkpoint and this target (and the distance file is the one evaluate.json records)."""
    target = params.export.abstain_target
    path, checkpoint = params.report_paths(Path("."))["test_metrics"], Path(params.train.out_dir) / "model.pt"
    if target is None:
        return {}, None
    if not path.exists():   # exported by hand without evaluate (dvc repro runs evaluate first): said, not guessed
        log.warning("no abstention threshold in the ONNX metadata: %s does not exist; run evaluate before export "
                    "(dvc repro export) for one", path)
        return {}, None
    record = read_json(path).get("abstention") or {}
    if record.get("target") != target or "threshold" not in record:
        raise StageError(f"{path} holds no abstention threshold for {target} (export.abstain_at_*): run evaluate "
                         "first (dvc repro evaluate)")
    if record.get("checkpoint_sha256") != sha256_file(checkpoint):
        raise StageError(f"{path} was computed for another checkpoint than {checkpoint}: re-run evaluate "
                         "(dvc repro evaluate)")
    if record["threshold"] is None:   # the model could not reach the target: said in evaluate's log and the card
        log.warning("no abstention threshold in the ONNX metadata: %s", record.get("note"))
        return {}, None
    stats_path = params.report_paths(Path("."))["feature_distance"]
    if not stats_path.exists() or sha256_file(stats_path) != record["distance"]["sha256"]:
        raise StageError(f"{stats_path} is missing or not the file {path} was computed with: re-run evaluate "
                         "(dvc repro evaluate)")
    with np.load(stats_path, allow_pickle=False) as stats:
        distance = torch.from_numpy(stats["whiten"]), torch.from_numpy(stats["centres"])
    key_points = {"target": target, "on_test": record["test"], "risk_coverage": record["risk_coverage"],
                  "out_of_domain": record["out_of_domain"], "noise": record["noise"]}
    return {ABSTAIN_KEY: repr(float(record["threshold"])), DISTANCE_KEY: repr(float(record["distance"]["threshold"])),
            "abstention": json.dumps(key_points, sort_keys=True),
            "abstention_rule": f"answer only when max({PROBABILITIES_NAME}) >= {ABSTAIN_KEY} and {DISTANCE_NAME} <= "
                               f"{DISTANCE_KEY}; otherwise the model is not sure: report unknown (both thresholds "
                               "chosen on the validation split)"}, distance


def summary(record: dict) -> str:
    """One line for the log and the demo: the operating point at the threshold, and the out-of-domain checks."""
    ood, noise = record["out_of_domain"], record.get("noise") or {}
    digits = (f"the digits check does not apply ({ood['not_applicable']})" if ood.get("not_applicable") else
              f"confidence tells {ood['source'].split(' (')[0]} from test images with AUROC {ood['auroc']:.3f}")
    point = record.get("test")
    if not point:
        why = record.get("note") or "export.abstain_at_accuracy and export.abstain_at_coverage are null"
        return f"no threshold ({why}); {digits}"
    accuracy = "no image answered" if point["accuracy"] is None else (
        f"{100 * point['accuracy']:.1f}% accurate [{100 * point['accuracy_ci_low']:.1f}, "
        f"{100 * point['accuracy_ci_high']:.1f}]")
    rejects = "" if ood.get("not_applicable") else f"{ood['rejected_count']} of {ood['n_images']} digits and "
    return (f"below p={point['threshold']:.4f} or beyond feature distance {record['distance']['threshold']:.1f} the "
            f"model says unknown: it answers {100 * point['coverage']:.1f}% of the test images, {accuracy}; it "
            f"rejects {rejects}{noise['rejected_count']} of {noise['n_images']} noise images; {digits}")
