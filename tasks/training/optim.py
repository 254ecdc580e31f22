"""What one training step is made of: loss, optimizer, learning-rate schedule, loss scaling, and the step itself."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.lib.config import TrainParams
from tasks.training.batches import Batch
from tasks.training.monitor import LossMeter


@dataclass
class Step:
    """One phase's training step: logits of a batch, the loss, and what a step updates."""

    model: Callable[[Batch], torch.Tensor]           # a batch's logits (float32)
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def make_step(model: Callable[[Batch], torch.Tensor], loss: nn.Module, optimizer: torch.optim.Optimizer,
              warmup_steps: int, total_steps: int, fp16: bool) -> Step:
    """A Step with the warmup + cosine schedule and a GradScaler (enabled for fp16 only)."""
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    return Step(model, loss, optimizer, warmup_cosine(optimizer, warmup_steps, total_steps),
                torch.amp.GradScaler(device.type, enabled=fp16))


def plain_step(step: Step, batch: Batch, meter: LossMeter,
               on_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Forward, loss, backward and the optimizer's update for one batch; the loss is summed on the device."""
    loss = step.loss(step.model(batch), batch.y)
    if on_loss is not None:
        loss = on_loss(loss)
    step.optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss).backward()
    with warnings.catch_warnings():   # a graph-safe optimizer warns when it runs outside a graph
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        step.scaler.step(step.optimizer)
    step.scaler.update()
    meter.add(loss, len(batch.y))


def make_loss(cfg: TrainParams, labels: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with label smoothing; inverse-frequency class weights when asked."""
    weight = None
    if cfg.class_weighting:
        counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
        weight = (counts.sum() / (num_classes * counts)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


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
