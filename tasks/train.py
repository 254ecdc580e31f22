"""Stage train: fine-tune a pretrained backbone with a new head (`python -m tasks.train`).

Phase 1 ("head") trains only the new head on the frozen backbone; phase 2 ("finetune") optionally
unfreezes the last N blocks or all of it (docs/training.md). The validation metric is macro-F1, as the
promotion gate's. Outputs: model.pt (the best epoch with its fitted temperature) and resume/ in
train.out_dir; train.json and train/ (curves) in reports.dir. The test split is never read here.
The pieces live in `tasks/training/`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from tasks.lib.cli import stage_main
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.figures import training_curves
from tasks.lib.image_cache import training_images
from tasks.lib.io import write_json
from tasks.lib.models import build_model, default_preprocessing, unwrap
from tasks.lib.preprocess import Preprocessing, train_preprocessing
from tasks.lib.split_files import labels_of, read_classes, read_split, split_path
from tasks.lib.weights import load_backbone_state
from tasks.training.calibration import calibration_report, fit_temperature
from tasks.training.label_issues import check_labels
from tasks.training.loop import Data, Hooks, NonFiniteLoss, Run, fit_phase, predict
from tasks.training.phases import finetune_phase, head_phase
from tasks.training.plots import write_curves
from tasks.training.runtime import Runtime, launch_ddp, setup_runtime, teardown_runtime
from tasks.training.state import Checkpointer, Progress, restore, run_fingerprint, training_data_sha256

__all__ = ["Hooks", "NonFiniteLoss", "run", "train"]

log = logging.getLogger("train")


def run(params: Params) -> dict[str, Any]:
    """The stage: train in this process, or re-launch under torchrun when nproc_per_node > 1."""
    if params.train.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ddp(params)
    return train(params)


def train(params: Params, hooks: Hooks | None = None, cache_features: bool | None = None) -> dict[str, Any]:
    """Train both phases and write model.pt, the metrics (reports.dir/train.json) and curves; returns the metrics.
    cache_features False runs the whole network every step instead of caching what its frozen part computes."""
    cfg, hooks = params.train, hooks or Hooks()
    rt = setup_runtime(cfg)
    try:
        return _train(params, rt, hooks, cache_features)
    finally:
        teardown_runtime(rt)


def _train(params: Params, rt: Runtime, hooks: Hooks, cache_features: bool | None) -> dict[str, Any]:
    cfg = params.train
    classes = read_classes(params.data.prepared_dir)
    backbone_state, weights = load_backbone_state(params.model.out_dir)
    arch = str(weights.get("arch") or params.model.arch)
    if arch != params.model.arch:
        raise StageError(f"{params.model.out_dir}/weights.json is for {arch!r} but model.arch is "
                         f"{params.model.arch!r}; re-run fetch_weights (dvc repro fetch_weights)")
    prep = preprocessing_for(arch, cfg.image_size, weights)
    data = load_data(params, prep, rt, len(classes))
    model = build_model(arch, len(classes), backbone_state).to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_labels(params, rt, data, model, classes)   # the pretrained features, before a resume loads trained ones

    fingerprint = run_fingerprint(params, weights)
    progress, resume_state = restore(cfg.out_dir / "resume", fingerprint, model, cfg.resume == "auto")
    ckpt = Checkpointer(cfg.out_dir, arch, classes, prep, weights, fingerprint,
                        training_data_sha256(params.data.prepared_dir))
    if resume_state is not None and rt.main:
        ckpt.keep_best(model, progress)
    reports = params.report_paths(Path("."))
    training = Run(cfg, rt, data, model, progress, ckpt, reports["train_plots"], hooks,
                   pretrained=backbone_state is not None, features_dir=params.cache.features_dir)

    if progress.phase == "head":
        if cfg.head.epochs > 0:
            fit_phase(training, head_phase(training, cache_features), resume_state)
        resume_state = None
        progress.phase, progress.epochs_done, progress.phase_stopped, progress.bad_epochs = "finetune", 0, False, 0
    if cfg.finetune.unfreeze != "none" and cfg.finetune.epochs > 0:
        fit_phase(training, finetune_phase(training, cache_features), resume_state)

    metrics = summary_metrics(progress, rt, arch, weights)
    metrics.update(calibrate(training))
    if rt.main:
        ckpt.save_resume(model, None, None, None, progress, finished=True)
        write_curves(reports["train_plots"], progress.history)   # also when a resumed run had no epoch left
        training_curves(progress.history, reports["train_plots"] / "curves.png")
        write_json(reports["train_metrics"], metrics)
    log.info("best val macro-F1 %.4f (accuracy %.4f) at epoch %d; model: %s", progress.best_metric,
             metrics["val_accuracy"], progress.best_epoch, cfg.out_dir / "model.pt")
    return metrics


def preprocessing_for(arch: str, image_size: int, weights: dict[str, Any]) -> Preprocessing:
    """The eval preprocessing at train.image_size, with the mean/std weights.json records, if any."""
    prep = default_preprocessing(arch, image_size)
    recorded = weights.get("preprocessing") or {}
    if recorded.get("mean") and recorded.get("std"):
        prep = Preprocessing(prep.crop_size, prep.resize_size, prep.interpolation,
                             tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"]))
    return prep


def load_data(params: Params, prep: Preprocessing, rt: Runtime, num_classes: int) -> Data:
    """Train at the eval crop (and with a margin if a phase augments), val at the eval crop, from the decoded cache."""
    cfg, prepared = params.train, params.data.prepared_dir
    train_rows, val_rows = (read_split(split_path(prepared, split)) for split in ("train", "val"))
    if not train_rows or not val_rows:
        raise StageError(f"{prepared}: the train and val splits must both have images; re-run prepare with more data")
    augments = cfg.head.augment or (cfg.finetune.augment and cfg.finetune.unfreeze != "none")
    preps = [prep, train_preprocessing(prep, params.cache.margin)] if augments else [prep]
    # The decode_cache stage's memory-mapped arrays, checked against the split files and the preprocessing.
    train_arrays = training_images(params, "train", train_rows, preps, pin=rt.device.type == "cuda")
    (val_array,) = training_images(params, "val", val_rows, [prep], pin=rt.device.type == "cuda")
    return Data(
        train_eval=train_arrays[0],
        train_margin=train_arrays[1] if augments else None,
        train_y=torch.from_numpy(labels_of(train_rows)),
        val_x=val_array,
        val_y=torch.from_numpy(labels_of(val_rows)),
        mean=torch.tensor(prep.mean, device=rt.device),
        std=torch.tensor(prep.std, device=rt.device),
        num_classes=num_classes,
    )


def calibrate(training: Run) -> dict[str, float]:
    """Fit the temperature on the best epoch's validation logits; write model.pt, the best epoch with it."""
    if training.rt.world > 1:
        torch.distributed.barrier()   # rank 0 wrote best.pt; every rank reads the same best epoch
    best = training.ckpt.load_best()
    unwrap(training.model).load_state_dict(best["state_dict"])
    logits = predict(training, training.model, training.data.val_x, "calibration")
    temperature = fit_temperature(logits, training.data.val_y)
    report = calibration_report(logits, training.data.val_y, temperature)
    if training.rt.main:
        training.ckpt.save_model(best, report)
    log.info("temperature %.3f fitted on the validation split: val NLL %.4f -> %.4f", temperature,
             report["val_nll_before"], report["val_nll_after"])
    return report


