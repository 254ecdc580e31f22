"""The one ONNX scorer (export's checks, publish's re-scoring of production, predict) against oracles of its own.

The model is a linear classifier small enough to compute by hand (average pool, one matrix
and a bias, optionally softmax over a fitted temperature), built with onnx.helper and run
by real onnxruntime on images shaped like a user's (tests.realistic: non-square, JPEG and
PNG, RGB, grayscale and RGBA, six class names that sort differently by every rule). The
expected input of each file is tests.realistic.oracle_input; the expected probabilities
are float64 numpy and scipy.special.softmax over those inputs. Everything is called in this
process, so `make mutate` sees which test catches which planted bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image
from scipy.special import softmax as scipy_softmax

from tasks.lib import onnx_classifier
from tasks.lib.onnx_classifier import BadImage, ImageLimits, ModelError, load_classifier, score_onnx
from tests.realistic import CLASS_NAMES, oracle_input, wrong_orders, write_realistic_folder

CLASSES = list(CLASS_NAMES)
# crop < resize and not ImageNet's mean/std: a scorer that squashes, skips the crop or ignores the
# metadata's normalisation gives other inputs.
PREP = {"crop_size": 16, "resize_size": 24, "interpolation": "bilinear", "mean": [0.45, 0.5, 0.4],
        "std": [0.2, 0.25, 0.3]}
WEIGHT = np.random.default_rng(7).normal(0.0, 2.0, (3, len(CLASSES))).astype(np.float32)
# Negative and positive, summing to more than 0: the raw logits of a blank image are no distribution.
BIAS = np.linspace(-1.0, 1.5, len(CLASSES), dtype=np.float32)
TEMPERATURE = 1.7
ATOL = 1e-6   # float32 onnxruntime against the float64 oracle (about 1e-7 seen)


# --------------------------------------------------------------------------- the model and the oracle


def linear_model(path: Path, temperature: float | None = None, logits: str = "linear",
                 probabilities: str = "softmax", weight_scale: float = 1.0, features_first: bool = False,
                 unused_initializer: bool = False, **metadata: str | None) -> Path:
    """softmax(((mean pixel of each channel) @ WEIGHT + BIAS) / temperature), as export writes it: a `logits`
    output, plus a `probabilities` output when a temperature was fitted (temperature None: none).

    logits: "linear"; "nan_on_images": NaN for every image that is not all zeros (the blank image
    load_classifier tries passes); "one_row": one row for the whole batch, whatever its size.
    probabilities: "softmax"; "raw": the logits themselves (negative for some classes, positive sum);
    "negative_on_images" / "zero_on_images": the softmax minus the image's energy, or times zero, for
    every image but the blank one; "zipmap": scikit-learn's kind, a list of {class: probability}.
    weight_scale: logits that many times larger (100: an overconfident network, float32 zeros).
    features_first: a `features` output (the pooled colour) listed before `logits`.
    metadata: entries replacing the good ones; None removes one.
    """
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
             helper.make_node("Gemm", ["features", "weight", "bias"], ["linear"]),
             helper.make_node("ReduceSumSquare", ["input"], ["energy4"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["energy4"], ["energy"], axis=1)]   # (N, 1): 0 only for a blank image
    nodes += {
        "linear": [helper.make_node("Identity", ["linear"], ["logits"])],
        "nan_on_images": [helper.make_node("Neg", ["energy"], ["negative"]),
                          helper.make_node("Sqrt", ["negative"], ["nan"]),
                          helper.make_node("Add", ["linear", "nan"], ["logits"])],
        "one_row": [helper.make_node("ReduceMean", ["linear"], ["logits"], axes=[0], keepdims=1)],
    }[logits]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if features_first:
        outputs.insert(0, helper.make_tensor_value_info("features", TensorProto.FLOAT, None))
    initializers = [helper.make_tensor("weight", TensorProto.FLOAT, [3, len(CLASSES)],
                                       (WEIGHT * weight_scale).flatten().tolist()),
                    helper.make_tensor("bias", TensorProto.FLOAT, [len(CLASSES)], BIAS.tolist()),
                    helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    if unused_initializer:   # what a careless exporter leaves behind; onnxruntime warns about it
        initializers.append(helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0]))
    if temperature is not None:
        nodes += [helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
                  helper.make_node("Softmax", ["scaled"], ["softmax"], axis=1)]
        nodes += {
            "softmax": [helper.make_node("Identity", ["softmax"], ["probabilities"])],
            "raw": [helper.make_node("Identity", ["logits"], ["probabilities"])],
            "negative_on_images": [helper.make_node("Sqrt", ["energy"], ["root"]),
                                   helper.make_node("Sub", ["softmax", "root"], ["probabilities"])],
            "zero_on_images": [helper.make_node("Sub", ["one", "energy"], ["one_minus"]),
                               helper.make_node("Relu", ["one_minus"], ["blank_only"]),
                               helper.make_node("Mul", ["softmax", "blank_only"], ["probabilities"])],
            "zipmap": [helper.make_node("ZipMap", ["softmax"], ["probabilities"], domain="ai.onnx.ml",
                                        classlabels_strings=CLASSES)],
        }[probabilities]
        kind = (helper.make_sequence_type_proto(helper.make_map_type_proto(
            TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
            if probabilities == "zipmap" else helper.make_tensor_type_proto(TensorProto.FLOAT, None))
        outputs.append(helper.make_value_info("probabilities", kind))
        initializers.append(helper.make_tensor("temperature", TensorProto.FLOAT, [], [temperature]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
        outputs, initializers)
    entries = {"class_names": json.dumps(CLASSES), "preprocessing": json.dumps(PREP)} | metadata
    return save_model(graph, path, {key: value for key, value in entries.items() if value is not None})


def save_model(graph: onnx.GraphProto, path: Path, metadata: dict[str, str]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 9
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def pixel_model(path: Path, side: int, metadata_side: int) -> Path:
    """A linear layer over every pixel, built for side x side images (its weight has 3 * side^2 rows), whose
    metadata says metadata_side; its layer named as torch.onnx names a compiled model's head."""
    weight = np.zeros((3 * side * side, len(CLASSES)), np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], name=PIXEL_LAYER)]
    graph = helper.make_graph(
        nodes, "pixels", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [helper.make_tensor("weight", TensorProto.FLOAT, list(weight.shape), weight.flatten().tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [len(CLASSES)], BIAS.tolist())])
    prep = PREP | {"crop_size": metadata_side, "resize_size": metadata_side}
    return save_model(graph, path, {"class_names": json.dumps(CLASSES), "preprocessing": json.dumps(prep)})


