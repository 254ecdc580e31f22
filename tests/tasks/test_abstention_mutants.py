"""The abstention module's pieces against oracles of their own, each in milliseconds: the feature distance against
Lee et al.'s formula written out with a matrix inverse, the thresholds against counts by hand, the out-of-domain
numbers against scikit-learn, the summary line literally. Everything runs in this process, so `make mutate` sees
which test catches which planted bug (tests/tasks/test_abstention.py covers the same pieces end to end)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from tasks.lib import abstention
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import sha256_file, write_json

NOISE_PIXELS_SHA256 = "57c2c05b751b06c7d0b441931381a8001c352dad5982521d8b8572fac80e6f6b"   # noise_000..003, seed 0


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
          "test": {"threshold": 0.8, "coverage": 0.75, "accuracy": 0.9, "accuracy_ci_low": 0.8,
                   "accuracy_ci_high": 0.95},
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


def test_noise_and_digit_images_are_the_same_files_every_run(tmp_path: Path) -> None:
    # The card's noise numbers compare across releases only while the pixels stay the same: pinned by hash.
    noise = abstention.write_noise_images(tmp_path, 4)
    assert [row.path for row in noise] == [f"noise_{i:03d}.png" for i in range(4)]
    assert [Image.open(tmp_path / row.path).mode for row in noise] == ["L", "RGB", "L", "RGB"]
    assert [row.sha256 == sha256_file(tmp_path / row.path) for row in noise] == [True] * 4
    pixels = b"".join(np.asarray(Image.open(tmp_path / row.path)).tobytes() for row in noise)   # not the PNG bytes:
    assert hashlib.sha256(pixels).hexdigest() == NOISE_PIXELS_SHA256                           # zlib may change
    digits, rows = load_digits(), abstention.write_ood_images(tmp_path, 3)
    assert [row.label for row in rows] == digits.target[:3].tolist()   # each file labelled with the digit it shows
    for row, image in zip(rows, digits.images, strict=False):
        pixels = np.asarray(Image.open(tmp_path / row.path), dtype=np.float64)
        assert pixels.shape == (28, 28) and row.sha256 == sha256_file(tmp_path / row.path)
        # The upscaled file is the digit: its 8x8 average follows the 0..16 ink, scaled to 0..255.
        blocks = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BOX))
        assert np.corrcoef(blocks.ravel(), image.ravel())[0, 1] > 0.9


def project(tmp_path: Path) -> tuple[Params, dict, dict]:
    """evaluate's two files and a checkpoint, written by hand: what export's onnx_metadata reads."""
    params = Params.model_validate({"train": {"out_dir": str(tmp_path / "train")},
                                    "evaluate": {"out_dir": str(tmp_path / "evaluate")},
                                    "reports": {"dir": str(tmp_path / "metrics")},
                                    "export": {"abstain_at_accuracy": 0.9}})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "model.pt").write_bytes(b"the checkpoint")
    (tmp_path / "evaluate").mkdir()
    stats = {"whiten": np.eye(2, dtype=np.float32) * 2, "centres": np.arange(6, dtype=np.float32).reshape(3, 2)}
    np.savez(tmp_path / "evaluate" / "feature_distance.npz", **stats)
    record = {"target": {"accuracy": 0.9}, "threshold": 0.8125,
              "checkpoint_sha256": sha256_file(tmp_path / "train" / "model.pt"),
              "distance": {"threshold": 12.5, "sha256": sha256_file(tmp_path / "evaluate" / "feature_distance.npz")},
              "test": {"coverage": 0.5}, "risk_coverage": [{"coverage": 1.0}], "out_of_domain": {"auroc": 0.9},
              "noise": {"auroc": 1.0}}
    write_json(tmp_path / "metrics" / "evaluate.json", {"abstention": record})
    return params, record, stats


def test_export_embeds_evaluates_thresholds_and_distance_as_written(tmp_path: Path) -> None:
    params, record, stats = project(tmp_path)
    meta, (whiten, centres) = abstention.onnx_metadata(params)
    assert meta == {
        "abstain_threshold": "0.8125", "feature_distance_threshold": "12.5",
        "abstention": json.dumps({"target": {"accuracy": 0.9}, "on_test": {"coverage": 0.5},
                                  "risk_coverage": [{"coverage": 1.0}], "out_of_domain": {"auroc": 0.9},
                                  "noise": {"auroc": 1.0}}, sort_keys=True),
        "abstention_rule": "answer only when max(probabilities) >= abstain_threshold and feature_distance <= "
                           "feature_distance_threshold; otherwise the model is not sure: report unknown (both "
                           "thresholds chosen on the validation split)"}
    np.testing.assert_array_equal(whiten.numpy(), stats["whiten"])
    np.testing.assert_array_equal(centres.numpy(), stats["centres"])


def test_export_refuses_evaluates_files_for_another_checkpoint_or_distance_saying_what_to_run(tmp_path: Path,
                                                                                              caplog) -> None:
    params, record, _ = project(tmp_path)
    metrics, checkpoint = tmp_path / "metrics" / "evaluate.json", tmp_path / "train" / "model.pt"
    checkpoint.write_bytes(b"retrained since")
    with pytest.raises(StageError) as err:
        abstention.onnx_metadata(params)
    assert str(err.value) == (f"{metrics} was computed for another checkpoint than {checkpoint}: re-run evaluate "
                              "(dvc repro evaluate)")
    write_json(metrics, {"abstention": {**record, "checkpoint_sha256": sha256_file(checkpoint),
                                        "distance": {**record["distance"], "sha256": "0" * 64}}})
    with pytest.raises(StageError) as err:
        abstention.onnx_metadata(params)
    assert str(err.value) == (f"{tmp_path / 'evaluate' / 'feature_distance.npz'} is missing or not the file "
                              f"{metrics} was computed with: re-run evaluate (dvc repro evaluate)")
    write_json(metrics, {"abstention": {**record, "target": {"coverage": 0.9}}})
    with pytest.raises(StageError) as err:
        abstention.onnx_metadata(params)
    assert str(err.value) == (f"{metrics} holds no abstention threshold for {{'accuracy': 0.9}} "
                              "(export.abstain_at_*): run evaluate first (dvc repro evaluate)")
    write_json(metrics, {"abstention": {**record, "checkpoint_sha256": sha256_file(checkpoint), "threshold": None,
                                        "note": "too weak"}})
    caplog.set_level(logging.WARNING, logger=abstention.__name__)
    assert abstention.onnx_metadata(params) == ({}, None)
    metrics.unlink()
    assert abstention.onnx_metadata(params) == ({}, None)
    assert caplog.messages == [
        "no abstention threshold in the ONNX metadata: too weak",
        f"no abstention threshold in the ONNX metadata: {metrics} does not exist; run evaluate before export "
        "(dvc repro export) for one"]
