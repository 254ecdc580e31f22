"""Stage `export`: the evaluated checkpoint as a validated, self-describing ONNX model.

Reads `<train.out_dir>/model.pt`, real test images and, for abstention, `<reports.dir>/evaluate.json`
and the feature distance evaluate fitted (`<evaluate.out_dir>/feature_distance.npz`, a third output of
the graph). Exports under a temporary name, embeds the metadata a consumer
needs, runs onnx's full check, the symbolic batch check and the onnxruntime-vs-PyTorch parity
at several batch sizes, measures CPU latency, optionally quantizes to int8, and only then
renames to `<export.out_dir>/model.onnx`; `<reports.dir>/export.json` holds the measurements.
A parity failure exits 1, names the worst image and leaves no model.onnx behind.
Run: `python -m tasks.export [--params params.yaml] [-S export.atol=1e-5]`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tasks.lib import abstention
from tasks.lib.cli import stage_main
from tasks.lib.config import ExportParams, Params
from tasks.lib.errors import StageError
from tasks.lib.images import INPUT_CONTRACT, BadImage, load_rgb
from tasks.lib.io import atomic_path, sha256_file, write_json
from tasks.lib.models import load_checkpoint
from tasks.lib.onnx_classifier import DISTANCE_NAME, INPUT_NAME, OUTPUT_NAME, PROBABILITIES_NAME, Classifier, load_classifier
from tasks.lib.preprocess import Preprocessing, preprocess
from tasks.lib.split_files import SplitRow, read_split, split_path
from tasks.lib.weights import weights_sha256

log = logging.getLogger(__name__)
logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # ~64 "Replaced initializer" INFO lines per export

# The dynamo exporter (torch.export + onnxscript): torch 2.14 deprecates the TorchScript one. Checked
# offline on resnet18, mobilenet_v3_small, efficientnet_b0 and timm efficientnet_lite0: a symbolic
# batch, onnx's full check passed, PyTorch matched to ~1e-6.
EXPORTER = "torch.onnx.export(dynamo=True)"
# Opset: 18 is the opset onnxscript's torchlib emits natively. Other opsets go through
# onnx's version converter: 17 fails on Reduce* ops (axes moved from attribute to
# input), 21 converts fine; params allow 18..21 and default to 18, no conversion.
BATCH_DIM = "batch"
QUANTIZED_NAME = "model.int8.onnx"
THROUGHPUT_BATCH = 32
WARMUP_RUNS = 3


class Calibrated(nn.Module):
    """The trained network with more outputs: softmax(logits / temperature), the calibrated probabilities, and,
    given the fitted (whitening, whitened class means), the feature distance of tasks.lib.abstention."""

    def __init__(self, model: nn.Module, temperature: float, distance: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)
        self.head = None if distance is None else abstention.HeadInput(model)
        self.register_buffer("whiten", None if distance is None else distance[0], persistent=False)
        self.register_buffer("centres", None if distance is None else distance[1], persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)
        probs = torch.softmax(logits / self.temperature, dim=1)
        if self.head is None:
            return logits, probs
        return logits, probs, abstention.squared_distance(self.head.value, self.whiten, self.centres)


@dataclass
class Parity:
    """Outcome of the onnxruntime-vs-PyTorch comparison."""

    passed: bool
    max_abs_diff: float
    worst_input: str
    worst_batch_size: int
    argmax_agree: bool
    argmax_mismatches: list[str] = field(default_factory=list)
    n_images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    distance_rel_diff: float | None = None   # max |feature distance diff| / max(1, |distance|), when exported


def run(params: Params) -> dict[str, Any]:
    """Export, validate and measure; write model.onnx and the export report only on success."""
    cfg = params.export
    out = Path(cfg.out_dir)
    onnx_path, report_path = out / "model.onnx", params.report_paths(Path("."))["export_report"]
    for stale in (onnx_path, report_path, out / QUANTIZED_NAME):
        stale.unlink(missing_ok=True)  # a failed export must not leave an older model looking current
    model, meta = load_checkpoint(Path(params.train.out_dir) / "model.pt")
    prep: Preprocessing = meta["preprocessing"]
    test_file = split_path(params.data.prepared_dir, "test")
    rows = read_split(test_file)
    if not rows:
        raise StageError(f"{test_file} lists no images; parity needs held-out images")
    images, names = load_parity_images(rows, params.data.raw_dir, prep, max(cfg.parity_batch_sizes))
    abstain, distance = abstention.onnx_metadata(params)
    metadata = {**build_metadata(params, meta), **abstain}
    model = Calibrated(model, float(meta.get("temperature") or 1.0), distance)
    parity, latency, quantized = export_model(model, onnx_path, images, names, metadata, cfg,
                                              quantize_data=(rows, Path(params.data.raw_dir), prep))
    report = {
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "onnx_bytes": onnx_path.stat().st_size,
        "opset": cfg.opset,
        "exporter": EXPORTER,
        "atol": cfg.atol,
        "parity_passed": parity.passed,
        "max_abs_diff": parity.max_abs_diff,
        "distance_rel_diff": parity.distance_rel_diff,
        "argmax_agree": parity.argmax_agree,
        "parity_worst_input": parity.worst_input,
        "parity_batch_sizes": parity.batch_sizes,
        "parity_images": parity.n_images,
        **latency,
        "quantized": quantized,
        "metadata": {k: v for k, v in metadata.items() if k not in ("class_names", "preprocessing")},
        "weights": meta.get("weights"),   # the checkpoint's pretrained-weights record, for publish's lineage
    }
    write_json(report_path, report)
    log.info("exported %s: max |diff| %.2e, p50 %.2f ms", onnx_path, parity.max_abs_diff, latency["ort_latency_ms_p50"])
    return report


# --------------------------------------------------------------------------- inputs and metadata


def load_parity_images(rows: list[SplitRow], raw_dir: Path, prep: Preprocessing, count: int
                       ) -> tuple[np.ndarray, list[str]]:
    """The first `count` test images, preprocessed; cycled when the split is smaller, so every batch size runs."""
    picked = [rows[i % len(rows)] for i in range(count)]
    arrays = [preprocess(_load(Path(raw_dir) / row.path), prep) for row in picked]
    return np.stack(arrays), [row.path for row in picked]


def _load(path: Path) -> Any:
    try:
        return load_rgb(path)
    except BadImage as err:
        raise StageError(f"{err}; the test split lists an unreadable image: re-run prepare "
                         "(dvc repro prepare)") from None


def build_metadata(params: Params, meta: dict[str, Any]) -> dict[str, str]:
    """What a consumer needs to call the model and know what it is (ONNX metadata_props are strings).

    Only facts of the checkpoint and the export settings: the same weights and
    preprocessing give a byte-identical file whatever commit exports them. Git
    commit, full params and flow run belong to the registry's lineage record.
    """
    prep: Preprocessing = meta["preprocessing"]
    return {
        "class_names": json.dumps(list(meta["class_names"])),
        "preprocessing": json.dumps(prep.to_dict(), sort_keys=True),
        "input_shape": json.dumps([BATCH_DIM, 3, prep.crop_size, prep.crop_size]),
        "input_format": "float32 NCHW, RGB scaled to [0,1] then (x - mean) / std",
        "resize_policy": f"resize the shorter side to {prep.resize_size} px ({prep.interpolation}), "
                         f"keep aspect, center-crop {prep.crop_size}x{prep.crop_size}",
        **INPUT_CONTRACT,   # how a file becomes the RGB image that the preprocessing above starts from
        "output": f"{OUTPUT_NAME}: raw scores; {PROBABILITIES_NAME}: softmax({OUTPUT_NAME} / temperature), "
                  "calibrated on the validation split; classes in class_names order",
        "temperature": repr(float(meta.get("temperature") or 1.0)),
        "arch": str(meta["arch"]),
        "data_sha256": str(meta.get("data_sha256") or "unknown"),
        "weights_sha256": str(weights_sha256(meta.get("weights") or {}) or "unknown"),
        "exporter": EXPORTER,
        "opset": str(params.export.opset),
    }


def export_model(model: nn.Module, onnx_path: Path, images: np.ndarray, names: list[str], metadata: dict[str, str],
                 cfg: ExportParams, quantize_data: tuple[list[SplitRow], Path, Preprocessing] | None = None
                 ) -> tuple[Parity, dict[str, Any], dict[str, Any]]:
    """Export under a temporary name; only when every check passed does it become `onnx_path`."""
    with atomic_path(onnx_path) as tmp:
        parity, classifier = export_validated(model, tmp, images, names, metadata, cfg)
        latency = measure_latency(classifier, images, cfg.latency_runs)
        quantized = maybe_quantize(tmp, classifier, *quantize_data, metadata, cfg) if quantize_data else {"enabled": False}
    return parity, latency, quantized


def export_validated(model: nn.Module, path: Path, images: np.ndarray, names: list[str], metadata: dict[str, str],
                     cfg: ExportParams) -> tuple[Parity, Classifier]:
    """Export to `path`, check the graph, compare with PyTorch; raise StageError naming the worst input on failure."""
    model = model.cpu().eval()
    export_onnx(model, path, images[:2] if len(images) >= 2 else np.repeat(images, 2, axis=0), cfg.opset, metadata)
    check_graph(path)
    classifier = load_classifier(path)
    parity = check_parity(model, classifier, images, names, cfg.parity_batch_sizes, cfg.atol)
    if not parity.passed:
        raise StageError(parity_message(parity, cfg.atol))
    return parity, classifier


def export_onnx(model: nn.Module, path: Path, example: np.ndarray, opset: int, metadata: dict[str, str]) -> None:
    """torch.onnx.export with a symbolic batch dimension, then embed the metadata."""
    # The example batch is 2, not 1: torch.export specialises a size-1 dimension to a constant.
    batch = torch.export.Dim(BATCH_DIM)
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(np.ascontiguousarray(example)),), str(path), dynamo=True,
                          opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME, PROBABILITIES_NAME, DISTANCE_NAME][:len(_outputs(model, example))],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def check_graph(path: Path) -> None:
    """onnx's full check (with shape inference), and a symbolic batch dimension on input and output."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise StageError(f"exported ONNX model fails onnx.checker: {err}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in (graph.input[0], *graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if first.HasField("dim_value") or not first.dim_param:
            raise StageError(f"ONNX {value.name} has a fixed batch dimension ({first.dim_value}); "
                             "the export must keep it symbolic")


