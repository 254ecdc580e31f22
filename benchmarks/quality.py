#!/usr/bin/env python
"""Model quality: the project's model beside what a user gets elsewhere, on the same images, in one run.

On one dataset's split files it trains, on the same train/val images, and scores on the same held-out test images:
(a) logistic regression and an RBF SVM on the raw pixels (the features of evaluate's baseline,
tasks/lib/baseline.py); (b) the plain recipe the PyTorch transfer-learning tutorial teaches, on the project's
backbone and pretrained weights; (c) this project's own stages as processes, with the current params plus `-S`
overrides. For each: test accuracy and macro-F1 with 95% intervals, ECE, log loss and wall time; for Fashion-MNIST
also on the 10,000 official test images. benchmarks/README.md details each model and records what was measured.

    python benchmarks/quality.py                              # the demo data (Fashion-MNIST subset), CPU
    python benchmarks/quality.py --dataset digits             # scikit-learn's 8x8 digits, another dataset
    python benchmarks/quality.py --data path/to/project       # a project whose prepare stage has run
    python benchmarks/quality.py -S train.finetune.epochs=4   # try a change of the recipe
    python benchmarks/quality.py --profile params.gpu.yaml --device cuda --dataset fashion-full   # GPU
    python benchmarks/quality.py --flip-labels 0.05 [-S prepare.label_issues=exclude]   # label-issue check
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.calibration import CalibratedClassifierCV  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import SVC  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

from benchmarks.stages import (  # noqa: E402
    STAGES, TEST_IMAGES, TEST_LABELS, emit, environment, log, run_stage, work_paths, write_params,
)
from tasks.evaluate import predict_probs  # noqa: E402
from tasks.lib.baseline import pixel_geometry, pixel_matrix, stratified_subset  # noqa: E402
from tasks.lib.config import Params, load_params  # noqa: E402
from tasks.lib.demo_data import CLASS_NAMES as FASHION_CLASSES  # noqa: E402
from tasks.lib.demo_data import materialise, read_idx  # noqa: E402
from tasks.lib.images import load_rgb  # noqa: E402
from tasks.lib.io import read_json, sha256_file  # noqa: E402
from tasks.lib.metrics import compute_metrics  # noqa: E402
from tasks.lib.models import build_model, load_checkpoint  # noqa: E402
from tasks.lib.split_files import SplitRow, labels_of, read_classes, read_split, split_path, write_split  # noqa: E402
from tasks.lib.uncertainty import bootstrap_macro_f1, interval_text, wilson_interval  # noqa: E402
from tasks.lib.weights import load_backbone_state  # noqa: E402
from tasks.train import preprocessing_for  # noqa: E402

SVM_MAX_TRAIN = 20_000        # an RBF SVM costs O(n^2): above this it trains on a stratified subset
TUTORIAL_LR, TUTORIAL_MOMENTUM, TUTORIAL_STEP, TUTORIAL_GAMMA = 0.001, 0.9, 7, 0.1
# On 2 CPU cores one full fine-tuning epoch of the demo costs ~30-45 s, about what the project's whole
# phase 2 on cached activations costs: 3 epochs give the tutorial at least the project's time.
CPU_TUTORIAL_EPOCHS = 3
FLIP_SEED = 5                 # --flip-labels: which training labels are flipped, and to what


@dataclass
class Split:
    """One split's images as files, with labels in class-index order."""

    rows: list[SplitRow]
    raw_dir: Path

    @property
    def labels(self) -> np.ndarray:
        return labels_of(self.rows)

    def paths(self) -> list[Path]:
        return [self.raw_dir / r.path for r in self.rows]


