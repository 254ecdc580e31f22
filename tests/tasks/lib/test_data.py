"""The training data path: decode once into arrays, batch orders, eval dataset unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.lib.data import (
    EvalDataset,
    batch_order,
    decode_arrays,
    labels_of,
    read_classes,
    read_rows,
    to_device,
    train_preprocessing,
)
from tasks.lib.images import BadImage, load_rgb
from tasks.lib.io import SplitRow, sha256_file, write_json, write_split
from tasks.lib.preprocess import Preprocessing, preprocess, resize_and_crop
from tests.conftest import write_image_folder


@pytest.fixture
def rows(tmp_path: Path) -> tuple[Path, list[SplitRow]]:
    raw = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=30)
    found = sorted(raw.rglob("*.png"))
    return raw, [SplitRow(str(p.relative_to(raw)), int(p.parent.name[-1]), sha256_file(p)) for p in found]


def test_decoded_arrays_equal_the_eval_preprocessing(rows: tuple[Path, list[SplitRow]]) -> None:
    raw, split = rows
    prep = Preprocessing(crop_size=24, resize_size=26)
    big = train_preprocessing(prep)
    eval_array, big_array = decode_arrays(split, raw, [prep, big], workers=2)
    assert eval_array.shape == (6, 24, 24, 3) and eval_array.dtype == np.uint8
    assert big_array.shape == (6, big.crop_size, big.crop_size, 3) and big.crop_size == round(24 * 1.15)
    for i, row in enumerate(split):
        img = load_rgb(raw / row.path)
        np.testing.assert_array_equal(eval_array[i], np.asarray(resize_and_crop(img, prep)))
        np.testing.assert_array_equal(big_array[i], np.asarray(resize_and_crop(img, big)))
    assert labels_of(split).tolist() == [r.label for r in split]


def test_a_file_broken_after_prepare_is_named(rows: tuple[Path, list[SplitRow]]) -> None:
    raw, split = rows
    (raw / split[2].path).write_bytes(b"not a png")
    with pytest.raises(BadImage, match=split[2].path.replace("/", ".")):
        decode_arrays(split, raw, [Preprocessing(crop_size=8, resize_size=8)])


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
    assert read_rows(prepared, "val") == split
    prep = Preprocessing(crop_size=16, resize_size=18)
    x, y = EvalDataset(split, raw, prep)[0]
    np.testing.assert_array_equal(x.numpy(), preprocess(load_rgb(raw / split[0].path), prep))
    assert y == split[0].label
