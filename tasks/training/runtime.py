"""Where and how the train stage runs: device, precision, seeds, and DDP (launch, wrap, shard, gather).

Nothing here knows about data, models or checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tasks.lib.config import Params, TrainParams
from tasks.lib.errors import StageError
from tasks.lib.io import read_json

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    amp_dtype: torch.dtype | None        # None: fp32
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(cfg: TrainParams) -> Runtime:
    """Device, precision, seeds and (under torchrun) the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            # Processes share the cores; oversubscribing them makes gloo training crawl.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # Random or badly scaled backbones produce denormal floats, which slow CPU kernels 10-100x.
    torch.set_flush_denormal(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed = cfg.seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    rt = Runtime(device=device, amp_dtype=pick_precision(cfg.precision, device), rank=rank, world=world)
    log.info("training on %s (precision %s, %d process(es))", device, rt.amp_dtype or "fp32", world)
    return rt


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise StageError("train.device is cuda but no CUDA device is visible; set train.device: auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise StageError("train.device is mps but MPS is not available; set train.device: auto or cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported, else fp16; fp32 elsewhere. fp16 needs CUDA (GradScaler)."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise StageError(f"train.precision fp16 needs CUDA (loss scaling); on {device.type} use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def launch_ddp(params: Params) -> dict[str, Any]:
    """Re-run tasks.train under torch.distributed.run with the resolved params (one process per device)."""
    cfg = params.train
    params_file = cfg.out_dir / "resume" / "ddp_params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc_per_node}",
           "-m", "tasks.train", "--params", str(params_file)]
    log.info("launching %d DDP processes: %s", cfg.nproc_per_node, " ".join(cmd))
    code = subprocess.call(cmd)
    if code != 0:
        raise StageError(f"a DDP training process failed (exit {code}); its error is in the log above")
    return read_json(params.report_paths(Path("."))["train_metrics"])


def teardown_runtime(rt: Runtime) -> None:
    """Leave the process group that setup_runtime joined under torchrun."""
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    if rt.world == 1:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard(n: int, rt: Runtime) -> tuple[torch.Tensor, int]:
    """This rank's contiguous share of range(n) and how many of its rows are real: ceil(n / world) rows,
    wrapping around to the start as DistributedSampler pads, so `gather_rows` gathers equal shapes."""
    per = -(-n // rt.world)
    start = rt.rank * per
    return torch.arange(start, start + per) % n, max(0, min(n, start + per) - start)


def gather_rows(local: torch.Tensor, n: int, rt: Runtime) -> torch.Tensor:
    """Every rank's `shard` result in rank order, padding dropped: the same (n, ...) tensor on every rank."""
    if rt.world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(rt.world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]
