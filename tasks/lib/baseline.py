"""The built-in baseline: logistic regression on the raw pixels, fitted on the same train split.

A fine-tuned network that does not beat a linear model on its pixels has not earned its cost: evaluate reports
`baseline_accuracy` and `lift`, and the gate refuses a model whose lift is not above gate.min_lift_over_baseline.
It is scikit-learn's `LogisticRegression()` on standardised pixels (multinomial, L2 with C = 1, L-BFGS), written
in a few lines of torch so that evaluate needs no more dependencies; images are shrunk to at most BASELINE_SIDE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from tasks.lib.images import load_rgb
from tasks.lib.split_files import SplitRow

BASELINE_SIDE = 28      # Fashion-MNIST's own size; larger images are shrunk to it
GREY_SAMPLE = 50        # images looked at to decide whether the data set is grey
MAX_ITER = 500


@dataclass(frozen=True)
class PixelGeometry:
    side: int
    grey: bool

    def describe(self) -> str:
        return f"{self.side}x{self.side} {'grey' if self.grey else 'RGB'} pixels"


def pixel_geometry(paths: list[Path]) -> PixelGeometry:
    """Side (the median short side, at most BASELINE_SIDE) and whether every sampled image is grey."""
    sample = paths[:: max(1, len(paths) // GREY_SAMPLE)]
    sides, grey = [], True
    for path in sample:
        pixels = np.asarray(load_rgb(path), dtype=np.int16)
        sides.append(min(pixels.shape[:2]))
        grey = grey and bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    return PixelGeometry(int(min(BASELINE_SIDE, max(1, np.median(sides)))), grey)


def pixel_matrix(paths: list[Path], geometry: PixelGeometry) -> np.ndarray:
    """(N, features) float32 in [0, 1]: each image resized to side x side, grey or RGB."""
    rows = []
    for path in paths:
        img = load_rgb(path)
        if img.size != (geometry.side, geometry.side):
            img = img.resize((geometry.side, geometry.side), Image.Resampling.BILINEAR)
        rows.append(np.asarray(img.convert("L") if geometry.grey else img, dtype=np.float32).ravel() / 255)
    return np.stack(rows)


def stratified_subset(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `limit` rows, each class keeping its share (at least one row)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[: max(1, limit * int((labels == c).sum()) // len(labels))]
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, c: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, minimising sum(log loss) + ||W||^2 / (2 C) as scikit-learn does, by
    float64 L-BFGS on the CPU (deterministic). (weights, bias) for standardised inputs."""
    xt, yt = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.int64))
    w = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-6, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")
    n = len(yt)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        # Divided by n: the same minimum as scikit-learn's summed objective, with gradients of a sane size.
        loss = F.cross_entropy(xt @ w + b, yt, reduction="sum") / n + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    optimizer.step(objective)
    return w.detach(), b.detach()


@dataclass
class PixelBaseline:
    """A fitted baseline: standardisation, weights, and the geometry it reads images at."""

    geometry: PixelGeometry
    mean: np.ndarray
    scale: np.ndarray
    weights: torch.Tensor
    bias: torch.Tensor
    train_images: int

    def predict(self, paths: list[Path]) -> np.ndarray:
        x = (pixel_matrix(paths, self.geometry) - self.mean) / self.scale
        return (torch.from_numpy(x.astype(np.float64)) @ self.weights + self.bias).argmax(1).numpy()


def fit_pixel_baseline(rows: list[SplitRow], raw_dir: Path, num_classes: int, max_images: int) -> PixelBaseline:
    """Fit the baseline on (a stratified subset of) the train split's images."""
    labels = np.array([r.label for r in rows], dtype=np.int64)
    chosen = stratified_subset(labels, max_images)
    paths = [Path(raw_dir) / rows[i].path for i in chosen]
    geometry = pixel_geometry(paths)
    x = pixel_matrix(paths, geometry)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0    # a constant pixel (a border) carries nothing; as StandardScaler does
    weights, bias = fit_logistic_regression((x - mean) / scale, labels[chosen], num_classes)
    return PixelBaseline(geometry, mean, scale, weights, bias, len(chosen))
