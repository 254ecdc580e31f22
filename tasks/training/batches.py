"""Batches made ahead of the step that uses them, in a background thread (and on a side CUDA stream).

A GPU step must never wait for its batch, and any host sync inside a step delays the gather of the next.
`BatchProducer` makes batch N+1 (gather into pinned memory, upload, augmentation) while step N runs; on
CUDA on its own stream, handed over with an event. `make` is called once per batch, in order, from one
thread, so what it draws from the epoch's generator is bit for bit what the synchronous loop drew (resume
relies on that); it must never draw from the global RNGs the step uses (dropout).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

# Batches made ahead of the step. Two cover a slow gather next to a fast step
# without holding much memory (each ResNet-50 batch at 224 px is ~150 MB of float32 on the device).
PREFETCH = 2
# How often a blocked producer looks whether the consumer has gone (seconds).
POLL_S = 0.1


@dataclass
class Batch:
    """What one step takes: the indices into the split, labels and input on the device (either may be None)."""

    idx: torch.Tensor
    y: torch.Tensor | None = None
    x: torch.Tensor | None = None


class BatchProducer:
    """Iterate over `make(idx)` for each idx of `order`, made up to `depth` batches ahead (0: in the calling
    thread, the synchronous path). Use as a context manager: leaving it stops the thread."""

    def __init__(self, order: Sequence[torch.Tensor], make: Callable[[torch.Tensor], Batch], device: torch.device,
                 depth: int | None = None) -> None:
        if device.type == "cuda" and device.index is None:   # the thread sets its device, which needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        self.order, self.make, self.device = list(order), make, device
        self.depth = PREFETCH if depth is None else depth
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and self.depth else None
        self._queue: queue.Queue[tuple[Batch, Any] | BaseException] = queue.Queue(maxsize=max(1, self.depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.order)

    def __enter__(self) -> BatchProducer:
        if self.depth and self.order:
            if self.stream is not None:
                # Whatever the training stream queued so far (e.g. mean/std) is done before the side stream reads it.
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __iter__(self) -> Iterator[Batch]:
        if self._thread is None:
            yield from (self.make(idx) for idx in self.order)
            return
        for _ in self.order:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch, event = item
            if event is not None:
                self._hand_over(batch, event)
            yield batch

    # ---- the background thread
    def _produce(self) -> None:
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)   # the current device is per thread
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                for idx in self.order:
                    if self._stop.is_set():
                        return
                    batch = self.make(idx)
                    event = None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    if not self._put((batch, event)):
                        return
        except BaseException as err:  # handed to the consumer, which raises it in the training thread
            self._put(err)

    def _put(self, item: tuple[Batch, Any] | BaseException) -> bool:
        """Queue an item unless the consumer has stopped; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _hand_over(self, batch: Batch, event: torch.cuda.Event) -> None:
        """The training stream waits (on the device) for the batch; its memory then belongs to that stream too."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in (batch.x, batch.y):
            if tensor is not None and tensor.is_cuda:
                # Made on the side stream: without this its memory could be reused while the step still reads it.
                tensor.record_stream(current)