PIXEL_LAYER = "/_orig_mod/model/head/classifier/fc/Gemm"


def oracle_logits(paths: list[Path], weight_scale: float = 1.0) -> np.ndarray:
    """float64 (mean of each channel of the oracle input) @ WEIGHT + BIAS, one row per file."""
    inputs = np.stack([oracle_input(path, PREP) for path in paths]).astype(np.float64)
    return inputs.mean(axis=(2, 3)) @ (WEIGHT.astype(np.float64) * weight_scale) + BIAS.astype(np.float64)


def oracle_probabilities(paths: list[Path], temperature: float = 1.0, weight_scale: float = 1.0) -> np.ndarray:
    """float64 softmax(logits / temperature), one row per file."""
    return scipy_softmax(oracle_logits(paths, weight_scale) / temperature, axis=1)


def batch_of(classifier: onnx_classifier.Classifier, paths: list[Path]) -> np.ndarray:
    return np.stack([classifier.load(path) for path in paths])


def onnxruntime_error(model: Path, feed: np.ndarray | None = None) -> str:
    """The first line of what onnxruntime itself says when it loads the model (or runs it on feed)."""
    with pytest.raises(Exception) as err:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        session.run(None, {"input": feed})
    return str(err.value).splitlines()[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve files, two per class: every kind and size of tests.realistic, in writing order."""
    root = tmp_path_factory.mktemp("realistic")
    return [root / written.path for written in write_realistic_folder(root, per_class=2)]


@pytest.fixture(autouse=True)
def pillow_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every checked decode sets Pillow's process-wide pixel limit to the one it was given: start each test at the
    default and put back whatever was there, so a small limit tried here leaks into no other test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", ImageLimits().max_pixels)


# Each limit below refuses every realistic image (all at least 1,350 px, 1.25:1 and 1,100 bytes) that the
# defaults accept; the limits a caller passes (prepare's) are the ones applied.
STRICT_LIMITS = [
    pytest.param(ImageLimits(max_pixels=1000), "decompression_bomb", id="max_pixels"),
    pytest.param(ImageLimits(max_aspect_ratio=1.1), "extreme_aspect_ratio", id="max_aspect_ratio"),
    pytest.param(ImageLimits(max_file_bytes=100), "file_too_large", id="max_file_bytes"),
]


# --------------------------------------------------------------------------- softmax


def test_softmax_is_float64_row_by_row_even_for_logits_far_from_zero() -> None:
    """Overconfident networks give logits in the hundreds; each row is its own distribution."""
    logits = np.array([[1000.0, 999.0, 990.0], [0.0, -1.0, -3.0], [-1000.0, -1001.0, -1003.0], [0.1, 0.2, 0.3]],
                      dtype=np.float32)
    probs = onnx_classifier.softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, scipy_softmax(logits.astype(np.float64), axis=1), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- one file: the network's input


def test_each_file_becomes_the_input_its_preprocessing_metadata_describes(tmp_path: Path,
                                                                          images: list[Path]) -> None:
    classifier = load_classifier(linear_model(tmp_path / "model.onnx"))
    for path in images:
        got = classifier.load(path)
        assert got.dtype == np.float32 and got.shape == (3, 16, 16), path
        np.testing.assert_allclose(got, oracle_input(path, PREP), rtol=0, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize(("limits", "reason"), STRICT_LIMITS)
def test_load_applies_the_limits_it_is_given(tmp_path: Path, images: list[Path], limits: ImageLimits,
                                            reason: str) -> None:
    classifier = load_classifier(linear_model(tmp_path / "model.onnx"))
    classifier.load(images[0])   # the process's limits (the defaults here) accept it
    with pytest.raises(BadImage) as err:
        classifier.load(images[0], limits)
    assert (err.value.path, err.value.reason) == (str(images[0]), reason)


# --------------------------------------------------------------------------- a batch: probabilities


@pytest.mark.parametrize("temperature", [None, TEMPERATURE], ids=["logits only", "calibrated"])
def test_probabilities_are_the_float64_softmax_of_the_logits_over_the_fitted_temperature(
        tmp_path: Path, images: list[Path], temperature: float | None) -> None:
    """A model exported before calibration has only logits (plain softmax); a calibrated one its own output."""
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", temperature))
    assert classifier.calibrated is (temperature is not None)
    probs = classifier.probabilities(batch_of(classifier, images))
    assert probs.dtype == np.float64 and probs.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(probs, oracle_probabilities(images, temperature or 1.0), rtol=0, atol=ATOL)
    # Each row a distribution in float64 (log loss and ECE take it as one), not float32's ~1e-7.
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_logits_come_from_the_output_named_logits_whatever_the_order_of_outputs(tmp_path: Path,
                                                                               images: list[Path]) -> None:
    """Export's parity check and int8 comparison read logits(); a model may list another output first."""
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE, features_first=True))
    logits = classifier.logits(batch_of(classifier, images))
    np.testing.assert_allclose(logits, oracle_logits(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [None, TEMPERATURE], ids=["logits only", "calibrated"])
def test_an_overconfident_networks_zero_probabilities_are_valid(tmp_path: Path, images: list[Path],
                                                                 temperature: float | None) -> None:
    """Logits hundreds apart give probabilities that are exactly 0: a distribution still, not a broken model."""
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", temperature, weight_scale=1000.0))
    probs = classifier.probabilities(batch_of(classifier, images))
    assert (probs == 0).any(axis=1).all()   # every row has one: the fixture keeps its point
    np.testing.assert_allclose(probs, oracle_probabilities(images, temperature or 1.0, 1000.0), rtol=0, atol=ATOL)


@pytest.mark.parametrize(("model", "message"), [
    ({"logits": "nan_on_images"},
     "its logits output gives NaN, infinite or negative probabilities for 2 of 3 image(s)"),
    ({"logits": "one_row"}, "its logits output has shape (1, 6) for 3 image(s), not (3, 6) (one value per class)"),
    ({"temperature": TEMPERATURE, "logits": "nan_on_images"},
     "its probabilities output gives NaN, infinite or negative probabilities for 2 of 3 image(s)"),
    ({"temperature": TEMPERATURE, "logits": "one_row"},
     "its probabilities output has shape (1, 6) for 3 image(s), not (3, 6) (one value per class)"),
    ({"temperature": TEMPERATURE, "probabilities": "negative_on_images"},
     "its probabilities output gives NaN, infinite or negative probabilities for 2 of 3 image(s)"),
    ({"temperature": TEMPERATURE, "probabilities": "zero_on_images"},   # all zeros: no distribution either
     "its probabilities output gives NaN, infinite or negative probabilities for 2 of 3 image(s)"),
], ids=["NaN logits", "logits for one image", "NaN probabilities", "probabilities for one image",
        "negative probabilities", "all-zero probabilities"])
def test_an_output_that_is_not_one_distribution_per_image_makes_the_model_unusable(
        tmp_path: Path, images: list[Path], model: dict, message: str) -> None:
    """Damage a blank image does not show (load_classifier's check passes) is caught on the real batch, and
    the message counts the images it hit."""
    path = linear_model(tmp_path / "damaged.onnx", **model)
    classifier = load_classifier(path)
    blank = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(ModelError) as err:
        classifier.probabilities(np.stack([blank, classifier.load(images[0]), classifier.load(images[1])]))
    assert str(err.value) == f"{path}: model unusable: {message}; re-export the model"


# --------------------------------------------------------------------------- files: score_files and score_onnx


def test_score_files_gives_each_files_probabilities_in_order_whatever_the_batch_size(
        tmp_path: Path, images: list[Path]) -> None:
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE))
    expected = oracle_probabilities(images, TEMPERATURE)
    np.testing.assert_allclose(classifier.score_files(images), expected, rtol=0, atol=ATOL)
    for batch_size in (1, 5, 12, 13):   # one file a batch; a short last batch; exactly one batch; more than all
        got = classifier.score_files(images, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL, err_msg=f"batch_size {batch_size}")


