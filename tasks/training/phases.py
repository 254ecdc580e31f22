"""The epoch loop of both training phases: train, validate, keep the best, stop early.

`PhaseRunner.run_head` trains only the new head with the backbone frozen (on
cached backbone features when nothing augments); `run_finetune` unfreezes per
`train.finetune.unfreeze` with discriminative learning rates. Both go through
`loop`, which validates on the val split every epoch, writes the best model and
the resume checkpoint, logs the curves and stops early on no improvement.

Steps never wait for the host: batches are made ahead in a background thread
(`tasks.training.batches`), the loss is checked from copies already on the
host (`tasks.training.monitor`), and the head on cached features runs from the
device (`tasks.training.resident`). Under DDP, feature extraction and
validation are shared out over the ranks and gathered (`predict`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score
from tqdm import tqdm

from tasks.lib.augment import device_batch
from tasks.lib.cli import LogProgress, StageError
from tasks.lib.config import TrainParams
from tasks.lib.data import batch_order, to_device
from tasks.lib.image_cache import MappedImages
from tasks.lib.models import feature_extractor, head_module
from tasks.training.batches import Batch, BatchProducer
from tasks.training.features import cached_features
from tasks.training.freezing import set_train_mode, set_trainable, split_frozen_prefix
from tasks.training.monitor import LossMeter
from tasks.training.optim import make_loss, make_optimizer, maybe_compile, warmup_cosine
from tasks.training.plots import Plots
from tasks.training.resident import ResidentHead, graph_safe
from tasks.training.runtime import Runtime, gather_rows, shard, wrap_ddp
from tasks.training.state import Checkpointer, Progress, set_rng_state

log = logging.getLogger("train")

EVAL_BATCH = 256          # inference batches (features, validation): no gradients, so larger is fine
LOG_EVERY = 10            # steps between loss checks / progress updates (each check syncs the GPU)


class NonFiniteLoss(StageError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class Hooks:
    """Callbacks for tests and benchmarks: change a loss, or act after an epoch's checkpoint."""

    on_loss: Callable[[torch.Tensor, str, int, int], torch.Tensor] | None = None   # (loss, phase, epoch, step)
    on_epoch_end: Callable[[str, int], None] | None = None                          # (phase, epoch)


@dataclass
class Data:
    """Decoded uint8 NHWC images (memory-mapped, batches come out as tensors), plus the normalisation constants."""

    train_eval: MappedImages             # train images at the eval crop (cached features, no augmentation)
    train_big: MappedImages | None       # train images with a margin, for random crops (None: no phase augments)
    train_y: torch.Tensor
    val_x: MappedImages
    val_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int


@dataclass
class Record:
    """Where each epoch's outcome goes: progress (resume state), checkpoints and plots (main process only)."""

    progress: Progress
    ckpt: Checkpointer | None
    live: Plots | None


