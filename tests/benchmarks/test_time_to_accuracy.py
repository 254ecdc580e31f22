"""Time to accuracy: the official splits are what the benchmark claims, and a tiny run goes through every stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, run

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def test_splits_are_55k_train_5k_stratified_val_and_exactly_the_official_test_set(fashion_mnist: Path) -> None:
    from time_to_accuracy import split_indices

    from tasks.lib.demo_data import LABELS_FILE, read_idx

    splits = split_indices(fashion_mnist, subset=None)
    (train_file, train), (val_file, val), (test_file, test) = splits["train"], splits["val"], splits["test"]
    assert (train_file, val_file, test_file) == ("train", "train", "t10k")
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    assert np.array_equal(test, np.arange(10_000))                          # every t10k image, none else
    assert not set(train.tolist()) & set(val.tolist())                     # val is held out of train
    assert np.bincount(read_idx(fashion_mnist / LABELS_FILE)[val]).tolist() == [500] * 10
    small = split_indices(fashion_mnist, subset=3)
    assert [len(small[s][1]) for s in ("train", "val", "test")] == [30, 30, 30]


@pytest.mark.slow(seconds=50)
def test_a_tiny_run_goes_through_every_stage_and_reports_the_curve(tmp_path: Path, fashion_mnist: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    proc = run([sys.executable, "benchmarks/time_to_accuracy.py", "--device", "cpu", "--tiny", "--subset", "3",
                "--source", str(fashion_mnist), "--work", str(work), "--out", str(out), "--workers", "2"],
               REPO_ROOT, env={"OMP_NUM_THREADS": "1"})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "time_to_accuracy.json").read_text())
    assert report["images"] == {"train": 30, "val": 30, "test": 30} and report["n_test"] == 30
    assert not report["official_test_set"]
    assert sorted(report["stage_seconds"]) == ["decode_cache", "evaluate", "fetch_weights", "prepare", "train"]
    curve = report["curve"]
    assert [(p["epoch"], p["phase"]) for p in curve] == [(1, "head"), (2, "finetune")]
    assert 0 < curve[0]["elapsed_s"] < curve[1]["elapsed_s"] <= report["train_stage_s"]
    assert 0 <= report["test_accuracy"] <= 1 and report["params"]["arch"] == "efficientnet_lite0"
    assert report["overrides"]["model.weights"] == "packaged" and report["params"]["image_size"] == 32
    assert "val acc" in proc.stdout and not work.exists()   # the curve was printed; the work folder is gone
