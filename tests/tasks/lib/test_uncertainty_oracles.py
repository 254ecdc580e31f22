"""The gate's statistics against independent oracles: scipy, and simulation where no formula exists.

Hand-worked values live in test_uncertainty.py; here every interval and p-value is compared with
scipy on many random inputs, and the bootstrap's 95% is checked to mean 95% by drawing test sets
from a population whose macro-F1 is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap

from tasks.lib.uncertainty import bootstrap_macro_f1, mcnemar_exact, wilson_interval


def random_counts(rng: np.random.Generator, size: int) -> list[tuple[int, int]]:
    """(successes, n) pairs: small and large n, the edges 0 and n, and everything between."""
    ns = np.concatenate([np.arange(1, 41), rng.integers(41, 5000, size)])
    pairs = [(0, int(n)) for n in ns[:10]] + [(int(n), int(n)) for n in ns[:10]]
    return pairs + [(int(rng.integers(0, n + 1)), int(n)) for n in ns]


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_interval_is_scipys(confidence: float) -> None:
    for k, n in random_counts(np.random.default_rng(0), 300):
        want = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        got = wilson_interval(k, n, confidence) if confidence != 0.95 else wilson_interval(k, n)   # the default
        assert got == pytest.approx((want.low, want.high), abs=1e-12), (k, n)


def paired_correctness(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two models' per-image correctness with a random share of disagreements."""
    production = rng.random(n) < rng.uniform(0.3, 0.95)
    flip = rng.random(n) < rng.uniform(0.0, 0.3)
    return production ^ flip, production


def test_mcnemar_exact_is_scipys_binomial_test_on_the_discordant_images() -> None:
    rng = np.random.default_rng(1)
    for n in [*range(1, 60), *rng.integers(60, 3000, 200)]:
        candidate, production = paired_correctness(rng, int(n))
        wins = int(np.count_nonzero(candidate & ~production))
        losses = int(np.count_nonzero(production & ~candidate))
        result = mcnemar_exact(candidate, production)
        assert (result["wins"], result["losses"]) == (wins, losses)
        want = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        assert result["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-300), (wins, losses)


CLASSES = 4
MODEL_CLASSES = CLASSES + 1   # the model knows one class more than any test set here holds


def macro_f1(labels: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro-F1 along `axis`, class by class from comparisons (no confusion matrix, no bincount); a class
    neither present nor predicted is left out of the mean, as torchmetrics does."""
    f1s, present = [], []
    for c in range(MODEL_CLASSES):
        tp = np.sum((labels == c) & (predicted == c), axis=axis)
        wrong = np.sum((labels == c) != (predicted == c), axis=axis)   # false positives plus false negatives
        f1s.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
        present.append(2 * tp + wrong > 0)
    return np.sum(f1s, axis=0) / np.maximum(np.sum(present, axis=0), 1)


def draw_test_set(rng: np.random.Generator, n: int, accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """A test set from a population whose macro-F1 is exactly `accuracy`: balanced labels, and a model
    right with that probability, else wrong to one of the other classes at random (per class, true
    positives accuracy/C and false positives = false negatives (1 - accuracy)/C, so F1 = accuracy)."""
    labels = rng.integers(0, CLASSES, n)
    wrong = rng.random(n) >= accuracy
    return labels, np.where(wrong, (labels + rng.integers(1, CLASSES, n)) % CLASSES, labels)


def test_bootstrap_interval_is_scipys_percentile_bootstrap() -> None:
    """Same statistic and method as scipy.stats.bootstrap, to within the Monte Carlo error of both."""
    rng = np.random.default_rng(2)
    for n, accuracy, rare in [(40, 0.6, False), (150, 0.8, False), (400, 0.9, False), (80, 0.7, True)]:
        labels, predicted = draw_test_set(rng, n, accuracy)
        if rare:   # class 3 has two images: many resamples lack it (as every test set here lacks class 4)
            labels[labels == 3] = 0
            labels[:2] = 3
        want = bootstrap((labels, predicted), macro_f1, paired=True, vectorized=True, n_resamples=20_000,
                         method="percentile", confidence_level=0.95, random_state=rng)
        got = bootstrap_macro_f1(labels, predicted, MODEL_CLASSES, samples=20_000, seed=3)
        spread = float(np.std(want.bootstrap_distribution))
        # Measured over seeds: the two agree to within 0.08 standard deviations of the statistic
        # (Monte Carlo error and ties of a discrete statistic); a 90% interval's ends lie 0.25 to
        # 0.4 of them inside, a 99% interval's about 0.6 outside.
        assert got == pytest.approx((want.confidence_interval.low, want.confidence_interval.high),
                                    abs=0.15 * spread), (n, accuracy, spread)


# Coverage: how often the interval of a test set drawn from the population holds the population's
# macro-F1. Measured on this population (4 classes, 60 images, macro-F1 0.8) over 3,000 test sets:
# 0.954 for the 95% interval, 0.895 for a 90% one. With 2,000 test sets the observed coverage has
# a standard error of 0.005 at 0.95 and 0.007 at 0.90, so the window [0.925, 0.975] keeps the 95%
# interval by 5 standard errors and rejects a 90% one (or a 99% one) by 3.7 or more. Seeded, it
# gives the same answer every run; the margins make that answer the same for any other seed.
COVERAGE_SETS, COVERAGE_IMAGES, POPULATION_F1 = 2_000, 60, 0.8


@pytest.mark.slow(seconds=10)
def test_bootstrap_interval_covers_the_population_macro_f1_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(4)
    covered = below = 0
    for i in range(COVERAGE_SETS):
        labels, predicted = draw_test_set(rng, COVERAGE_IMAGES, POPULATION_F1)
        low, high = bootstrap_macro_f1(labels, predicted, CLASSES, seed=i)   # default resamples and level
        covered += low <= POPULATION_F1 <= high
        below += POPULATION_F1 < low
    coverage = covered / COVERAGE_SETS
    assert 0.925 <= coverage <= 0.975, coverage
    # Both ends miss: a one-sided interval, or one shifted to one side, misses on one side only.
    assert 0.01 <= below / COVERAGE_SETS <= 0.04 and 0.01 <= (COVERAGE_SETS - covered - below) / COVERAGE_SETS <= 0.04
