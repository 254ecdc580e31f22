"""The training loop, in process: training batches honour train.hflip, training and validation batches
train.channels_last; an epoch's mean loss and progress lines; a phase's record of its epochs, and its resume.

A dataset where a mirror changes the label (text, arrows, left/right body parts) sets `hflip: false`;
with it true, about half of every augmented batch is mirrored. Each image here is dark on its left
half and bright on its right, so a crop shows whether it was mirrored, whatever its box.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from sklearn.metrics import f1_score
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.image_cache import MappedImages
from tasks.lib.preprocess import Preprocessing
from tasks.training.batches import Batch
from tasks.training.loop import (Data, Hooks, Phase, Run, cached_batch, eval_batch, fit_phase, image_batch,
                                 train_epoch)
from tasks.training.optim import Step
from tasks.training.state import Checkpointer, Progress
from tasks.training.runtime import Runtime

N, SIDE, SIZE = 64, 40, 32


def dark_left_bright_right() -> np.ndarray:
    """N uint8 NHWC images: the columns left of the middle near black, those right of it near white."""
    rng = np.random.default_rng(3)
    images = np.empty((N, SIDE, SIDE, 3), dtype=np.uint8)
    images[:, :, : SIDE // 2] = rng.integers(0, 40, (N, SIDE, SIDE // 2, 3))
    images[:, :, SIDE // 2:] = rng.integers(215, 256, (N, SIDE, SIDE // 2, 3))
    return images


def image_run(**settings: object) -> Run:
    images = MappedImages(dark_left_bright_right(), False)
    labels = torch.zeros(N, dtype=torch.long)
    data = Data(train_eval=images, train_margin=images, train_y=labels, val_x=images, val_y=labels,
                mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225]), num_classes=2)
    cfg = TrainParams(image_size=SIZE, batch_size=N, device="cpu", **settings)
    return Run(cfg, Runtime(torch.device("cpu"), None), data, nn.Identity())


def augmented_batch(**settings: object) -> torch.Tensor:
    return image_batch(image_run(**settings), torch.arange(N), torch.Generator().manual_seed(0)).x


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
def test_training_and_validation_batches_have_the_memory_layout_train_channels_last_asks_for(
        channels_last: bool) -> None:
    augmented = augmented_batch(hflip=False, min_crop_scale=0.5, channels_last=channels_last)
    evaluated = eval_batch(image_run(channels_last=channels_last), image_run().data.val_x, torch.arange(N)).x
    for x in (augmented, evaluated):
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


# --------------------------------------------------------------------------- one phase: its record of every epoch


N_TRAIN, N_VAL, CLASSES = 48, 30, 4


@dataclass
class Features:
    """Fixed features of four noisy class clusters, as a frozen backbone hands them to the head."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def features() -> Features:
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 1.5, (CLASSES, 6))
    train_y, val_y = rng.integers(0, CLASSES, N_TRAIN), rng.integers(0, CLASSES, N_VAL)
    return Features(torch.tensor(centres[train_y] + rng.normal(0, 1.5, (N_TRAIN, 6)), dtype=torch.float32),
                    torch.from_numpy(train_y),
                    torch.tensor(centres[val_y] + rng.normal(0, 1.5, (N_VAL, 6)), dtype=torch.float32),
                    torch.from_numpy(val_y))


def head_phase(f: Features, epochs: int, hooks: Hooks | None = None, ckpt: Checkpointer | None = None
               ) -> tuple[Run, Phase, nn.Linear]:
    """A linear head trained on cached features with SGD and momentum (so a resume needs the optimizer's state)."""
    torch.manual_seed(0)
    head = nn.Linear(6, CLASSES)
    images = MappedImages(np.zeros((N_TRAIN, 4, 4, 3), dtype=np.uint8), False)   # unused: cached features
    data = Data(train_eval=images, train_margin=None, train_y=f.train_y, val_x=images, val_y=f.val_y,
                mean=torch.zeros(3), std=torch.ones(3), num_classes=CLASSES)
    cfg = TrainParams(batch_size=10, device="cpu", early_stopping_patience=0, head={"epochs": epochs, "lr": 0.05},
                      label_smoothing=0.0)
    run = Run(cfg, Runtime(torch.device("cpu"), None), data, head, ckpt=ckpt, hooks=hooks or Hooks())
    phase = Phase("head", lambda batch: head(batch.x), torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9),
                  partial(cached_batch, f.train_x, f.train_y), lambda: head(f.val_x).detach(), head.train)
    return run, phase, head


