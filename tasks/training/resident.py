"""Training on cached inputs, resident on the device, its step replayed from a CUDA graph.

The inputs are what the frozen part of the network computed once per image:
backbone features for the head (phase 1), or the frozen bottom's activations
for the unfrozen top (phase 2 without augmentation). When the head trains on
backbone features, an epoch costs
almost no arithmetic (a 256 x 2048 by 2048 x 10 product per step), so its
speed is all overhead: host copies, Python and kernel launches. Here
everything stays on the device: the features (computed there), the labels
(copied once) and each epoch's batch order (one copy per epoch, not one per
step). On CUDA the step itself (gather, head, loss, backward, AdamW and the
loss sum) is captured once in a CUDA graph and replayed: one launch per step
instead of ~25 kernels behind ~0.3 ms of Python.

Same batches, order and batch size as every other epoch loop: on the CPU the
arithmetic is the loop's own, bit for bit. The graph needs AdamW's fused
kernel with its state on the device (`graph_safe`): the same update,
rounded differently in the last bits than the multi-tensor kernel. SGD, fp16
loss scaling, DDP and loss hooks run the same step eagerly. The first
WARMUP_STEPS steps always run eagerly, on a side stream (the optimizer's
state must exist before capture); a capture that fails logs why and the
phase goes on eagerly. `train.cuda_graphs: false` turns graphs off.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tasks.lib.data import to_device
from tasks.training.monitor import LossMeter
from tasks.training.runtime import Runtime

log = logging.getLogger("train")

# Real steps run eagerly before the capture: they create the optimizer's state and
# let cuBLAS set up on the stream, which must not happen inside a capture.
WARMUP_STEPS = 2

StepHook = Callable[[torch.Tensor, int], torch.Tensor]   # (loss, step) -> loss


def graph_safe(optimizer: torch.optim.Optimizer, rt: Runtime, enabled: bool = True) -> torch.optim.Optimizer:
    """The same AdamW (groups and hyper-parameters) with the fused kernel and device-side state a graph can capture.

    Anything else (SGD, CPU, DDP, graphs off) is returned as it is and runs eagerly.
    """
    if not enabled or rt.device.type != "cuda" or rt.world > 1 or type(optimizer) is not torch.optim.AdamW:
        return optimizer
    groups = [{**group, "fused": True, "capturable": True, "foreach": None} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=True, capturable=True)


class ResidentHead:
    """Trains the head on features that live on the device; one instance per phase run (it keeps its graph)."""

    def __init__(self, trained: nn.Module, feats: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                 rt: Runtime) -> None:
        self.trained, self.feats, self.loss_fn, self.rt = trained, feats, loss_fn, rt
        self.labels = labels.to(feats.device)
        self.total = torch.zeros((), device=feats.device)     # the loss sum the graph adds into
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_rows: torch.Tensor | None = None
        self.lrs: list[torch.Tensor] = []
        self.eager_steps = 0
        self.capture_failed = False

    def epoch(self, order: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
              on_loss: StepHook | None) -> tuple[LossMeter, Iterator[int]]:
        """A meter for the epoch's loss and an iterator that runs the epoch's steps, yielding each step's index."""
        self.total.zero_()
        meter = LossMeter(self.feats.device, self.total)
        return meter, self._steps(order, optimizer, scheduler, scaler, on_loss, meter)

    def _steps(self, order: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
               on_loss: StepHook | None, meter: LossMeter) -> Iterator[int]:
        if not order:
            return
        # The whole epoch's order in one copy; each step's batch is a view of it.
        rows = to_device(torch.cat(list(order)), self.feats.device)
        graphs = self.graphs_allowed(optimizer, scaler, on_loss)
        full, start = len(order[0]), 0
        for step, idx in enumerate(order):
            batch = rows[start:start + len(idx)]
            start += len(idx)
            if graphs and len(idx) == full and self.eager_steps >= WARMUP_STEPS and self._replay(batch, optimizer):
                meter.count(len(idx))
            elif graphs and len(idx) == full and not self.capture_failed:
                self._on_side_stream(lambda: self._eager_step(batch, optimizer, scaler, None, step, meter))
            else:
                # The short last batch (a graph replays one shape), and everything graphs do not cover.
                self._eager_step(batch, optimizer, scaler, on_loss, step, meter)
            scheduler.step()
            yield step

    def graphs_allowed(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                       on_loss: StepHook | None) -> bool:
        return (self.feats.is_cuda and not self.capture_failed and on_loss is None and not scaler.is_enabled()
                and all(group.get("capturable") for group in optimizer.param_groups))

    def _eager_step(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    on_loss: StepHook | None, step: int, meter: LossMeter) -> None:
        loss = self.loss_fn(self.trained(self.feats[rows]), self.labels[rows])
        if on_loss is not None:
            loss = on_loss(loss, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        with warnings.catch_warnings():   # a graph-safe optimizer warns when it runs outside a graph
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            scaler.step(optimizer)
        scaler.update()
        meter.add(loss, len(rows))
        self.eager_steps += 1

    def _on_side_stream(self, run: Callable[[], None]) -> None:
        """Warm-up steps before a capture run on a side stream, as PyTorch's CUDA graph notes require."""
        current = torch.cuda.current_stream(self.feats.device)
        side = torch.cuda.Stream(self.feats.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            run()
        current.wait_stream(side)

    def _replay(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """One step from the graph (captured at the first call); False when it cannot be captured."""
        if self.graph is None and not self._capture(rows, optimizer):
            return False
        self.static_rows.copy_(rows)
        for lr, group in zip(self.lrs, optimizer.param_groups):
            lr.fill_(group["lr"])   # the scheduler's rate for this step; a fill, not a host copy
        self.graph.replay()
        return True

    def _capture(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Record one step (reading `static_rows` and the `lrs` tensors) into a CUDA graph; False if that fails."""
        groups = optimizer.param_groups
        rates = [group["lr"] for group in groups]
        self.static_rows = rows.clone()
        self.lrs = [torch.tensor(float(rate), device=self.feats.device) for rate in rates]
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)   # backward inside the graph writes the gradients, never adds
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.loss_fn(self.trained(self.feats[self.static_rows]), self.labels[self.static_rows])
                loss.backward()
                optimizer.step()
                self.total.add_(loss.detach() * len(rows))
        except Exception as err:  # noqa: BLE001 - any capture problem: train on without the graph
            log.warning("could not capture the head step in a CUDA graph (%s: %s); the phase goes on without one",
                        type(err).__name__, err)
            self.capture_failed = True
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            for group, rate in zip(groups, rates):
                group["lr"] = rate   # floats again: the scheduler and the resume checkpoint see what they always saw
        self.graph = graph
        log.info("head step captured in a CUDA graph (batch %d)", len(rows))
        return True