def write_dataset(name: str, raw: Path, params: Params, source: Path) -> None:
    """The named dataset as an ImageFolder of PNGs under raw (deterministic bytes)."""
    demo = params.data.demo
    if name == "digits":
        digits = load_digits()
        for index, (image, label) in enumerate(zip(digits.images, digits.target)):
            folder = raw / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(image * 255 / 16).astype(np.uint8)   # 0..16 grey levels -> 0..255
            Image.fromarray(pixels).save(folder / f"{index:04d}.png", optimize=False, compress_level=6)
    elif name == "demo":
        materialise(raw, demo.per_class, demo.seed, source, demo.download_dir)
    elif name.startswith("fashion-"):      # fashion-<per class>[-<seed>]: another draw of Fashion-MNIST
        _, per_class, *seed = name.split("-")
        materialise(raw, int(per_class), int(seed[0]) if seed else 1, source, demo.download_dir)
    else:
        raise SystemExit(f"error: unknown --dataset {name!r}; use demo, digits or fashion-<per class>[-<seed>]")


def official_fashion_test(source: Path, work: Path, class_names: list[str], limit: int) -> Split:
    """The 10,000 official Fashion-MNIST test images as PNGs, labelled in the dataset's class order."""
    if not (source / TEST_IMAGES).exists() or not (source / TEST_LABELS).exists():
        raise SystemExit(f"error: {source} lacks {TEST_IMAGES}; pass --source or --official-test off")
    images, labels = read_idx(source / TEST_IMAGES)[:limit], read_idx(source / TEST_LABELS)[:limit]
    folder = work / "official_test"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, label) in enumerate(zip(images, labels)):
        path = folder / f"{index:05d}.png"
        Image.fromarray(image).save(path, optimize=False, compress_level=1)
        # evaluate refuses an image whose bytes differ from the hash its split recorded, as prepare records it
        rows.append(SplitRow(path=path.name, label=class_names.index(FASHION_CLASSES[label]),
                             sha256=sha256_file(path)))
    return Split(rows, folder)


def project_params(work: Path, base: Path, device: str, overrides: list[str],
                   data: Path | None) -> tuple[Path, Params]:
    """base params with every output under work/ (inputs too unless --data), then -S; validated, resolved."""
    fixed: dict[str, Any] = {**work_paths(work), "train.resume": "never"}
    if device != "auto":
        fixed.update({"train.device": device, "evaluate.device": device})
    if data is not None:
        project = load_params(data / "params.yaml")
        fixed.update({"data.raw_dir": str((data / project.data.raw_dir).resolve()),
                      "data.prepared_dir": str((data / project.data.prepared_dir).resolve())})
    return write_params(work, base, fixed, overrides)


def score(probs: np.ndarray, labels: np.ndarray, class_names: list[str], seconds: float) -> dict[str, Any]:
    """Accuracy and macro-F1 with 95% intervals, ECE, log loss: the same code evaluate uses."""
    metrics = compute_metrics(probs, labels, class_names, top_k=1, bins=15)
    correct = int((probs.argmax(axis=1) == labels).sum())
    return {
        "accuracy": metrics["accuracy"], "accuracy_ci95": list(wilson_interval(correct, len(labels))),
        "macro_f1": metrics["macro_f1"],
        "macro_f1_ci95": list(bootstrap_macro_f1(labels, probs.argmax(axis=1), len(class_names))),
        "ece": metrics["ece"], "log_loss": metrics["log_loss"], "n": len(labels), "seconds": round(seconds, 1),
    }