# The feature distance (float64 from fp32 features, tasks.lib.abstention) moves as much as the features do, ~1e-6
# relative; the rule flips only for an image within DISTANCE_RTOL of the threshold, and a wrong op or buffer is off
# by far more.
DISTANCE_RTOL = 1e-4


# Tolerance: both runtimes compute in fp32 but with different kernels (oneDNN vs MLAS)
# and summation orders. Measured differences on these architectures are ~1e-6 for
# logits of magnitude ~1-10, i.e. a few fp32 ulps accumulated over ~50 layers. The
# default atol 1e-4 leaves two orders of magnitude of headroom for deeper models and
# other CPUs, yet is far below any logit gap that changes a prediction; a real export
# bug (a wrong op, a missed eval-mode switch, a baked-in constant) shows up as >=1e-2.
def check_parity(model: nn.Module, classifier: Classifier, images: np.ndarray, names: list[str],
                 batch_sizes: list[int], atol: float) -> Parity:
    """Max |logit diff| and argmax agreement on every image, batched at each size."""
    worst, worst_name, worst_batch, distance_rel = -1.0, "", 0, None
    mismatches: list[str] = []
    for size in batch_sizes:
        for start in range(0, len(images), size):
            batch = np.ascontiguousarray(images[start:start + size])
            try:
                got = classifier.logits(batch)
            except Exception as err:  # onnxruntime's errors share no base class but Exception
                raise StageError(f"the ONNX model fails at batch size {size} (on {names[start]}): "
                                 f"{str(err).splitlines()[0]}; a dimension was probably fixed at export; "
                                 "no model.onnx was written") from None
            outputs = _outputs(model, batch)
            want = outputs[0].numpy()
            if len(outputs) == 3:   # the feature distance: relative, its magnitude is the features' squared norm
                far = classifier.session.run([DISTANCE_NAME], {classifier.input_name: batch})[0]
                rel = np.abs(far - outputs[2].numpy()).max() / max(1.0, float(np.abs(outputs[2].numpy()).max()))
                distance_rel = max(distance_rel or 0.0, float(rel))
            diffs = np.abs(got.astype(np.float64) - want).max(axis=1)
            if diffs.max() > worst:
                worst, worst_name, worst_batch = float(diffs.max()), names[start + int(diffs.argmax())], size
            disagree = np.flatnonzero(got.argmax(axis=1) != want.argmax(axis=1))
            mismatches += [f"{names[start + i]} (batch {size})" for i in disagree]
    return Parity(passed=worst <= atol and not mismatches and (distance_rel or 0.0) <= DISTANCE_RTOL,
                  max_abs_diff=worst, worst_input=worst_name, worst_batch_size=worst_batch, argmax_agree=not mismatches,
                  argmax_mismatches=mismatches, n_images=len(images), batch_sizes=list(batch_sizes),
                  distance_rel_diff=distance_rel)


