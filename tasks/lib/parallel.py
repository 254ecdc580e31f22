"""A process pool that streams: bounded work in flight, so memory does not grow with the number of items."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int) -> int:
    """0 means one per CPU core."""
    return requested or os.cpu_count() or 1


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def imap_unordered(fn: Callable[[T], R], items: Iterable[T], workers: int, per_worker: int = 4) -> Iterator[R]:
    """fn over items in `workers` processes, results as they finish; at most workers*per_worker items pending
    (Executor.map would submit everything up front). The first exception cancels what has not started.

    With one worker, or one item, it runs inline: a pool's start and shutdown cost more than a small
    incremental run's work (a retrain that brings a few images is one item)."""
    iterator = iter(items)
    first = list(itertools.islice(iterator, 2))
    if workers <= 1 or len(first) < 2:
        yield from map(fn, itertools.chain(first, iterator))
        return
    iterator = itertools.chain(first, iterator)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: set[Future[R]] = set()
        try:
            for item in itertools.islice(iterator, workers * per_worker):
                pending.add(pool.submit(fn, item))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
                for item in itertools.islice(iterator, len(done)):
                    pending.add(pool.submit(fn, item))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
