"""The epoch loop both training phases share, as plain functions over a `Step` (as torchvision's references).

`train_epoch` runs one pass over the batches, `validate` scores the validation logits, and `fit_phase`
repeats the two per epoch, keeps the best epoch, checkpoints and stops early. A step never waits for the
host (tasks.training.batches, monitor, cuda_graph); under DDP, inference is shared over the ranks (`predict`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score

from tasks.lib.augment import device_batch
from tasks.lib.config import TrainParams
from tasks.lib.data import batch_order, to_device
from tasks.lib.errors import StageError
from tasks.lib.image_cache import MappedImages
from tasks.lib.progress import progress
from tasks.training.batches import Batch, BatchProducer
from tasks.training.cuda_graph import CudaGraphStep
from tasks.training.monitor import LossMeter
from tasks.training.optim import Step, make_loss, make_step, plain_step
from tasks.training.plots import write_curves
from tasks.training.runtime import Runtime, gather_rows, shard
from tasks.training.state import Checkpointer, Progress, set_rng_state

log = logging.getLogger(__name__)

EVAL_BATCH = 256          # inference batches (features, validation): no gradients, so larger is fine
LOG_EVERY = 10            # steps between loss checks / progress updates (each check syncs the GPU)

LossHook = Callable[[torch.Tensor, str, int, int], torch.Tensor]   # (loss, phase, epoch, step) -> loss


class NonFiniteLoss(StageError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class Hooks:
    """Callbacks for tests and benchmarks: change a loss, or act after an epoch's checkpoint."""

    on_loss: LossHook | None = None
    on_epoch_end: Callable[[str, int], None] | None = None    # (phase, epochs done in it)


@dataclass
class Data:
    """Decoded uint8 NHWC images (memory-mapped, batches come out as tensors), plus the normalisation constants."""

    train_eval: MappedImages             # train images at the eval crop (cached features, no augmentation)
    train_margin: MappedImages | None    # train images with a margin for random crops (None: no phase augments)
    train_y: torch.Tensor
    val_x: MappedImages
    val_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int
    train_rows: torch.Tensor | None = None     # the rows that train (prepare.label_issues: exclude); None: all

    def training_labels(self) -> torch.Tensor:
        return self.train_y if self.train_rows is None else self.train_y[self.train_rows]


@dataclass
class Run:
    """What every phase of one training run shares. fit_phase updates `progress`; the rest is read."""

    cfg: TrainParams
    rt: Runtime
    data: Data
    model: nn.Module
    progress: Progress = field(default_factory=Progress)
    ckpt: Checkpointer | None = None      # None: nothing is saved (benchmarks, tests)
    curves_dir: Path | None = None        # per-epoch TSVs (tasks.training.plots), main process only
    hooks: Hooks = field(default_factory=Hooks)
    pretrained: bool = True               # BatchNorm statistics worth keeping (tasks.training.freezing)
    features_dir: Path | None = None      # cache.features_dir (tasks.training.features); None: not stored
    loss: nn.Module = field(init=False)   # from cfg and the train labels (class weights)

    def __post_init__(self) -> None:
        self.loss = make_loss(self.cfg, self.data.training_labels(), self.data.num_classes, self.rt.device)


@dataclass
class Phase:
    """What one phase trains and how fit_phase validates it."""

    name: str                                          # "head" or "finetune": train.<name> holds its settings
    model: Callable[[Batch], torch.Tensor]             # a training batch's logits
    optimizer: torch.optim.Optimizer
    make_batch: Callable[[torch.Tensor, torch.Generator | None], Batch]   # step's indices -> its batch
    val_logits: Callable[[], torch.Tensor]
    train_mode: Callable[[], None]                     # set before every epoch
    graph: CudaGraphStep | None = None                 # replays the step on CUDA (cuda_graph.graph_for)


# --------------------------------------------------------------------------- batches


def epoch_order(run: Run, phase: str, seed: int) -> list[torch.Tensor]:
    """This rank's batches of indices into the train split for one epoch."""
    # Train mode BatchNorm cannot take a batch of one; phase 1 runs in eval mode.
    order = batch_order(len(run.data.training_labels()), run.cfg.batch_size, shuffle=True, seed=seed,
                        rank=run.rt.rank, world=run.rt.world, drop_last=phase == "finetune")
    rows = run.data.train_rows
    return order if rows is None else [rows[idx] for idx in order]


