"""The abstention rule as the ONNX scorer applies it, against an oracle of its own.

The model is tests/tasks/lib/test_onnx_classifier.py's linear classifier (mean colour, one matrix, softmax over a
temperature) with a `feature_distance` output: the squared length of the mean colour, which float64 numpy computes
from tests.realistic.oracle_input. Each threshold is set to one image's own value, so an image exactly at a
threshold is tested (answered: p >= threshold, distance <= its threshold). Everything runs in this process, so
`make mutate` sees which test catches which planted bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from scipy.special import softmax as scipy_softmax

from tasks.lib.onnx_classifier import ModelError, answered, load_classifier
from tests.realistic import oracle_input
from tests.tasks.lib.test_onnx_classifier import BIAS, CLASSES, PREP, WEIGHT, images, save_model   # noqa: F401

TEMPERATURE = 1.7


def distance_model(path: Path, distance_shape: str = "rows", **metadata: str) -> Path:
    """probabilities = softmax((mean colour @ WEIGHT + BIAS) / TEMPERATURE), feature_distance = |mean colour|^2;
    distance_shape "rows" gives one value per image, "column" an (N, 1) table instead."""
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
             helper.make_node("Gemm", ["features", "weight", "bias"], ["logits"]),
             helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1),
             helper.make_node("ReduceSumSquare", ["features"], ["feature_distance"], axes=[1],
                              keepdims=int(distance_shape == "column"))]
    graph = helper.make_graph(
        nodes, "distance", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("logits", "probabilities", "feature_distance")],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, len(CLASSES)], WEIGHT.flatten().tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [len(CLASSES)], BIAS.tolist()),
         helper.make_tensor("temperature", TensorProto.FLOAT, [], [TEMPERATURE])])
    entries = {"class_names": json.dumps(CLASSES), "preprocessing": json.dumps(PREP)} | metadata
    return save_model(graph, path, entries)


def oracle(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """float64 top probability and feature distance of each file."""
    colour = np.stack([oracle_input(path, PREP) for path in paths]).astype(np.float64).mean(axis=(2, 3))
    probs = scipy_softmax((colour @ WEIGHT.astype(np.float64) + BIAS.astype(np.float64)) / TEMPERATURE, axis=1)
    return probs.max(axis=1), (colour ** 2).sum(axis=1)


def test_the_rule_answers_at_both_thresholds_and_not_beyond_either() -> None:
    probs = np.array([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7], [0.9, 0.1]])
    distance = np.array([2.0, 1.0, 3.0, 2.0 + 1e-9])
    assert answered(probs, 0.6).tolist() == [True, False, True, True]            # p exactly at the threshold
    assert answered(probs, 0.6, distance, 2.0).tolist() == [True, False, False, False]   # distance exactly at its own
    assert answered(probs, 0.6, distance, None).tolist() == [True, False, True, True]    # no distance threshold


def scored(model: Path, images: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch, its top probabilities as the scorer computes them and its distances as onnxruntime gives them,
    both checked against the float64 oracle."""
    classifier = load_classifier(model)
    batch = np.stack([classifier.load(path) for path in images])
    p = classifier.probabilities(batch).max(axis=1)
    d = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["feature_distance"],
                                                                                 {"input": batch})[0]
    want_p, want_d = oracle(images)
    np.testing.assert_allclose(p, want_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d, want_d, rtol=1e-5)
    return batch, p, d


def test_the_scorer_answers_exactly_where_the_rule_says_on_the_models_two_outputs(tmp_path: Path,
                                                                                   images: list[Path]) -> None:
    batch, p, d = scored(distance_model(tmp_path / "plain.onnx"), images)
    # Each threshold exactly at a middle image's own value: that image is answered on that count.
    t, dt = float(np.sort(p)[len(p) // 2]), float(np.sort(d)[len(d) // 2])
    sure, near = p >= t, d <= dt
    assert (sure & ~near).any() and (~sure & near).any() and (sure & near).any()   # every case occurs
    model = distance_model(tmp_path / "model.onnx", abstain_threshold=repr(t), feature_distance_threshold=repr(dt))
    classifier = load_classifier(model)
    assert (classifier.abstain_threshold, classifier.max_distance) == (t, dt)
    probs, answers = classifier.answered(batch)
    np.testing.assert_array_equal(probs.max(axis=1), p)
    assert answers.tolist() == (sure & near).tolist()


def test_without_a_distance_threshold_only_confidence_decides(tmp_path: Path, images: list[Path]) -> None:
    batch, p, _ = scored(distance_model(tmp_path / "plain.onnx"), images)
    t = float(np.sort(p)[len(p) // 2])
    classifier = load_classifier(distance_model(tmp_path / "model.onnx", abstain_threshold=repr(t)))
    assert classifier.max_distance is None
    probs, answers = classifier.answered(batch)
    np.testing.assert_array_equal(probs.max(axis=1), p)
    assert answers.tolist() == (p >= t).tolist() and not answers.all()


def test_a_distance_output_that_is_not_one_value_per_image_is_refused(tmp_path: Path, images: list[Path]) -> None:
    model = distance_model(tmp_path / "model.onnx", "column", abstain_threshold="0.5", feature_distance_threshold="1")
    classifier = load_classifier(model)
    with pytest.raises(ModelError) as err:
        classifier.answered(np.stack([classifier.load(path) for path in images[:2]]))
    assert str(err.value) == (f"{model}: model unusable: its feature_distance output has shape (2, 1) for 2 image(s), "
                              "not (2,); re-export the model")


LONG = "-1" + "0" * 48   # shown cut at 40 characters


@pytest.mark.parametrize("value", ["-0.5", "inf", "nan", "far", LONG])
def test_a_distance_threshold_that_is_no_distance_is_refused_naming_the_file(tmp_path: Path, value: str) -> None:
    model = distance_model(tmp_path / "model.onnx", feature_distance_threshold=value)
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: metadata feature_distance_threshold {value[:40]!r} is not a finite distance "
                              ">= 0; re-export the model")


def test_a_distance_threshold_of_zero_is_a_distance(tmp_path: Path) -> None:
    assert load_classifier(distance_model(tmp_path / "model.onnx", feature_distance_threshold="0")).max_distance == 0.0


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "sure", "-" + "9" * 50])
def test_an_abstain_threshold_that_is_no_probability_is_refused_naming_the_file(tmp_path: Path, value: str) -> None:
    model = distance_model(tmp_path / "model.onnx", abstain_threshold=value)
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: metadata abstain_threshold {value[:40]!r} is not a probability in (0, 1]; "
                              "re-export the model")


def test_an_abstain_threshold_of_one_answers_only_certainty(tmp_path: Path) -> None:
    assert load_classifier(distance_model(tmp_path / "model.onnx", abstain_threshold="1")).abstain_threshold == 1.0
