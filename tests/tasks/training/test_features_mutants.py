"""The feature cache under conditions a user's disk produces, beyond tests/tasks/training/test_features.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.tasks.test_train import one_thread, write_project  # noqa: F401
from tests.tasks.training.test_features import contexts, features

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_entry_that_cannot_be_read_or_deleted_is_skipped_with_a_warning_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder where a chunk should be (a stray copy, a mount) is neither a chunk nor deletable as one:
    its failed removal must not stop training, which reads the sound chunks."""
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = tmp_path / "features"
    first, _ = features(tmp_path, store)
    (context,) = contexts(store)
    (context / "stray.npz").mkdir()
    caplog.clear()
    again, _ = features(tmp_path, store)
    assert torch.equal(again, first)
    assert "18 of 18 images from the feature cache" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{context / 'stray.npz'}: ")
    assert (context / "stray.npz").is_dir()


def test_a_feature_cache_path_that_is_a_file_means_training_without_the_cache_and_says_why_and_for_how_long(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_project(tmp_path)
    store = tmp_path / "features"
    store.write_text("not a folder")             # cache.features_dir pointed at a file by mistake
    first, _ = features(tmp_path, store)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"Not a directory: '{store}/" in warnings[0]
    assert warnings[0].endswith(f"; training goes on without storing features in the cache {store} (this run "
                                f"computes them all, and so will the next one unless it can write there)")
    assert store.read_text() == "not a folder"
    assert torch.equal(first, features(tmp_path, tmp_path / "fresh")[0])