def test_no_files_give_an_empty_table_with_one_column_per_class(tmp_path: Path) -> None:
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE))
    probs = classifier.score_files([])
    assert probs.shape == (0, len(CLASSES)) and probs.dtype == np.float64


def test_score_files_stops_at_the_first_unreadable_file_naming_it(tmp_path: Path, images: list[Path]) -> None:
    broken = tmp_path / "half a photo.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE))
    with pytest.raises(BadImage) as err:
        classifier.score_files([*images[:3], broken, *images[3:]], batch_size=2)
    assert err.value.path == str(broken)


@pytest.mark.parametrize(("limits", "reason"), STRICT_LIMITS)
def test_score_files_applies_the_limits_it_is_given(tmp_path: Path, images: list[Path], limits: ImageLimits,
                                                   reason: str) -> None:
    classifier = load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE))
    with pytest.raises(BadImage) as err:
        classifier.score_files(images[1:], batch_size=4, limits=limits)
    assert (err.value.path, err.value.reason) == (str(images[1]), reason)


def test_score_onnx_scores_files_with_the_models_own_preprocessing_and_calibration(
        tmp_path: Path, images: list[Path]) -> None:
    """What publish does to production's ONNX file on the candidate's test split."""
    model = linear_model(tmp_path / "production.onnx", TEMPERATURE)
    probs = score_onnx(model, CLASSES, images)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, oracle_probabilities(images, TEMPERATURE), rtol=0, atol=ATOL)


