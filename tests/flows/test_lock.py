"""The retrain lock against a real second process: it excludes, names its holder, and dies with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.lock import RetrainBusy, read_owner, retrain_lock
from tests.conftest import REPO_ROOT

HOLDER = """
import sys, time
from pathlib import Path
from flows.lock import retrain_lock
with retrain_lock(Path(sys.argv[1]), 0, {"flow_run_id": "the-holder"}):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_sigkilled_holder_releases_the_lock_and_the_next_run_takes_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RetrainBusy, match="the-holder") as busy:
            with retrain_lock(tmp_path, 0, {"flow_run_id": "second"}):
                pass
        assert f"pid {holder.pid} on " in str(busy.value)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        started = time.monotonic()
        with retrain_lock(tmp_path, 10, {"flow_run_id": "second"}) as path:
            assert read_owner(path)["flow_run_id"] == "second"
        assert time.monotonic() - started < 2   # released by the kernel at the holder's death, not by a timeout
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
