"""Resume state of the train stage: what `<train.out_dir>/resume/last.pt` holds and how it is checked.

`Progress` is how far a run has got (phase, epochs, best metric, history).
`Checkpointer` writes the best model (`model.pt`) and, after every epoch, the
resume state: progress, model, optimizer, scheduler, scaler and every RNG
state (`get_rng_state` / `set_rng_state`), so `train.resume: auto` continues
exactly. `run_fingerprint` hashes what makes that state valid (train params,
arch, weights, split files); `restore` loads it only when the fingerprint
matches and the run did not finish, and starts fresh otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.lib.config import Params
from tasks.lib.io import atomic_path, sha256_file
from tasks.lib.models import save_checkpoint, unwrap
from tasks.lib.preprocess import Preprocessing

log = logging.getLogger("train")

RESUME_FORMAT = 1


@dataclass
class Progress:
    """What the run has done so far; saved in the resume checkpoint."""

    phase: str = "head"
    epochs_done: int = 0                 # in the current phase
    phase_stopped: bool = False          # early stopping ended the current phase
    global_epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    best_phase: str = ""
    bad_epochs: int = 0
    train_images: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


TRAINING_FILES = ("train.csv", "val.csv", "classes.json")


def training_data_sha256(prepared_dir: Path) -> str:
    """One hash of the split files training reads (each lists its images' content hashes): the model's data."""
    files = {name: sha256_file(Path(prepared_dir) / name) for name in TRAINING_FILES}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def run_fingerprint(params: Params, record: dict[str, Any]) -> str:
    """What makes a resume state valid: train params (but not resume itself), arch, weights and the split files."""
    train = params.train.model_dump(mode="json", exclude={"resume", "timeout_minutes", "num_workers"})
    inputs = {
        "train": train, "arch": params.model.arch, "weights_sha256": record.get("sha256"),
        "data": training_data_sha256(params.data.prepared_dir), "raw_dir": str(params.data.raw_dir),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def restore(path: Path, fingerprint: str, model: nn.Module, enabled: bool) -> tuple[Progress, dict[str, Any] | None]:
    """Progress and resume state from `path` when it belongs to this run; a fresh start otherwise."""
    if not enabled or not path.exists():
        return Progress(), None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file must not block training
        log.warning("ignoring %s: cannot be read (%s); starting fresh", path, err)
        return Progress(), None
    if state.get("format") != RESUME_FORMAT or state.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it was made with other params or data; starting fresh", path)
        return Progress(), None
    if state.get("finished"):
        log.info("%s is from a finished run; starting fresh", path)
        return Progress(), None
    progress = Progress(**state["progress"])
    unwrap(model).load_state_dict(state["model"])
    log.info("resuming from %s: phase %s, %d epoch(s) done", path, progress.phase, progress.epochs_done)
    return progress, state


class Checkpointer:
    """Writes model.pt (best epoch) and resume/last.pt (every epoch), atomically, on the main process."""

    def __init__(self, out_dir: Path, arch: str, classes: list[str], prep: Preprocessing, record: dict[str, Any],
                 fingerprint: str, data_sha256: str) -> None:
        self.out_dir, self.arch, self.classes, self.prep = out_dir, arch, classes, prep
        self.record, self.fingerprint, self.data_sha256 = record, fingerprint, data_sha256
        self.resume_path = out_dir / "resume" / "last.pt"

    def save_best(self, model: nn.Module, row: dict[str, Any]) -> None:
        save_checkpoint(self.out_dir / "model.pt", model, arch=self.arch, class_names=self.classes,
                        preprocessing=self.prep, weights=self.record,
                        extra={"epoch": row["epoch"], "phase": row["phase"], "val_accuracy": row["val_accuracy"],
                               "val_macro_f1": row["val_macro_f1"], "data_sha256": self.data_sha256})

    def save_calibration(self, best: dict[str, Any], report: dict[str, float]) -> None:
        """model.pt again, with the fitted temperature (`best` is its loaded payload)."""
        payload = {**best, "temperature": report["temperature"], "calibration": report}
        with atomic_path(self.out_dir / "model.pt") as tmp, open(tmp, "wb") as handle:
            torch.save(payload, handle)

    def save_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                    progress: Progress, finished: bool = False) -> None:
        state = {
            "format": RESUME_FORMAT, "fingerprint": self.fingerprint, "finished": finished,
            "progress": asdict(progress),
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "rng": get_rng_state(),
        }
        with atomic_path(self.resume_path) as tmp:
            torch.save(state, tmp)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
