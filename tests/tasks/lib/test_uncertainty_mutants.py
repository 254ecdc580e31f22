"""The statistics at their edges: empty and one-image test sets, absent classes, compact label arrays.

Mutation testing (`make mutate`) planted one-line bugs in tasks/lib/uncertainty.py that the
other tests let through: an interval for one image that claims to know nothing, an absent
class that crashes the bootstrap, uint8 labels that overflow, a 96.7% interval reported as
95%, an upper bound a hair above 1. Expected values come from scikit-learn and scipy, or from
the definition, never from the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from tasks.lib.uncertainty import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_macro_f1,
    interval_text,
    macro_f1_from_counts,
    mcnemar_exact,
    wilson_interval,
)


def sklearn_macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the classes that occur as a label or a prediction (absent ones are left out)."""
    return float(f1_score(labels, predicted, labels=np.union1d(labels, predicted), average="macro",
                          zero_division=0))


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def predictions(n: int, num_classes: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    wrong = rng.random(n) >= accuracy
    return labels, np.where(wrong, (labels + rng.integers(1, num_classes, n)) % num_classes, labels)


def test_the_macro_f1_interval_is_the_central_95_percent_of_the_seeded_resamples():
    """Reproducible to the last digit: the images resampled are numpy's default_rng(BOOTSTRAP_SEED) draws, so
    the same predictions give the same interval in every run (the model card records it)."""
    labels, predicted = predictions(150, 7, 0.7, seed=5)
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(labels), size=(BOOTSTRAP_SAMPLES, len(labels)))
    scores = [sklearn_macro_f1(labels[rows], predicted[rows]) for rows in picks]
    want = np.percentile(scores, [2.5, 97.5])
    assert bootstrap_macro_f1(labels, predicted, 7) == pytest.approx(tuple(want), abs=1e-12)


def test_a_stack_of_confusion_matrices_scores_each_as_if_alone():
    stack = np.stack([confusion(*predictions(80, 5, accuracy, seed), 5) for seed, accuracy in enumerate((0.3, 0.9))])
    assert macro_f1_from_counts(stack) == pytest.approx([macro_f1_from_counts(m) for m in stack], abs=1e-15)


def test_an_empty_test_set_has_the_uninformative_interval():
    assert bootstrap_macro_f1(np.array([], dtype=int), np.array([], dtype=int), 3) == (0.0, 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("predicted", "score"), [(2, 1.0), (0, 0.0)])
def test_one_test_image_gives_an_interval_at_its_own_score(predicted, score):
    assert bootstrap_macro_f1(np.array([2]), np.array([predicted]), 3) == (score, score)


def test_one_image_has_scipys_wilson_interval():
    want = binomtest(1, 1).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(1, 1) == pytest.approx((want.low, want.high), abs=1e-12)


def test_a_class_absent_from_the_test_split_leaves_the_interval_unchanged():
    labels, predicted = predictions(90, 4, 0.75, seed=1)        # classes 0..3 only; the model knows 5
    assert bootstrap_macro_f1(labels, predicted, 5) == bootstrap_macro_f1(labels, predicted, 4)


def test_labels_and_predictions_of_any_integer_valued_dtype_give_the_same_interval():
    # uint8 labels, as image datasets often ship them (Fashion-MNIST does), with 20 classes: label * 20
    # overflows a uint8; predictions read back as floats.
    labels, predicted = predictions(120, 20, 0.6, seed=2)
    want = bootstrap_macro_f1(labels, predicted, 20)
    assert bootstrap_macro_f1(labels.astype(np.uint8), predicted.astype(np.float64), 20) == want


@pytest.mark.parametrize(("counts", "want_labels", "want_predicted"), [
    ([[3, 0, 1], [0, 2, 0], [0, 0, 0]], [0, 0, 0, 0, 1, 1], [0, 0, 0, 2, 1, 1]),   # class 2 predicted once, never present
    ([[0, 0, 0], [0, 5, 0], [0, 0, 0]], [1] * 5, [1] * 5),                       # one class, all right
])
def test_macro_f1_counts_every_class_seen_as_a_label_or_a_prediction(counts, want_labels, want_predicted):
    assert macro_f1_from_counts(np.array(counts)) == pytest.approx(
        sklearn_macro_f1(np.array(want_labels), np.array(want_predicted)), abs=1e-15)


def test_the_wilson_interval_never_leaves_zero_to_one():
    # The formula gives 1.0000000000000002 for 9 of 9 and -1.4e-17 for 0 of 21 in floating point.
    assert wilson_interval(9, 9)[1] == 1.0 and wilson_interval(0, 21)[0] == 0.0
    bounds = np.array([wilson_interval(k, n) for n in range(1, 60) for k in range(n + 1)])
    assert bounds.min() >= 0.0 and bounds.max() <= 1.0


def test_impossible_counts_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"^successes must lie in \[0, 10\], got 11$"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match=r"^paired predictions differ in length: \(3,\) vs \(2,\)$"):
        mcnemar_exact(np.array([True, False, True]), np.array([True, False]))


def test_per_image_correctness_given_as_numbers_counts_like_booleans():
    candidate, production = [1, 1, 0, 1, 0, 1], [0, 1, 1, 0, 0, 0]
    want = mcnemar_exact(np.array(candidate, dtype=bool), np.array(production, dtype=bool))
    assert want["wins"] == 3 and want["losses"] == 1
    assert mcnemar_exact(np.array(candidate, dtype=float), np.array(production, dtype=float)) == want


def test_interval_text_rounds_both_ends():
    assert interval_text(0.81234, 0.87456) == "[0.812, 0.875]"
    assert interval_text(0.81234, 0.87456, digits=1) == "[0.8, 0.9]"
