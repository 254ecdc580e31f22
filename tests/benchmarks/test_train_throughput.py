"""The throughput benchmark runs end to end in CPU mode and reports every figure the targets use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run

RATES = ["plain_frozen", "plain_unfreeze", "project_frozen", "project_frozen_amortised", "project_frozen_backbone",
         "project_feature_extract", "project_unfreeze", "ceiling_frozen", "ceiling_unfreeze"]
RATIOS = ["speedup_frozen", "speedup_frozen_amortised", "speedup_unfreeze", "efficiency_frozen",
          "efficiency_unfreeze", "cached_vs_backbone_epoch_ratio"]


@pytest.mark.slow
def test_cpu_mode_prints_a_table_and_ends_with_the_json_report(tmp_path: Path) -> None:
    proc = run([sys.executable, "benchmarks/train_throughput.py", "--device", "cpu", "--arch", "mobilenet_v3_small",
                "--image-size", "32", "--batch-size", "8", "--num-images", "40", "--steps", "2", "--warmup", "1",
                "--repeats", "1", "--workers", "1", "--profile", str(tmp_path)], REPO_ROOT,
               env={"OMP_NUM_THREADS": "1"})
    lines = proc.stdout.strip().splitlines()
    assert any("unfreeze (b) project" in line for line in lines)          # the table came first
    report = json.loads(lines[-1])
    result = report["results"]["mobilenet_v3_small"]
    for key in RATES:
        assert result[f"{key}_img_per_s"] > 0, key
    for key in RATIOS:
        assert result[key] > 0, key
    assert set(result["peak_gpu_mem_mb"]) >= {"plain_frozen", "project_unfreeze", "ceiling_unfreeze"}
    assert report["peak_host_rss_mb"] > 0 and report["cache_build_img_per_s"] > 0
    env = report["environment"]
    assert env["device"] == "cpu" and env["image_size"] == 32 and env["batch_size"] == 8 and env["torch"]
    profiles = (tmp_path / "profile.txt").read_text()   # --profile: where (b)'s time goes, op by op
    assert "mobilenet_v3_small_frozen_cached:" in profiles and "mobilenet_v3_small_unfreeze:" in profiles
    assert "Optimizer.step" in profiles
