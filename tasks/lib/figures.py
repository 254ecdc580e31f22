"""Static pictures of a run (matplotlib, PNG): they open anywhere, offline, and travel in the model card,
where DVC's own plots need JavaScript from a CDN. Train draws the curves, evaluate the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure   # no pyplot: no global figure state, no display backend

from tasks.lib.io import atomic_path

DPI = 100


def _save(fig: Figure, path: Path) -> bool:
    """Lay out and write the figure atomically; True (the figure was drawn)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # No timestamps or software tags: the same numbers give the same bytes.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return True


def training_curves(history: list[dict[str, Any]], path: Path) -> bool:
    """Loss and validation accuracy / macro-F1 per epoch, the phases told apart."""
    if not history:
        return False
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 3.8))
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val loss")
    score_ax.plot(epochs, [r["val_accuracy"] for r in history], marker="o", label="val accuracy")
    score_ax.plot(epochs, [r["val_macro_f1"] for r in history], marker="o", label="val macro-F1")
    for ax, title in ((loss_ax, "loss"), (score_ax, "validation")):
        _shade_phases(ax, history)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _shade_phases(ax: Any, history: list[dict[str, Any]]) -> None:
    finetune = [row["epoch"] for row in history if row["phase"] == "finetune"]
    if finetune:
        ax.axvspan(min(finetune) - 0.5, max(finetune) + 0.5, color="0.9", zorder=0, label="phase 2 (fine-tune)")


def confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> bool:
    """Counts, actual class down, predicted across; each cell shaded by its share of the row."""
    k = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(14, 2.5 + 0.55 * k)
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    labels = [_short(name) for name in class_names]
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"confusion matrix (test split, {int(matrix.sum())} images)")
    return _save(fig, path)


def per_class_f1(class_names: Sequence[str], f1: Sequence[float], path: Path) -> bool:
    order = np.argsort(f1)
    fig = Figure(figsize=(7, min(14, 1 + 0.3 * len(class_names))))
    ax = fig.subplots()
    ax.barh([_short(class_names[i]) for i in order], [f1[i] for i in order], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test split")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def reliability(curves: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Accuracy against mean confidence per bin (tasks.lib.metrics.reliability_bins), one line per curve."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for name, bins in curves.items():
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("reliability (test split)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def image_mosaic(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, title: str) -> bool:
    """Up to 4 images a row (uint8 HWC), each captioned; no images draws the title alone (the file always exists)."""
    if not images:
        fig = Figure(figsize=(6, 1))
        fig.text(0.5, 0.5, f"{title}: none", ha="center", va="center", fontsize=9)
        return _save(fig, path)
    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows + 0.4))
    for i, axis in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        axis.axis("off")
        if i < len(images):
            image = images[i]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            axis.set_title(_short(captions[i], 40), fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _short(name: str, width: int = 24) -> str:
    """Class names on an axis: printable, at most `width` characters (the table in the card has them whole)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(name))
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$")    # matplotlib would read $...$ as mathematics
