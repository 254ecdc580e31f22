"""The training loop, in process: augmented batches honour train.hflip and train.channels_last; an epoch's mean
loss and progress lines.

A dataset where a mirror changes the label (text, arrows, left/right body parts) sets `hflip: false`;
with it true, about half of every augmented batch is mirrored. Each image here is dark on its left
half and bright on its right, so a crop shows whether it was mirrored, whatever its box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.image_cache import MappedImages
from tasks.training.batches import Batch
from tasks.training.loop import Data, Run, image_batch, train_epoch
from tasks.training.optim import Step
from tasks.training.runtime import Runtime

N, SIDE, SIZE = 64, 40, 32


def dark_left_bright_right() -> np.ndarray:
    """N uint8 NHWC images: the columns left of the middle near black, those right of it near white."""
    rng = np.random.default_rng(3)
    images = np.empty((N, SIDE, SIDE, 3), dtype=np.uint8)
    images[:, :, : SIDE // 2] = rng.integers(0, 40, (N, SIDE, SIDE // 2, 3))
    images[:, :, SIDE // 2:] = rng.integers(215, 256, (N, SIDE, SIDE // 2, 3))
    return images


def augmented_batch(**settings: object) -> torch.Tensor:
    images = MappedImages(dark_left_bright_right(), False)
    labels = torch.zeros(N, dtype=torch.long)
    data = Data(train_eval=images, train_margin=images, train_y=labels, val_x=images, val_y=labels,
                mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225]), num_classes=2)
    cfg = TrainParams(image_size=SIZE, batch_size=N, device="cpu", **settings)
    run = Run(cfg, Runtime(torch.device("cpu"), None), data, nn.Identity())
    return image_batch(run, torch.arange(N), torch.Generator().manual_seed(0)).x


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """Per image: is its left edge brighter than its right edge (only a mirror does that here)?"""
    return x[:, :, :, 0].mean(dim=(1, 2)) > x[:, :, :, -1].mean(dim=(1, 2))


@pytest.mark.parametrize("min_crop_scale", [0.5, 1.0])
def test_hflip_false_mirrors_no_image_and_true_mirrors_about_half(min_crop_scale: float) -> None:
    kept = augmented_batch(hflip=False, min_crop_scale=min_crop_scale, channels_last=False)
    assert not mirrored(kept).any()
    flipped = int(mirrored(augmented_batch(hflip=True, min_crop_scale=min_crop_scale, channels_last=False)).sum())
    assert 16 <= flipped <= 48, f"{flipped} of {N} mirrored with train.hflip: true; a fair coin gives about half"


@pytest.mark.parametrize("channels_last", [False, True])
def test_augmented_batches_have_the_memory_layout_train_channels_last_asks_for(channels_last: bool) -> None:
    x = augmented_batch(hflip=False, min_crop_scale=0.5, channels_last=channels_last)
    assert x.shape == (N, 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert x.is_contiguous() != channels_last


# --------------------------------------------------------------------------- one epoch: the mean loss and its progress


def test_an_epoch_returns_the_sample_weighted_mean_loss_a_plain_torch_loop_gets_and_logs_its_progress(
        capsys: pytest.CaptureFixture[str]) -> None:
    """25 batches (the last one short) with a learning rate the scheduler halves every step; the epoch's loss is
    the mean over images of each step's loss before its update, as a plain torch loop computes it."""
    sizes = [8] * 24 + [5]
    gen = torch.Generator().manual_seed(0)
    batches = [Batch(torch.arange(n), torch.randint(0, 3, (n,), generator=gen), torch.randn(n, 4, generator=gen))
               for n in sizes]
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(net.state_dict())

    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    halving = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda steps: 0.5 ** steps)
    step = Step(lambda batch: net(batch.x), nn.CrossEntropyLoss(), optimizer, halving,
                torch.amp.GradScaler("cpu", enabled=False))
    mean = train_epoch(step, batches, Runtime(torch.device("cpu"), None), "head", 2)

    total = 0.0
    for i, batch in enumerate(batches):
        loss = nn.functional.cross_entropy(reference(batch.x), batch.y)
        total += float(loss.detach()) * len(batch.y)
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.5 * 0.5 ** i * p.grad
    assert mean == pytest.approx(total / sum(sizes), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.parameters(), reference.parameters()))

    # In a log, a line per quarter of the epoch, named by phase and 1-based epoch, the last with the mean loss.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("head ")]
    assert [line.split(" batch,")[0] for line in lines] == \
        ["head 3: 7/25 (28%)", "head 3: 13/25 (52%)", "head 3: 19/25 (76%)", "head 3: 25/25 (100%)"]
    assert f"loss={total / sum(sizes):.4f}" in lines[-1]
