"""Labels that look wrong (prepare.label_issues): flipped labels found by confident learning on held-out
probabilities, `exclude` leaves them out of training only, and the stage writes the report and mosaic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.image_cache import MappedImages
from tasks.lib.split_files import read_split, split_path, write_split
from tasks.train import train
from tasks.training import label_issues
from tasks.training.label_issues import EXCLUDE_SCORE, excluded_rows, find, held_out_probabilities
from tasks.training.loop import Data, Run, epoch_order
from tasks.training.runtime import Runtime
from tests.tasks.test_train import tiny_params, write_project

CLASSES = ["Boot", "sac à main", "T-shirt 2"]


def clustered(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features of 3 well separated classes (16 dims) and their labels."""
    labels = rng.integers(0, 3, n)
    return np.eye(3, 16)[labels] * 6 + rng.normal(0, 1, (n, 16)), labels


def test_flipped_labels_are_the_suspects_and_exclude_takes_only_confident_training_ones() -> None:
    rng = np.random.default_rng(0)
    (train_x, train_y), (val_x, val_y) = clustered(240, rng), clustered(60, rng)
    flipped = rng.choice(240, 12, replace=False)                 # 5% of the training labels
    noisy = train_y.copy()
    noisy[flipped] = (train_y[flipped] + 1) % 3
    val_noisy = val_y.copy()
    val_noisy[:2] = (val_y[:2] + 2) % 3
    paths = {"train": [f"train/{i}.png" for i in range(240)], "val": [f"val/{i}.png" for i in range(60)]}
    report = find({"train": train_x, "val": val_x}, {"train": noisy, "val": val_noisy}, paths, CLASSES)

    train_suspects = [s for s in report["suspects"] if s["split"] == "train"]
    assert {s["index"] for s in train_suspects} <= set(flipped.tolist()) and len(train_suspects) >= 11
    # 60 validation images: confident learning's per-class thresholds are coarse, it may miss one but flags no other
    assert {s["index"] for s in report["suspects"] if s["split"] == "val"} in ({0, 1}, {0}, {1})
    for s in train_suspects:       # what a person fixing the labels reads: the file, its label and the likelier one
        i = s["index"]
        assert s["path"] == f"train/{i}.png" and s["given"] == CLASSES[noisy[i]] and s["suggested"] == CLASSES[train_y[i]]
    scores = [s["score"] for s in report["suspects"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= v <= 1 for v in scores)
    assert report["n_flagged"]["train"] == len(train_suspects) and report["n_checked"] == {"train": 240, "val": 60}
    assert excluded_rows(report) == sorted(s["index"] for s in train_suspects if s["score"] >= EXCLUDE_SCORE)
    assert set(excluded_rows(report)) <= set(flipped.tolist()) and len(excluded_rows(report)) >= 10


def test_an_image_never_votes_for_its_own_label_and_blocks_change_nothing(monkeypatch) -> None:
    # Three images of each class on one direction, and one more "class 0" image unlike any other: counted, its
    # own label would outweigh every neighbour (a weight of 1 against exp(-1/0.07)) and it would look certain.
    train_x = np.array([[1, 0, 0]] * 3 + [[0, 1, 0]] * 3 + [[0, 0, 1]], dtype=float)
    train_y = np.array([0, 0, 0, 1, 1, 1, 0])
    train_probs, val_probs = held_out_probabilities(train_x, train_y, train_x[:1], 2)
    assert train_probs[6, 0] == pytest.approx(3 / 6, abs=1e-3)      # 6 equally unlike neighbours, 3 of class 0
    assert train_probs[0, 0] == pytest.approx(1.0, abs=1e-3)        # its two twins, far heavier than the rest
    assert val_probs[0, 0] == pytest.approx(1.0, abs=1e-3)          # a val image may match a training one
    monkeypatch.setattr(label_issues, "BLOCK", 2)
    blocked = held_out_probabilities(train_x, train_y, train_x[:1], 2)
    np.testing.assert_allclose(blocked[0], train_probs)
    np.testing.assert_allclose(blocked[1], val_probs)


def test_a_class_with_one_training_image_is_not_checked_and_says_why() -> None:
    features = np.eye(3, 4)
    report = find({"train": features, "val": features}, {"train": np.array([0, 1, 1]), "val": np.array([0, 1, 2])},
                  {"train": ["a", "b", "c"], "val": ["d", "e", "f"]}, CLASSES)
    assert report["suspects"] == [] and "fewer than 2 training images" in report["note"]


def test_an_epoch_draws_each_kept_training_row_once_and_never_an_excluded_one() -> None:
    images = MappedImages(np.zeros((10, 8, 8, 3), dtype=np.uint8), False)
    labels = torch.arange(10) % 2
    data = Data(train_eval=images, train_margin=None, train_y=labels, val_x=images, val_y=labels,
                mean=torch.zeros(3), std=torch.ones(3), num_classes=2, train_rows=torch.tensor([0, 2, 3, 5, 9]))
    run = Run(TrainParams(image_size=16, batch_size=2, device="cpu"), Runtime(torch.device("cpu"), None), data,
              nn.Identity())
    drawn = torch.cat(epoch_order(run, "head", seed=1)).tolist()
    assert sorted(drawn) == [0, 2, 3, 5, 9]
    assert data.training_labels().tolist() == [0, 0, 1, 1, 1]


@pytest.mark.slow(seconds=8)
def test_the_train_stage_reports_flipped_labels_and_exclude_trains_without_them(tmp_path: Path) -> None:
    write_project(tmp_path, per_class=16)
    train_file = split_path(tmp_path / "data" / "prepared", "train")
    rows = read_split(train_file)
    flipped = {0: 1, 13: 2}            # row index -> the wrong label written for it
    write_split(train_file, [row if i not in flipped else type(row)(row.path, flipped[i], row.sha256)
                             for i, row in enumerate(rows)])
    train(tiny_params(tmp_path, **{"prepare.label_issues": "exclude", "train.finetune.epochs": 0}))

    report = json.loads((tmp_path / "metrics" / "label_issues.json").read_text())
    suspects = {s["path"]: s for s in report["suspects"] if s["split"] == "train"}
    for i, wrong in flipped.items():
        assert suspects[rows[i].path]["given"] == f"class_{wrong}"
        assert suspects[rows[i].path]["suggested"] == f"class_{rows[i].label}"
    assert report["mode"] == "exclude" and report["n_excluded_from_training"] == len(excluded_rows(report)) >= 2
    with Image.open(tmp_path / "metrics" / "train" / "label_issues.png") as mosaic:
        assert mosaic.width > 200
