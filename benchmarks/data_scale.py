#!/usr/bin/env python
"""Data at scale: what each data step costs from scratch and after adding 1% new images.

Generates N JPEGs of realistic sizes in a DVC repo and times dvc add, dvc status, prepare, decode_cache (through
`dvc repro`, so DVC's own share shows) and feature extraction, from scratch and after adding 1% new images; each
project step in its own process, so its peak RSS and CPU time are its alone. Reports images/s per core beside a plain
Pillow decode of the same files, the incremental/full ratio and peak RSS at N against N/10; benchmarks/README.md
explains each figure. Nothing here asserts a speed.

    python benchmarks/data_scale.py                  # a few minutes on 2 cores
    python benchmarks/data_scale.py --n 200000       # on a bigger box
    python benchmarks/data_scale.py --only dvc --n 20000 --dvc-config cache.type=hardlink
    python benchmarks/data_scale.py --only memory --n 200000   # peak RSS at N/10 and N, tiny PNGs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

PROCESS_START = time.perf_counter()

from collections.abc import Callable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ARCH = "mobilenet_v3_small"       # a real backbone at the default 96 px; random weights, BatchNorm calibrated
IMAGE_SIZE = 96
DVC = str(Path(sys.executable).parent / "dvc")


def write_jpeg(args: tuple[Path, int]) -> int:
    """One smooth 'photo' of 300-800 px a side with sensor-like noise; returns its size in bytes."""
    path, seed = args
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(300, 801, 2))
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=88)
    return path.stat().st_size


def generate(raw: Path, n: int, classes: int, start: int, workers: int, file_kb: int = 0) -> int:
    """n JPEGs; or, with file_kb, n files of that many random bytes (for DVC-only runs: DVC reads bytes, not pixels)."""
    paths = [raw / f"class_{i % classes:02d}" / f"img_{i:07d}.jpg" for i in range(start, start + n)]
    if file_kb:
        rng = np.random.default_rng(start)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(file_kb * 1024))
        return n * file_kb * 1024
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(write_jpeg, zip(paths, range(start, start + n)), chunksize=64))


def write_tiny_pngs(args: tuple[Path, int, int, int]) -> int:
    """count 8x8 noise PNGs from index start on (--only memory: the per-image bookkeeping, not decoding, shows)."""
    raw, classes, start, count = args
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        path = raw / f"class_{i % classes:02d}" / f"img_{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return count


def generate_tiny(raw: Path, n: int, classes: int, workers: int) -> None:
    block = 2000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_tiny_pngs, [(raw, classes, s, min(block, n - s)) for s in range(0, n, block)]))


def subset(raw: Path, target: Path, every: int) -> None:
    """Every `every`-th file of raw (all classes), copied into target (a hard link would change the
    originals' ctime, and prepare would rightly hash them again)."""
    files = sorted(f for f in raw.rglob("*") if f.suffix in (".jpg", ".png"))[::every]
    for f in files:
        dest = target / f.relative_to(raw)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)


def peak(figures: dict[str, Any]) -> float:
    """A step's peak RSS in MB: its own process's or its largest worker's, whichever is larger."""
    return max(figures["rss_mb"], figures["worker_rss_mb"])


def pillow_decode(files: list[Path]) -> None:
    """The plain loop: open and fully decode each file, nothing else."""
    for f in files:
        with Image.open(f) as img:
            img.load()