@pytest.mark.parametrize("order", sorted(wrong_orders(CLASS_NAMES)))
def test_score_onnx_refuses_a_model_whose_classes_are_in_another_order(tmp_path: Path, images: list[Path],
                                                                       order: str) -> None:
    """Column i must mean the test split's class i: same names in another order would score the wrong class."""
    names = wrong_orders(CLASS_NAMES)[order]
    assert names != CLASSES
    model = linear_model(tmp_path / "production.onnx", TEMPERATURE)
    with pytest.raises(ModelError) as err:
        score_onnx(model, names, images)
    assert str(err.value) == f"{model}: its classes {CLASSES} differ from the test split's {names}"


@pytest.mark.parametrize(("limits", "reason"), STRICT_LIMITS)
def test_score_onnx_applies_prepares_limits_and_says_to_rerun_prepare(
        tmp_path: Path, images: list[Path], limits: ImageLimits, reason: str) -> None:
    """An image that prepare's limits refuse (it changed since prepare) stops the scoring with what to do."""
    model = linear_model(tmp_path / "production.onnx", TEMPERATURE)
    np.testing.assert_allclose(score_onnx(model, CLASSES, images[2:4]), oracle_probabilities(images[2:4],
                                                                                               TEMPERATURE),
                               rtol=0, atol=ATOL)   # the defaults accept them
    with pytest.raises(ValueError) as err:
        score_onnx(model, CLASSES, images[2:4], limits=limits)
    message = str(err.value)
    assert message.startswith(f"{images[2]}: {reason} (") and message.endswith("); re-run prepare (dvc repro prepare)")


