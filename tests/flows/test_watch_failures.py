"""The watch flow when a retrain fails, and when data versions keep coming (v3 after v2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.watch import state_path, watch
from tests.flows.conftest import add_data_version
from tests.flows.test_watch import make_production, md5_at

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.slow(seconds=90)
def test_a_failed_retrain_fails_the_watch_is_not_retried_and_the_next_version_trains(tiny_project: Path) -> None:
    make_production(tiny_project, md5_at(tiny_project, "main"))
    add_data_version(tiny_project, "v2", seed=7)
    v2 = md5_at(tiny_project, "v2")

    # The tiny pipeline's train stage fails when train.head.epochs is 0.
    failed = watch(root=str(tiny_project), publish=False, overrides=["train.head.epochs=0"], return_state=True)
    assert failed.is_failed(), failed
    assert f"retrain of data {v2} ended Failed" in failed.message
    record = json.loads(state_path(tiny_project).read_text())
    assert (record["data_md5"], record["state"]) == (v2, "Failed")

    # Every few minutes the watch looks again: a data version whose retrain failed is not retrained
    # in a loop (a fix comes as a new data version or a manual retrain).
    again = watch(root=str(tiny_project), publish=False)
    assert again == {"triggered": False, "data_md5": v2, "reason": "already triggered for this data version"}

    add_data_version(tiny_project, "v3", seed=8)
    v3 = md5_at(tiny_project, "v3")
    assert v3 != v2
    fixed = watch(root=str(tiny_project), publish=False)
    assert fixed["triggered"] and fixed["data_md5"] == v3
    assert fixed["retrain"]["data_md5"] == v3 and fixed["retrain"]["stages_run"][0] == "prepare"
    record = json.loads(state_path(tiny_project).read_text())
    assert (record["data_md5"], record["state"]) == (v3, "Completed")
    assert watch(root=str(tiny_project), publish=False)["reason"] == "already triggered for this data version"
