"""Reading the prepared splits as PyTorch datasets.

Split files (written by tasks.prepare) list paths relative to data.raw_dir,
class indices and content hashes; classes.json lists class names in index order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from tasks.images import load_rgb
from tasks.io import SplitRow, read_json, read_split
from tasks.preprocess import Preprocessing, preprocess


def read_classes(prepared_dir: Path | str) -> list[str]:
    """Class names in index order, as written by the prepare stage."""
    path = Path(prepared_dir) / "classes.json"
    classes = read_json(path)
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"{path}: expected a list of at least two class names; re-run the prepare stage")
    return [str(c) for c in classes]


def read_rows(prepared_dir: Path | str, split: str) -> list[SplitRow]:
    return read_split(Path(prepared_dir) / f"{split}.csv")


class EvalDataset(Dataset):
    """Images of one split with the deterministic evaluation preprocessing: (tensor, label)."""

    def __init__(self, rows: list[SplitRow], raw_dir: Path | str, prep: Preprocessing, max_pixels: int = 89_478_485):
        self.rows = rows
        self.raw_dir = Path(raw_dir)
        self.prep = prep
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        img = load_rgb(self.raw_dir / row.path, self.max_pixels)
        return torch.from_numpy(preprocess(img, self.prep)), row.label
