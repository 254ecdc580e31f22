"""The training data path: the decoded arrays, batch orders, eval dataset unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.decode_cache import build_cache
from tasks.lib.data import EvalDataset, batch_order, to_device
from tasks.lib.image_cache import AUGMENT, EVAL, open_split
from tasks.lib.images import load_rgb
from tasks.lib.io import sha256_file, write_json
from tasks.lib.preprocess import train_preprocessing
from tasks.lib.preprocess import Preprocessing, preprocess
from tasks.lib.split_files import labels_of, read_classes, read_split, split_path
from tasks.lib.split_files import SplitRow, write_split
from tests.conftest import write_image_folder
from tests.realistic import CLASS_NAMES, oracle_input, oracle_resize_crop, oracle_rgb, write_realistic_folder


@pytest.fixture
def rows(tmp_path: Path) -> tuple[Path, list[SplitRow]]:
    raw = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=30)
    found = sorted(raw.rglob("*.png"))
    return raw, [SplitRow(str(p.relative_to(raw)), int(p.parent.name[-1]), sha256_file(p)) for p in found]


def test_batch_order_is_seeded_and_ranks_split_the_data_evenly() -> None:
    one = torch.cat(batch_order(10, 4, shuffle=True, seed=1))
    assert sorted(one.tolist()) == list(range(10))
    assert torch.equal(one, torch.cat(batch_order(10, 4, shuffle=True, seed=1)))
    assert not torch.equal(one, torch.cat(batch_order(10, 4, shuffle=True, seed=2)))
    ranks = [torch.cat(batch_order(11, 3, shuffle=True, seed=0, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6          # padded to the same length, as DistributedSampler does
    assert set(ranks[0].tolist()) | set(ranks[1].tolist()) == set(range(11))
    assert [len(b) for b in batch_order(10, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_to_device_on_cpu_keeps_values() -> None:
    batch = torch.arange(6, dtype=torch.uint8)
    assert torch.equal(to_device(batch, torch.device("cpu")), batch)


def test_eval_dataset_and_readers_still_work(tmp_path: Path, rows: tuple[Path, list[SplitRow]]) -> None:
    raw, split = rows
    prepared = tmp_path / "prepared"
    write_split(prepared / "val.csv", split)
    write_json(prepared / "classes.json", ["class_0", "class_1"])
    assert read_classes(prepared) == ["class_0", "class_1"]
    assert read_split(split_path(prepared, "val")) == split
    assert labels_of(split).tolist() == [r.label for r in split]
    prep = Preprocessing(crop_size=16, resize_size=18)
    x, y = EvalDataset(split, raw, prep)[0]
    np.testing.assert_array_equal(x.numpy(), preprocess(load_rgb(raw / split[0].path), prep))
    assert y == split[0].label


# --------------------------------------------------------------------------- realistic folders


def realistic_rows(raw: Path) -> tuple[list[SplitRow], set[str]]:
    """Split rows of a realistic folder, and which of its files are half-transparent."""
    written = write_realistic_folder(raw, per_class=6)
    rows = [SplitRow(w.path, CLASS_NAMES.index(w.label_name), sha256_file(raw / w.path)) for w in written]
    return rows, {w.path for w in written if w.kind.mode == "RGBA"}


def test_training_arrays_are_the_centre_of_each_image_at_its_own_aspect(tmp_path: Path) -> None:
    """The arrays train learns from (the eval crop, and the larger square random crops come from) hold
    what the preprocessing promises for non-square JPEGs, grayscale and half-transparent PNGs: shorter
    side resized, aspect kept, the central square; row i is split row i."""
    raw = tmp_path / "raw"
    rows, transparent = realistic_rows(raw)
    prep = Preprocessing(crop_size=24, resize_size=24)
    big = train_preprocessing(prep)
    assert (big.crop_size, big.resize_size) == (28, 28)
    write_split(tmp_path / "prepared" / "train.csv", rows)
    build_cache(tmp_path / "prepared", raw, tmp_path / "decoded", {EVAL: prep, AUGMENT: big}, splits=["train"],
                workers=1)
    eval_array, big_array = (open_split(tmp_path / "decoded", "train", variant)[0] for variant in (EVAL, AUGMENT))
    for i, row in enumerate(rows):
        rgb = oracle_rgb(raw / row.path)
        tolerance = 1 if row.path in transparent else 0    # alpha onto white: integer vs float rounding
        for got, p in ((eval_array[i], prep), (big_array[i], big)):
            want = oracle_resize_crop(rgb, p.crop_size, p.resize_size)
            assert np.abs(got.astype(np.int16) - want).max() <= tolerance, f"{row.path} at {p.crop_size} px"


def test_evaluation_inputs_are_normalised_with_the_recorded_mean_and_std(tmp_path: Path) -> None:
    """EvalDataset (evaluate's input) on realistic files equals the oracle's input: resized, cropped,
    scaled to [0, 1], minus the mean and over the std the preprocessing records (not ImageNet's)."""
    raw = tmp_path / "raw"
    rows, transparent = realistic_rows(raw)
    prep = Preprocessing(crop_size=16, resize_size=24, mean=(0.45, 0.5, 0.4), std=(0.2, 0.25, 0.3))
    dataset = EvalDataset(rows, raw, prep)
    one_level = 1 / 255 / min(prep.std)          # what a gray level of alpha rounding moves an input by
    for i, row in enumerate(rows):
        x, y = dataset[i]
        want = oracle_input(raw / row.path, prep.to_dict())
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == row.label
        assert np.abs(x.numpy() - want).max() <= one_level + 1e-5, row.path
        if row.path not in transparent:
            np.testing.assert_allclose(x.numpy(), want, atol=1e-5, err_msg=row.path)
