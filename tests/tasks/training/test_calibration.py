"""Temperature scaling: it finds the temperature that was put in, and it lowers the NLL of an over-confident model."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tasks.training.calibration import calibration_report, fit_temperature


def labelled_logits(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is exactly calibrated: labels are drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_recovers_the_temperature_that_distorted_calibrated_logits(true_temperature):
    logits, labels = labelled_logits(20_000, 5)
    fitted = fit_temperature(logits * true_temperature, labels)   # over-confident for T > 1
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_lowers_the_nll_of_an_over_confident_model_and_never_changes_a_prediction():
    logits, labels = labelled_logits(2_000, 10, seed=1)
    confident = logits * 4
    temperature = fit_temperature(confident, labels)
    report = calibration_report(confident, labels, temperature)
    assert temperature > 2
    assert report["val_nll_after"] < report["val_nll_before"] - 0.3
    assert torch.equal((confident / temperature).argmax(1), confident.argmax(1))
    # The fitted value is the minimum: a little either side is worse.
    nll = [float(F.cross_entropy(confident / t, labels)) for t in (temperature * 0.9, temperature, temperature * 1.1)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_is_deterministic_and_stays_in_range():
    logits, labels = labelled_logits(500, 3)
    assert fit_temperature(logits, labels) == fit_temperature(logits.clone(), labels.clone())
    # Labels that contradict every logit push T to its upper bound, not to infinity.
    wrong = (logits.argmax(1) + 1) % 3
    assert fit_temperature(logits * 50, wrong) <= 20.0