class PhaseRunner:
    """Runs phase 1 and phase 2 over the same epoch loop: train, validate, checkpoint, early-stop."""

    def __init__(self, cfg: TrainParams, rt: Runtime, data: Data, model: nn.Module, record: Record,
                 hooks: Hooks | None = None, pretrained: bool = True) -> None:
        self.cfg, self.rt, self.data, self.model = cfg, rt, data, model
        self.loss_fn = make_loss(cfg, data.train_y, data.num_classes, rt.device)
        self.progress, self.ckpt, self.live = record.progress, record.ckpt, record.live
        self.hooks, self.pretrained = hooks or Hooks(), pretrained
        self.sharding_logged: set[str] = set()

    # ---- phase 1
    def run_head(self, resume_state: dict[str, Any] | None, cache_features: bool | None) -> None:
        """Backbone frozen and in eval mode; only the head's parameters train."""
        cfg, model = self.cfg, self.model
        if cfg.head.epochs == 0:
            return
        set_trainable(model, "none")
        head = head_module(model)
        model.eval()    # BatchNorm statistics and dropout stay as pretrained
        linear_head = isinstance(head, nn.Linear)
        cache = linear_head and not cfg.head.augment if cache_features is None else cache_features and linear_head
        extractor = maybe_compile(feature_extractor(model).eval(), cfg) if linear_head else None
        train_feats = val_feats = None
        if cache and not (self.progress.phase_stopped or self.progress.epochs_done >= cfg.head.epochs):
            train_feats = self.features(extractor, self.data.train_eval, "features train")
            val_feats = self.features(extractor, self.data.val_x, "features val")
        trained = wrap_ddp(head if linear_head else model, self.rt)
        optimizer = make_optimizer(cfg, [{"params": list(head.parameters()), "lr": cfg.head.lr}])

        def backbone_logits(batch: Batch) -> torch.Tensor:
            if extractor is None:    # a conv head (SqueezeNet): the full model, backbone without gradients
                with self.rt.autocast():
                    return trained(batch.x).float()
            with torch.no_grad(), self.rt.autocast():
                feats = extractor(batch.x).float()
            return trained(feats)

        logits: Callable[[Batch], torch.Tensor] | ResidentHead = backbone_logits
        if train_feats is not None:
            # Features, labels and batch order stay on the device; on CUDA the step is a graph replay.
            optimizer = graph_safe(optimizer, self.rt, cfg.cuda_graphs)
            logits = ResidentHead(trained, train_feats, self.data.train_y, self.loss_fn, self.rt)

        def val_logits() -> torch.Tensor:
            if val_feats is not None:
                with torch.no_grad():
                    return head(val_feats)
            return self.predict(model, self.data.val_x)

        self.loop("head", cfg.head.epochs, 0.0, optimizer, logits, val_logits, cfg.head.augment, resume_state,
                  train_mode=lambda: model.eval())

    def features(self, extractor: nn.Module, images: MappedImages, desc: str) -> torch.Tensor:
        """Backbone features of every image, computed once (phase 1 on cached features), shared out over ranks;
        unchanged images' features come from the previous run (tasks.training.features)."""
        return cached_features(self, extractor, images, desc)

    # ---- phase 2
    def run_finetune(self, resume_state: dict[str, Any] | None, cache_activations: bool | None = None) -> None:
        """Unfreeze per train.finetune.unfreeze; head at lr, backbone at lr * backbone_lr_scale.

        Without augmentation an image's path through the still-frozen bottom of the
        network never changes, so (as phase 1 does with features) the bottom runs
        once per image and only the unfrozen top trains on its cached activations:
        the same model and loss, at the cost of the top alone. cache_activations
        False runs the whole network every step (the equivalence test compares the two).
        """
        cfg, ft, model = self.cfg, self.cfg.finetune, self.model
        first = set_trainable(model, ft.unfreeze, ft.last_n)
        head_ids = {id(p) for p in head_module(model).parameters()}
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        optimizer = make_optimizer(cfg, [{"params": list(head_module(model).parameters()), "lr": ft.lr},
                                         {"params": backbone, "lr": ft.lr * ft.backbone_lr_scale}])
        log.info("phase 2: %d of %d parameter tensors train", sum(p.requires_grad for p in model.parameters()),
                 sum(1 for _ in model.parameters()))
        cache = not ft.augment and bool(first) and cache_activations is not False
        split = split_frozen_prefix(model, first[0], cfg.image_size) if cache else None
        logits: Callable[[Batch], torch.Tensor] | ResidentHead
        if split is None:
            trained = wrap_ddp(maybe_compile(model, cfg), self.rt)

            def logits(batch: Batch) -> torch.Tensor:
                with self.rt.autocast():
                    return trained(batch.x).float()

            val_logits = partial(self.predict, model, self.data.val_x)
        else:
            lower, upper = split
            train_acts = self.features(lower, self.data.train_eval, "activations train")
            val_acts = self.features(lower, self.data.val_x, "activations val")
            log.info("phase 2 trains from %s on cached activations of shape %s", first[0], tuple(train_acts.shape[1:]))
            optimizer = graph_safe(optimizer, self.rt, cfg.cuda_graphs)
            logits = ResidentHead(wrap_ddp(maybe_compile(upper, cfg), self.rt), train_acts, self.data.train_y,
                                  self.loss_fn, self.rt)
            val_logits = partial(self.predict_cached, upper, val_acts)

        self.loop("finetune", ft.epochs, ft.warmup_epochs, optimizer, logits, val_logits, ft.augment, resume_state,
                  train_mode=lambda: set_train_mode(model, self.pretrained and ft.batchnorm == "frozen"))

    # ---- shared pieces
    def inputs(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A training batch on the device: random crops from the margin arrays, or the eval crop."""
        source = self.data.train_big if generator is not None else self.data.train_eval
        batch = to_device(source[idx], self.rt.device)
        return device_batch(batch, self.data.mean, self.data.std, self.cfg.image_size, generator,
                            self.cfg.channels_last, self.cfg.min_crop_scale, self.cfg.hflip)

    def make_batch(self, idx: torch.Tensor, generator: torch.Generator | None, images: bool = True) -> Batch:
        """One training step's labels and input on the device; runs in the batch producer's thread, in step order."""
        y = to_device(self.data.train_y[idx], self.rt.device)
        return Batch(idx, y, self.inputs(idx, generator) if images else None)

    def eval_batch(self, images: MappedImages, idx: torch.Tensor) -> Batch:
        x = device_batch(to_device(images[idx], self.rt.device), self.data.mean, self.data.std,
                         self.cfg.image_size, None, self.cfg.channels_last)
        return Batch(idx, None, x)

    @torch.no_grad()
    def predict(self, module: nn.Module, images: MappedImages, desc: str | None = None) -> torch.Tensor:
        """Outputs of `module` in eval mode for uint8 images, in fixed batches (the loop resets the mode).

        Under DDP each rank runs its share of the images and every rank gets all
        outputs back (tasks.training.runtime.shard / gather_rows).
        """
        module.eval()
        rows, real = shard(len(images), self.rt)
        if self.rt.world > 1 and (desc or "predictions") not in self.sharding_logged:
            self.sharding_logged.add(desc or "predictions")
            log.info("%s: rank %d of %d computes %d of %d images", desc or "predictions", self.rt.rank,
                     self.rt.world, real, len(images))
        chunks = []
        order = torch.split(rows, EVAL_BATCH)
        with BatchProducer(order, partial(self.eval_batch, images), self.rt.device) as batches:
            for batch in (bar(batches, desc, self.rt, total=len(order)) if desc else batches):
                with self.rt.autocast():
                    chunks.append(module(batch.x).float())
        return gather_rows(torch.cat(chunks), len(images), self.rt)

    @torch.no_grad()
    def predict_cached(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Outputs of `module` in eval mode for inputs already on the device (cached activations), shared out
        over the ranks like `predict`."""
        module.eval()
        rows, _ = shard(len(inputs), self.rt)
        chunks = [module(inputs[idx.to(inputs.device)]) for idx in torch.split(rows, EVAL_BATCH)]
        return gather_rows(torch.cat(chunks).float(), len(inputs), self.rt)

    def loop(self, phase: str, epochs: int, warmup_epochs: float, optimizer: torch.optim.Optimizer,
             logits: Callable[[Batch], torch.Tensor] | ResidentHead,
             val_logits: Callable[[], torch.Tensor], augment: bool, resume_state: dict[str, Any] | None,
             train_mode: Callable[[], None]) -> None:
        """The epoch loop of one phase; continues from resume_state when it belongs to this phase."""
        cfg, rt, prog = self.cfg, self.rt, self.progress
        n_train = len(self.data.train_y)
        steps_per_epoch = len(self.batches(phase, 0))
        scheduler = warmup_cosine(optimizer, round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch)
        scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
        if resume_state is not None and resume_state["progress"]["phase"] == phase:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            scaler.load_state_dict(resume_state["scaler"])
            set_rng_state(resume_state["rng"])
        prog.phase = phase
        while prog.epochs_done < epochs and not prog.phase_stopped:
            epoch = prog.epochs_done
            train_mode()
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + prog.global_epoch * 101 + rt.rank) \
                if augment else None
            loss = self.train_epoch(phase, epoch, epochs, optimizer, scheduler, scaler, logits, generator)
            seconds = time.perf_counter() - started
            val = self.val_metrics(val_logits())
            prog.epochs_done += 1
            prog.global_epoch += 1
            prog.train_images += n_train
            prog.train_seconds += seconds
            row = {"epoch": prog.global_epoch, "phase": phase, "train_loss": loss, "seconds": seconds,
                   "train_img_per_s": n_train / seconds, **val, "lr": optimizer.param_groups[0]["lr"]}
            prog.history.append(row)
            self.after_epoch(phase, row, optimizer, scheduler, scaler)

    def batches(self, phase: str, epoch_seed: int) -> list[torch.Tensor]:
        n = len(self.data.train_y)
        # Train mode BatchNorm cannot take a batch of one; phase 1 runs in eval mode.
        return batch_order(n, self.cfg.batch_size, shuffle=True, seed=epoch_seed, rank=self.rt.rank,
                           world=self.rt.world, drop_last=phase == "finetune")

    def train_epoch(self, phase: str, epoch: int, epochs: int, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    logits: Callable[[Batch], torch.Tensor] | ResidentHead, generator: torch.Generator | None,
                    images: bool = True) -> float:
        """One pass over this rank's share of the train split; returns the mean loss.

        No step waits for the GPU: batches are made ahead (tasks.training.batches), the
        loss is summed on the device and checked every LOG_EVERY steps from a copy that
        has already reached the host (tasks.training.monitor). `logits` is a ResidentHead
        for the head on cached features; images=False makes batches of labels only (the
        throughput benchmark's ceiling feeds the model itself).
        """
        rt = self.rt
        order = self.batches(phase, self.cfg.seed * 7919 + self.progress.global_epoch)
        started = time.perf_counter()
        pbar = bar(None, f"{phase} {epoch + 1}/{epochs}", rt, total=len(order))
        on_loss = self.hooks.on_loss
        if isinstance(logits, ResidentHead):
            hook = (lambda loss, step: on_loss(loss, phase, epoch, step)) if on_loss is not None else None
            meter, steps = logits.epoch(order, optimizer, scheduler, scaler, hook)
        else:
            meter = LossMeter(rt.device)
            make = partial(self.make_batch, generator=generator, images=images)
            steps = self.batch_steps(phase, epoch, order, make, optimizer, scheduler, scaler, logits, meter)
        for step in steps:
            if (step + 1) % LOG_EVERY == 0 or step + 1 == len(order):
                meter.snapshot(step)
                reading = meter.latest()
                if reading is not None:
                    self.check_finite(reading.mean, phase, epoch, reading.step)
                    if pbar is not None:
                        rate = reading.seen * rt.world / (time.perf_counter() - started)
                        pbar.set_postfix(loss=f"{reading.mean:.4f}", img_s=f"{rate:.0f}")
            if pbar is not None:
                pbar.update(1)
        if pbar is not None:
            pbar.close()
        return self.check_finite(meter.mean(), phase, epoch, len(order) - 1)

    def batch_steps(self, phase: str, epoch: int, order: list[torch.Tensor], make: Callable[[torch.Tensor], Batch],
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, logits: Callable[[Batch], torch.Tensor],
                    meter: LossMeter) -> Iterator[int]:
        """The training steps of one epoch over batches made ahead; yields each step's index."""
        with BatchProducer(order, make, self.rt.device) as batches:
            for step, batch in enumerate(batches):
                loss = self.loss_fn(logits(batch), batch.y)
                if self.hooks.on_loss is not None:
                    loss = self.hooks.on_loss(loss, phase, epoch, step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                meter.add(loss, len(batch.idx))
                yield step

    def check_finite(self, mean_loss: torch.Tensor | float, phase: str, epoch: int, step: int) -> float:
        """Stop the run on a NaN/inf loss, before anything of this epoch is saved."""
        value = float(mean_loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"the training loss became {value} in phase {phase}, epoch {epoch + 1}, by step {step + 1}; "
                f"stopped without saving this epoch (the last good checkpoint, {self.ckpt.resume_path}, is kept). "
                f"Lower train.{phase}.lr, or use train.precision: fp32 or bf16 instead of fp16")
        return value

    def val_metrics(self, logits: torch.Tensor) -> dict[str, float]:
        """Loss, accuracy and macro-F1 on the validation split (macro-F1 as tasks.lib.metrics computes it)."""
        y = self.data.val_y.to(logits.device)
        pred = logits.argmax(1)
        k = logits.shape[1]
        return {"val_loss": float(nn.functional.cross_entropy(logits.float(), y)),
                "val_accuracy": float((pred == y).double().mean()),
                "val_macro_f1": float(multiclass_f1_score(pred, y, num_classes=k, average="macro"))}

    def agreed(self, value: float) -> float:
        """Rank 0's value on every rank, so early stopping and best-epoch choices never diverge."""
        if self.rt.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.rt.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def after_epoch(self, phase: str, row: dict[str, Any], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> None:
        """Best model, early stopping, resume checkpoint and plots for the epoch just done."""
        prog, patience = self.progress, self.cfg.early_stopping_patience
        metric = self.agreed(row["val_macro_f1"])
        improved = metric > prog.best_metric
        if improved:
            prog.best_metric, prog.best_epoch, prog.best_phase, prog.bad_epochs = metric, row["epoch"], phase, 0
        else:
            prog.bad_epochs += 1
            if patience and prog.bad_epochs >= patience:
                log.info("early stopping in phase %s: no better val macro-F1 for %d epochs", phase, patience)
                prog.phase_stopped = True
        if self.rt.main:
            # last.pt first: stopped between the two, last.pt holds the new best weights itself (state.restore).
            self.ckpt.save_resume(self.model, optimizer, scheduler, scaler, prog)
            if improved:
                self.ckpt.save_best(self.model, row)
            if self.live:
                self.live.log(row)
        log.info("epoch %d (%s): train loss %.4f, val loss %.4f, val acc %.4f, val macro-F1 %.4f", row["epoch"],
                 phase, row["train_loss"], row["val_loss"], row["val_accuracy"], row["val_macro_f1"])
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(phase, prog.epochs_done)


def bar(iterable: Any, desc: str | None, rt: Runtime, total: int | None = None) -> Any:
    """A tqdm bar on the main process (rate and ETA included); plain iteration elsewhere."""
    if not rt.main:
        return iterable
    if not sys.stderr.isatty():  # a log: a line per 25 % or 30 s, not one every few batches
        return LogProgress(iterable, desc, total=total, unit="batch")
    return tqdm(iterable, desc=desc, total=total, unit="batch", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1)
