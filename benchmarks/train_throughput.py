#!/usr/bin/env python
"""Training throughput in one run: the plain tutorial loop, this project's loop, and the ceiling.

(a) plain: torchvision ImageFolder + PIL transforms + DataLoader, fp32, the step tutorials write. (b) project: the
decode_cache stage's arrays, augmented on the device, through the train stage's own phases and epoch loop
(tasks.training). (c) ceiling: the same loop and step on a synthetic batch already on the device. Each for the
frozen phase (head on cached features, and re-running the backbone) and the unfreeze phase. Prints a table, then as
its last line one JSON object with every rate, speed-up (b)/(a), efficiency (b)/(c) and peak memory;
benchmarks/README.md explains each and records what was measured where.

    python benchmarks/train_throughput.py                       # CPU mode here, GPU mode on a GPU
    python benchmarks/train_throughput.py --arch resnet50 --compile
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain, repeat
from pathlib import Path
from typing import Any

# Progress bars of the project's loops would flood the output and cost time per epoch.
os.environ.setdefault("TQDM_DISABLE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from benchmarks.stages import calibrated_model, emit, log  # noqa: E402
from benchmarks.stages import environment as environment_of  # noqa: E402
from tasks.decode_cache import build_cache  # noqa: E402
from tasks.lib.config import TrainParams  # noqa: E402
from tasks.lib.image_cache import AUGMENT, EVAL, MappedImages, open_split  # noqa: E402
from tasks.lib.io import sha256_file  # noqa: E402
from tasks.lib.models import default_preprocessing, head_module  # noqa: E402
from tasks.lib.preprocess import train_preprocessing  # noqa: E402
from tasks.lib.split_files import SplitRow, write_split  # noqa: E402
from tasks.training.batches import Batch  # noqa: E402
from tasks.training.cuda_graph import CudaGraphStep  # noqa: E402
from tasks.training.loop import Data, Phase, Run, epoch_order, phase_step, run_epoch  # noqa: E402
from tasks.training.phases import finetune_phase, head_phase  # noqa: E402
from tasks.training.runtime import pick_precision, setup_runtime  # noqa: E402

NUM_CLASSES = 10
MARGIN = 1.15                 # cache.margin's default
HEAD_EPOCHS = 30              # train.head.epochs' default, for the amortised frozen rate
MIN_SECONDS = 0.5             # short cached-feature epochs repeat until they took this long


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument("--arch", action="append", help="model(s) to measure; repeat or comma-separate "
                        "(default: mobilenet_v3_small on CPU; resnet50,mobilenet_v3_large on GPU)")
    parser.add_argument("--image-size", type=int, help="network input side (default 64 on CPU, 224 on GPU)")
    parser.add_argument("--batch-size", type=int, help="default 32 on CPU, 256 on GPU")
    parser.add_argument("--num-images", type=int, help="JPEGs generated (default 384 on CPU, 8192 on GPU)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 10 on CPU, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (workers start, cuDNN tunes)")
    parser.add_argument("--repeats", type=int, help="timings per measurement, the best counts (default 3 on CPU, "
                        "where other load adds noise; 1 on GPU)")
    parser.add_argument("--compile", action="store_true", help="also measure (b) and (c) unfreeze under torch.compile")
    parser.add_argument("--workers", type=int, help="DataLoader workers of (a) and cache builders "
                        "(default: every core, at most 16)")
    parser.add_argument("--profile", type=Path, help="also profile (b) cached head and (b) unfreeze with "
                        "torch.profiler; tables are appended to DIR/profile.txt")
    s = parser.parse_args(argv)
    name = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = name == "cuda"
    s.device = torch.device(name)
    s.archs = [a for item in (s.arch or (["resnet50", "mobilenet_v3_large"] if gpu else ["mobilenet_v3_small"]))
               for a in item.split(",") if a]
    s.image_size = s.image_size or (224 if gpu else 64)
    s.batch_size = s.batch_size or (256 if gpu else 32)
    s.num_images = s.num_images or (8192 if gpu else 384)
    s.steps = s.steps or (30 if gpu else 10)
    s.repeats = s.repeats or (1 if gpu else 3)
    s.workers = s.workers if s.workers is not None else min(os.cpu_count() or 1, 16)
    return s


def make_jpegs(root: Path, n: int, image_size: int, workers: int) -> list[SplitRow]:
    """An ImageFolder of n JPEGs, larger than the input like real photos, written with every core."""
    # Real photos are about 1.5-2x the network input (ImageNet averages ~400x350 for 224 px).
    jobs = [(root, i, i % NUM_CLASSES, image_size) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        paths = list(pool.map(_write_jpeg, jobs, chunksize=64))
    return [SplitRow(p, i % NUM_CLASSES, sha256_file(root / p)) for i, p in enumerate(paths)]


def _write_jpeg(job: tuple[Path, int, int, int]) -> str:
    root, index, label, size = job
    rng = np.random.default_rng(index)
    width, height = (int(size * rng.uniform(1.5, 2.2)) for _ in range(2))
    # Smooth blobs plus fine noise: compresses and decodes like a photo, not like flat colour.
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3))
    pixels[..., label % 3] += 40
    rel = f"class_{label:02d}/img_{index:06d}.jpg"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / rel, quality=90)
    return rel


def build_decoded(raw: Path, work: Path, rows: list[SplitRow], image_size: int, workers: int) -> float:
    """The decode_cache stage's build on the train split; returns its images/s."""
    write_split(work / "prepared" / "train.csv", rows)
    prep = default_preprocessing("resnet18", image_size)
    started = time.perf_counter()
    build_cache(work / "prepared", raw, work / "decoded", {EVAL: prep, AUGMENT: train_preprocessing(prep, MARGIN)},
                splits=["train"], workers=max(1, workers))
    return len(rows) / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Rate:
    img_per_s: float
    peak_gpu_mb: float


