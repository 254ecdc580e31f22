"""Backbone features kept across runs: reused for unchanged images, never across weights or preprocessing."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from tasks.lib.io import sha256_file
from tasks.lib.models import build_model, feature_extractor
from tasks.lib.split_files import SplitRow, read_classes, read_split, write_split
from tasks.lib.weights import load_backbone_state
from tasks.train import load_data, preprocessing_for
from tasks.training.features import MAX_CHUNKS
from tasks.training.loop import Run
from tasks.training.phases import features as computed_features
from tasks.training.runtime import Runtime
from tests.conftest import write_image_folder
from tests.tasks.lib.test_io_errors import full_disk  # noqa: F401
from tests.tasks.test_train import one_thread, tiny_params, write_project, write_weights  # noqa: F401

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None)


def features(root: Path, features_dir: Path, **overrides: object) -> tuple[torch.Tensor, list[str]]:
    """What the head phase computes for the train split, through the real loader and phases.features."""
    params = tiny_params(root, **{"cache.features_dir": str(features_dir), **overrides})
    state, record = load_backbone_state(params.model.out_dir)
    prep = preprocessing_for(params.model.arch, params.train.image_size, record)
    classes = read_classes(params.data.prepared_dir)
    data = load_data(params, prep, CPU, len(classes))
    model = build_model(params.model.arch, len(classes), state).eval()
    run = Run(params.train, CPU, data, model, features_dir=params.cache.features_dir)
    return computed_features(run, feature_extractor(model), data.train_eval, "features train"), data.train_eval.keys


def add_images(root: Path, n: int, seed: int) -> None:
    """n new images appended to the train split."""
    extra = write_image_folder(root / "extra", classes=1, per_class=n, size=36, seed=seed)
    prepared = root / "data" / "prepared" / "train.csv"
    rows = read_split(prepared)
    for path in sorted(extra.rglob("*.png")):
        target = root / "data" / "raw" / "class_0" / f"new_{seed}_{path.name}"
        shutil.copy(path, target)
        rows.append(SplitRow(str(target.relative_to(root / "data" / "raw")), 0, sha256_file(target)))
    write_split(prepared, rows)


def test_features_are_reused_for_unchanged_images_and_equal_recomputed_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = tmp_path / "features"
    first, keys = features(tmp_path, store)
    assert "0 of 18 images from the feature cache" in caplog.text
    again, _ = features(tmp_path, store)
    assert "18 of 18 images from the feature cache" in caplog.text
    assert torch.equal(again, first)                     # stored rows come back bit for bit

    add_images(tmp_path, 3, seed=5)
    caplog.clear()
    incremental, new_keys = features(tmp_path, store)
    assert "18 of 21 images from the feature cache" in caplog.text
    scratch, _ = features(tmp_path, tmp_path / "fresh")
    assert new_keys[:18] == keys and incremental.shape == scratch.shape == (21, first.shape[1])
    # A batch of 3 rounds differently from a batch of 21 in float32 (as the no-cache test in test_train notes):
    # measured 2.3e-4 and 3.0e-4 at a largest feature of 30, i.e. up to 1e-5 of the scale; a wrong image's
    # features would be off by the scale itself.
    assert (incremental - scratch).abs().max() <= 1e-4 * scratch.abs().max()
    assert torch.equal(incremental[:18], first)


def test_other_weights_or_preprocessing_never_reuse_features(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = tmp_path / "features"
    features(tmp_path, store)
    for change in ({"train.image_size": 40}, {"cache.margin": 1.15, "train.channels_last": True}):
        caplog.clear()
        features(tmp_path, store, **change)
        assert "0 of 18 images from the feature cache" in caplog.text, change
    write_weights(tmp_path / "artifacts" / "weights", "mobilenet_v3_small", seed=1)
    caplog.clear()
    features(tmp_path, store)
    assert "0 of 18 images from the feature cache" in caplog.text


def test_chunks_are_merged_and_torn_writes_are_never_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = tmp_path / "features"
    features(tmp_path, store)
    for seed in range(MAX_CHUNKS):
        add_images(tmp_path, 1, seed=10 + seed)
        features(tmp_path, store)
    (context,) = [p for p in store.iterdir() if p.is_dir()]
    assert len(list(context.glob("*.npz"))) == 1                        # merged
    (context / ".deadbeef.tmp").write_bytes(b"half a chunk")           # what a crash leaves: never read
    (context / "garbage.npz").write_bytes(b"not a zip")                # unreadable chunk: skipped
    caplog.clear()
    features(tmp_path, store)
    assert f"{18 + MAX_CHUNKS} of {18 + MAX_CHUNKS} images from the feature cache" in caplog.text


def contexts(store: Path) -> set[Path]:
    return {p for p in store.iterdir() if p.is_dir()}


@pytest.mark.parametrize("damage", ["flipped", "truncated", "swapped"])
def test_a_damaged_chunk_is_dropped_with_a_warning_and_its_features_computed_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = tmp_path / "features"
    first, _ = features(tmp_path, store)
    (context,) = contexts(store)
    (chunk,) = context.glob("*.npz")
    sound = (chunk.name, chunk.read_bytes())
    if damage == "flipped":                        # in place, as bit rot or a stray write
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x5A
        chunk.write_bytes(bytes(data))
    elif damage == "truncated":
        os.truncate(chunk, chunk.stat().st_size - 100)
    else:                                          # the same images' features for another image size
        features(tmp_path, store, **{"train.image_size": 40})
        (other,) = contexts(store) - {context}
        (foreign,) = other.glob("*.npz")
        os.replace(foreign, context / foreign.name)
        os.replace(chunk, other / chunk.name)
        chunk = context / foreign.name
    caplog.clear()
    again, _ = features(tmp_path, store)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "tasks.training.features"]
    assert warnings == [f"{chunk}: its bytes do not match its checksum (the file name); dropped from the feature "
                        f"cache, its images' features are computed again"]
    assert "0 of 18 images from the feature cache" in caplog.text
    assert torch.equal(again, first)
    assert [(p.name, p.read_bytes()) for p in context.glob("*.npz")] == [sound]       # stored again, the same


def test_a_full_disk_under_the_feature_cache_means_training_without_it_after_one_warning(
        tmp_path: Path, full_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.training")
    write_project(tmp_path)
    store = full_disk / "features"
    first, _ = features(tmp_path, store)
    again, _ = features(tmp_path, store)             # the val set of the same run, say
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "tasks.training.features"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{store}/") and "the disk is full" in warnings[0]
    assert f"training goes on without storing features in the cache {store}" in warnings[0]
    assert not [p for p in store.rglob("*") if p.is_file()]       # no chunk, no temporary file left
    fresh, _ = features(tmp_path, tmp_path / "fresh")
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
