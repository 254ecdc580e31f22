"""The running training loss, summed on the device and read without stalling it.

Reading a CUDA tensor on the host waits for every queued kernel, and the GPU then idles. `snapshot`
copies the sum to pinned memory without blocking and `latest` reads only copies that have arrived, so a
NaN shows up a few steps late, never later than `mean` at the epoch's end. On the CPU a snapshot is read at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class Reading:
    """The mean training loss over the first `seen` samples of the epoch, as of step `step` (0-based)."""

    step: int
    seen: int
    mean: float


class LossMeter:
    """Sum of loss * batch size over an epoch; `total` may be a tensor a CUDA graph adds into itself."""

    def __init__(self, device: torch.device, total: torch.Tensor | None = None) -> None:
        self.device = device
        self.total = total if total is not None else torch.zeros((), device=device)
        self.seen = 0
        self._pending: deque[tuple[int, int, torch.Tensor, torch.cuda.Event]] = deque()
        self._latest: Reading | None = None

    def add(self, loss: torch.Tensor, n: int) -> None:
        """One step's mean loss over n samples (queued on the device, no sync)."""
        self.total += loss.detach() * n
        self.seen += n

    def count(self, n: int) -> None:
        """n more samples whose loss something else (a CUDA graph) already added to `total`."""
        self.seen += n

    def snapshot(self, step: int) -> None:
        """Start reading the sum as of now; `latest` returns it once it has arrived."""
        if self.device.type != "cuda":
            self._latest = Reading(step, self.seen, float(self.total / self.seen))
            return
        host = torch.empty((), dtype=self.total.dtype, pin_memory=True)
        host.copy_(self.total, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pending.append((step, self.seen, host, event))

    def latest(self) -> Reading | None:
        """The newest snapshot that has arrived on the host (never waits); None before the first."""
        while self._pending and self._pending[0][3].query():
            step, seen, host, _ = self._pending.popleft()
            self._latest = Reading(step, seen, float(host) / seen)
        return self._latest

    def mean(self) -> float:
        """The epoch's mean loss (waits for the device once)."""
        self._pending.clear()
        return float(self.total / max(self.seen, 1))