def image_batch(run: Run, idx: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
    """One training step's labels and images on the device: random crops from the margin arrays when a
    generator is given, else the eval crop. Runs in the batch producer's thread, in step order."""
    cfg, data, device = run.cfg, run.data, run.rt.device
    y = to_device(data.train_y[idx], device)
    source = data.train_margin if generator is not None else data.train_eval
    x = device_batch(to_device(source[idx], device), data.mean, data.std, cfg.image_size, generator,
                     cfg.channels_last, cfg.min_crop_scale, cfg.hflip)
    return Batch(idx, y, x)


def cached_batch(inputs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                 generator: torch.Generator | None = None) -> Batch:
    """One step's rows of the inputs cached on the device and their labels (never augmented: no `generator`)."""
    rows = to_device(idx, inputs.device)
    return Batch(idx, labels[rows], inputs[rows])


def amp_logits(module: nn.Module, rt: Runtime, batch: Batch) -> torch.Tensor:
    """The network on images, under the run's autocast."""
    with rt.autocast():
        return module(batch.x).float()


def fp32_logits(module: nn.Module, batch: Batch) -> torch.Tensor:
    """A module on cached float32 inputs (features, activations)."""
    return module(batch.x)


# --------------------------------------------------------------------------- one epoch


def train_epoch(step: Step, batches: Sequence[Batch], rt: Runtime, phase: str, epoch: int,
                on_loss: LossHook | None = None, graph: CudaGraphStep | None = None) -> float:
    """One pass over this rank's batches; returns the mean loss. The loss is checked every LOG_EVERY steps
    without waiting for the GPU (tasks.training.monitor); a CUDA graph runs the steps it can, unless a loss hook."""
    graph = graph if on_loss is None else None
    meter = graph.meter() if graph is not None else LossMeter(rt.device)
    bar = progress(None, f"{phase} {epoch + 1}", total=len(batches), unit="batch", show=rt.main)
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        if graph is None or not graph.run(step, batch, meter):
            plain_step(step, batch, meter, None if on_loss is None else lambda loss: on_loss(loss, phase, epoch, i))
        step.scheduler.step()
        if (i + 1) % LOG_EVERY == 0 or i + 1 == len(batches):
            meter.snapshot(i)
            reading = meter.latest()
            if reading is not None:
                finite(reading.mean, phase, epoch, reading.step)
                bar.set_postfix(loss=f"{reading.mean:.4f}",
                                img_s=f"{reading.seen * rt.world / (time.perf_counter() - started):.0f}")
        bar.update(1)
    bar.close()
    return finite(meter.mean(), phase, epoch, len(batches) - 1)


def finite(mean_loss: torch.Tensor | float, phase: str, epoch: int, step: int) -> float:
    """Stop the run on a NaN/inf loss, before anything of this epoch is saved."""
    value = float(mean_loss)
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"the training loss became {value} in phase {phase}, epoch {epoch + 1}, by step {step + 1}; "
            f"stopped without saving this epoch (the last good checkpoint, resume/last.pt in train.out_dir, is "
            f"kept). Lower train.{phase}.lr, or use train.precision: fp32 or bf16 instead of fp16")
    return value


def validate(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on the validation split (macro-F1 as tasks.lib.metrics computes it)."""
    y = y.to(logits.device)
    pred = logits.argmax(1)
    return {"val_loss": float(nn.functional.cross_entropy(logits.float(), y)),
            "val_accuracy": float((pred == y).double().mean()),
            "val_macro_f1": float(multiclass_f1_score(pred, y, num_classes=logits.shape[1], average="macro"))}


# --------------------------------------------------------------------------- one phase


def fit_phase(run: Run, phase: Phase, resume_state: dict[str, Any] | None) -> None:
    """One phase's epochs: train, validate, keep the best, stop early; continues resume_state if it is this phase's."""
    prog, settings = run.progress, getattr(run.cfg, phase.name)
    step = phase_step(run, phase)
    if resume_state is not None and resume_state["progress"]["phase"] == phase.name:
        step.optimizer.load_state_dict(resume_state["optimizer"])
        step.scheduler.load_state_dict(resume_state["scheduler"])
        step.scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
    prog.phase = phase.name
    n_train = len(run.data.training_labels())
    while prog.epochs_done < settings.epochs and not prog.phase_stopped:
        started = time.perf_counter()
        loss = run_epoch(run, phase, step)
        seconds = time.perf_counter() - started
        val = validate(phase.val_logits(), run.data.val_y)
        prog.epochs_done += 1
        prog.global_epoch += 1
        prog.train_images += n_train
        prog.train_seconds += seconds
        row = {"epoch": prog.global_epoch, "phase": phase.name, "train_loss": loss, "seconds": seconds,
               "train_img_per_s": n_train / seconds, **val, "lr": step.optimizer.param_groups[0]["lr"]}
        prog.history.append(row)
        after_epoch(run, step, row)


def phase_step(run: Run, phase: Phase) -> Step:
    """The phase's Step: warmup + cosine over all its epochs, loss scaling for fp16."""
    settings, rt = getattr(run.cfg, phase.name), run.rt
    per_epoch = len(epoch_order(run, phase.name, 0))
    warmup = round(getattr(settings, "warmup_epochs", 0.0) * per_epoch)
    return make_step(phase.model, run.loss, phase.optimizer, warmup, settings.epochs * per_epoch,
                     fp16=rt.amp_dtype == torch.float16)


def run_epoch(run: Run, phase: Phase, step: Step) -> float:
    """One training epoch of the phase (its batch order and random crops follow the run's global epoch, so a
    resumed run draws what the straight run drew); returns the mean loss."""
    cfg, rt, prog = run.cfg, run.rt, run.progress
    phase.train_mode()
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + prog.global_epoch * 101 + rt.rank) \
        if getattr(cfg, phase.name).augment else None
    order = epoch_order(run, phase.name, cfg.seed * 7919 + prog.global_epoch)
    with BatchProducer(order, partial(phase.make_batch, generator=generator), rt.device) as batches:
        return train_epoch(step, batches, rt, phase.name, prog.epochs_done, run.hooks.on_loss, phase.graph)


