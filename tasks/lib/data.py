"""The torch side of the prepared splits: a dataset for evaluation, batches for training
(the split files themselves are read by the torch-free tasks.lib.split_files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from tasks.lib.images import load_rgb
from tasks.lib.preprocess import Preprocessing, preprocess
from tasks.lib.split_files import SplitRow


class EvalDataset(Dataset):
    """Images of one split with the deterministic evaluation preprocessing: (tensor, label). Each file must still
    hash to the sha256 in its split file (BadImage changed_since_prepare otherwise)."""

    def __init__(self, rows: list[SplitRow], raw_dir: Path | str, prep: Preprocessing):
        self.rows = rows
        self.raw_dir = Path(raw_dir)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        img = load_rgb(self.raw_dir / row.path, sha256=row.sha256)   # the bytes prepare split
        return torch.from_numpy(preprocess(img, self.prep)), row.label


def batch_order(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches of one epoch for one rank; the same seed gives the same order (resume needs that).
    Under DDP every rank gets as many batches: the order wraps around, as DistributedSampler does."""
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
