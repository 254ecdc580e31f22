"""The training step on cached inputs, replayed from a CUDA graph (`train.cuda_graphs`, CUDA only).

On cached inputs a step is almost no arithmetic, so its speed is all overhead (Python, ~25 kernel
launches); one graph replay is one launch. The graph needs AdamW's fused kernel with device-side state
(`graph_safe`), which rounds differently in the last bits. SGD, fp16, DDP and loss hooks run the plain
step; a capture that fails logs why and the phase goes on with the plain step.
"""

from __future__ import annotations

import logging

import torch

from tasks.training.batches import Batch
from tasks.training.monitor import LossMeter
from tasks.training.optim import Step, plain_step
from tasks.training.runtime import Runtime

log = logging.getLogger(__name__)

# Real steps run before the capture: they create the optimizer's state and
# let cuBLAS set up on the stream, which must not happen inside a capture.
WARMUP_STEPS = 2


def graph_safe(optimizer: torch.optim.Optimizer, rt: Runtime, enabled: bool = True) -> torch.optim.Optimizer:
    """The same AdamW with the fused kernel and device-side state a graph can capture; anything else (SGD,
    CPU, DDP, graphs off) is returned as it is and runs the plain step."""
    if not enabled or rt.device.type != "cuda" or rt.world > 1 or type(optimizer) is not torch.optim.AdamW:
        return optimizer
    groups = [{**group, "fused": True, "capturable": True, "foreach": None} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=True, capturable=True)


def graph_for(optimizer: torch.optim.Optimizer, rt: Runtime,
              enabled: bool = True) -> tuple[torch.optim.Optimizer, CudaGraphStep | None]:
    """The optimizer to train with (`graph_safe`) and the graph that replays its step; no graph for fp16 (loss
    scaling checks the gradients on the host) or where graph_safe keeps the optimizer as it is."""
    safe = graph_safe(optimizer, rt, enabled)
    if safe is optimizer or rt.amp_dtype == torch.float16:
        return safe, None
    return safe, CudaGraphStep(rt.device)


class CudaGraphStep:
    """Runs a Step's full-size batches from one CUDA graph; one instance per phase run (it keeps its graph)."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)     # the loss sum the graph adds into
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.lrs: list[torch.Tensor] = []
        self.warm_steps = 0
        self.failed = False

    def meter(self) -> LossMeter:
        """A fresh epoch's loss meter over the sum the graph adds into."""
        self.total.zero_()
        return LossMeter(self.total.device, self.total)

    def run(self, step: Step, batch: Batch, meter: LossMeter) -> bool:
        """This batch's step (a warm-up step, or a replay); False: run it plainly (another shape, no graph)."""
        if self.failed or (self.static is not None and batch.x.shape != self.static.x.shape):
            return False
        if self.warm_steps < WARMUP_STEPS:
            self._on_side_stream(step, batch, meter)
            return True
        if self.graph is None and not self._capture(step, batch):
            return False
        self.static.x.copy_(batch.x)
        self.static.y.copy_(batch.y)
        for lr, group in zip(self.lrs, step.optimizer.param_groups):
            lr.fill_(group["lr"])   # the scheduler's rate for this step; a fill, not a host copy
        self.graph.replay()
        meter.count(len(batch.y))
        return True

    def _on_side_stream(self, step: Step, batch: Batch, meter: LossMeter) -> None:
        """Warm-up steps before a capture run on a side stream, as PyTorch's CUDA graph notes require."""
        current = torch.cuda.current_stream(self.total.device)
        side = torch.cuda.Stream(self.total.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            plain_step(step, batch, meter)
        current.wait_stream(side)
        self.warm_steps += 1

    def _capture(self, step: Step, batch: Batch) -> bool:
        """Record one step (reading `static` and the `lrs` tensors) into a CUDA graph; False if that fails."""
        groups = step.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        self.static = Batch(batch.idx, batch.y.clone(), batch.x.clone())
        self.lrs = [torch.tensor(float(rate), device=self.total.device) for rate in rates]
        graph = torch.cuda.CUDAGraph()
        step.optimizer.zero_grad(set_to_none=True)   # backward inside the graph writes the gradients, never adds
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = step.loss(step.model(self.static), self.static.y)
                loss.backward()
                step.optimizer.step()
                self.total.add_(loss.detach() * len(self.static.y))
        except Exception as err:  # noqa: BLE001 - any capture problem: train on without the graph
            log.warning("could not capture the training step in a CUDA graph (%s: %s); the phase goes on without "
                        "one", type(err).__name__, err)
            self.failed = True
            step.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            for group, rate in zip(groups, rates):
                group["lr"] = rate   # floats again: the scheduler and the resume checkpoint see what they always saw
        self.graph = graph
        log.info("training step captured in a CUDA graph (batch %d)", len(self.static.y))
        return True