# --------------------------------------------------------------------------- opening a model: load_classifier


def test_a_good_model_brings_its_class_names_and_preprocessing(tmp_path: Path) -> None:
    classifier = load_classifier(str(linear_model(tmp_path / "model.onnx", TEMPERATURE)))
    assert classifier.class_names == CLASSES
    assert (classifier.prep.crop_size, classifier.prep.resize_size, classifier.prep.interpolation,
            list(classifier.prep.mean), list(classifier.prep.std)) == tuple(PREP.values())


def test_onnxruntime_picks_the_thread_count_unless_told(tmp_path: Path) -> None:
    """threads 0 (the default: publish, export) is one per core; predict --threads N passes N."""
    model = linear_model(tmp_path / "model.onnx")
    assert load_classifier(model).session.get_session_options().intra_op_num_threads == 0
    assert load_classifier(model, threads=2).session.get_session_options().intra_op_num_threads == 2


def test_loading_prints_nothing_yet_onnxruntimes_errors_reach_stderr(tmp_path: Path, capfd) -> None:
    """predict's stdout is a table or JSON: onnxruntime's warnings (an unused initializer) and provider
    fallbacks must not land in it; an error onnxruntime logs (which layer failed) stays on stderr."""
    load_classifier(linear_model(tmp_path / "model.onnx", TEMPERATURE, unused_initializer=True))
    assert capfd.readouterr() == ("", "")
    with pytest.raises(ModelError):
        load_classifier(pixel_model(tmp_path / "pixels.onnx", side=32, metadata_side=16))
    out, err = capfd.readouterr()
    assert out == "" and "[E:onnxruntime" in err and PIXEL_LAYER in err


def test_a_missing_or_damaged_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        load_classifier(tmp_path / "model.onnx")
    assert str(err.value) == f"{tmp_path / 'model.onnx'}: model file not found"

    damaged = tmp_path / "half a download.onnx"
    damaged.write_bytes(linear_model(tmp_path / "model.onnx").read_bytes()[:300])
    with pytest.raises(ModelError) as err:
        load_classifier(damaged)
    assert str(err.value) == f"{damaged}: onnxruntime cannot load it ({onnxruntime_error(damaged)})"