def usage() -> dict[str, float]:
    """CPU seconds of this process and its finished children (the workers), and their peak RSS."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "rss_mb": own_peak_rss_kb(me.ru_maxrss) / 1024, "worker_rss_mb": kids.ru_maxrss / 1024}


def own_peak_rss_kb(maxrss_kb: int) -> int:
    """This program's peak RSS. Linux carries ru_maxrss across exec, so a step started by a large parent
    would report the parent's peak; VmHWM belongs to this program's own memory only."""
    status = Path("/proc/self/status")    # Linux; elsewhere ru_maxrss is all there is
    found = re.search(r"^VmHWM:\s+(\d+)", status.read_text(), re.MULTILINE) if status.exists() else None
    return int(found.group(1)) if found else maxrss_kb


def step(name: str, work: Path, raw: Path, workers: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Runs in a child process: one project step over the work folder's data.

    `seconds` and `cpu_s` cover the step's work only, after its imports (and,
    for features, after the model is built); `process_s` is the whole child
    process, start-up and imports included. Peak RSS covers the whole process.
    """
    counts: dict[str, Any] = {}
    if name == "features":
        run_features = prepare_features(work, raw, workers)
    elif name == "prepare":
        from tasks.lib.config import PrepareParams
        from tasks.prepare import Counts, prepare
    elif name == "decode_cache":
        from tasks.decode_cache import build_cache, cache_preprocessings
        from tasks.lib.config import load_params
    before, started = usage(), time.perf_counter()
    if name == "pillow":     # as many processes as the steps use, so both meet the same contention
        files = sorted(raw.rglob("*.jpg"))
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(pillow_decode, [files[i::workers] for i in range(workers)]))
    elif name == "prepare":
        c = Counts()
        prepare(raw, work / "prepared", PrepareParams(num_workers=workers, cache_dir=work / "cache" / "prepare"), c)
        counts = {"decoded": c.decoded, "hashed": c.hashed, "unchanged": c.unchanged}
    elif name == "decode_cache":
        params = load_params(REPO_ROOT / "params.yaml", {"train.image_size": image_size})
        summary = build_cache(work / "prepared", raw, work / "decoded", cache_preprocessings(params),
                              workers=workers, store_dir=work / "cache" / "decoded", draft=params.cache.jpeg_draft,
                              limits=params.prepare.limits())
        counts = {"decoded": sum(s["decoded"] for s in summary.values())}
    elif name == "features":
        counts = run_features()
    after = usage()
    return {"seconds": time.perf_counter() - started, "process_s": time.perf_counter() - PROCESS_START,
            **after, "cpu_s": after["cpu_s"] - before["cpu_s"], **counts}


def prepare_features(work: Path, raw: Path, workers: int) -> Callable[[], dict[str, Any]]:
    """Imports, params and a model for phase 1's feature extraction; returns the function that runs it."""
    import torch

    from benchmarks.stages import calibrated_model
    from tasks.lib.config import load_params
    from tasks.lib.image_cache import training_images
    from tasks.lib.models import default_preprocessing, feature_extractor
    from tasks.lib.split_files import read_split, split_path
    from tasks.training.loop import Data, Run
    from tasks.training.phases import features
    from tasks.training.runtime import Runtime

    torch.set_num_threads(workers)
    params = load_params(REPO_ROOT / "params.yaml", {
        "data.raw_dir": str(raw), "data.prepared_dir": str(work / "prepared"), "cache.out_dir": str(work / "decoded"),
        "cache.features_dir": str(work / "cache" / "features"), "model.arch": ARCH, "train.image_size": IMAGE_SIZE,
        "train.device": "cpu", "train.channels_last": False})
    prep = default_preprocessing(ARCH, IMAGE_SIZE)
    torch.manual_seed(0)
    model = calibrated_model(ARCH, 10).eval()
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None)

    def extract() -> dict[str, Any]:
        """Phase 1's feature extraction (train + val) through tasks.training.phases.features and the feature cache."""
        done = 0
        for split in ("train", "val"):
            rows = read_split(split_path(work / "prepared", split))
            (images,) = training_images(params, split, rows, [prep])
            data = Data(images, None, torch.zeros(len(rows), dtype=torch.int64), images, torch.zeros(len(rows)),
                        torch.tensor(prep.mean), torch.tensor(prep.std), 10)
            run = Run(params.train, rt, data, model, features_dir=params.cache.features_dir)
            features(run, feature_extractor(model), images, f"features {split}")
            done += len(rows)
        return {"images": done}

    return extract


