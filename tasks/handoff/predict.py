"""`predict`: classify images with an exported ONNX model; needs only onnxruntime, numpy, Pillow and fsspec.

    predict model.onnx photo.jpg more/photos/ [--top-k 3] [--json] [--abstain]
    predict --registry registry --name fashion-demo [--version V] photo.jpg ...

A registry version (default: production) is verified and fetched to a temporary file; class names and
preprocessing come from the model's metadata. Each file gets its top-k labels or its own error, and inputs
stream --batch-size files at a time, so memory stays flat. With --abstain, an image whose top probability is below
the threshold in the model's metadata (export.abstain_at_accuracy), or whose feature distance is beyond its own
threshold there (unlike the training images), is reported as unknown. Exit status: 0 every input predicted; 1 some or
all failed (or no image found); 2 the model is unusable. Never imports torch: production boxes lack it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks.handoff.registry import Registry, RegistryError
from tasks.lib.console import quiet_broken_pipe, terminal_safe
from tasks.lib.images import DEFAULT_MAX_ASPECT_RATIO, BadImage, ImageLimits, is_image_name
from tasks.lib.io import sha256_file
from tasks.lib.onnx_classifier import ABSTAIN_KEY, Classifier, ModelError, load_classifier
from tasks.lib.parallel import batched

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_MODEL = 0, 1, 2


def input_files(inputs: list[Path]) -> Iterator[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden ones skipped), one listing at a time."""
    for item in inputs:
        if item.is_dir():
            yield from _image_files(item)
        else:
            yield item  # a missing or non-image file gets its own error below


