"""The torch side of the prepared splits: a dataset for evaluation, decoded arrays and batches for training.

The split files themselves are read by tasks.lib.split_files (torch-free).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.lib.images import ImageLimits, load_rgb, pixel_limit
from tasks.lib.preprocess import Preprocessing, preprocess, resize_and_crop
from tasks.lib.progress import progress
from tasks.lib.split_files import SplitRow

# Until tasks.train imports them from tasks.lib.split_files and tasks.lib.preprocess.
from tasks.lib.preprocess import train_preprocessing  # noqa: E402,F401
from tasks.lib.split_files import labels_of, read_classes, read_split, split_path  # noqa: E402,F401


def read_rows(prepared_dir: Path | str, split: str) -> list[SplitRow]:
    return read_split(split_path(prepared_dir, split))


class EvalDataset(Dataset):
    """Images of one split with the deterministic evaluation preprocessing: (tensor, label).

    Each file must still hash to the sha256 in its split file (BadImage changed_since_prepare otherwise).
    """

    def __init__(self, rows: list[SplitRow], raw_dir: Path | str, prep: Preprocessing, max_pixels: int | None = None):
        self.rows = rows
        self.raw_dir = Path(raw_dir)
        self.prep = prep
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        img = load_rgb(self.raw_dir / row.path, self.max_pixels, sha256=row.sha256)   # the bytes prepare split
        return torch.from_numpy(preprocess(img, self.prep)), row.label


# --------------------------------------------------------------------------- training data path
#
# Decode every image once into uint8 NHWC arrays (the eval crop, and a slightly
# larger square for random crops), then hand whole batches to the device;
# tasks.lib.augment does the per-image work there. The decode_cache stage stores
# these arrays memory-mapped (tasks.lib.image_cache); `decode_arrays` makes them
# in memory when that cache is missing or stale.

def decode_arrays(rows: list[SplitRow], raw_dir: Path | str, preps: Sequence[Preprocessing], *,
                  max_pixels: int | None = None, limits: ImageLimits | None = None, workers: int = 0,
                  desc: str = "decoding") -> list[np.ndarray]:
    """Decode each image once and resize it for every preprocessing: one uint8 (N, S, S, 3) array per prep.

    Raises BadImage naming the file when an image no longer decodes or its bytes no longer hash to the
    row's sha256 (the pixels are kept under that hash, in the feature cache). limits
    (all of prepare's limits) takes precedence over max_pixels.
    """
    raw_dir = Path(raw_dir)
    limits = limits or ImageLimits(max_pixels=max_pixels or pixel_limit())
    arrays = [np.empty((len(rows), p.crop_size, p.crop_size, 3), np.uint8) for p in preps]

    def fill(index: int) -> None:
        img = load_rgb(raw_dir / rows[index].path, limits.max_pixels, max_aspect_ratio=limits.max_aspect_ratio,
                       max_file_bytes=limits.max_file_bytes, sha256=rows[index].sha256)
        for array, prep in zip(arrays, preps):
            array[index] = np.asarray(resize_and_crop(img, prep), dtype=np.uint8)

    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for _ in progress(pool.map(fill, range(len(rows))), desc=desc, total=len(rows), unit="img"):
            pass
    return arrays


def batch_order(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches of one epoch for one rank; the same seed gives the same order (resume needs that).

    Under DDP every rank gets the same number of batches: the order is padded
    by wrapping around, as DistributedSampler does.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    per_rank = -(-n // world)
    if per_rank * world > n:
        order = torch.cat([order, order[: per_rank * world - n]])
    mine = order[rank::world]
    batches = list(torch.split(mine, batch_size))
    # A batch of one breaks BatchNorm in train mode; drop a short tail when asked.
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; through pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
