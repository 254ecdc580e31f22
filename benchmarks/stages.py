"""What the benchmarks that run the project's stages share: params with every output under a work folder, a
stage run as DVC starts it, and progress lines on stderr (stdout ends with the report's JSON line)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.config import Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "decode_cache", "fetch_weights", "train", "evaluate")


def work_paths(work: Path) -> dict[str, str]:
    """Every output and cache of the pipeline under work/, so a run neither reads nor changes the project's."""
    return {
        "data.raw_dir": str(work / "data" / "raw"), "data.prepared_dir": str(work / "data" / "prepared"),
        "cache.out_dir": str(work / "artifacts" / "decoded"), "cache.store_dir": str(work / "cache" / "decoded"),
        "cache.features_dir": str(work / "cache" / "features"), "prepare.cache_dir": str(work / "cache" / "prepare"),
        "model.out_dir": str(work / "artifacts" / "weights"),
        "train.out_dir": str(work / "artifacts" / "train"), "evaluate.out_dir": str(work / "artifacts" / "evaluate"),
        "reports.dir": str(work / "metrics"),
    }


def write_params(work: Path, base: Path, fixed: dict[str, Any], overrides: list[str]) -> tuple[Path, Params]:
    """base, then `fixed`, then the -S overrides; validated, resolved and written to work/params.yaml."""
    params = load_params(base, [f"{key}={json.dumps(value)}" for key, value in fixed.items()] + overrides)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path, params


def run_stage(stage: str, params_file: Path, cmd: list[str] | None = None) -> float:
    """One stage in its own process, as DVC starts it (or `cmd`, which runs it); its output goes to stderr.
    Returns its wall time."""
    cmd = cmd or [sys.executable, "-m", f"tasks.{stage}", "--params", str(params_file)]
    log(f"== {stage}: {' '.join(cmd)}")
    started = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO_ROOT, stdout=sys.stderr)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: stage {stage} failed (exit {code}) after {seconds:.1f} s; its output is above")
    log(f"== {stage}: {seconds:.1f} s")
    return seconds


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
