"""The one way this project calls an exported ONNX model: onnxruntime plus the model's own metadata.

Torch-free: predict runs on boxes without torch. Export (parity, int8), publish (`score_onnx`) and predict all go
through it, so they cannot disagree about preprocessing or softmax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tasks.lib.images import BadImage, ImageLimits, image_limits, load_rgb
from tasks.lib.preprocess import Preprocessing, preprocess

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Calibrated probabilities: softmax(logits / temperature), the temperature fitted on the validation split.
# Models exported before calibration existed have only logits; their probabilities are the plain softmax.
PROBABILITIES_NAME = "probabilities"
# The largest crop_size (network input side) a model's metadata may ask for: train.image_size's own bound
# (tasks.lib.config). One preprocessed image is 3 * side^2 float32 (12 MB at 1024 px); a 355-byte ONNX file
# that claimed 8192 px made predict hold 3.4 GB for two images. resize_size may exceed it by
# MAX_RESIZE_RATIO: timm's crop_pct is at least 0.5 for every model it knows (0.875 for most).
MAX_CROP_SIZE = 1024
MAX_RESIZE_RATIO = 2


# The abstention threshold in the model's metadata (export.abstain_at_accuracy / _coverage chose it on validation),
# and the feature-distance output with its own threshold (tasks.lib.abstention: how far from the training images).
ABSTAIN_KEY = "abstain_threshold"
DISTANCE_NAME, DISTANCE_KEY = "feature_distance", "feature_distance_threshold"


def answered(probs: np.ndarray, threshold: float, distance: np.ndarray | None = None,
             max_distance: float | None = None) -> np.ndarray:
    """The abstention rule: an image is answered when its top probability is at least `threshold` and, where the
    model has a distance threshold, its feature distance is at most `max_distance`."""
    sure = np.asarray(probs).max(axis=1) >= threshold
    return sure if max_distance is None else sure & (np.asarray(distance) <= max_distance)


class ModelError(ValueError):
    """The ONNX file cannot be used; the message names it and says why."""


def ort_session(path: Path | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session; `threads` 0 lets onnxruntime use one per core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the metrics are computed in float64)."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class Classifier:
    """An onnxruntime session plus what its metadata says about inputs and outputs."""

    session: ort.InferenceSession
    class_names: list[str]
    prep: Preprocessing
    source: str = "the model"   # named in errors: the file it was loaded from
    abstain_threshold: float | None = None   # below it the model is not sure (metadata ABSTAIN_KEY)
    max_distance: float | None = None        # beyond it the image is unlike the training data (DISTANCE_KEY)
    input_name: str = field(init=False)
    calibrated: bool = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name
        self.calibrated = PROBABILITIES_NAME in [output.name for output in self.session.get_outputs()]

    def answered(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of a preprocessed batch, and which images the abstention rule answers (`answered`)."""
        if self.max_distance is None:
            probs = self.probabilities(batch)
            return probs, answered(probs, self.abstain_threshold)
        probs, distance = self.session.run([PROBABILITIES_NAME, DISTANCE_NAME], {self.input_name: np.ascontiguousarray(batch)})
        probs = self._normalised(probs, len(batch))
        if np.shape(distance) != (len(batch),):
            raise ModelError(f"{self.source}: model unusable: its {DISTANCE_NAME} output has shape {np.shape(distance)} "
                             f"for {len(batch)} image(s), not ({len(batch)},); re-export the model")
        return probs, answered(probs, self.abstain_threshold, distance, self.max_distance)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw float32 logits of a preprocessed (N, 3, S, S) batch."""
        return self.session.run([OUTPUT_NAME], {self.input_name: np.ascontiguousarray(batch)})[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (float64) of a preprocessed batch: the calibrated output when the model has one.
        ModelError unless it is one row of finite, non-negative numbers per image and class: NaN is never scored."""
        if not self.calibrated:
            return self._checked(softmax(self.logits(batch)), len(batch), "logits")
        return self._normalised(self.session.run([PROBABILITIES_NAME], {self.input_name: np.ascontiguousarray(batch)})[0],
                                len(batch))

    def _normalised(self, probs: np.ndarray, n: int) -> np.ndarray:
        probs = self._checked(np.asarray(probs, dtype=np.float64), n, PROBABILITIES_NAME)
        return probs / probs.sum(axis=1, keepdims=True)   # float32 rows sum to 1 only within ~1e-7

    def _checked(self, probs: np.ndarray, n: int, output: str) -> np.ndarray:
        expected = (n, len(self.class_names))
        if probs.shape != expected:
            raise ModelError(f"{self.source}: model unusable: its {output} output has shape {probs.shape} for "
                             f"{n} image(s), not {expected} (one value per class); re-export the model")
        bad = ~(np.isfinite(probs).all(axis=1) & (probs >= 0).all(axis=1) & (probs.sum(axis=1) > 0))
        if bad.any():
            raise ModelError(f"{self.source}: model unusable: its {output} output gives NaN, infinite or negative "
                             f"probabilities for {int(bad.sum())} of {n} image(s); re-export the model")
        return probs

    def load(self, path: Path | str, limits: ImageLimits | None = None) -> np.ndarray:
        """One image file as the network's input (BadImage / OSError name the file); limits None: the process's."""
        limits = limits or image_limits()
        img = load_rgb(path, limits.max_pixels, max_aspect_ratio=limits.max_aspect_ratio,
                       max_file_bytes=limits.max_file_bytes)
        return preprocess(img, self.prep)

    def score_files(self, paths: Sequence[Path], batch_size: int = 64, limits: ImageLimits | None = None
                    ) -> np.ndarray:
        """Probabilities of every file, in order; the first unreadable file raises."""
        chunks = [self.probabilities(np.stack([self.load(p, limits) for p in paths[start:start + batch_size]]))
                  for start in range(0, len(paths), batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, len(self.class_names)))