def test_a_phase_records_each_epochs_validation_scores_images_and_seconds_as_an_independent_count_gives() -> None:
    """A linear head on fixed features, four epochs, no early stopping: each epoch's row holds the validation
    loss, accuracy and macro-F1 that scipy and scikit-learn compute from that epoch's logits, the best epoch is
    the first with the top macro-F1, and the images and seconds add up (metrics/train.json reports their ratio
    as the training throughput)."""
    f = features()
    seen_logits: list[np.ndarray] = []
    hooks = Hooks(on_epoch_end=lambda phase, done: seen_logits.append(head(f.val_x).detach().numpy()))
    run, phase, head = head_phase(f, epochs=4, hooks=hooks)
    fit_phase(run, phase, None)
    val_y, n_val, n, classes = f.val_y.numpy(), N_VAL, N_TRAIN, CLASSES

    prog, rows = run.progress, run.progress.history
    assert (prog.epochs_done, prog.global_epoch, prog.phase) == (4, 4, "head")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4] and {row["phase"] for row in rows} == {"head"}
    for row, logits in zip(rows, seen_logits, strict=True):
        predicted = logits.argmax(1)
        assert row["val_macro_f1"] == pytest.approx(f1_score(val_y, predicted, average="macro",
                                                             labels=range(classes), zero_division=0), abs=1e-6)
        assert row["val_accuracy"] == pytest.approx(float((predicted == val_y).mean()), abs=1e-9)
        assert row["val_loss"] == pytest.approx(float(-log_softmax(logits, axis=1)[np.arange(n_val), val_y].mean()),
                                                rel=1e-5)
        assert row["seconds"] > 0 and row["train_img_per_s"] == pytest.approx(n / row["seconds"])
    f1 = [row["val_macro_f1"] for row in rows]
    assert (prog.best_epoch, prog.best_metric, prog.best_phase) == (f1.index(max(f1)) + 1, max(f1), "head")
    assert prog.train_images == 4 * n
    assert prog.train_seconds == pytest.approx(sum(row["seconds"] for row in rows))


class Killed(Exception):
    """The process dying after an epoch's checkpoint (as a SIGKILL would, but in this process)."""


def test_a_phase_resumed_from_its_last_checkpoint_ends_with_the_weights_of_a_straight_run(tmp_path: Path) -> None:
    """Killed after epoch 2 of 4, the phase resumes from resume/last.pt (weights, optimizer momentum, schedule,
    random state, progress) and ends bit-close to a run that was never interrupted."""
    f = features()
    straight, phase, head = head_phase(f, epochs=4)
    fit_phase(straight, phase, None)

    ckpt = Checkpointer(tmp_path, "linear", [f"class {i}" for i in range(CLASSES)], Preprocessing(crop_size=4, resize_size=4),
                        {}, "fp", "data")

    def die_after_two(phase_name: str, done: int) -> None:
        if done == 2:
            raise Killed

    first, phase, _ = head_phase(f, epochs=4, hooks=Hooks(on_epoch_end=die_after_two), ckpt=ckpt)
    with pytest.raises(Killed):
        fit_phase(first, phase, None)

    state = torch.load(ckpt.resume_path, map_location="cpu", weights_only=True)
    resumed, phase, resumed_head = head_phase(f, epochs=4, ckpt=ckpt)
    resumed_head.load_state_dict(state["model"])
    resumed.progress = Progress(**state["progress"])
    fit_phase(resumed, phase, state)

    assert resumed.progress.global_epoch == 4
    assert [row["val_macro_f1"] for row in resumed.progress.history] == \
        [row["val_macro_f1"] for row in straight.progress.history]
    for mine, theirs in zip(resumed_head.parameters(), head.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