@torch.no_grad()
def _outputs(model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor, ...]:
    output = model(torch.from_numpy(np.ascontiguousarray(batch)))
    return output if isinstance(output, tuple) else (output,)


def parity_message(parity: Parity, atol: float) -> str:
    text = (f"ONNX parity failed: max |logit diff| {parity.max_abs_diff:.3g} (atol {atol:g}) worst on "
            f"{parity.worst_input} at batch size {parity.worst_batch_size}")
    if parity.argmax_mismatches:
        shown = ", ".join(parity.argmax_mismatches[:5])
        text += f"; argmax differs on {len(parity.argmax_mismatches)} image(s): {shown}"
    if (parity.distance_rel_diff or 0.0) > DISTANCE_RTOL:
        text += f"; {DISTANCE_NAME} differs by {parity.distance_rel_diff:.3g} relative (at most {DISTANCE_RTOL:g})"
    return text + "; no model.onnx was written. Check the model for train-mode or data-dependent ops."


# --------------------------------------------------------------------------- speed


def measure_latency(classifier: Classifier, images: np.ndarray, runs: int) -> dict[str, Any]:
    """onnxruntime CPU latency (p50/p95, batch 1) and throughput at batch 32, on real preprocessed images."""
    single = np.ascontiguousarray(images[:1])
    for _ in range(WARMUP_RUNS):
        classifier.logits(single)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.logits(single)
        times.append((time.perf_counter() - start) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    big = np.ascontiguousarray(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))
    classifier.logits(big)
    repeats = max(3, runs // 10)
    start = time.perf_counter()
    for _ in range(repeats):
        classifier.logits(big)
    elapsed = time.perf_counter() - start
    return {
        "ort_latency_ms_p50": round(float(p50), 3),
        "ort_latency_ms_p95": round(float(p95), 3),
        "ort_throughput_img_per_s_b32": round(THROUGHPUT_BATCH * repeats / elapsed, 1),
        "ort_latency_runs": runs,
        "ort_version": ort.__version__,
        "cpu": f"{platform.machine()} x{os.cpu_count()}",
    }


# --------------------------------------------------------------------------- int8


def maybe_quantize(fp32_path: Path, classifier: Classifier, rows: list[SplitRow], raw_dir: Path,
                   prep: Preprocessing, metadata: dict[str, str], cfg: ExportParams) -> dict[str, Any]:
    """Dynamic int8 quantization, kept (as model.int8.onnx) only if test accuracy drops by <= max_accuracy_drop."""
    out = fp32_path.parent / QUANTIZED_NAME
    if not cfg.quantize.enabled:
        out.unlink(missing_ok=True)  # an int8 file from an earlier run would not match this model
        return {"enabled": False}
    with tempfile.TemporaryDirectory(dir=fp32_path.parent, prefix=".quantize.") as work:
        int8_path = quantize_dynamic_int8(fp32_path, Path(work), metadata)
        acc_fp32 = test_accuracy(classifier, rows, raw_dir)
        int8 = load_classifier(int8_path)
        acc_int8 = test_accuracy(int8, rows, raw_dir)
        drop = acc_fp32 - acc_int8
        kept = drop <= cfg.quantize.max_accuracy_drop
        result: dict[str, Any] = {
            "enabled": True, "method": "onnxruntime dynamic, int8 weights", "kept": kept,
            "accuracy_fp32": round(acc_fp32, 6), "accuracy_int8": round(acc_int8, 6),
            "accuracy_drop": round(drop, 6), "max_accuracy_drop": cfg.quantize.max_accuracy_drop,
            "bytes_fp32": fp32_path.stat().st_size, "bytes_int8": int8_path.stat().st_size,
        }
        if kept:
            speed = measure_latency(int8, load_parity_images(rows, raw_dir, prep, 1)[0], cfg.latency_runs)
            result.update(onnx=str(out), onnx_sha256=sha256_file(int8_path),
                          ort_latency_ms_p50=speed["ort_latency_ms_p50"])
            with atomic_path(out) as tmp:
                os.replace(int8_path, tmp)
        else:
            out.unlink(missing_ok=True)
    log.info("int8: accuracy %.4f vs fp32 %.4f -> %s", acc_int8, acc_fp32, "kept" if kept else "dropped")
    return result


def quantize_dynamic_int8(fp32_path: Path, work: Path, metadata: dict[str, str]) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The dynamo exporter records intermediate shapes (value_info) that onnxruntime's
    # quantizer re-infers and then rejects as conflicting; it needs only the graph.
    proto = onnx.load(str(fp32_path))
    del proto.graph.value_info[:]
    stripped, int8_path = work / "fp32.onnx", work / "int8.onnx"
    onnx.save(proto, str(stripped))
    quantize_dynamic(str(stripped), str(int8_path), weight_type=QuantType.QInt8)
    quantized = onnx.load(str(int8_path))
    onnx.helper.set_model_props(quantized, {**metadata, "quantization": "dynamic int8 (onnxruntime)"})
    onnx.save(quantized, str(int8_path))
    return int8_path


def test_accuracy(classifier: Classifier, rows: list[SplitRow], raw_dir: Path) -> float:
    """Top-1 accuracy of an ONNX model on the listed images."""
    try:
        probs = classifier.score_files([Path(raw_dir) / r.path for r in rows])
    except BadImage as err:
        raise StageError(f"{err}; the test split lists an unreadable image: re-run prepare "
                         "(dvc repro prepare)") from None
    return float((probs.argmax(axis=1) == np.array([r.label for r in rows])).mean())


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Export the trained model to a validated ONNX file.", argv)


if __name__ == "__main__":
    sys.exit(main())