def load_classifier(path: Path | str, threads: int = 0) -> Classifier:
    """Open the model, read class names and preprocessing from its metadata and check they fit the network.
    Every ONNX file is untrusted input: any problem raises ModelError naming the file, before any image is read."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    session = ort_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise ModelError(f"{path}: metadata lacks {', '.join(missing)}; export the model with `python -m tasks.export`")
    if OUTPUT_NAME not in [output.name for output in session.get_outputs()]:
        raise ModelError(f"{path}: the network has no output named {OUTPUT_NAME!r}; export it with `python -m tasks.export`")
    classifier = Classifier(session, _class_names(path, _json_value(path, meta, "class_names")),
                            _preprocessing(path, _json_value(path, meta, "preprocessing")), str(path),
                            _abstain_threshold(path, meta.get(ABSTAIN_KEY)), _max_distance(path, session, meta))
    _check_output_size(path, classifier)
    return classifier


def score_onnx(onnx_path: Path, class_names: list[str], paths: Sequence[Path], limits: ImageLimits | None = None
               ) -> np.ndarray:
    """Probabilities of the ONNX model at onnx_path on image files, with the preprocessing from its own metadata;
    ValueError naming the file when the model is unusable, its classes are not `class_names`, or an image fails."""
    classifier = load_classifier(onnx_path)
    if classifier.class_names != class_names:
        raise ModelError(f"{onnx_path}: its classes {classifier.class_names} differ from the test split's {class_names}")
    try:
        return classifier.score_files(paths, limits=limits)
    except BadImage as err:
        raise ValueError(f"{err}; re-run prepare (dvc repro prepare)") from None


def _json_value(path: Path, meta: dict[str, str], key: str) -> object:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: metadata {key} is not valid JSON ({err}); re-export the model") from None


def _class_names(path: Path, value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(name, str) and name for name in value):
        raise ModelError(f"{path}: metadata class_names must be a non-empty list of non-empty strings, "
                         f"got {str(value)[:80]}; re-export the model")
    if len(set(value)) != len(value):
        raise ModelError(f"{path}: metadata class_names lists a class twice; re-export the model")
    return value


def _number(text: str) -> float:
    """A metadata value as a number; NaN when it is none, which every range check then refuses."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _abstain_threshold(path: Path, text: str | None) -> float | None:
    if text is None:
        return None
    value = _number(text)
    if not 0 < value <= 1:
        raise ModelError(f"{path}: metadata {ABSTAIN_KEY} {text[:40]!r} is not a probability in (0, 1]; "
                         "re-export the model")
    return value


def _max_distance(path: Path, session: ort.InferenceSession, meta: dict[str, str]) -> float | None:
    text = meta.get(DISTANCE_KEY)
    if text is None:
        return None
    value = _number(text)
    if not 0 <= value < math.inf:
        raise ModelError(f"{path}: metadata {DISTANCE_KEY} {text[:40]!r} is not a finite distance >= 0; re-export the model")
    if DISTANCE_NAME not in [output.name for output in session.get_outputs()]:
        raise ModelError(f"{path}: metadata has {DISTANCE_KEY} but the network has no {DISTANCE_NAME!r} output; "
                         "re-export the model")
    return value


def _preprocessing(path: Path, value: object) -> Preprocessing:
    try:
        prep = Preprocessing.from_dict(value)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{path}: metadata preprocessing is unusable ({type(err).__name__}: {err}); "
                         "re-export the model") from None
    problem = _preprocessing_problem(prep)
    if problem:
        raise ModelError(f"{path}: metadata preprocessing is unusable ({problem}); re-export the model")
    return prep


def _preprocessing_problem(prep: Preprocessing) -> str | None:
    """What Preprocessing itself does not check (interpolation and resize >= crop it does)."""
    if not 1 <= prep.crop_size <= MAX_CROP_SIZE:
        return f"crop_size {prep.crop_size} is not between 1 and {MAX_CROP_SIZE} px"
    if prep.resize_size > MAX_RESIZE_RATIO * prep.crop_size:
        return f"resize_size {prep.resize_size} is more than {MAX_RESIZE_RATIO} times crop_size {prep.crop_size}"
    if len(prep.mean) != 3 or len(prep.std) != 3:
        return "mean and std need three values (RGB)"
    if not all(np.isfinite(prep.mean)) or not all(np.isfinite(s) and s > 0 for s in prep.std):
        return "mean must be finite and std positive"
    return None


def _check_output_size(path: Path, classifier: Classifier) -> None:
    """One forward pass of a blank image: the input fits the preprocessing, the output has one logit per class
    and the probabilities are usable (probabilities() checks them again on every batch)."""
    size = classifier.prep.crop_size
    blank = np.zeros((1, 3, size, size), dtype=np.float32)
    try:
        logits = classifier.logits(blank)
    except Exception as err:  # onnxruntime raises its own exception types for shape errors
        raise ModelError(f"{path}: the network does not accept a {size}x{size} image as its metadata says "
                         f"({str(err).splitlines()[0][:200]}); re-export the model") from None
    if logits.ndim != 2 or logits.shape[1] != len(classifier.class_names):
        raise ModelError(f"{path}: the network outputs {logits.shape[1:] if logits.ndim else ()} logits but its "
                         f"metadata names {len(classifier.class_names)} classes; re-export the model")
    try:
        classifier.probabilities(blank)
    except ModelError:
        raise
    except Exception as err:  # a probabilities output that onnxruntime cannot compute
        raise ModelError(f"{path}: model unusable: onnxruntime cannot compute its {PROBABILITIES_NAME} output "
                         f"({str(err).splitlines()[0][:200]}); re-export the model") from None
