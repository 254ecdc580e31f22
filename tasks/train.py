"""Stage train: fine-tune a pretrained backbone with a new head (`python -m tasks.train`).

Phase 1 ("head") trains only the new head with the backbone frozen and every
BatchNorm/dropout in eval mode; without augmentation the backbone's features
are computed once and the head trains on them, so its epochs cost almost
nothing. Phase 2 ("finetune") optionally unfreezes the last N blocks or the
whole backbone, with a lower rate for the backbone (lr * backbone_lr_scale),
warmup + cosine, and random resized crop + flip done on the device.

The validation metric is macro-F1 (it does not let a large class hide a weak
one, and the promotion gate uses it too); the best epoch is
`<train.out_dir>/model.pt`. After every epoch `<train.out_dir>/resume/last.pt`
holds everything needed to continue exactly (`train.resume: auto`). The test
split is never read here.

Outputs: model.pt, metrics.json, plots/metrics/*.tsv (dvclive), resume/last.pt.
Several GPUs: `train.nproc_per_node: N` re-launches this module under torchrun.
The GPU profile for real datasets is params.gpu.yaml (see its header).
Device, precision, seeding and DDP live in `tasks.train_runtime`; the resume
state (progress, checkpoints, fingerprint, RNG states) in `tasks.train_state`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from tasks.augment import device_batch
from tasks.cli import StageError, stage_main
from tasks.config import Params, TrainParams
from tasks.data import (batch_order, labels_of, read_classes, read_rows, to_device,
                        train_preprocessing)
from tasks.decode_cache import MappedImages, training_images
from tasks.images import BadImage
from tasks.io import write_json
from tasks.models import build_model, default_preprocessing, feature_extractor, find_head, head_module
from tasks.preprocess import Preprocessing
from tasks.train_runtime import Runtime, launch_ddp, setup_runtime, teardown_runtime, wrap_ddp
from tasks.train_state import Checkpointer, Progress, restore, run_fingerprint, set_rng_state

log = logging.getLogger("train")

EVAL_BATCH = 256          # inference batches (features, validation): no gradients, so larger is fine
LOG_EVERY = 10            # steps between loss checks / progress updates (each check syncs the GPU)
# Containers whose children are the backbone's blocks, tried in this order (see backbone_blocks).
BLOCK_CONTAINERS = ("features", "blocks", "stages", "encoder.layers", "layers", "trunk_output")


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


# --------------------------------------------------------------------------- entry


def run(params: Params) -> dict[str, Any]:
    """The stage: train in this process, or re-launch under torchrun when nproc_per_node > 1."""
    if params.train.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ddp(params)
    return train(params)


def train(params: Params, hooks: Hooks | None = None, cache_features: bool | None = None) -> dict[str, Any]:
    """Train both phases and write model.pt, metrics.json and plots; returns the metrics.

    cache_features None caches backbone features in phase 1 when it does not
    augment; False forces the frozen backbone to run every epoch (benchmarks
    and the equivalence test compare the two).
    """
    cfg, hooks = params.train, hooks or Hooks()
    rt = setup_runtime(cfg)
    try:
        return _train(params, rt, hooks, cache_features)
    finally:
        teardown_runtime(rt)


def _train(params: Params, rt: Runtime, hooks: Hooks, cache_features: bool | None) -> dict[str, Any]:
    cfg = params.train
    classes = read_classes(params.data.prepared_dir)
    backbone_state, record = load_backbone(params.model.out_dir)
    arch = str(record.get("arch") or params.model.arch)
    if arch != params.model.arch:
        raise StageError(f"{params.model.out_dir}/weights.json is for {arch!r} but model.arch is "
                         f"{params.model.arch!r}; re-run fetch_weights (dvc repro fetch_weights)")
    prep = preprocessing_for(arch, cfg.image_size, record)
    data = load_data(params, prep, rt)
    model = build_model(arch, len(classes), backbone_state).to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    fingerprint = run_fingerprint(params, record)
    progress, resume_state = restore(cfg.out_dir / "resume" / "last.pt", fingerprint, model, cfg.resume == "auto")
    ckpt = Checkpointer(cfg.out_dir, arch, classes, prep, record, fingerprint, rt)
    live = Plots(cfg.out_dir, progress.history) if rt.main else None
    loss_fn = make_loss(cfg, data.train_y, len(classes), rt.device)
    steps = PhaseRunner(cfg, rt, data, model, loss_fn, progress, ckpt, live, hooks, backbone_state is not None)

    if progress.phase == "head":
        steps.run_head(resume_state, cache_features)
        resume_state = None
        progress.phase, progress.epochs_done, progress.phase_stopped, progress.bad_epochs = "finetune", 0, False, 0
    if cfg.finetune.unfreeze != "none" and cfg.finetune.epochs > 0:
        steps.run_finetune(resume_state)

    metrics = summary_metrics(progress, rt, arch, record)
    if rt.main:
        live.close()
        ckpt.save_resume(model, None, None, None, progress, finished=True)
        write_json(cfg.out_dir / "metrics.json", metrics)
    log.info("best val macro-F1 %.4f (accuracy %.4f) at epoch %d; model: %s", progress.best_metric,
             metrics["val_accuracy"], progress.best_epoch, cfg.out_dir / "model.pt")
    return metrics


# --------------------------------------------------------------------------- weights, data and loss


def load_backbone(out_dir: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(backbone state dict or None for random init, the weights.json record) from fetch_weights' output."""
    from tasks.fetch_weights import load_backbone_state

    return load_backbone_state(out_dir)


