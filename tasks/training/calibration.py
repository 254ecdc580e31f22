"""Temperature scaling (Guo et al., 2017): one number T that makes the model's probabilities mean what they say.

Dividing the logits by T, fitted on the best epoch's validation logits, changes no prediction. The
checkpoint carries T, evaluate reports the metrics before and after, and the ONNX model applies it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# The search range of T: beyond it something is wrong with the logits, not the calibration.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on `labels` (float64, CPU, deterministic): the
    NLL is convex in 1/T, and 60 golden-section steps on log T narrow [0.05, 20] to well below 1e-9."""
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / torch.tensor(log_t).exp(), y))

    low, high = torch.log(torch.tensor(MIN_TEMPERATURE)).item(), torch.log(torch.tensor(MAX_TEMPERATURE)).item()
    ratio = (5 ** 0.5 - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(torch.tensor((low + high) / 2).exp())


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """Validation NLL before and after dividing the logits by `temperature`."""
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    return {"temperature": round(temperature, 6),
            "val_nll_before": round(float(F.cross_entropy(z, y)), 6),
            "val_nll_after": round(float(F.cross_entropy(z / temperature, y)), 6)}
