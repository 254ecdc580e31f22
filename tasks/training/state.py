"""Resume state of the train stage: what `<train.out_dir>/resume/` holds and how it is checked.

resume/last.pt (every epoch: progress, model, optimizer, scheduler, scaler, RNG states) and resume/best.pt
(the best epoch) live outside the stage's DVC outputs, which `dvc repro` deletes before it re-runs an
interrupted stage. `restore` loads last.pt only when it can lead to a finished run, else starts fresh.
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

log = logging.getLogger(__name__)

RESUME_FORMAT = 2        # 2: the best epoch's weights are resume/best.pt, no longer model.pt


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
LAST, BEST = "last.pt", "best.pt"      # in <train.out_dir>/resume/


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
        "label_issues": params.prepare.label_issues,   # exclude trains on fewer rows
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def restore(resume_dir: Path, fingerprint: str, model: nn.Module,
            enabled: bool) -> tuple[Progress, dict[str, Any] | None]:
    """Progress and resume state from `resume_dir` when it belongs to this run; a fresh start otherwise."""
    path = resume_dir / LAST
    if not enabled or not path.exists():
        return Progress(), None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file must not block training
        log.warning("ignoring %s: cannot be read (%s); starting fresh", path, err)
        return Progress(), None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("ignoring %s: written by another version of this code; starting fresh", path)
        return Progress(), None
    if state.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it was made with other params or data; starting fresh", path)
        return Progress(), None
    if state.get("finished"):
        log.info("%s is from a finished run; starting fresh", path)
        return Progress(), None
    try:
        progress = Progress(**state["progress"])
        fits(state["model"], unwrap(model))
    except (KeyError, TypeError, ValueError) as err:
        log.warning("ignoring %s: it does not fit this model or code (%s); starting fresh", path, err)
        return Progress(), None
    missing = missing_best(resume_dir / BEST, progress, fingerprint)
    if missing:
        log.warning("ignoring %s: %s, and a resumed run could not write model.pt without it; starting fresh",
                    path, missing)
        return Progress(), None
    unwrap(model).load_state_dict(state["model"])
    log.info("resuming from %s: phase %s, %d epoch(s) done", path, progress.phase, progress.epochs_done)
    return progress, state


def fits(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ValueError unless state_dict has exactly model's keys and shapes (load_state_dict would half-load)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ValueError(f"other weights: {wrong}")


def missing_best(path: Path, progress: Progress, fingerprint: str) -> str | None:
    """Why the best epoch's weights are not at hand for this resume state; None when they are (last.pt is
    written before best.pt, so a state saved at its best epoch holds them itself)."""
    if progress.best_epoch == progress.global_epoch:
        return None
    if not path.exists():
        return f"{path} (the weights of its best epoch {progress.best_epoch}) is missing"
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        return f"{path} cannot be read ({err})"
    if not isinstance(best, dict) or best.get("fingerprint") != fingerprint or best.get("epoch") != progress.best_epoch:
        return f"{path} is not the weights of its best epoch {progress.best_epoch}"
    return None


class Checkpointer:
    """Writes resume/last.pt (every epoch), resume/best.pt (best epoch) and, at the end, model.pt, atomically."""

    def __init__(self, out_dir: Path, arch: str, classes: list[str], prep: Preprocessing, record: dict[str, Any],
                 fingerprint: str, data_sha256: str) -> None:
        self.out_dir, self.arch, self.classes, self.prep = out_dir, arch, classes, prep
        self.record, self.fingerprint, self.data_sha256 = record, fingerprint, data_sha256
        self.resume_path = out_dir / "resume" / LAST
        self.best_path = out_dir / "resume" / BEST

    def save_best(self, model: nn.Module, row: dict[str, Any]) -> None:
        """The best epoch so far as model.pt will hold it, plus the fingerprint of the run it belongs to."""
        save_checkpoint(self.best_path, model, arch=self.arch, class_names=self.classes,
                        preprocessing=self.prep, weights=self.record,
                        extra={"epoch": row["epoch"], "phase": row["phase"], "val_accuracy": row["val_accuracy"],
                               "val_macro_f1": row["val_macro_f1"], "data_sha256": self.data_sha256,
                               "fingerprint": self.fingerprint})

    def keep_best(self, model: nn.Module, progress: Progress) -> None:
        """After a resume at the best epoch: best.pt from the weights last.pt held (the run may have stopped
        before it wrote best.pt, and the next last.pt will no longer hold them)."""
        if progress.best_epoch and progress.best_epoch == progress.global_epoch:
            self.save_best(model, next(r for r in progress.history if r["epoch"] == progress.best_epoch))

    def load_best(self) -> dict[str, Any]:
        return torch.load(self.best_path, map_location="cpu", weights_only=True)

    def save_model(self, best: dict[str, Any], report: dict[str, float]) -> None:
        """model.pt, the stage's output: the best epoch (`best` is best.pt's payload) with the fitted temperature."""
        payload = {**{k: v for k, v in best.items() if k != "fingerprint"},
                   "temperature": report["temperature"], "calibration": report}
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
