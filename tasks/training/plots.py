"""Per-epoch training curves as DVC plots: `<dir>/plots/metrics/<name>.tsv` (step, metric), rewritten whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.lib.io import atomic_path

KEYS = ("train_loss", "train_img_per_s", "val_loss", "val_accuracy", "val_macro_f1", "lr")


def write_curves(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Every metric of every epoch so far, one TSV per metric."""
    folder = Path(out_dir) / "plots" / "metrics"
    for key in KEYS:
        lines = [f"step\t{key}"] + [f"{step}\t{row[key]}" for step, row in enumerate(history)]
        with atomic_path(folder / f"{key}.tsv") as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")