def measure(name: str, work: Path, raw: Path, workers: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """One step in a child process (this script with --step): its figures."""
    stdout, _ = call([sys.executable, __file__, "--step", name, "--work", str(work), "--raw", str(raw), "--workers",
                      str(workers), "--image-size", str(image_size)], REPO_ROOT)
    return json.loads(stdout.strip().splitlines()[-1])


def call(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """cmd's stdout and wall time; its output ends the benchmark if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout, time.perf_counter() - started


def timed(cmd: list[str], cwd: Path) -> float:
    return call(cmd, cwd)[1]


def dvc_steps(work: Path) -> dict[str, float]:
    return {"dvc_add_s": timed([DVC, "add", "-q", "data/raw"], work),
            "dvc_status_s": timed([DVC, "status", "-q", "data/raw.dvc"], work)}


def init_repo(work: Path, dvc_config: list[str]) -> None:
    timed(["git", "init", "-q"], work)
    timed([DVC, "init", "-q"], work)
    timed([DVC, "config", "core.analytics", "false"], work)
    for setting in dvc_config:
        key, _, value = setting.partition("=")
        timed([DVC, "config", key, value], work)


def project_steps(work: Path, raw: Path, workers: int, features: bool) -> dict[str, Any]:
    names = ["prepare", "decode_cache"] + (["features"] if features else [])
    return {name: measure_through_dvc(name, work) if name == "decode_cache" else measure(name, work, raw, workers)
            for name in names}


def add_stage(work: Path, name: str, workers: int) -> None:
    """A dvc.yaml stage running one step, with decode_cache's outputs declared as the project's dvc.yaml does
    (cache: false), so `dvc repro` adds what it adds around the real stage: hashing the outputs (a new file is
    read whole, a kept one is found in DVC's state) and the dependencies, and writing dvc.lock."""
    cmd = f"{sys.executable} {__file__} --step {name} --work . --raw data/raw --workers {workers}"
    timed([DVC, "stage", "add", "-q", "-n", name, "-d", "prepared", "-O", "decoded", cmd], work)


def measure_through_dvc(name: str, work: Path) -> dict[str, Any]:
    """A step run by `dvc repro`: its own figures, plus the whole command's wall time and DVC's share of it."""
    stdout, wall = call([DVC, "repro", "-q", name], work)
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    return result | {"dvc_repro_s": wall, "dvc_overhead_s": wall - result["process_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000: a few minutes on 2 cores)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--added", type=float, default=0.01, help="fraction of new images for the incremental run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=["all", "dvc", "memory"], default="all",
                        help="dvc: only dvc add / status; memory: peak RSS of prepare and decode_cache at N/10 and N "
                             "on tiny PNGs (fast to make at N = 200000)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help=f"train.image_size for decode_cache (default {IMAGE_SIZE}; --only memory: 32)")
    parser.add_argument("--no-features", action="store_true", help="skip feature extraction")
    parser.add_argument("--file-kb", type=int, default=0,
                        help="with --only dvc: files of this many random bytes instead of JPEGs (fast to make)")
    parser.add_argument("--dvc-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a dvc config setting for the benchmark repo, e.g. core.checksum_jobs=4")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, deleted)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        print(json.dumps(step(args.step, args.work, args.raw, args.workers, args.image_size)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="data-scale-"))
    try:
        report = run_memory(args, work) if args.only == "memory" else run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    (print_memory_table if args.only == "memory" else print_table)(report)
    print(json.dumps(report))
    return 0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    init_repo(work, args.dvc_config)
    raw = work / "data" / "raw"
    started = time.perf_counter()
    size = generate(raw, args.n, args.classes, 0, args.workers, args.file_kb if args.only == "dvc" else 0)
    report: dict[str, Any] = {"n": args.n, "mean_file_kb": size / args.n / 1024, "workers": args.workers,
                              "dvc_config": args.dvc_config, "generate_s": time.perf_counter() - started}
    report["full"] = dvc_steps(work)
    n_added = max(1, round(args.n * args.added))
    if args.only == "dvc":
        generate(raw, n_added, args.classes, args.n, args.workers, args.file_kb)
        report["n_added"] = n_added
        report["incremental"] = dvc_steps(work)
        return report
    features = not args.no_features
    add_stage(work, "decode_cache", args.workers)
    report["pillow"] = measure("pillow", work, raw, args.workers)
    report["full"] |= project_steps(work, raw, args.workers, features)
    small = work / "small"
    subset(raw, small / "data" / "raw", 10)
    report["tenth"] = {name: measure(name, small, small / "data" / "raw", args.workers)
                       for name in ("prepare", "decode_cache")}
    generate(raw, n_added, args.classes, args.n, args.workers)
    report["n_added"] = n_added
    report["incremental"] = dvc_steps(work) | project_steps(work, raw, args.workers, features)
    summarize(report, features)
    return report


MEMORY_IMAGE_SIZE = 32      # --only memory: rows of a few KB, so 200k images fit a small disk


def run_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Peak RSS of prepare and decode_cache at N/10 and N: a first build, then a rebuild from the caches.

    Tiny PNGs decode in microseconds, so what the peaks show is what grows with
    the number of images: the split tables and the caches' indexes.
    """
    size = args.image_size if args.image_size != IMAGE_SIZE else MEMORY_IMAGE_SIZE
    raw = work / "data" / "raw"
    started = time.perf_counter()
    generate_tiny(raw, args.n, args.classes, args.workers)
    small = work / "small"
    subset(raw, small / "data" / "raw", 10)
    report: dict[str, Any] = {"n": args.n, "image_size": size, "workers": args.workers,
                              "generate_s": time.perf_counter() - started}
    for label, folder in (("tenth", small), ("full", work)):
        report[label] = {f"{name}{run}": measure(name, folder, folder / "data" / "raw", args.workers, size)
                         for run in ("", "_rerun") for name in ("prepare", "decode_cache")}
    report["rss_vs_tenth"] = {key: peak(report["full"][key]) / peak(report["tenth"][key]) for key in report["full"]}
    return report


def print_memory_table(report: dict[str, Any]) -> None:
    n = report["n"]
    print(f"{n} tiny PNGs, decode_cache at {report['image_size']} px, {report['workers']} workers")
    print(f"{'step':<20}{f'N/10 = {n // 10}':>16}{f'N = {n}':>16}{'N vs N/10':>11}")
    for key, ratio in report["rss_vs_tenth"].items():
        peaks = [peak(report[size][key]) for size in ("tenth", "full")]
        print(f"{key:<20}{peaks[0]:>13.1f} MB{peaks[1]:>13.1f} MB{ratio:>10.2f}x")


def summarize(report: dict[str, Any], features: bool) -> None:
    n, pillow = report["n"], report["pillow"]
    report["pillow_img_per_core_s"] = n / pillow["cpu_s"]
    steps = ["prepare", "decode_cache"] + (["features"] if features else [])
    for name in steps:
        full = report["full"][name]
        full["img_per_core_s"] = n / full["cpu_s"]
        full["vs_pillow"] = full["img_per_core_s"] / report["pillow_img_per_core_s"]
    for name in ("prepare", "decode_cache"):
        report["full"][name]["rss_vs_tenth"] = peak(report["full"][name]) / peak(report["tenth"][name])
    for unit, key in (("seconds", "incremental_vs_full"), ("cpu_s", "incremental_vs_full_cpu")):
        report[key] = (sum(report["incremental"][s][unit] for s in steps) / sum(report["full"][s][unit] for s in steps))


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['n']} JPEGs (300-800 px, {report['mean_file_kb']:.0f} KB on average), "
          f"{report['workers']} workers, dvc config {report['dvc_config'] or 'default'}")
    print(f"{'step':<14}{'full s':>9}{'+1% s':>9}{'img/s/core':>12}{'vs Pillow':>11}{'peak RSS MB':>13}"
          f"{'RSS N vs N/10':>15}")
    for key in ("dvc_add_s", "dvc_status_s"):
        inc = report.get("incremental", {}).get(key, float("nan"))
        print(f"{key.removesuffix('_s'):<14}{report['full'][key]:>9.1f}{inc:>9.1f}")
    if "decode_cache" in report["full"]:
        print(f"{'dvc overhead':<14}{report['full']['decode_cache']['dvc_overhead_s']:>9.1f}"
              f"{report['incremental']['decode_cache']['dvc_overhead_s']:>9.1f}   (what `dvc repro decode_cache` "
              f"adds to the stage: start, hashing, dvc.lock)")
    if "pillow" in report:
        pillow = report["pillow"]
        print(f"{'pillow decode':<14}{pillow['seconds']:>9.1f}{'':>9}{report['pillow_img_per_core_s']:>12.0f}")
    for name in ("prepare", "decode_cache", "features"):
        full, inc = report["full"].get(name), report.get("incremental", {}).get(name)
        if not full:
            continue
        ratio = f"{full['rss_vs_tenth']:.2f}x" if "rss_vs_tenth" in full else ""
        print(f"{name:<14}{full['seconds']:>9.1f}{inc['seconds']:>9.1f}{full['img_per_core_s']:>12.0f}"
              f"{full['vs_pillow']:>10.0%}{peak(full):>13.0f}{ratio:>15}")
    if "incremental_vs_full" in report:
        print(f"incremental / full (prepare + decode_cache + features): {report['incremental_vs_full']:.1%} of the "
              f"time, {report['incremental_vs_full_cpu']:.1%} of the CPU")


if __name__ == "__main__":
    sys.exit(main())