def measure(device: torch.device, run: Callable[[], int], warmup: Callable[[], Any] | None = None,
            min_seconds: float = 0.0, min_images: int = 1, repeats: int = 1) -> Rate:
    """Images/s of run() (which returns images done), repeated to min_images and min_seconds; GPU peak memory too.

    With repeats > 1 the best of that many timings counts: on a shared machine
    the other load only ever slows a timing down.
    """
    if warmup is not None:
        warmup()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = 0.0
    for _ in range(repeats):
        images, started = 0, time.perf_counter()
        while images < min_images or time.perf_counter() - started < min_seconds:
            images += run()
        sync(device)
        best = max(best, images / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return Rate(best, peak)


def plain_loader(raw: Path, s: argparse.Namespace) -> DataLoader:
    """The data path of the PyTorch transfer-learning tutorial."""
    transform = T.Compose([T.RandomResizedCrop(s.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(str(raw), transform)
    return DataLoader(dataset, batch_size=s.batch_size, shuffle=True, num_workers=s.workers,
                      pin_memory=s.device.type == "cuda", drop_last=True, persistent_workers=s.workers > 0)


def plain_rate(arch: str, raw: Path, s: argparse.Namespace, frozen: bool) -> Rate:
    """(a): fp32, NCHW, SGD; frozen = requires_grad off outside the head, model still in train mode."""
    reset_backend_flags()
    model = calibrated_model(arch, NUM_CLASSES).to(s.device)
    if frozen:
        for param in model.parameters():
            param.requires_grad_(False)
        for param in head_module(model).parameters():
            param.requires_grad_(True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    batches = chain.from_iterable(repeat(plain_loader(raw, s)))   # epoch after epoch

    def steps(count: int) -> int:
        running = 0.0
        for _ in range(count):
            x, y = next(batches)
            x, y = x.to(s.device), y.to(s.device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.item() * x.size(0)    # as the tutorial does: a host sync every step
        return count * s.batch_size

    try:
        return measure(s.device, lambda: steps(s.steps), warmup=lambda: steps(s.warmup), repeats=s.repeats)
    finally:
        del batches, model, optimizer
        free_gpu(s.device)


def reset_backend_flags() -> None:
    """PyTorch's defaults, which the plain loop runs with (the project's runtime changes some)."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(False)


def free_gpu(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def project_run(arch: str, decoded: Path, s: argparse.Namespace, compile_model: bool, **train: Any) -> Run:
    """tasks.train's Run (runtime, data, model), fed by the memory-mapped cache instead of params files."""
    cfg = TrainParams(image_size=s.image_size, batch_size=s.batch_size, device=s.device.type, compile=compile_model,
                      deterministic=False, early_stopping_patience=0, **train)
    rt = setup_runtime(cfg)
    eval_x, labels = open_split(decoded, "train", EVAL)
    margin_x, _ = open_split(decoded, "train", AUGMENT)
    prep = default_preprocessing(arch, s.image_size)
    y = torch.from_numpy(labels)
    pin = rt.device.type == "cuda"
    data = Data(train_eval=MappedImages(eval_x, pin), train_margin=MappedImages(margin_x, pin), train_y=y,
                val_x=MappedImages(eval_x[:1], pin), val_y=y[:1],
                mean=torch.tensor(prep.mean, device=rt.device), std=torch.tensor(prep.std, device=rt.device),
                num_classes=NUM_CLASSES)
    model = calibrated_model(arch, NUM_CLASSES).to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # pretrained=True: the project's recipe (BatchNorm keeps pretrained statistics when unfrozen).
    return Run(cfg, rt, data, model, pretrained=True)


def epoch_runner(run: Run, phase: Phase) -> Callable[[], int]:
    """A function running one epoch of the phase through tasks.training.loop.run_epoch; it returns the images done."""
    step = phase_step(run, phase)
    per_epoch = sum(len(idx) for idx in epoch_order(run, phase.name, 0))

    def epoch() -> int:
        run_epoch(run, phase, step)
        run.progress.global_epoch += 1
        return per_epoch

    return epoch


def synthetic_batch(x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                    generator: torch.Generator | None = None) -> Batch:
    return Batch(idx, labels[: len(idx)], x[: len(idx)])


def ceiling(run: Run, phase: Phase, shape: tuple[int, ...], memory: torch.memory_format) -> Phase:
    """(c): the phase's step on synthetic inputs and labels already on the device, never read from anywhere."""
    x = torch.randn(run.cfg.batch_size, *shape, device=run.rt.device).contiguous(memory_format=memory)
    labels = torch.randint(0, NUM_CLASSES, (run.cfg.batch_size,), device=run.rt.device)
    graph = CudaGraphStep(run.rt.device) if phase.graph is not None else None    # its own graph, if any
    return replace(phase, make_batch=partial(synthetic_batch, x, labels), graph=graph)


def frozen_rates(arch: str, decoded: Path, s: argparse.Namespace) -> dict[str, Rate]:
    """(b) frozen: features once, then head epochs on them; and head epochs re-running the backbone; (c) frozen."""
    run = project_run(arch, decoded, s, compile_model=False)
    n = len(run.data.train_y)
    holder: dict[str, Phase] = {}

    def extract() -> int:     # head_phase computes the features of train and val (val is one image here)
        holder["phase"] = head_phase(run, cache_features=True)
        return n

    small = replace(run, data=replace(run.data, train_eval=MappedImages(run.data.train_eval.array[: 2 * s.batch_size])))
    rates = {"project_feature_extract": measure(s.device, extract, warmup=lambda: head_phase(small, True),
                                                repeats=s.repeats)}
    cached = holder["phase"]
    synthetic = ceiling(run, cached, cached.make_batch.args[0].shape[1:], torch.contiguous_format)   # on features
    for key, phase in (("project_frozen", cached), ("ceiling_frozen", synthetic)):
        epoch = epoch_runner(run, phase)
        rates[key] = measure(s.device, epoch, warmup=epoch, min_seconds=MIN_SECONDS, repeats=s.repeats)
    if s.profile:
        profile_steps(s, f"{arch}_frozen_cached", epoch_runner(run, cached), epochs=3)
    backbone = epoch_runner(run, head_phase(run, cache_features=False))
    rates["project_frozen_backbone"] = measure(s.device, backbone, warmup=backbone, repeats=s.repeats)
    del run, cached, synthetic
    free_gpu(s.device)
    return rates


def unfreeze_rates(arch: str, decoded: Path, s: argparse.Namespace, compile_model: bool) -> dict[str, Rate]:
    """(b) unfreeze: finetune_phase's step with everything trainable, random crops on the device; (c) synthetic."""
    run = project_run(arch, decoded, s, compile_model, finetune={"unfreeze": "all", "augment": True})
    phase = finetune_phase(run)
    memory = torch.channels_last if run.cfg.channels_last else torch.contiguous_format
    synthetic = ceiling(run, phase, (3, s.image_size, s.image_size), memory)
    rates = {}
    suffix = "_compiled" if compile_model else ""
    for key, timed in (("project_unfreeze", phase), ("ceiling_unfreeze", synthetic)):
        epoch = epoch_runner(run, timed)
        rates[key + suffix] = measure(s.device, epoch, warmup=epoch, min_images=s.steps * s.batch_size,
                                      repeats=s.repeats)
    if s.profile:
        profile_steps(s, f"{arch}_unfreeze{suffix}", epoch_runner(run, phase))
    del run, phase, synthetic
    free_gpu(s.device)
    return rates


def profile_steps(s: argparse.Namespace, name: str, epoch: Callable[[], int], epochs: int = 1) -> None:
    """torch.profiler over a few epochs: where the time goes when (b) misses (c); a table under --profile."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    epoch()   # compilation and CUDA graph capture happen here, outside the profiler
    sync(s.device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        images = sum(epoch() for _ in range(epochs))
        sync(s.device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if s.device.type == "cuda" else 0.0
    sort = "self_cuda_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
    header = f"{name}: {images} images in {wall:.3f} s under the profiler ({images / wall:.0f} img/s)"
    if s.device.type == "cuda":   # below 100%: the GPU waited for the host (launches, copies, syncs)
        header += f"; kernels busy {device_us / 1e6:.3f} s = {device_us / 1e6 / wall:.0%} of the wall time"
    header += "\n"
    s.profile.mkdir(parents=True, exist_ok=True)
    with open(s.profile / "profile.txt", "a") as out:
        out.write(header + events.table(sort_by=sort, row_limit=25) + "\n\n")
    log("    " + header.strip())


def arch_results(arch: str, raw: Path, decoded: Path, s: argparse.Namespace) -> dict[str, Any]:
    """Every rate for one architecture, with the ratios the targets are stated in."""
    rates: dict[str, Rate] = {}
    steps: list[tuple[str, Callable[[], dict[str, Rate]]]] = [
        ("(a) plain frozen", lambda: {"plain_frozen": plain_rate(arch, raw, s, frozen=True)}),
        ("(a) plain unfreeze", lambda: {"plain_unfreeze": plain_rate(arch, raw, s, frozen=False)}),
        ("(b)/(c) frozen", lambda: frozen_rates(arch, decoded, s)),
        ("(b)/(c) unfreeze", lambda: unfreeze_rates(arch, decoded, s, False)),
    ]
    if s.compile:
        steps.append(("(b)/(c) unfreeze, torch.compile", lambda: unfreeze_rates(arch, decoded, s, True)))
    rss_after: dict[str, float] = {}
    for title, measure_some in steps:
        log(f"[{arch}] {title}")
        new = measure_some()
        # Peak RSS only grows: its value after each step shows which step raised it.
        rss_after[title] = peak_rss_mb()["peak_host_rss_mb"]
        # Logged as they come, so a run cut short still shows what it measured.
        log("    " + ", ".join(f"{k} {v.img_per_s:.1f} img/s" for k, v in new.items())
            + f"; peak host RSS so far {rss_after[title]:.0f} MB")
        rates.update(new)
    r = {k: v.img_per_s for k, v in rates.items()}
    # The whole head phase: features once, then HEAD_EPOCHS epochs on them.
    r["project_frozen_amortised"] = HEAD_EPOCHS / (1 / r["project_feature_extract"] + HEAD_EPOCHS / r["project_frozen"])
    out: dict[str, Any] = {f"{k}_img_per_s": round(v, 2) for k, v in r.items()}
    out |= {name: r[ours] / r[theirs] for name, (ours, theirs) in RATIOS.items() if ours in r}
    out["peak_gpu_mem_mb"] = {k: round(v.peak_gpu_mb, 1) for k, v in rates.items()}
    out["peak_host_rss_mb_after"] = rss_after
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def environment(s: argparse.Namespace) -> dict[str, Any]:
    return environment_of(s.device.type == "cuda") | {
        "timm": timm.__version__, "torch_threads": torch.get_num_threads(),
        "precision": str(pick_precision("auto", s.device) or "fp32").removeprefix("torch."),
        "channels_last": True, "compile": s.compile, "cuda_graphs": TrainParams().cuda_graphs,
        "image_size": s.image_size, "batch_size": s.batch_size, "num_images": s.num_images, "steps": s.steps,
        "workers": s.workers, "repeats": s.repeats,
    }


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process (memory-mapped pages it touched included) and of the largest worker."""
    to_mb = 1 / 1024  # ru_maxrss is in KiB on Linux
    return {"peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mb, 1),
            "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mb, 1)}


ROWS = [("frozen (a) plain", "plain_frozen"), ("frozen (b) project, cached features", "project_frozen"),
        ("frozen (b) project, amortised over 30 epochs", "project_frozen_amortised"),
        ("frozen (b) project, backbone re-run", "project_frozen_backbone"),
        ("frozen (b) feature extraction (once)", "project_feature_extract"), ("frozen (c) ceiling", "ceiling_frozen"),
        ("unfreeze (a) plain", "plain_unfreeze"), ("unfreeze (b) project", "project_unfreeze"),
        ("unfreeze (c) ceiling", "ceiling_unfreeze"), ("unfreeze (b) project, compiled", "project_unfreeze_compiled"),
        ("unfreeze (c) ceiling, compiled", "ceiling_unfreeze_compiled")]
# name: (b) rate / the rate it is compared with; speed-ups against (a), efficiencies against (c).
RATIOS = {"speedup_frozen": ("project_frozen", "plain_frozen"),
          "speedup_frozen_amortised": ("project_frozen_amortised", "plain_frozen"),
          "speedup_unfreeze": ("project_unfreeze", "plain_unfreeze"),
          "efficiency_frozen": ("project_frozen", "ceiling_frozen"),
          "efficiency_unfreeze": ("project_unfreeze", "ceiling_unfreeze"),
          "cached_vs_backbone_epoch_ratio": ("project_frozen", "project_frozen_backbone"),
          "speedup_unfreeze_compiled": ("project_unfreeze_compiled", "plain_unfreeze"),
          "efficiency_unfreeze_compiled": ("project_unfreeze_compiled", "ceiling_unfreeze_compiled")}


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\ndevice {env['device']} ({env['device_name']}), torch {env['torch']}, {env['image_size']} px, "
          f"batch {env['batch_size']}, {env['num_images']} JPEGs, precision {env['precision']}")
    print(f"decoded cache built at {report['cache_build_img_per_s']:.0f} img/s")
    for arch, res in report["results"].items():
        print(f"\n{arch:<48}{'images/s':>12}{'peak GPU MB':>14}")
        for label, key in ROWS:
            if f"{key}_img_per_s" in res:
                mem = res["peak_gpu_mem_mb"].get(key, "")
                print(f"  {label:<46}{res[f'{key}_img_per_s']:>12.1f}{mem!s:>14}")
        for key in RATIOS:
            if key in res:
                print(f"  {key:<46}{res[key]:>12.2f}")
    print(f"\npeak host RSS {report['peak_host_rss_mb']} MB (memory-mapped cache pages included), "
          f"largest worker {report['peak_worker_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="train_throughput-"))
    try:
        started = time.perf_counter()
        rows = make_jpegs(work / "raw", s.num_images, s.image_size, s.workers)
        log(f"{s.num_images} JPEGs in {time.perf_counter() - started:.1f} s; building the decoded cache")
        cache_rate = build_decoded(work / "raw", work, rows, s.image_size, s.workers)
        results = {arch: arch_results(arch, work / "raw", work / "decoded", s) for arch in s.archs}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"environment": environment(s), "cache_build_img_per_s": round(cache_rate, 1), "results": results,
              **peak_rss_mb()}
    print_table(report)
    emit(report, None, "train_throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
