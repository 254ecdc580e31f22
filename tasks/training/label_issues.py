"""Labels that look wrong: confident learning (cleanlab) on held-out probabilities from the frozen features.

Every train and val image gets class probabilities from the labels of its nearest training images in the
pretrained backbone's feature space (the features the head phase trains on, kept by the feature cache),
never from its own label. cleanlab's `find_label_issues` flags the images whose given label those
probabilities contradict, ranked by how little probability their given label gets (the score is 1 minus
it). `prepare.label_issues: exclude` drops the flagged training images scoring at least EXCLUDE_SCORE from
training; validation and test images are never dropped: a score is only an estimate, and the held-out
numbers must stay comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.lib.config import Params
from tasks.lib.figures import image_mosaic
from tasks.lib.io import write_json
from tasks.lib.models import feature_extractor
from tasks.lib.split_files import read_split, split_path
from tasks.training.loop import Data, Run
from tasks.training.phases import features
from tasks.training.runtime import Runtime

log = logging.getLogger(__name__)

# DINO's k-NN classifier on frozen features (k 20, temperature 0.07): on the demo's features with 5% of the
# training labels flipped it ranked 41-46 of the 69 flips in its top 69 for k 10-40 and temperatures
# 0.02-1, against 36-42 for a 5-fold cross-validated logistic regression that took 100-1000 times longer.
NEIGHBOURS, TEMPERATURE = 20, 0.07
BLOCK = 512             # query rows per similarity block
EXCLUDE_SCORE = 0.9     # exclude: the given label gets under a tenth of the neighbours' weight
SHOWN = 16              # suspects in the mosaic


def report_paths(params: Params) -> tuple[Path, Path]:
    """Where the train stage writes the report and the mosaic (beside its metrics, which git tracks)."""
    paths = params.report_paths(Path("."))
    return paths["label_issues"], paths["train_plots"] / "label_issues.png"


def check_labels(params: Params, rt: Runtime, data: Data, model: nn.Module, class_names: list[str]) -> None:
    """Write the report and mosaic (prepare.label_issues: report or exclude) from the pretrained model's
    features; under `exclude`, set `data.train_rows` to the training rows that stay."""
    mode = params.prepare.label_issues
    if mode == "off":   # the stage's outputs still exist, and say why they are empty
        if rt.main:
            write({"mode": mode, "method": None, "suspects": [], "note": "prepare.label_issues is off"},
                  *report_paths(params), {})
        return
    probe = Run(params.train, rt, data, model, features_dir=params.cache.features_dir)
    extractor = feature_extractor(model).eval()
    images = {"train": data.train_eval, "val": data.val_x}
    feats = {split: features(probe, extractor, images[split], f"features {split}").flatten(1).cpu().numpy()
             for split in images}
    labels = {"train": data.train_y.numpy(), "val": data.val_y.numpy()}
    paths = {split: [row.path for row in read_split(split_path(params.data.prepared_dir, split))]
             for split in images}
    report = find(feats, labels, paths, class_names)
    report["mode"] = mode
    dropped = excluded_rows(report) if mode == "exclude" else []
    report["n_excluded_from_training"] = len(dropped)
    if dropped:
        data.train_rows = torch.from_numpy(np.setdiff1d(np.arange(len(data.train_y)), dropped))
    if rt.main:
        write(report, *report_paths(params), images)
    log.info("label issues: %d of %d training and %d of %d validation images flagged (%s); %s",
             report.get("n_flagged", {}).get("train", 0), len(labels["train"]),
             report.get("n_flagged", {}).get("val", 0), len(labels["val"]), report_paths(params)[0],
             f"{len(dropped)} left out of training" if mode == "exclude" else "none left out (report only)")


def held_out_probabilities(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, n_classes: int
                           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Class probabilities from the K nearest training images by cosine similarity, each weighted by
    exp(similarity / TEMPERATURE), never counting an image itself: out-of-sample for train and val alike.
    None when a class has fewer than 2 training images (nothing to compare its images with)."""
    if np.bincount(train_y, minlength=n_classes).min() < 2:
        return None
    unit = _unit(train_x)
    return (_neighbour_votes(unit, unit, train_y, n_classes, leave_self_out=True),
            _neighbour_votes(_unit(val_x), unit, train_y, n_classes, leave_self_out=False))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbour_votes(queries: np.ndarray, keys: np.ndarray, labels: np.ndarray, n_classes: int,
                     leave_self_out: bool) -> np.ndarray:
    k = min(NEIGHBOURS, len(keys) - int(leave_self_out))
    probs = np.empty((len(queries), n_classes))
    for start in range(0, len(queries), BLOCK):       # BLOCK x N similarities at a time, whatever N is
        sims = queries[start:start + BLOCK] @ keys.T
        if leave_self_out:
            np.fill_diagonal(sims[:, start:start + BLOCK], -np.inf)
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp((np.take_along_axis(sims, nearest, axis=1) - 1) / TEMPERATURE)
        votes = np.stack([(weights * (labels[nearest] == c)).sum(axis=1) for c in range(n_classes)], axis=1)
        votes += 1e-6          # no class has probability exactly 0
        probs[start:start + BLOCK] = votes / votes.sum(axis=1, keepdims=True)
    return probs


def flagged(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices confident learning flags, most suspicious first (lowest probability of the given label)."""
    from cleanlab.filter import find_label_issues

    if len(labels) < 2:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), dtype=np.int64)


def find(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], paths: dict[str, list[str]],
         class_names: list[str]) -> dict[str, Any]:
    """The report: per suspect its split, path, given and suggested class and score, most suspicious first."""
    probs = held_out_probabilities(features["train"], labels["train"], features["val"], len(class_names))
    if probs is None:
        return {"method": None, "suspects": [], "note": "a class has fewer than 2 training images: "
                "no image can be held out to check its label"}
    suspects = []
    for split, split_probs in zip(("train", "val"), probs):
        for i in flagged(labels[split], split_probs):
            given, suggested = int(labels[split][i]), int(split_probs[i].argmax())
            suspects.append({"split": split, "index": int(i), "path": paths[split][i],
                             "given": class_names[given], "suggested": class_names[suggested],
                             "score": round(1.0 - float(split_probs[i][given]), 6)})
    suspects.sort(key=lambda s: -s["score"])
    return {"method": f"cleanlab find_label_issues on the votes of the {NEIGHBOURS} nearest training images "
                      "(cosine similarity of the pretrained backbone's features, the image itself left out)",
            "n_checked": {split: len(labels[split]) for split in ("train", "val")},
            "n_flagged": {split: sum(s["split"] == split for s in suspects) for split in ("train", "val")},
            "suspects": suspects}


def excluded_rows(report: dict[str, Any]) -> list[int]:
    """The training rows `exclude` drops: flagged, scoring at least EXCLUDE_SCORE."""
    return sorted(s["index"] for s in report["suspects"] if s["split"] == "train" and s["score"] >= EXCLUDE_SCORE)


def write(report: dict[str, Any], json_path: Path, mosaic_path: Path, images: dict[str, Any]) -> None:
    """label_issues.json, and a mosaic of the top suspects (their decoded pixels, given -> suggested)."""
    write_json(json_path, report)
    top = report["suspects"][:SHOWN]
    image_mosaic([np.asarray(images[s["split"]][np.array([s["index"]])][0]) for s in top],
                 [f"{s['given']} -> {s['suggested']} ({s['score']:.2f})" for s in top], mosaic_path,
                 "likely label issues: given -> suggested (score)")