def pixel_baselines(train: Split, tests: dict[str, Split], class_names: list[str]) -> dict[str, dict[str, Any]]:
    """(a) Logistic regression and an RBF SVM (scikit-learn defaults; Platt-scaled probabilities) on the raw pixels."""
    geometry = pixel_geometry(train.paths())
    x_train = pixel_matrix(train.paths(), geometry)
    x_tests = {name: pixel_matrix(split.paths(), geometry) for name, split in tests.items()}
    results: dict[str, dict[str, Any]] = {}
    for name, model, limit in (
        ("logistic_regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), None),
        # Platt-scaled probabilities fitted by cross-validation (what SVC(probability=True) did), for the ECE.
        ("rbf_svm", CalibratedClassifierCV(SVC(kernel="rbf"), ensemble=False), SVM_MAX_TRAIN),
    ):
        rows = stratified_subset(train.labels, limit or len(train.rows))
        started = time.perf_counter()
        model.fit(x_train[rows], train.labels[rows])
        fit_s = time.perf_counter() - started
        results[name] = {"test_sets": {}, "pixels": geometry.describe(), "train_images": len(rows)}
        for test_name, split in tests.items():
            started = time.perf_counter()
            probs = np.zeros((len(split.rows), len(class_names)))
            probs[:, model.classes_] = model.predict_proba(x_tests[test_name])   # a class train lacks stays 0
            results[name]["test_sets"][test_name] = score(probs, split.labels, class_names,
                                                          fit_s + time.perf_counter() - started)
    return results


def tutorial_recipe(params: Params, train: Split, val: Split, tests: dict[str, Split], class_names: list[str],
                    epochs: int, dev: torch.device) -> dict[str, Any]:
    """(b) The PyTorch transfer-learning tutorial: the whole network fine-tuned from the first step in fp32 (SGD,
    StepLR, RandomResizedCrop + flip, BatchNorm in train mode), the best epoch by validation accuracy."""
    torch.manual_seed(0)
    state, record = load_backbone_state(params.model.out_dir)
    prep = preprocessing_for(params.model.arch, params.train.image_size, record)
    model = build_model(params.model.arch, len(class_names), state).to(dev)
    normalize = transforms.Normalize(prep.mean, prep.std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(prep.crop_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(prep.resize_size), transforms.CenterCrop(prep.crop_size),
                                  transforms.ToTensor(), normalize])

    def loader(split: Split, tf: Any, shuffle: bool) -> DataLoader:
        def read(batch: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:   # a list is a dataset
            return torch.stack([tf(load_rgb(path)) for path, _ in batch]), torch.tensor([y for _, y in batch])

        return DataLoader(list(zip(split.paths(), split.labels.tolist())), batch_size=params.train.batch_size,
                          shuffle=shuffle, collate_fn=read)

    @torch.no_grad()
    def predict(split: Split) -> np.ndarray:
        model.eval()
        chunks = [torch.softmax(model(x.to(dev)).double(), 1).cpu().numpy() for x, _ in loader(split, eval_tf, False)]
        return np.concatenate(chunks)

    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=TUTORIAL_LR, momentum=TUTORIAL_MOMENTUM)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=TUTORIAL_STEP, gamma=TUTORIAL_GAMMA)
    started = time.perf_counter()
    best_acc, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        for x, y in loader(train, train_tf, True):
            optimizer.zero_grad()
            loss = criterion(model(x.to(dev)), y.to(dev))
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_acc = float((predict(val).argmax(1) == val.labels).mean())
        log(f"tutorial epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, val accuracy {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    train_s = time.perf_counter() - started
    result: dict[str, Any] = {"epochs": epochs, "val_accuracy": best_acc, "test_sets": {}}
    for name, split in tests.items():
        t0 = time.perf_counter()
        result["test_sets"][name] = score(predict(split), split.labels, class_names, train_s + time.perf_counter() - t0)
    return result


def project_model(params: Params, tests: dict[str, Split], class_names: list[str],
                  stage_seconds: dict[str, float]) -> dict[str, Any]:
    """(c) The train stage's model.pt, scored as evaluate scores it (calibrated, test-time flips when the recipe
    uses them)."""
    model, meta = load_checkpoint(Path(params.train.out_dir) / "model.pt")
    reports = params.report_paths(Path("."))
    train_metrics = read_json(reports["train_metrics"])
    device = torch.device("cuda" if params.evaluate.device != "cpu" and torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
                              "val_accuracy": train_metrics["val_accuracy"], "best_epoch": train_metrics["best_epoch"],
                              "best_phase": train_metrics["best_phase"], "temperature": meta.get("temperature"),
                              "test_sets": {}}
    for name, split in tests.items():
        started = time.perf_counter()
        probs = predict_probs(model, split.rows, split.raw_dir, meta["preprocessing"], params.evaluate.batch_size,
                              device, temperature=meta.get("temperature"))
        seconds = stage_seconds["train"] + time.perf_counter() - started
        result["test_sets"][name] = score(probs, split.labels, class_names, seconds)
    evaluated = read_json(reports["test_metrics"])
    result["evaluate_stage"] = {k: evaluated.get(k) for k in ("accuracy", "macro_f1", "ece", "baseline_accuracy", "lift")}
    return result


def print_table(result: dict[str, Any]) -> None:
    models = result["models"]
    for test_name in result["test_sets"]:
        n = next(iter(models.values()))["test_sets"][test_name]["n"]
        print(f"\n{result['dataset']}: test set {test_name!r} ({n} images), {result['environment']['device']}")
        print(f"  {'model':<22}{'accuracy [95% CI]':<26}{'macro-F1 [95% CI]':<26}{'ECE':>7}{'log loss':>10}{'time s':>9}")
        for name, model in models.items():
            m = model["test_sets"][test_name]
            print(f"  {name:<22}{m['accuracy']:.3f} {interval_text(*m['accuracy_ci95']):<20}"
                  f"{m['macro_f1']:.3f} {interval_text(*m['macro_f1_ci95']):<20}{m['ece']:>7.3f}"
                  f"{m['log_loss']:>10.3f}{m['seconds']:>9.1f}")
        for name, margin in result["margins"].get(test_name, {}).items():
            print(f"  project - {name}: {margin:+.3f} accuracy")


def margins(models: dict[str, Any], test_name: str) -> dict[str, float]:
    ours = models["project"]["test_sets"][test_name]["accuracy"]
    return {name: round(ours - m["test_sets"][test_name]["accuracy"], 4) for name, m in models.items()
            if name != "project"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dataset", default="demo",
                       help="demo (default), digits, or fashion-<per class>[-<seed>] (another Fashion-MNIST draw)")
    where.add_argument("--data", type=Path, help="a project folder whose prepare stage has run (its split files)")
    parser.add_argument("--profile", type=Path, default=REPO_ROOT / "params.yaml", help="params to train with")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--models", default="baselines,tutorial,project",
                        help="comma-separated subset of baselines, tutorial, project")
    parser.add_argument("--tutorial-epochs", type=int, help="epochs of (b) (default: train.finetune.epochs on a "
                        f"GPU, {CPU_TUTORIAL_EPOCHS} on a CPU)")
    parser.add_argument("--official-test", choices=["auto", "on", "off"], default="auto",
                        help="also score the official 10,000 Fashion-MNIST test images (auto: for Fashion-MNIST data)")
    parser.add_argument("--official-limit", type=int, default=10_000, help="score only the first N official test "
                        "images (a quicker check; the default is all 10,000)")
    parser.add_argument("--flip-labels", type=float, metavar="FRACTION", help="give this share of the training "
                        "labels another class (seeded) and report how many the label-issue check finds; with "
                        "-S prepare.label_issues=exclude, what leaving them out does to test accuracy")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to OUT/quality.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = set(args.models.split(","))
    if not chosen <= {"baselines", "tutorial", "project"}:
        raise SystemExit(f"error: --models takes baselines, tutorial, project; got {args.models}")
    work = args.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, chosen, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    emit(result, args.out, "quality")
    return 0