def test_a_network_without_a_logits_output_is_refused(tmp_path: Path) -> None:
    """torch.onnx names outputs after graph values unless told: export names it `logits`."""
    proto = onnx.load(str(linear_model(tmp_path / "model.onnx")))
    for node in proto.graph.node:
        node.output[:] = ["output" if name == "logits" else name for name in node.output]
    proto.graph.output[0].name = "output"
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ModelError) as err:
        load_classifier(tmp_path / "renamed.onnx")
    assert str(err.value) == (f"{tmp_path / 'renamed.onnx'}: the network has no output named 'logits'; "
                              "export it with `python -m tasks.export`")


@pytest.mark.parametrize(("metadata", "lacks"), [
    ({"class_names": None, "preprocessing": None}, "class_names, preprocessing"),
    ({"class_names": None}, "class_names"),
    ({"preprocessing": None}, "preprocessing"),
])
def test_metadata_without_class_names_or_preprocessing_is_refused(tmp_path: Path, metadata: dict,
                                                                   lacks: str) -> None:
    model = linear_model(tmp_path / "model.onnx", **metadata)
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == f"{model}: metadata lacks {lacks}; export the model with `python -m tasks.export`"


@pytest.mark.parametrize("key", ["class_names", "preprocessing"])
def test_metadata_that_is_not_json_is_refused_with_the_parsers_reason(tmp_path: Path, key: str) -> None:
    text = '["10 items", "2 items", "Zebra", "apple", "Äpfel", "éclair"' if key == "class_names" else "{crop_size: 16}"
    with pytest.raises(json.JSONDecodeError) as parser:
        json.loads(text)
    model = linear_model(tmp_path / "model.onnx", **{key: text})
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == f"{model}: metadata {key} is not valid JSON ({parser.value}); re-export the model"


# One string of names instead of a list, longer than the 80 characters a message shows of it.
NAMES_AS_TEXT = ", ".join(CLASSES + [f"{name} (2024)" for name in CLASSES])


@pytest.mark.parametrize(("names", "shown"), [
    ([], "[]"),
    ({"apple": 0}, "{'apple': 0}"),
    (["10 items", "", "Zebra", "apple", "Äpfel", "éclair"], "['10 items', '', 'Zebra', 'apple', 'Äpfel', 'éclair']"),
    ([10, 2, "Zebra", "apple", "Äpfel", "éclair"], "[10, 2, 'Zebra', 'apple', 'Äpfel', 'éclair']"),
    (NAMES_AS_TEXT, NAMES_AS_TEXT[:80]),
], ids=["empty", "a mapping", "an empty name", "numbers", "one long string"])
def test_class_names_must_be_a_list_of_names(tmp_path: Path, names: object, shown: str) -> None:
    model = linear_model(tmp_path / "model.onnx", class_names=json.dumps(names))
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: metadata class_names must be a non-empty list of non-empty strings, "
                              f"got {shown}; re-export the model")


def test_a_class_named_twice_is_refused(tmp_path: Path) -> None:
    names = ["10 items", "2 items", "Zebra", "apple", "Äpfel", "apple"]
    model = linear_model(tmp_path / "model.onnx", class_names=json.dumps(names))
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == f"{model}: metadata class_names lists a class twice; re-export the model"


