"""`predict`: classify images with an exported ONNX model; needs only onnxruntime, numpy and Pillow.

    predict model.onnx photo.jpg more/photos/ [--top-k 3] [--json]

The class names and the preprocessing (size, crop, interpolation, mean, std)
come from the model's own metadata, written by `tasks.export`. Each file gets
its top-k labels with probabilities, or its own error (unreadable, not an
image, missing); the other files are still predicted.

Exit status: 0 when at least one file was predicted, 1 when none could be
(every input bad, or no images found), 2 when the model itself is unusable.
This module must never import torch: production boxes do not have it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tasks.images import BadImage, is_image_name, load_rgb
from tasks.preprocess import Preprocessing, preprocess

EXIT_OK, EXIT_NOTHING_PREDICTED, EXIT_BAD_MODEL = 0, 1, 2


class ModelError(ValueError):
    """The ONNX file cannot be used for prediction; the message says why."""


@dataclass
class Classifier:
    """An onnxruntime session plus what its metadata says about inputs and outputs."""

    session: ort.InferenceSession
    class_names: list[str]
    prep: Preprocessing
    input_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


def load_classifier(path: Path, threads: int = 0) -> Classifier:
    """Open the model and read class names and preprocessing from its metadata."""
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise ModelError(f"{path}: metadata lacks {', '.join(missing)}; export the model with `python -m tasks.export`")
    prep = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    return Classifier(session, json.loads(meta["class_names"]), prep)


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (recursively, sorted, hidden ones skipped)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p) and not _hidden(p, item))
        else:
            files.append(item)  # a missing or non-image file gets its own error below
    return files


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def predict_files(classifier: Classifier, files: list[Path], top_k: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """One result per file, in input order: {"file", "predictions"} or {"file", "error"}."""
    results: list[dict[str, Any]] = [{"file": str(path)} for path in files]
    ready: list[tuple[int, np.ndarray]] = []
    for i, path in enumerate(files):
        try:
            ready.append((i, preprocess(load_rgb(path), classifier.prep)))
        except BadImage as err:
            results[i]["error"] = f"{err.reason}: {err.detail}" if err.detail else err.reason
        except OSError as err:  # missing file, permission denied, a folder that vanished
            results[i]["error"] = f"{type(err).__name__}: {err.strerror or err}"
    k = max(1, min(top_k, len(classifier.class_names)))
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        probs = classifier.probabilities(np.stack([array for _, array in chunk]))
        for (i, _), row in zip(chunk, probs, strict=True):
            best = np.argsort(-row, kind="stable")[:k]
            results[i]["predictions"] = [
                {"label": classifier.class_names[j], "index": int(j), "probability": round(float(row[j]), 6)}
                for j in best
            ]
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per file: the path, then label (probability) for each of the top k, or the error."""
    width = max(len(r["file"]) for r in results)
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']:<{width}}  ERROR {r['error']}")
        else:
            lines.append(f"{r['file']:<{width}}  " + "  ".join(
                f"{p['label']} {p['probability']:.4f}" for p in r["predictions"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="ONNX file written by the export stage")
    parser.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders of images")
    parser.add_argument("-k", "--top-k", type=int, default=3, help="labels per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    try:
        classifier = load_classifier(args.model, args.threads)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_MODEL
    files = collect_inputs(args.inputs)
    if not files:
        print(f"error: no image files in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return EXIT_NOTHING_PREDICTED
    results = predict_files(classifier, files, args.top_k, args.batch_size)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    predicted = sum("predictions" in r for r in results)
    if predicted < len(results):
        print(f"{len(results) - predicted} of {len(results)} file(s) could not be predicted", file=sys.stderr)
    return EXIT_OK if predicted else EXIT_NOTHING_PREDICTED


if __name__ == "__main__":
    sys.exit(main())
