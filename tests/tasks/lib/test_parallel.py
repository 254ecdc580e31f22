"""The streaming process pool: inline when a pool cannot help, bounded and fail-fast otherwise."""

from __future__ import annotations

import os
import time

import pytest

from tasks.lib.parallel import imap_unordered


def pid_of(item: int) -> tuple[int, int]:
    return item, os.getpid()


def slow_pid_of(item: int) -> tuple[int, int]:
    time.sleep(0.05)      # long enough that one worker cannot take every item before the other starts
    return item, os.getpid()


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError(f"item {item} is bad")
    return item


def test_a_single_item_runs_in_this_process_without_a_pool() -> None:
    assert list(imap_unordered(pid_of, [7], workers=4)) == [(7, os.getpid())]
    assert list(imap_unordered(pid_of, iter([]), workers=4)) == []


def test_several_items_run_in_worker_processes_and_all_come_back() -> None:
    results = list(imap_unordered(slow_pid_of, range(8), workers=2))
    assert sorted(item for item, _ in results) == list(range(8))
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids and len(pids) == 2


def test_one_worker_runs_inline_in_order() -> None:
    assert list(imap_unordered(pid_of, range(3), workers=1)) == [(i, os.getpid()) for i in range(3)]


def test_items_are_pulled_lazily_a_few_per_worker() -> None:
    pulled: list[int] = []

    def items() -> object:
        for i in range(1000):
            pulled.append(i)
            yield i

    stream = imap_unordered(pid_of, items(), workers=2, per_worker=2)
    next(stream)
    assert len(pulled) <= 2 * 2 + 2     # the first batch, plus what replaced the finished ones
    stream.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_error_is_raised(workers: int) -> None:
    with pytest.raises(ValueError, match="item 3 is bad"):
        list(imap_unordered(fail_on_three, range(6), workers=workers))
