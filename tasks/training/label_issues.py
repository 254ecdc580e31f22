"""Labels that look wrong: confident learning (cleanlab) on out-of-fold predictions from the frozen features.

Every training image gets class probabilities from a logistic regression that never saw its label
(cross-validated on the pretrained backbone's features, which the head phase computes anyway and the
feature cache keeps), every validation image from one fitted on all of train. cleanlab's
`find_label_issues` flags the images whose given label those probabilities contradict, ranked by how
little probability their given label gets (the score is 1 minus it). `prepare.label_issues: exclude` drops
the flagged training images scoring at least EXCLUDE_SCORE from training; validation and test images are
never dropped: a score is only an estimate, and the held-out numbers must stay comparable.
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

FOLDS = 5
EXCLUDE_SCORE = 0.5     # the given label gets under half the held-out probability: the suggestion is likelier
SHOWN = 16              # suspects in the mosaic


def report_paths(params: Params) -> tuple[Path, Path]:
    """Where the train stage writes the report and the mosaic (beside its metrics, which git tracks)."""
    return params.reports.dir / "label_issues.json", params.reports.dir / "train" / "label_issues.png"


def check_labels(params: Params, rt: Runtime, data: Data, model: nn.Module, class_names: list[str]) -> None:
    """Write the report and mosaic (prepare.label_issues: report or exclude) from the pretrained model's
    features; under `exclude`, set `data.train_rows` to the training rows that stay."""
    mode = params.prepare.label_issues
    if mode == "off":
        return
    probe = Run(params.train, rt, data, model, features_dir=params.cache.features_dir)
    extractor = feature_extractor(model).eval()
    images = {"train": data.train_eval, "val": data.val_x}
    feats = {split: features(probe, extractor, images[split], f"features {split}").flatten(1).cpu().numpy()
             for split in images}
    labels = {"train": data.train_y.numpy(), "val": data.val_y.numpy()}
    paths = {split: [row.path for row in read_split(split_path(params.data.prepared_dir, split))]
             for split in images}
    report = find(feats, labels, paths, class_names, params.train.seed)
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


def held_out_probabilities(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, n_classes: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Out-of-fold probabilities for train, and for val from a model fitted on all of train; None when a class
    has too few training images to hold any out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(train_y, minlength=n_classes)
    if counts.min() < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    folds = StratifiedKFold(min(FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    train_probs = cross_val_predict(model, train_x, train_y, cv=folds, method="predict_proba")
    val_probs = model.fit(train_x, train_y).predict_proba(val_x)
    return train_probs, val_probs


def flagged(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices confident learning flags, most suspicious first (lowest probability of the given label)."""
    from cleanlab.filter import find_label_issues

    if len(labels) < 2:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), dtype=np.int64)


def find(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], paths: dict[str, list[str]],
         class_names: list[str], seed: int) -> dict[str, Any]:
    """The report: per suspect its split, path, given and suggested class and score, most suspicious first."""
    probs = held_out_probabilities(features["train"], labels["train"], features["val"], len(class_names), seed)
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
    return {"method": f"cleanlab find_label_issues on {FOLDS}-fold out-of-fold logistic regression "
                      "probabilities from the pretrained backbone's features",
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
