"""What the benchmarks share: params with every output under a work folder, a stage run as DVC starts it, the
environment and the report's output, and progress lines on stderr (stdout ends with the report's JSON line)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

from tasks.lib.config import Params, load_params
from tasks.lib.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "decode_cache", "fetch_weights", "train", "evaluate")
# The official Fashion-MNIST test set, beside tasks.lib.demo_data's training files.
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


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
    """One stage in its own process, as DVC starts it (or `cmd`, which runs it), its output on stderr; its wall time."""
    cmd = cmd or [sys.executable, "-m", f"tasks.{stage}", "--params", str(params_file)]
    log(f"== {stage}: {' '.join(cmd)}")
    started = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO_ROOT, stdout=sys.stderr)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: stage {stage} failed (exit {code}) after {seconds:.1f} s; its output is above")
    log(f"== {stage}: {seconds:.1f} s")
    return seconds


def calibrated_model(arch: str, num_classes: int) -> torch.nn.Module:
    """The project's model with ImageNet-like BatchNorm statistics (no pretrained weights offline).

    With the init statistics (mean 0, var 1) a random backbone's eval-mode features shrink to ~1e-10: denormal
    floats, which make CPU matmuls many times slower and would time the arithmetic, not the loop. One train-mode
    pass over noise calibrates them, as pretrained weights would have.
    """
    model = build_model(arch, num_classes)
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            momenta[module], module.momentum = module.momentum, None   # None: a plain average
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    for module, momentum in momenta.items():
        module.momentum = momentum
    return model


def environment(cuda: bool) -> dict[str, Any]:
    """The machine and library versions a figure was measured with."""
    return {"device": "cuda" if cuda else "cpu",
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def emit(result: dict[str, Any], out: Path | None, name: str) -> None:
    """The report as the last stdout line, and in OUT/<name>.json with --out."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, sort_keys=True), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