@pytest.mark.parametrize(("prep", "problem"), [
    ({"crop_size": 16, "resize_size": 24}, "KeyError: 'interpolation'"),
    ([16, 24, "bilinear"], "TypeError: list indices must be integers or slices, not str"),
    (PREP | {"interpolation": "area"},
     "ValueError: interpolation 'area' is not one of ['bicubic', 'bilinear', 'lanczos', 'nearest']"),
    (PREP | {"crop_size": 0, "resize_size": 0}, "crop_size 0 is not between 1 and 1024 px"),
    (PREP | {"crop_size": 1025, "resize_size": 1025}, "crop_size 1025 is not between 1 and 1024 px"),
    (PREP | {"crop_size": 16, "resize_size": 33}, "resize_size 33 is more than 2 times crop_size 16"),
    (PREP | {"mean": [0.45, 0.5]}, "mean and std need three values (RGB)"),
    (PREP | {"std": [0.2, 0.25, 0.3, 0.3]}, "mean and std need three values (RGB)"),
    (PREP | {"mean": [0.45, float("nan"), 0.4]}, "mean must be finite and std positive"),
    (PREP | {"std": [0.2, 0.0, 0.3]}, "mean must be finite and std positive"),
    (PREP | {"std": [0.2, -0.25, 0.3]}, "mean must be finite and std positive"),
    (PREP | {"std": [0.2, float("inf"), 0.3]}, "mean must be finite and std positive"),
], ids=["a key missing", "a list", "an unknown interpolation", "crop 0", "crop 1025", "resize over 2x crop",
        "two means", "four stds", "NaN mean", "zero std", "negative std", "infinite std"])
def test_unusable_preprocessing_is_refused_saying_why(tmp_path: Path, prep: object, problem: str) -> None:
    model = linear_model(tmp_path / "model.onnx", preprocessing=json.dumps(prep))
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == f"{model}: metadata preprocessing is unusable ({problem}); re-export the model"


@pytest.mark.parametrize(("crop", "resize"), [(1, 2), (16, 32), (1024, 1024)])
def test_preprocessing_at_the_limits_is_accepted(tmp_path: Path, crop: int, resize: int) -> None:
    """1 to 1024 px crops, resized up to twice the crop (timm's smallest crop_pct is 0.5)."""
    model = linear_model(tmp_path / "model.onnx", preprocessing=json.dumps(PREP | {"crop_size": crop,
                                                                                    "resize_size": resize}))
    assert (load_classifier(model).prep.crop_size, load_classifier(model).prep.resize_size) == (crop, resize)


def test_a_network_that_rejects_the_size_its_metadata_gives_is_refused(tmp_path: Path) -> None:
    """A layer over every pixel of a 32 px image cannot take the 16 px its metadata claims; onnxruntime's
    reason is kept to its first 200 characters."""
    model = pixel_model(tmp_path / "pixels.onnx", side=32, metadata_side=16)
    reason = onnxruntime_error(model, np.zeros((1, 3, 16, 16), np.float32))
    assert len(reason) > 200 and PIXEL_LAYER in reason
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: the network does not accept a 16x16 image as its metadata says "
                              f"({reason[:200]}); re-export the model")


def test_a_network_with_other_than_one_logit_per_class_is_refused(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "model.onnx", class_names=json.dumps(CLASSES[:5]))
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: the network outputs (6,) logits but its metadata names 5 classes; "
                              "re-export the model")


def test_probabilities_a_blank_image_shows_are_broken_are_refused_on_loading(tmp_path: Path) -> None:
    """The logits wired to the probabilities output: negative values, though they sum to more than 0."""
    model = linear_model(tmp_path / "model.onnx", TEMPERATURE, probabilities="raw")
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    assert str(err.value) == (f"{model}: model unusable: its probabilities output gives NaN, infinite or "
                              "negative probabilities for 1 of 1 image(s); re-export the model")


def test_a_probabilities_output_that_is_no_table_is_refused_on_loading(tmp_path: Path) -> None:
    """scikit-learn's ONNX classifiers give a list of {class: probability} (ZipMap), not one row per image."""
    model = linear_model(tmp_path / "model.onnx", TEMPERATURE, probabilities="zipmap")
    with pytest.raises(ModelError) as err:
        load_classifier(model)
    message = str(err.value)
    assert message.startswith(f"{model}: model unusable: onnxruntime cannot compute its probabilities output (")
    assert "'dict'" in message and message.endswith("); re-export the model")
