"""Loss, optimizer, learning-rate schedule and compilation of the train stage."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tasks.lib.config import TrainParams


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