def preprocessing_for(arch: str, image_size: int, record: dict[str, Any]) -> Preprocessing:
    """The eval preprocessing at train.image_size, with the pretrained weights' mean/std when recorded."""
    prep = default_preprocessing(arch, image_size)
    recorded = record.get("preprocessing") or {}
    if recorded.get("mean") and recorded.get("std"):
        prep = Preprocessing(prep.crop_size, prep.resize_size, prep.interpolation,
                             tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"]))
    return prep


def load_data(params: Params, prep: Preprocessing, rt: Runtime) -> Data:
    """Decode train and val once: train at the eval crop (and with a margin if a phase augments), val at the eval crop."""
    cfg, prepared = params.train, params.data.prepared_dir
    train_rows, val_rows = read_rows(prepared, "train"), read_rows(prepared, "val")
    if not train_rows or not val_rows:
        raise StageError(f"{prepared}: the train and val splits must both have images; re-run prepare with more data")
    augments = cfg.head.augment or (cfg.finetune.augment and cfg.finetune.unfreeze != "none")
    preps = [prep, train_preprocessing(prep, params.cache.margin)] if augments else [prep]
    pin = rt.device.type == "cuda"
    try:
        # The decode_cache stage's memory-mapped arrays; decoded here only when that cache is missing or stale.
        train_arrays = training_images(params, "train", train_rows, preps, pin)
        (val_array,) = training_images(params, "val", val_rows, [prep], pin)
    except BadImage as err:
        raise StageError(f"{err}; the raw data changed since prepare ran: re-run it (dvc repro prepare)") from None
    return Data(
        train_eval=train_arrays[0],
        train_big=train_arrays[1] if augments else None,
        train_y=torch.from_numpy(labels_of(train_rows)),
        val_x=val_array,
        val_y=torch.from_numpy(labels_of(val_rows)),
        mean=torch.tensor(prep.mean, device=rt.device),
        std=torch.tensor(prep.std, device=rt.device),
    )


def make_loss(cfg: TrainParams, labels: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with label smoothing; inverse-frequency class weights when asked."""
    weight = None
    if cfg.class_weighting:
        counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
        weight = (counts.sum() / (num_classes * counts)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


# --------------------------------------------------------------------------- freezing


def backbone_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the backbone's blocks in forward order.

    Rule: the children of the first container in BLOCK_CONTAINERS that the model
    has (torchvision `features`, timm `blocks`, ViT `encoder.layers`, ...);
    else ResNet-style `layer1..layerN`; else the model's own top-level children.
    The head and parameter-free modules never count as blocks.
    """
    head_top = find_head(model).split(".")[0]
    for name in BLOCK_CONTAINERS:
        try:
            container = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and name.split(".")[0] != head_top:
            return [f"{name}.{child}" for child, m in container.named_children() if _has_params(m)]
    layers = [n for n, m in model.named_children() if n.startswith("layer") and n[5:].isdigit() and _has_params(m)]
    if layers:
        return layers
    return [n for n, m in model.named_children() if n != head_top and _has_params(m)]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def set_trainable(model: nn.Module, unfreeze: str, last_n: int) -> list[str]:
    """Freeze the backbone, then unfreeze per the rule; the head always trains. Returns the first unfrozen block.

    last_n unfreezes the last N blocks and every parameter registered after the
    first of them (final conv/norm layers such as timm's conv_head), i.e. the
    top of the network from that block on.
    """
    head = find_head(model)
    start: str | None = None
    if unfreeze == "all":
        start = ""
    elif unfreeze == "last_n":
        blocks = backbone_blocks(model)
        start = blocks[-min(last_n, len(blocks))] if blocks else head
    on = False
    for name, param in model.named_parameters():
        if start is not None and (name == start or name.startswith(start + ".") or start == ""):
            on = True
        param.requires_grad_(on or name.startswith(head + "."))
    return [start] if start is not None else []


def set_train_mode(model: nn.Module, pretrained: bool = True) -> None:
    """Train mode (dropout on), but with pretrained weights every BatchNorm keeps its running statistics.

    The head was fitted to features normalised by those statistics; switching
    unfrozen BatchNorms to batch statistics shifts every feature at once (on the
    demo, train accuracy fell from 95% to 10% in one step). Their scale and
    shift still train. This is the usual transfer-learning advice (Keras guide).
    A randomly initialised backbone has no statistics worth keeping: its
    BatchNorms use batch statistics as in training from scratch.
    """
    model.train()
    if not pretrained:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# --------------------------------------------------------------------------- optimisation


def make_optimizer(cfg: TrainParams, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's rate, then cosine decay to zero, stepped per batch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def maybe_compile(module: nn.Module, cfg: TrainParams) -> nn.Module:
    return torch.compile(module) if cfg.compile else module


# --------------------------------------------------------------------------- the phases


class PhaseRunner:
    """Runs phase 1 and phase 2 over the same epoch loop: train, validate, checkpoint, early-stop."""

    def __init__(self, cfg: TrainParams, rt: Runtime, data: Data, model: nn.Module, loss_fn: nn.Module,
                 progress: Progress, ckpt: Checkpointer, live: Plots | None, hooks: Hooks, pretrained: bool) -> None:
        self.cfg, self.rt, self.data, self.model, self.loss_fn = cfg, rt, data, model, loss_fn
        self.pretrained = pretrained
        self.progress, self.ckpt, self.live, self.hooks = progress, ckpt, live, hooks

    # ---- phase 1
    def run_head(self, resume_state: dict[str, Any] | None, cache_features: bool | None) -> None:
        """Backbone frozen and in eval mode; only the head's parameters train."""
        cfg, model = self.cfg, self.model
        if cfg.head.epochs == 0:
            return
        for param in model.parameters():
            param.requires_grad_(False)
        head = head_module(model)
        for param in head.parameters():
            param.requires_grad_(True)
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

        def logits(idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            if train_feats is not None:
                return trained(train_feats[idx.to(train_feats.device)])
            x = self.inputs(idx, generator)
            if extractor is None:    # a conv head (SqueezeNet): the full model, backbone without gradients
                with self.rt.autocast():
                    return trained(x).float()
            with torch.no_grad(), self.rt.autocast():
                feats = extractor(x).float()
            return trained(feats)

        def val_logits() -> torch.Tensor:
            if val_feats is not None:
                with torch.no_grad():
                    return head(val_feats)
            return self.predict(model, self.data.val_x)

        self.loop("head", cfg.head.epochs, 0.0, optimizer, logits, val_logits, cfg.head.augment, resume_state,
                  train_mode=lambda: model.eval())

    def features(self, extractor: nn.Module, images: torch.Tensor, desc: str) -> torch.Tensor:
        """Backbone features of every image, computed once (phase 1 on cached features)."""
        return self.predict(extractor, images, desc=desc)

    # ---- phase 2
    def run_finetune(self, resume_state: dict[str, Any] | None) -> None:
        """Unfreeze per train.finetune.unfreeze; head at lr, backbone at lr * backbone_lr_scale."""
        cfg, ft, model = self.cfg, self.cfg.finetune, self.model
        set_trainable(model, ft.unfreeze, ft.last_n)
        head_ids = {id(p) for p in head_module(model).parameters()}
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        optimizer = make_optimizer(cfg, [{"params": list(head_module(model).parameters()), "lr": ft.lr},
                                         {"params": backbone, "lr": ft.lr * ft.backbone_lr_scale}])
        log.info("phase 2: %d of %d parameter tensors train", sum(p.requires_grad for p in model.parameters()),
                 sum(1 for _ in model.parameters()))
        trained = wrap_ddp(maybe_compile(model, cfg), self.rt)

        def logits(idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            x = self.inputs(idx, generator)
            with self.rt.autocast():
                return trained(x).float()

        self.loop("finetune", ft.epochs, ft.warmup_epochs, optimizer, logits,
                  lambda: self.predict(model, self.data.val_x), ft.augment, resume_state,
                  train_mode=lambda: set_train_mode(model, self.pretrained))

    # ---- shared pieces
    def inputs(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A training batch on the device: random crops from the margin arrays, or the eval crop."""
        source = self.data.train_big if generator is not None else self.data.train_eval
        batch = to_device(source[idx], self.rt.device)
        return device_batch(batch, self.data.mean, self.data.std, self.cfg.image_size, generator,
                            self.cfg.channels_last, self.cfg.min_crop_scale)

    @torch.no_grad()
    def predict(self, module: nn.Module, images: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """Outputs of `module` in eval mode for uint8 images, in fixed batches (the loop resets the mode)."""
        module.eval()
        chunks = []
        batches = torch.split(torch.arange(len(images)), EVAL_BATCH)
        for idx in (bar(batches, desc, self.rt) if desc else batches):
            x = device_batch(to_device(images[idx], self.rt.device), self.data.mean, self.data.std,
                             self.cfg.image_size, None, self.cfg.channels_last)
            with self.rt.autocast():
                chunks.append(module(x).float())
        return torch.cat(chunks)

    def loop(self, phase: str, epochs: int, warmup_epochs: float, optimizer: torch.optim.Optimizer,
             logits: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
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
            set_rng_state(resume_state["rng"], rt)
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
                    logits: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
                    generator: torch.Generator | None) -> float:
        """One pass over this rank's share of the train split; returns the mean loss."""
        rt, hooks = self.rt, self.hooks
        order = self.batches(phase, self.cfg.seed * 7919 + self.progress.global_epoch)
        total = torch.zeros((), device=rt.device)
        seen = 0
        started = time.perf_counter()
        pbar = bar(None, f"{phase} {epoch + 1}/{epochs}", rt, total=len(order))
        for step, idx in enumerate(order):
            y = to_device(self.data.train_y[idx], rt.device)  # pinned: a pageable copy would stall the stream
            loss = self.loss_fn(logits(idx, generator), y)
            if hooks.on_loss is not None:
                loss = hooks.on_loss(loss, phase, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == len(order):
                mean = self.check_finite(total / seen, phase, epoch, step)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{mean:.4f}", img_s=f"{seen * rt.world / (time.perf_counter() - started):.0f}")
            if pbar is not None:
                pbar.update(1)
        if pbar is not None:
            pbar.close()
        return float(total / max(seen, 1))

    def check_finite(self, mean_loss: torch.Tensor, phase: str, epoch: int, step: int) -> float:
        """Stop the run on a NaN/inf loss, before anything of this epoch is saved."""
        value = float(mean_loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"the training loss became {value} in phase {phase}, epoch {epoch + 1}, by step {step + 1}; "
                f"stopped without saving this epoch (the last good checkpoint, {self.ckpt.resume_path}, is kept). "
                f"Lower train.{phase}.lr, or use train.precision: fp32 or bf16 instead of fp16")
        return value

    def val_metrics(self, logits: torch.Tensor) -> dict[str, float]:
        """Loss, accuracy and macro-F1 on the validation split."""
        y = self.data.val_y.to(logits.device)
        pred = logits.argmax(1)
        k = logits.shape[1]
        confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k).double()
        tp = confusion.diag()
        f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)
        present = confusion.sum(1) > 0
        return {"val_loss": float(nn.functional.cross_entropy(logits.float(), y)),
                "val_accuracy": float((pred == y).double().mean()),
                "val_macro_f1": float(f1[present].mean())}

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
        if metric > prog.best_metric:
            prog.best_metric, prog.best_epoch, prog.best_phase, prog.bad_epochs = metric, row["epoch"], phase, 0
            if self.rt.main:
                self.ckpt.save_best(self.model, row)
        else:
            prog.bad_epochs += 1
            if patience and prog.bad_epochs >= patience:
                log.info("early stopping in phase %s: no better val macro-F1 for %d epochs", phase, patience)
                prog.phase_stopped = True
        if self.rt.main:
            self.ckpt.save_resume(self.model, optimizer, scheduler, scaler, prog)
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
    return tqdm(iterable, desc=desc, total=total, unit="batch", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 5.0)


# --------------------------------------------------------------------------- metrics and plots


class Plots:
    """Per-epoch metrics through dvclive into <out_dir>/plots/metrics/<name>.tsv, x = step (as dvc.yaml declares).

    dvclive's running summary goes to <out_dir>/plots/summary.json, so
    <out_dir>/metrics.json exists only once a run has finished.
    """

    KEYS = ("train_loss", "train_img_per_s", "val_loss", "val_accuracy", "val_macro_f1", "lr")

    def __init__(self, out_dir: Path, history: list[dict[str, Any]]) -> None:
        self.live = None
        try:
            from dvclive import Live
        except ImportError:   # a bare GPU box may lack it; training must not depend on plots
            log.warning("dvclive is not installed: no per-epoch plots in %s/plots", out_dir)
            return

        class _Live(Live):
            """Live that only writes files: no git/DVC repo is opened (or created!), no Studio is called."""

            def _init_dvc(self) -> None:   # it would run Repo() or Repo.init() and read git state
                pass

            def _init_studio(self) -> None:   # offline: skip every Studio event
                self._studio_events_to_skip.update({"start", "data", "done"})

            @property
            def metrics_file(self) -> str:   # dvclive would write <dir>/metrics.json, the stage's own output
                return os.path.join(self.plots_dir, "summary.json")

        # No git/DVC experiment side effects; a resumed run rewrites the log from its saved history.
        self.live = _Live(dir=str(out_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
        for row in history:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        if self.live is None:
            return
        for key in self.KEYS:
            self.live.log_metric(key, row[key])
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def summary_metrics(progress: Progress, rt: Runtime, arch: str, record: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the best epoch's validation numbers plus how the run went."""
    best = next((r for r in progress.history if r["epoch"] == progress.best_epoch), None)
    if best is None:
        raise StageError("no epoch was trained: set train.head.epochs or train.finetune.epochs above 0")
    return {
        "val_accuracy": best["val_accuracy"],
        "val_macro_f1": best["val_macro_f1"],
        "val_loss": best["val_loss"],
        "epochs": progress.global_epoch,
        "best_epoch": progress.best_epoch,
        "best_phase": progress.best_phase,
        "train_img_per_s": progress.train_images / max(progress.train_seconds, 1e-9),
        **{f"{phase}_img_per_s": rate for phase, rate in phase_rates(progress.history).items()},
        "train_seconds": progress.train_seconds,
        "device": str(rt.device.type),
        "precision": str(rt.amp_dtype).removeprefix("torch.") if rt.amp_dtype else "fp32",
        "world_size": rt.world,
        "arch": arch,
        "weights": record.get("weights"),
        "weights_sha256": record.get("sha256"),
    }


def phase_rates(history: list[dict[str, Any]]) -> dict[str, float]:
    """Training images per second of each phase (cached-feature epochs are far faster than fine-tuning ones)."""
    rates = {}
    for phase in ("head", "finetune"):
        rows = [r for r in history if r["phase"] == phase]
        if rows:
            images = sum(r["train_img_per_s"] * r["seconds"] for r in rows)
            rates[phase] = images / max(sum(r["seconds"] for r in rows), 1e-9)
    return rates


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Fine-tune the pretrained backbone with a new head (frozen head phase, optional unfreeze).",
                      argv)


if __name__ == "__main__":
    sys.exit(main())
