"""`make quality ARGS='--flip-labels 0.05'`: the flipped labels and how many the label-issue check found."""

from __future__ import annotations

from pathlib import Path

from benchmarks.quality import FLIP_SEED, flip_labels, found_flips
from tasks.lib.config import Params
from tasks.lib.io import write_json
from tasks.lib.split_files import SplitRow, read_split, write_split


def test_flipped_labels_change_class_and_are_counted_when_found(tmp_path: Path) -> None:
    train_file = tmp_path / "train.csv"
    rows = [SplitRow(f"c{i % 3}/{i}.png", i % 3, f"{i:064x}") for i in range(100)]
    write_split(train_file, rows)
    flipped = flip_labels(train_file, 0.05, 3)
    after = {r.path: r.label for r in read_split(train_file)}
    assert len(flipped) == 5 and FLIP_SEED is not None
    assert all(after[r.path] != r.label for r in rows if r.path in flipped)      # another class, always
    assert all(after[r.path] == r.label for r in rows if r.path not in flipped)
    assert flip_labels(write_split(train_file, rows) or train_file, 0.05, 3) == flipped   # seeded

    found, missed = sorted(flipped)[:4], sorted(flipped)[4]
    suspects = [{"split": "train", "path": p, "score": 0.9} for p in found[:3]] + \
               [{"split": "train", "path": "c0/0.png", "score": 0.8}, {"split": "val", "path": missed, "score": 0.7},
                {"split": "train", "path": found[3], "score": 0.6}]
    write_json(tmp_path / "label_issues.json", {"mode": "exclude", "n_excluded_from_training": 4,
                                                "suspects": suspects})
    result = found_flips(Params.model_validate({"reports": {"dir": str(tmp_path)}}), flipped, 0.05)
    # top 5 of the train suspects: 3 flipped, 1 not, then 1 flipped; the val suspect is not a training label
    assert result["precision_at_k"] == 0.8 and result["flagged"] == 5
    assert result["precision_flagged"] == 0.8 and result["recall_flagged"] == 0.8 and result["excluded"] == 4
