"""The data-scale benchmark runs end to end on a handful of images and reports every figure the targets use."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO_ROOT, run


@pytest.mark.slow(seconds=35)
def test_data_scale_prints_a_table_and_ends_with_the_json_report(tmp_path) -> None:
    proc = run([sys.executable, "benchmarks/data_scale.py", "--n", "20", "--classes", "2", "--added", "0.1",
                "--workers", "2", "--work", str(tmp_path / "work")], REPO_ROOT, env={"OMP_NUM_THREADS": "1"})
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("decode_cache") for line in lines)          # the table came first
    report = json.loads(lines[-1])
    assert report["n"] == 20 and report["n_added"] == 2
    for step in ("prepare", "decode_cache", "features"):
        assert report["full"][step]["img_per_core_s"] > 0 and report["full"][step]["vs_pillow"] > 0
    assert report["full"]["prepare"]["decoded"] == 20 and report["incremental"]["prepare"]["decoded"] == 2
    assert report["incremental"]["decode_cache"]["decoded"] == 2           # the other rows came from the store
    for step in ("prepare", "decode_cache"):
        assert report["full"][step]["rss_vs_tenth"] > 0
    assert report["full"]["dvc_add_s"] > 0 and report["incremental"]["dvc_status_s"] > 0
    for run_ in ("full", "incremental"):       # decode_cache ran through dvc repro, its outputs hashed by DVC
        assert report[run_]["decode_cache"]["dvc_repro_s"] > report[run_]["decode_cache"]["seconds"] > 0
    assert 0 < report["incremental_vs_full"] and report["pillow_img_per_core_s"] > 0
