"""The abstention module's pieces against oracles of their own, each in milliseconds: the feature distance against
Lee et al.'s formula written out with a matrix inverse, the thresholds against counts by hand, the out-of-domain
numbers against scikit-learn, the summary line literally. Everything runs in this process, so `make mutate` sees
which test catches which planted bug (tests/tasks/test_abstention.py covers the same pieces end to end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tasks.lib import abstention


def oracle_distance(train: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean: class means and the pooled (biased) covariance,
    shrunk by 0.01 toward its mean variance, inverted."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(train)
    cov = 0.99 * cov + 0.01 * np.trace(cov) / len(cov) * np.eye(len(cov))
    inverse = np.linalg.inv(cov)
    return np.min([np.einsum("nd,de,ne->n", queries - m, inverse, queries - m) for m in means], axis=0)


def fitted_distance(stats: dict[str, np.ndarray], queries: np.ndarray) -> np.ndarray:
    return abstention.squared_distance(torch.from_numpy(queries), torch.from_numpy(stats["whiten"]),
                                       torch.from_numpy(stats["centres"])).numpy()


def test_the_fitted_distance_is_the_shrunk_mahalanobis_distance_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(3)
    # Four classes named, three seen (class 2 has no image), features of unequal scale and correlated.
    labels = np.array([0, 1, 3] * 10)
    train = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 3.0 * labels[:, None]
    # Streamed in two uneven batches, as evaluate feeds it.
    stats = abstention.fit_distance([(train[:7], labels[:7]), (train[7:], labels[7:])], num_classes=4)
    assert stats["whiten"].dtype == stats["centres"].dtype == np.float32
    assert stats["whiten"].shape == (5, 5) and stats["centres"].shape == (3, 5)   # the unseen class dropped out
    queries = np.concatenate([train[:4], rng.normal(scale=10.0, size=(6, 5))])
    np.testing.assert_allclose(fitted_distance(stats, queries), oracle_distance(train, labels, queries), rtol=1e-4)


def test_with_one_image_per_class_the_distance_is_euclidean_over_the_shrinkage() -> None:
    train, labels = np.array([[0.0, 0.0], [4.0, 0.0]]), np.array([0, 1])
    stats = abstention.fit_distance([(train, labels)], num_classes=2)   # no spread: covariance 0, then 0.01 * I
    queries = np.array([[1.0, 0.0], [4.0, 3.0], [-2.0, 1.0]])
    np.testing.assert_allclose(fitted_distance(stats, queries), np.array([1.0, 9.0, 5.0]) / 0.01, rtol=1e-5)


def test_the_distance_threshold_keeps_95_percent_of_validation_with_ties_together() -> None:
    assert abstention.distance_threshold(np.array([])) is None
    values = np.arange(40, 0, -1, dtype=np.float64)   # 1 .. 40, unsorted: 38 of 40 is 95%
    assert abstention.distance_threshold(values) == 38.0
    assert abstention.distance_threshold(np.array([5.0])) == 5.0
    assert abstention.distance_threshold(np.array([3.0, 1.0, 2.0])) == 3.0   # ceil(2.85): all three kept
    assert abstention.distance_threshold(np.r_[np.ones(19), 7.0]) == 1.0     # 19 of 20 is exactly 95%
    assert isinstance(abstention.distance_threshold(values), float)


def test_the_coverage_threshold_answers_at_least_that_share() -> None:
    confidence = np.array([0.55, 0.9, 0.6, 0.7, 0.6])
    assert abstention.threshold_for_coverage(confidence, 1.0) == 0.55
    assert abstention.threshold_for_coverage(confidence, 0.4) == 0.7    # 2 of 5
    assert abstention.threshold_for_coverage(confidence, 0.5) == 0.6    # 3 of 5, the tie answered with it
    assert abstention.threshold_for_coverage(confidence, 0.01) == 0.9   # at least one image
    probs = np.stack([confidence, 1 - confidence], axis=1)   # class 0 predicted for each
    assert abstention.choose_threshold(probs, np.zeros(5, int), None, 0.4) == (0.7, None)
    assert abstention.choose_threshold(probs, np.zeros(5, int), None, None) == (None, None)
    assert abstention.choose_threshold(probs[:0], np.zeros(0, int), 0.9, None) == (
        None, "the validation split lists no images, so no abstention threshold was chosen")
    assert abstention.choose_threshold(probs, np.array([0, 0, 1, 0, 1]), 0.9, None) == (0.7, None)


def test_out_of_domain_numbers_are_scikit_learns_auroc_and_the_rules_rejections() -> None:
    rng = np.random.default_rng(5)
    known, strangers = rng.dirichlet([1, 1, 1], 8), rng.dirichlet([1, 1, 1], 6)
    near, far = rng.uniform(0, 5, 8), rng.uniform(2, 9, 6)
    domain = np.r_[np.ones(8), np.zeros(6)]
    result = abstention.out_of_domain(known, strangers, 0.5, near, far, 6.0, "somewhere")
    rejected = int(((strangers.max(axis=1) < 0.5) | (far > 6.0)).sum())
    assert result == {
        "source": "somewhere", "n_images": 6,
        "auroc": round(roc_auc_score(domain, np.r_[known.max(axis=1), strangers.max(axis=1)]), 6),
        "auroc_distance": round(roc_auc_score(domain, -np.r_[near, far]), 6),
        "mean_confidence": round(strangers.max(axis=1).mean(), 6),
        "rejected": round(rejected / 6, 6), "rejected_count": rejected}
    assert 0 < rejected < 6
    without = abstention.out_of_domain(known, strangers, None, None, None, None)
    assert without["source"] == abstention.OOD_SOURCE
    assert (without["auroc_distance"], without["rejected"], without["rejected_count"]) == (None, None, None)


RECORD = {"threshold": 0.8, "distance": {"threshold": 123.45},
          "test": {"threshold": 0.8, "coverage": 0.75, "accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95},
          "out_of_domain": {"source": "scikit-learn digits (8x8 grey)", "auroc": 0.8766, "rejected_count": 7,
                            "n_images": 18},
          "noise": {"rejected_count": 48, "n_images": 50}}


def test_the_summary_line_states_the_operating_point_and_the_strangers_rejected() -> None:
    assert abstention.summary(RECORD) == (
        "below p=0.8000 or beyond feature distance 123.5 the model says unknown: it answers 75.0% of the test images, "
        "90.0% accurate [80.0, 95.0]; it rejects 7 of 18 digits and 48 of 50 noise images; confidence tells "
        "scikit-learn digits from test images with AUROC 0.877")
    none_answered = {**RECORD, "test": {**RECORD["test"], "accuracy": None}}
    assert "it answers 75.0% of the test images, no image answered; it" in abstention.summary(none_answered)
    own = {**RECORD, "out_of_domain": {**RECORD["out_of_domain"], "not_applicable": "its own domain"}}
    assert abstention.summary(own).endswith(
        "it rejects 48 of 50 noise images; the digits check does not apply (its own domain)")
    assert abstention.summary({**RECORD, "test": None, "note": "too weak"}) == (
        "no threshold (too weak); confidence tells scikit-learn digits from test images with AUROC 0.877")
    assert abstention.summary({**RECORD, "test": None}) == (
        "no threshold (export.abstain_at_accuracy and export.abstain_at_coverage are null); confidence tells "
        "scikit-learn digits from test images with AUROC 0.877")


@pytest.mark.parametrize("conv", [True, False])
def test_the_head_input_is_the_penultimate_features_pooled_over_positions(conv: bool) -> None:
    torch.manual_seed(0)
    head = torch.nn.Conv2d(4, 3, 1) if conv else torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(torch.nn.Identity(), head)
    model.fc = head   # the name models.find_head knows
    features = torch.randn(2, 4, 3, 5) if conv else torch.randn(2, 4)
    kept = abstention.HeadInput(model)
    model.fc(features)
    expected = features.mean(dim=(2, 3)) if conv else features
    torch.testing.assert_close(kept.value, expected)
