"""The feature cache under conditions a user's disk produces, beyond tests/tasks/training/test_features.py."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from tasks.training.features import KEEP_CONTEXTS
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
    assert f"features train: 18 of 18 images from the feature cache {context}" in caplog.messages
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


def test_an_old_context_that_is_a_link_is_left_alone_and_the_cache_stays_in_use(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pruning old contexts (beyond KEEP_CONTEXTS) meets one that is a link (to features kept on another disk):
    it cannot be removed like a folder, must not be followed, and must not make the cache count as unwritable."""
    write_project(tmp_path)
    store, elsewhere = tmp_path / "features", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.npz").write_bytes(b"features on another disk")
    store.mkdir()
    (store / "0-linked").symlink_to(elsewhere, target_is_directory=True)
    for i in range(1, KEEP_CONTEXTS):
        (store / f"{i}-old").mkdir()
    for age, context in enumerate(sorted(store.iterdir(), reverse=True), start=1):   # the link oldest
        os.utime(context.resolve(), (time.time() - 3600 * age,) * 2)
    caplog.set_level(logging.INFO, logger="tasks.training")
    first, _ = features(tmp_path, store)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert (store / "0-linked").is_symlink() and (elsewhere / "kept.npz").read_bytes() == b"features on another disk"
    assert len(contexts(store)) == KEEP_CONTEXTS + 1          # the new one, the 3 newest old ones, the link
    caplog.clear()
    again, _ = features(tmp_path, store)
    assert torch.equal(again, first) and "features train: 18 of 18 images from the feature cache" in caplog.text