def summary_metrics(progress: Progress, rt: Runtime, arch: str, weights: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the best epoch's validation numbers plus how the run went."""
    best = next((r for r in progress.history if r["epoch"] == progress.best_epoch), None)
    if best is None:
        raise StageError("no epoch was trained: set train.head.epochs or train.finetune.epochs above 0")
    return {
        "val_accuracy": best["val_accuracy"],
        "val_macro_f1": best["val_macro_f1"],
        "val_loss": best["val_loss"],
        "epochs": progress.global_epoch,
        "best_epoch": progress.best_epoch,
        "best_phase": progress.best_phase,
        "train_img_per_s": progress.train_images / max(progress.train_seconds, 1e-9),
        **phase_summary(progress.history),
        "train_seconds": progress.train_seconds,
        "device": str(rt.device.type),
        "precision": str(rt.amp_dtype).removeprefix("torch.") if rt.amp_dtype else "fp32",
        "world_size": rt.world,
        "arch": arch,
        "weights": weights.get("weights"),
        "weights_sha256": weights.get("sha256"),
    }


def phase_summary(history: list[dict[str, Any]]) -> dict[str, float | int]:
    """Per phase that ran: epochs, training seconds, images per second (cached-feature epochs are far faster than
    fine-tuning ones) and best val macro-F1, so the model card can say what a phase cost and whether it paid."""
    facts: dict[str, float | int] = {}
    for phase in ("head", "finetune"):
        rows = [r for r in history if r["phase"] == phase]
        if rows:
            seconds = sum(r["seconds"] for r in rows)
            images = sum(r["train_img_per_s"] * r["seconds"] for r in rows)
            facts |= {f"{phase}_epochs": len(rows), f"{phase}_seconds": seconds,
                      f"{phase}_img_per_s": images / max(seconds, 1e-9),
                      f"{phase}_best_val_macro_f1": max(r["val_macro_f1"] for r in rows)}
    return facts


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Fine-tune the pretrained backbone with a new head (frozen head phase, optional unfreeze).",
                      argv)


if __name__ == "__main__":
    sys.exit(main())