def measure(args: argparse.Namespace, chosen: set[str], work: Path) -> dict[str, Any]:
    params_file, params = project_params(work, args.profile, args.device, args.set, args.data)
    stage_seconds: dict[str, float] = {}
    if args.data is None and not (Path(params.data.prepared_dir) / "test.csv").exists():
        write_dataset(args.dataset, Path(params.data.raw_dir), params, args.source)
        stage_seconds["prepare"] = run_stage("prepare", params_file)
    prepared, raw = Path(params.data.prepared_dir), Path(params.data.raw_dir)
    class_names = read_classes(prepared)
    flipped = flip_labels(split_path(prepared, "train"), args.flip_labels, len(class_names)) if args.flip_labels else None
    train, val, test = (Split(read_split(split_path(prepared, s)), raw) for s in ("train", "val", "test"))
    tests = {"test split": test}
    if args.official_test == "on" or (args.official_test == "auto" and sorted(class_names) == sorted(FASHION_CLASSES)):
        tests["official Fashion-MNIST test"] = official_fashion_test(args.source, work, class_names,
                                                                    args.official_limit)
    models: dict[str, Any] = {}
    if "baselines" in chosen:
        log("== pixel baselines")
        models.update(pixel_baselines(train, tests, class_names))
    for stage in [s for s in STAGES if s != "prepare"] if "project" in chosen else ["fetch_weights"]:
        stage_seconds[stage] = run_stage(stage, params_file)
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if "tutorial" in chosen:
        epochs = args.tutorial_epochs or (max(1, params.train.finetune.epochs) if cuda else CPU_TUTORIAL_EPOCHS)
        log(f"== tutorial recipe, {epochs} epoch(s)")
        models["tutorial_recipe"] = tutorial_recipe(params, train, val, tests, class_names, epochs,
                                                    torch.device("cuda" if cuda else "cpu"))
    if "project" in chosen:
        models["project"] = project_model(params, tests, class_names, stage_seconds)
    result = {"dataset": str(args.data or args.dataset), "classes": len(class_names),
              "images": {"train": len(train.rows), "val": len(val.rows), "test": len(test.rows)},
              "test_sets": list(tests), "models": models, "overrides": args.set, "environment": environment(cuda)}
    result["margins"] = {name: margins(models, name) for name in tests} if "project" in models else {}
    if flipped is not None and "project" in models:
        result["label_issues"] = found_flips(params, flipped, args.flip_labels)
    return result


