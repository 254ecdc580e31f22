"""Confidence intervals and the paired test against values worked out by hand (and by statsmodels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_f1_score

from tasks.lib.uncertainty import (
    binomial_two_sided,
    bootstrap_macro_f1,
    macro_f1_from_counts,
    mcnemar_exact,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.4901624, 0.9433178),      # statsmodels proportion_confint(8, 10, method="wilson")
    (0, 10, 0.0, 0.2775328),            # stays inside [0, 1] where the normal interval would not
    (10, 10, 0.7224672, 1.0),
    (263, 315, 0.7899360, 0.8718349),   # the demo's 315 test images at 0.835: about +/- 4 points
])
def test_wilson_interval_matches_known_values(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_narrows_with_more_images():
    small, large = wilson_interval(80, 100), wilson_interval(8000, 10000)
    assert small[1] - small[0] > 5 * (large[1] - large[0])


@pytest.mark.parametrize(("wins", "losses", "p"), [
    (1, 9, 0.021484375),     # 2 * (C(10,0) + C(10,1)) / 2**10; statsmodels mcnemar(exact=True) agrees
    (9, 1, 0.021484375),     # two-sided: symmetric
    (5, 5, 1.0),
    (0, 0, 1.0),             # no image where the models differ: no evidence either way
    (0, 6, 0.03125),         # 2 / 2**6
])
def test_mcnemar_exact_counts_discordant_images(wins, losses, p):
    candidate = np.array([True] * wins + [False] * losses + [True] * 7 + [False] * 3)
    production = np.array([False] * wins + [True] * losses + [True] * 7 + [False] * 3)
    result = mcnemar_exact(candidate, production)
    assert (result["wins"], result["losses"]) == (wins, losses)
    assert result["p_value"] == pytest.approx(p, rel=1e-12)


def test_binomial_two_sided_handles_thousands_of_images_exactly():
    assert binomial_two_sided(5000, 10000) == 1.0
    assert 0 < binomial_two_sided(4800, 10000) < 1e-4


def test_macro_f1_from_counts_matches_torchmetrics_with_absent_classes():
    rng = np.random.default_rng(1)
    labels, predicted = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    predicted[predicted == 3] = 0
    labels[labels == 3] = 1                  # class 3 neither present nor predicted: left out, as torchmetrics does
    counts = np.zeros((5, 5), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    want = multiclass_f1_score(torch.from_numpy(predicted), torch.from_numpy(labels), num_classes=5, average="macro")
    assert macro_f1_from_counts(counts) == pytest.approx(float(want), abs=1e-7)


def test_bootstrap_interval_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    predicted = np.where(rng.random(400) < 0.8, labels, rng.integers(0, 5, 400))
    counts = np.zeros((5, 5))
    np.add.at(counts, (labels, predicted), 1)
    estimate = macro_f1_from_counts(counts)
    low, high = bootstrap_macro_f1(labels, predicted, 5)
    assert (low, high) == bootstrap_macro_f1(labels, predicted, 5)
    assert low < estimate < high and 0.04 < high - low < 0.15
    other = bootstrap_macro_f1(labels, predicted, 5, seed=1)
    assert other != (low, high) and abs(other[0] - low) < 0.02
