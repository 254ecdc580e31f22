"""tasks.training.state: the resume checkpoint is used only when it belongs to this run, and restores exactly."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.lib.config import Params
from tasks.lib.io import write_json
from tasks.lib.preprocess import Preprocessing
from tasks.lib.split_files import SplitRow, write_split
from tasks.training.state import (
    Checkpointer,
    Progress,
    get_rng_state,
    restore,
    run_fingerprint,
    set_rng_state,
    training_data_sha256,
)

RECORD = {"arch": "resnet18", "weights": "packaged", "sha256": "ab" * 32}


@pytest.fixture
def params(tmp_path: Path) -> Params:
    prepared = tmp_path / "prepared"
    write_split(prepared / "train.csv", [SplitRow("a/1.png", 0, "1" * 64), SplitRow("b/2.png", 1, "2" * 64)])
    write_split(prepared / "val.csv", [SplitRow("a/3.png", 0, "3" * 64)])
    write_json(prepared / "classes.json", ["a", "b"])
    return Params.model_validate({"data": {"prepared_dir": str(prepared)},
                                  "train": {"out_dir": str(tmp_path / "train")}})


def checkpointer(params: Params, fingerprint: str) -> Checkpointer:
    return Checkpointer(params.train.out_dir, "resnet18", ["a", "b"], Preprocessing(8, 8), RECORD, fingerprint,
                        training_data_sha256(params.data.prepared_dir))


def test_the_fingerprint_follows_what_makes_a_resume_state_valid(params: Params) -> None:
    base = run_fingerprint(params, RECORD)
    # How a run is executed does not invalidate its state...
    for key, value in (("resume", "never"), ("timeout_minutes", 5.0), ("num_workers", 7)):
        assert run_fingerprint(params.model_copy(update={"train": params.train.model_copy(update={key: value})}),
                               RECORD) == base
    # ...what it learns from does.
    assert run_fingerprint(params.model_copy(update={"train": params.train.model_copy(update={"seed": 1})}),
                           RECORD) != base
    assert run_fingerprint(params, {**RECORD, "sha256": "cd" * 32}) != base
    write_split(params.data.prepared_dir / "val.csv", [SplitRow("a/4.png", 0, "4" * 64)])
    assert run_fingerprint(params, RECORD) != base


def test_the_training_data_hash_covers_every_file_train_reads(params: Params) -> None:
    before = training_data_sha256(params.data.prepared_dir)
    write_json(params.data.prepared_dir / "classes.json", ["a", "c"])
    assert training_data_sha256(params.data.prepared_dir) != before


def test_a_state_of_this_run_restores_progress_and_weights(params: Params) -> None:
    torch.manual_seed(0)
    model, fresh = nn.Linear(4, 2), nn.Linear(4, 2)
    progress = Progress(phase="finetune", epochs_done=2, global_epoch=5, best_metric=0.75, best_epoch=4,
                        history=[{"epoch": 5, "val_macro_f1": 0.7}])
    ckpt = checkpointer(params, "fp")
    ckpt.save_resume(model, None, None, None, progress)
    ckpt.save_best(model, ROW | {"epoch": 4})
    restored, state = restore(params.train.out_dir / "resume", "fp", fresh, enabled=True)
    assert restored == progress and state is not None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


ROW = {"epoch": 1, "phase": "head", "val_accuracy": 0.5, "val_macro_f1": 0.4}
# Two epochs done, the best was the first: a resumed run needs best.pt of epoch 1 to write model.pt.
PAST_BEST = Progress(epochs_done=2, global_epoch=2, best_metric=0.4, best_epoch=1, history=[ROW])


@pytest.mark.parametrize("case", ["other params", "older format", "finished", "torn file", "disabled", "other model",
                                  "best missing", "best of another epoch", "best of another run", "best torn"])
def test_anything_else_starts_fresh_and_leaves_the_model_alone(params: Params, case: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(4, 2)
    path = params.train.out_dir / "resume" / "last.pt"
    ckpt = checkpointer(params, "fp")
    ckpt.save_resume(nn.Linear(4, 3) if case == "other model" else model, None, None, None, PAST_BEST,
                     finished=case == "finished")
    if case != "best missing":
        checkpointer(params, "fp" if case != "best of another run" else "other").save_best(
            model, ROW | {"epoch": 2 if case == "best of another epoch" else 1})
    if case == "torn file":
        path.write_bytes(path.read_bytes()[:100])
    if case == "best torn":
        ckpt.best_path.write_bytes(ckpt.best_path.read_bytes()[:100])
    if case == "older format":
        torch.save({**torch.load(path, weights_only=True), "format": 1}, path)
    untouched = nn.Linear(4, 2)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="tasks.training"):
        progress, state = restore(path.parent, "other" if case == "other params" else "fp", untouched,
                                  enabled=case != "disabled")
    assert progress == Progress() and state is None
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())
    if case != "disabled":
        assert str(path) in caplog.text and "starting fresh" in caplog.text
    if case.startswith("best"):
        assert str(ckpt.best_path) in caplog.text


def test_a_state_saved_at_its_best_epoch_resumes_without_best_pt_and_writes_it(params: Params) -> None:
    # Stopped between the two writes of an improving epoch: last.pt is written first and holds the best weights.
    torch.manual_seed(0)
    model, fresh = nn.Linear(4, 2), nn.Linear(4, 2)
    ckpt = checkpointer(params, "fp")
    at_best = Progress(epochs_done=1, global_epoch=1, best_metric=0.4, best_epoch=1, history=[ROW])
    ckpt.save_resume(model, None, None, None, at_best)
    assert not ckpt.best_path.exists()
    progress, state = restore(params.train.out_dir / "resume", "fp", fresh, enabled=True)
    assert progress == at_best and state is not None
    ckpt.keep_best(fresh, progress)
    best = ckpt.load_best()
    assert best["epoch"] == 1 and best["fingerprint"] == "fp"
    assert all(torch.equal(best["state_dict"][k], v) for k, v in model.state_dict().items())


def test_model_pt_is_the_best_epoch_with_its_temperature_and_records_the_training_data(params: Params) -> None:
    ckpt = checkpointer(params, "fp")
    ckpt.save_best(nn.Linear(4, 2), ROW)
    assert not (params.train.out_dir / "model.pt").exists()    # only at the end: dvc repro deletes it anyway
    ckpt.save_model(ckpt.load_best(), {"temperature": 1.5})
    saved = torch.load(params.train.out_dir / "model.pt", weights_only=True)
    assert saved["data_sha256"] == training_data_sha256(params.data.prepared_dir)
    assert (saved["epoch"], saved["phase"], saved["arch"], saved["temperature"]) == (1, "head", "resnet18", 1.5)
    assert "fingerprint" not in saved


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