def flip_labels(train_file: Path, fraction: float, n_classes: int) -> set[str]:
    """Give a seeded `fraction` of the training images another class, as a careless labeller would; their paths."""
    rows = read_split(train_file)
    rng = np.random.default_rng(FLIP_SEED)
    chosen = set(rng.choice(len(rows), round(fraction * len(rows)), replace=False).tolist())
    write_split(train_file, [SplitRow(r.path, int((r.label + rng.integers(1, n_classes)) % n_classes), r.sha256)
                             if i in chosen else r for i, r in enumerate(rows)])
    log(f"== {len(chosen)} of {len(rows)} training labels flipped (seed {FLIP_SEED})")
    return {rows[i].path for i in chosen}


def found_flips(params: Params, flipped: set[str], fraction: float) -> dict[str, Any]:
    """How many flipped labels the label-issue check ranks in its top k (k = how many were flipped), and in all
    it flags: precision and recall."""
    report = read_json(Path(params.reports.dir) / "label_issues.json")
    ranked = [s["path"] for s in report["suspects"] if s["split"] == "train"]
    k = len(flipped)
    hits_at_k, hits = len(flipped & set(ranked[:k])), len(flipped & set(ranked))
    result = {"flipped": k, "fraction": fraction, "mode": report.get("mode"), "flagged": len(ranked),
              "excluded": report.get("n_excluded_from_training"),
              "precision_at_k": round(hits_at_k / max(1, k), 4),     # = recall at k: k is how many were flipped
              "precision_flagged": round(hits / max(1, len(ranked)), 4),
              "recall_flagged": round(hits / max(1, k), 4)}
    log(f"== label issues: {hits_at_k} of the {k} flipped labels in the top {k}; {hits} of {k} among the "
        f"{len(ranked)} flagged (mode {result['mode']}, {result['excluded']} left out of training)")
    return result


if __name__ == "__main__":
    sys.exit(main())