def _image_files(folder: Path) -> Iterator[Path]:
    """Depth first, each folder's entries sorted by name: the order of sorting the whole tree's paths."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # an unreadable sub-folder is skipped, as Path.rglob skips it
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _image_files(Path(entry.path))
        elif entry.is_file() and is_image_name(Path(entry.name)):
            yield Path(entry.path)


def predict_batches(classifier: Classifier, files: Iterable[Path], top_k: int, batch_size: int = 16,
                    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, abstain: bool = False
                    ) -> Iterator[list[dict[str, Any]]]:
    """One result per file, in input order, a batch at a time: {"file", "predictions"} or {"file", "error"};
    with `abstain`, each prediction also says whether the model is sure ("unknown": the classifier's threshold)."""
    limits = ImageLimits(max_aspect_ratio=max_aspect_ratio)
    k = max(1, min(top_k, len(classifier.class_names)))
    threshold = abstain_threshold(classifier) if abstain else None
    for chunk in batched(files, batch_size):
        yield _predict_batch(classifier, chunk, k, limits, threshold)


def abstain_threshold(classifier: Classifier) -> float:
    """The model's abstention threshold; ModelError naming the file and the setting when it has none."""
    if classifier.abstain_threshold is None:
        raise ModelError(f"{classifier.source}: the model has no {ABSTAIN_KEY} in its metadata, so --abstain cannot "
                         "tell when it is not sure; set export.abstain_at_accuracy (or export.abstain_at_coverage) "
                         "in params.yaml and re-run evaluate and export (dvc repro export)")
    return classifier.abstain_threshold


def _predict_batch(classifier: Classifier, files: list[Path], k: int, limits: ImageLimits,
                   threshold: float | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{"file": str(path)} for path in files]
    ready: list[tuple[int, np.ndarray]] = []
    for i, path in enumerate(files):
        try:
            ready.append((i, classifier.load(path, limits)))
        except BadImage as err:
            results[i]["error"] = f"{err.reason}: {err.detail}" if err.detail else err.reason
        except OSError as err:  # missing file, permission denied, a folder that vanished
            results[i]["error"] = f"{type(err).__name__}: {err.strerror or err}"
    if ready:
        batch = np.stack([array for _, array in ready])
        probs, sure = classifier.answered(batch) if threshold is not None else (classifier.probabilities(batch), None)
        for n, ((i, _), row) in enumerate(zip(ready, probs, strict=True)):
            if sure is not None:
                results[i]["unknown"] = not sure[n]
            best = np.argsort(-row, kind="stable")[:k]
            results[i]["predictions"] = [
                {"label": classifier.class_names[j], "index": int(j), "probability": round(float(row[j]), 6)}
                for j in best
            ]
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per file: the path, then label (probability) for each of the top k, or the error."""
    shown = [{**r, "file": terminal_safe(r["file"], one_line=True)} for r in results]
    width = max(len(r["file"]) for r in shown)
    lines = []
    for r in shown:
        if "error" in r:
            lines.append(f"{r['file']:<{width}}  ERROR {terminal_safe(r['error'], one_line=True)}")
        elif r.get("unknown"):
            lines.append(f"{r['file']:<{width}}  unknown (p={r['predictions'][0]['probability']:.4f})")
        else:
            lines.append(f"{r['file']:<{width}}  " + "  ".join(
                f"{terminal_safe(p['label'], one_line=True)} {p['probability']:.4f}" for p in r["predictions"]))
    return "\n".join(lines)


def print_results(batches: Iterable[list[dict[str, Any]]], as_json: bool) -> tuple[int, int]:
    """Print each batch as soon as it is predicted (table lines, aligned within a batch, or the items of one
    JSON array); (files, files that failed)."""
    total = failed = 0
    for results in batches:
        if as_json:
            items = ",\n".join(textwrap.indent(json.dumps(r, indent=2), "  ") for r in results)
            sys.stdout.write(("[\n" if total == 0 else ",\n") + items)
        else:
            print(format_table(results))
        sys.stdout.flush()
        total += len(results)
        failed += sum("predictions" not in r for r in results)
    if as_json:
        print("\n]" if total else "[]")
    return total, failed


@contextlib.contextmanager
def registry_model(uri: str, name: str, version: str | None) -> Iterator[Path]:
    """A verified copy of a registry version's ONNX file in a temporary folder (ModelError if unusable)."""
    try:
        reg = Registry(uri, name)
        version = version or reg.production()
        if version is None:
            raise ModelError(f"{reg.url()}: no production version of {name}; name one with --version")
        problems = reg.verify(version)
        if problems:
            raise ModelError(f"{reg.url(version)} does not verify: {'; '.join(problems)}")
        with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
            local = Path(tmp) / "model.onnx"
            local.write_bytes(reg.read_bytes(version, "model.onnx"))
            if sha256_file(local) != reg.manifest(version)["model.onnx"]:  # changed since it was verified
                raise ModelError(f"{reg.url(version, 'model.onnx')} changed while it was fetched; try again")
            yield local
    except RegistryError as err:
        raise ModelError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predict", description=__doc__.split("\n\n")[0], epilog=(
        "exit status: 0 every input predicted, 1 some or all inputs failed, 2 the model is unusable"))
    parser.add_argument("paths", type=Path, nargs="+", metavar="[MODEL] INPUT",
                        help="the ONNX file written by the export stage (not with --registry), then image files "
                        "and/or folders of images")
    source = parser.add_argument_group("a model from a registry instead of a file")
    source.add_argument("--registry", metavar="URI", help="registry directory or fsspec URL (s3://bucket/prefix)")
    source.add_argument("--name", help="model name in the registry (project.name)")
    source.add_argument("--version", help="registry version (default: production)")
    parser.add_argument("-k", "--top-k", type=int, default=3, help="labels per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--abstain", action="store_true", help="say `unknown (p=...)` when the top probability is "
                        "below the model's abstention threshold or the image is far from the training images (metadata "
                        "feature_distance_threshold) (JSON: \"unknown\": true beside the predictions)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    parser.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO,
                        help="reject images whose long side is more than this many times the short side "
                             f"(default {DEFAULT_MAX_ASPECT_RATIO:g}, as prepare.max_aspect_ratio)")
    return parser


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.max_aspect_ratio < 1:
        parser.error("--top-k and --batch-size must be at least 1, --max-aspect-ratio at least 1")
    if (args.registry is None) != (args.name is None) or (args.version and not args.registry):
        parser.error("--registry and --name go together (and --version needs them)")
    if args.registry is None and len(args.paths) < 2:
        parser.error("give the model file and at least one image (or --registry URI --name NAME and images)")
    model = contextlib.nullcontext(args.paths[0]) if args.registry is None else \
        registry_model(args.registry, args.name, args.version)
    inputs = args.paths[1:] if args.registry is None else args.paths
    try:
        with model as model_path:
            classifier = load_classifier(model_path, args.threads)
            return _predict(classifier, inputs, args)
    except ModelError as err:
        print(f"error: {terminal_safe(err)}", file=sys.stderr)
        return EXIT_BAD_MODEL


def _predict(classifier: Classifier, inputs: list[Path], args: argparse.Namespace) -> int:
    files = input_files(inputs)
    first = next(files, None)
    if first is None:
        print(f"error: no image files in {terminal_safe(', '.join(map(str, inputs)))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    batches = predict_batches(classifier, itertools.chain([first], files), args.top_k, args.batch_size,
                              args.max_aspect_ratio, args.abstain)
    total, failed = print_results(batches, args.json)
    if failed:
        print(f"{failed} of {total} file(s) could not be predicted", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