def after_epoch(run: Run, step: Step, row: dict[str, Any]) -> None:
    """Best model, early stopping, resume checkpoint and curves for the epoch just done."""
    prog, patience, phase = run.progress, run.cfg.early_stopping_patience, row["phase"]
    metric = agreed(row["val_macro_f1"], run.rt)
    improved = metric > prog.best_metric
    if improved:
        prog.best_metric, prog.best_epoch, prog.best_phase, prog.bad_epochs = metric, row["epoch"], phase, 0
    else:
        prog.bad_epochs += 1
        if patience and prog.bad_epochs >= patience:
            log.info("early stopping in phase %s: no better val macro-F1 for %d epochs", phase, patience)
            prog.phase_stopped = True
    if run.rt.main and run.ckpt is not None:
        # last.pt first: stopped between the two, last.pt holds the new best weights itself (state.restore).
        run.ckpt.save_resume(run.model, step.optimizer, step.scheduler, step.scaler, prog)
        if improved:
            run.ckpt.save_best(run.model, row)
    if run.rt.main and run.curves_dir is not None:
        write_curves(run.curves_dir, prog.history)
    log.info("epoch %d (%s): train loss %.4f, val loss %.4f, val acc %.4f, val macro-F1 %.4f", row["epoch"],
             phase, row["train_loss"], row["val_loss"], row["val_accuracy"], row["val_macro_f1"])
    if run.hooks.on_epoch_end is not None:
        run.hooks.on_epoch_end(phase, prog.epochs_done)


def agreed(value: float, rt: Runtime) -> float:
    """Rank 0's value on every rank, so early stopping and best-epoch choices never diverge."""
    if rt.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


# --------------------------------------------------------------------------- inference


def eval_batch(run: Run, images: MappedImages, idx: torch.Tensor) -> Batch:
    x = device_batch(to_device(images[idx], run.rt.device), run.data.mean, run.data.std, run.cfg.image_size, None,
                     run.cfg.channels_last)
    return Batch(idx, None, x)


@torch.no_grad()
def predict(run: Run, module: nn.Module, images: MappedImages, desc: str | None = None) -> torch.Tensor:
    """Outputs of `module` in eval mode for uint8 images (fit_phase resets the mode); under DDP each rank
    runs its share and every rank gets all outputs back (tasks.training.runtime.shard / gather_rows)."""
    rt = run.rt
    module.eval()
    rows, real = shard(len(images), rt)
    if rt.world > 1 and desc:
        log.info("%s: rank %d of %d computes %d of %d images", desc, rt.rank, rt.world, real, len(images))
    chunks = []
    order = torch.split(rows, EVAL_BATCH)
    with BatchProducer(order, partial(eval_batch, run, images), rt.device) as batches:
        for batch in progress(batches, desc or "predictions", total=len(order), unit="batch",
                              show=rt.main and desc is not None):
            with rt.autocast():
                chunks.append(module(batch.x).float())
    return gather_rows(torch.cat(chunks), len(images), rt)


@torch.no_grad()
def predict_cached(module: nn.Module, inputs: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """`predict` for inputs already on the device (cached activations)."""
    module.eval()
    rows, _ = shard(len(inputs), rt)
    chunks = [module(inputs[idx.to(inputs.device)]) for idx in torch.split(rows, EVAL_BATCH)]
    return gather_rows(torch.cat(chunks).float(), len(inputs), rt)
