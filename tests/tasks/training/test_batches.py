"""Batches made ahead: the same batches as the synchronous loop, bit for bit, made early, errors and stops handled."""

from __future__ import annotations

import threading
import time
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.image_cache import MappedImages
from tasks.training.batches import Batch, BatchProducer
from tasks.training.loop import Data, Run, epoch_order, image_batch
from tasks.training.monitor import LossMeter
from tasks.training.runtime import Runtime, gather_rows, shard

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_run(device: str = "cpu", n: int = 37, side: int = 20, size: int = 16) -> Run:
    """A Run over random uint8 images (train with a margin for crops), as tasks.train builds it."""
    rng = np.random.default_rng(0)
    dev = torch.device(device)
    pin = dev.type == "cuda"
    big = MappedImages(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), pin)
    small = MappedImages(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), pin)
    labels = torch.from_numpy(rng.integers(0, 3, n))
    data = Data(train_eval=small, train_margin=big, train_y=labels, val_x=small, val_y=labels,
                mean=torch.tensor([0.5, 0.4, 0.3], device=dev), std=torch.tensor([0.2, 0.3, 0.4], device=dev),
                num_classes=3)
    cfg = TrainParams(image_size=size, batch_size=8, device=device, channels_last=device == "cuda")
    return Run(cfg, Runtime(dev, None), data, nn.Identity())


def synchronous_and_produced(r: Run, seed: int, depth: int | None = None) -> tuple[list[Batch], list[Batch]]:
    order = epoch_order(r, "finetune", seed)
    sync_generator = torch.Generator().manual_seed(seed)
    synchronous = [image_batch(r, idx, sync_generator) for idx in order]     # what the loop did before
    make = partial(image_batch, r, generator=torch.Generator().manual_seed(seed))
    with BatchProducer(order, make, r.rt.device, depth=depth) as batches:
        produced = list(batches)
    return synchronous, produced


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b) > 1
    for one, other in zip(a, b):
        assert torch.equal(one.idx, other.idx) and torch.equal(one.y, other.y)
        assert torch.equal(one.x, other.x)   # bit for bit: same crops, same flips, same order


def test_made_ahead_batches_equal_the_synchronous_ones_bit_for_bit() -> None:
    synchronous, produced = synchronous_and_produced(make_run(), seed=5)
    assert_same_batches(synchronous, produced)
    assert produced[0].x.shape == (8, 3, 16, 16)
    _, other_seed = synchronous_and_produced(make_run(), seed=6)
    assert not torch.equal(produced[0].x, other_seed[0].x)   # the comparison can fail: crops depend on the seed


def test_batches_are_made_ahead_in_a_background_thread() -> None:
    made: list[tuple[int, str]] = []
    order = [torch.tensor([i]) for i in range(6)]

    def make(idx: torch.Tensor) -> Batch:
        made.append((int(idx), threading.current_thread().name))
        return Batch(idx)

    with BatchProducer(order, make, torch.device("cpu"), depth=2) as batches:
        first = next(iter(batches))
        deadline = time.monotonic() + 10
        while len(made) < 3 and time.monotonic() < deadline:   # batches 1 and 2 come without being asked for
            time.sleep(0.01)
        assert int(first.idx) == 0 and [i for i, _ in made[:3]] == [0, 1, 2]
        time.sleep(0.2)
        assert len(made) <= 4   # at most depth batches wait, plus the one being made
    assert {name for _, name in made} == {"batch-producer"}


def test_an_error_in_the_producer_reaches_the_training_loop_and_the_thread_ends() -> None:
    def make(idx: torch.Tensor) -> Batch:
        if int(idx) == 2:
            raise IndexError("image index out of range 0..1")
        return Batch(idx)

    producer = BatchProducer([torch.tensor([i]) for i in range(5)], make, torch.device("cpu"))
    seen = []
    with pytest.raises(IndexError, match="out of range"), producer as batches:
        for batch in batches:
            seen.append(int(batch.idx))
    assert seen == [0, 1] and producer._thread is None


def test_leaving_early_stops_the_producer() -> None:
    producer = BatchProducer([torch.tensor([i]) for i in range(1000)], Batch, torch.device("cpu"), depth=1)
    with producer as batches:
        for batch in batches:
            if int(batch.idx) == 3:
                break
        thread = producer._thread
    assert thread is not None and not thread.is_alive()


def test_loss_meter_reads_what_the_loop_summed() -> None:
    meter = LossMeter(torch.device("cpu"))
    assert meter.latest() is None
    meter.add(torch.tensor(2.0), 4)
    meter.add(torch.tensor(1.0), 2)
    meter.snapshot(1)
    reading = meter.latest()
    assert (reading.step, reading.seen) == (1, 6) and reading.mean == pytest.approx(10 / 6)
    meter.add(torch.tensor(float("nan")), 1)
    assert meter.mean() != meter.mean()   # NaN: the final check sees it


def test_shards_cover_every_row_once_and_gather_in_order() -> None:
    rows = [shard(11, Runtime(torch.device("cpu"), None, rank=r, world=3)) for r in range(3)]
    assert [real for _, real in rows] == [4, 4, 3]
    assert torch.cat([r for r, _ in rows]).tolist()[:11] == list(range(11))
    assert {len(r) for r, _ in rows} == {4}   # equal shapes for all_gather: the last rank wraps around
    one = Runtime(torch.device("cpu"), None)
    assert torch.equal(gather_rows(torch.arange(5.0), 5, one), torch.arange(5.0))


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_batches_made_on_a_side_stream_equal_the_synchronous_ones() -> None:
    r = make_run("cuda", n=300, side=40, size=32)
    synchronous, produced = synchronous_and_produced(r, seed=3)
    assert produced[0].x.is_cuda and produced[0].x.is_contiguous(memory_format=torch.channels_last)
    assert_same_batches(synchronous, produced)
    # The batches outlive the producer's stream: reading them after more work on the main stream is still exact.
    torch.cuda.synchronize()
    assert_same_batches(synchronous, produced)


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_loss_meter_reads_snapshots_without_waiting() -> None:
    meter = LossMeter(torch.device("cuda"))
    for step in range(20):
        meter.add(torch.full((), float(step), device="cuda"), 2)
        if step % 5 == 4:
            meter.snapshot(step)
    torch.cuda.synchronize()
    reading = meter.latest()
    assert reading.step == 19 and reading.mean == pytest.approx(sum(range(20)) / 20)
    assert meter.mean() == pytest.approx(9.5)
