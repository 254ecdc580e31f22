"""params.yaml, read once into one typed schema.

Every stage calls `load_params()`; nothing else parses params.yaml. Unknown
keys, wrong types and out-of-range values fail with the dotted key path, the
bad value and what is allowed, before any work starts.

Print the schema with `python -m tasks.config --schema`, check a file with
`python -m tasks.config [params.yaml] [-S key=value ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


# --------------------------------------------------------------------------- project


class ProjectParams(Section):
    name: str = Field("fashion-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Model name in the registry (letters, digits, . _ -).")


# --------------------------------------------------------------------------- data


class DemoParams(Section):
    per_class: int = Field(200, ge=2, le=7000, description="Fashion-MNIST images per class written to data/raw.")
    seed: int = Field(0, description="Which images the demo subset takes.")
    source_dir: Path = Field(Path("/usr/share/datasets/fashion-mnist"),
                             description="Where the Fashion-MNIST .gz files are (Debian's dataset-fashion-mnist).")
    download_dir: Path = Field(Path(".cache/fashion-mnist"),
                               description="Where torchvision downloads them when source_dir has none.")


class DataParams(Section):
    raw_dir: Path = Field(Path("data/raw"), description="The input ImageFolder (one sub-folder per class), tracked by DVC.")
    prepared_dir: Path = Field(Path("data/prepared"), description="Split files, class map and data report.")
    demo: DemoParams = DemoParams()


# --------------------------------------------------------------------------- prepare


class PrepareParams(Section):
    train: float = Field(0.7, gt=0, lt=1, description="Fraction of each class in the train split.")
    val: float = Field(0.15, gt=0, lt=1, description="Fraction of each class in the validation split.")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction of each class in the held-out test split.")
    seed: int = Field(42, description="Salt of the content-hash split; changing it reshuffles every split.")
    bad_files: Literal["skip", "fail"] = Field("skip", description="skip: report bad files and go on; fail: stop the stage.")
    max_pixels: int = Field(89_478_485, ge=1, description="Images with more pixels are rejected as decompression bombs.")
    near_duplicates: bool = Field(False, description="Also look for near-duplicates across splits by perceptual hash.")
    near_duplicate_distance: int = Field(4, ge=0, le=64, description="Max Hamming distance of two 64-bit dHashes to count as near-duplicates.")
    num_workers: int = Field(0, ge=0, description="Processes decoding images; 0 means one per CPU core.")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> PrepareParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"prepare.train + prepare.val + prepare.test must be 1.0, got {total:g}")
        return self


# --------------------------------------------------------------------------- decoded image cache


class CacheParams(Section):
    dir: Path = Field(Path("artifacts/decoded"), description="Stage decode_cache writes decoded uint8 images here "
                      "(memory-mapped .npy, one folder per split; rebuilt from the split files, never committed).")
    margin: float = Field(1.15, ge=1.0, le=2.0, description="Train images are stored this much larger than "
                          "train.image_size, the room random resized crops take from.")
    num_workers: int = Field(0, ge=0, description="Processes decoding images; 0 means one per CPU core.")


# --------------------------------------------------------------------------- model / weights


class ModelParams(Section):
    arch: str = Field("efficientnet_lite0", description="A torchvision classification model name, or efficientnet_lite0 (timm).")
    weights: str = Field("packaged", min_length=1, description="none | packaged (efficientnet_lite0) | a torchvision Weights member (IMAGENET1K_V2, DEFAULT) | a local file | an https URL.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Pinned SHA-256 of the weights file (required for URLs and local files; optional for torchvision names, which are otherwise pinned on first download).")
    hub_dir: Path = Field(Path(".cache/torch/hub"), description="torch.hub cache where downloads land (<hub_dir>/checkpoints/<file>).")
    offline: bool = Field(False, description="Never download: use the cache or fail at once.")
    download_retries: int = Field(3, ge=0, le=20, description="Retries of a failed download, with exponential backoff.")
    download_timeout_s: float = Field(60, gt=0, le=3600, description="Seconds a stalled download waits for data before it counts as failed (and is retried).")
    out_dir: Path = Field(Path("artifacts/weights"), description="fetch_weights writes the verified weights and their record here.")


# --------------------------------------------------------------------------- train


class HeadPhaseParams(Section):
    epochs: int = Field(30, ge=0, description="Epochs of phase 1 (backbone frozen, only the new head trains).")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate of the head.")
    augment: bool = Field(False, description="Random augmentation in phase 1; false lets the head train on cached features.")


class FinetunePhaseParams(Section):
    unfreeze: Literal["none", "all", "last_n"] = Field("last_n", description="What phase 2 unfreezes.")
    last_n: int = Field(2, ge=1, description="Blocks unfrozen when unfreeze is last_n.")
    epochs: int = Field(2, ge=0, description="Epochs of phase 2.")
    lr: float = Field(3e-4, gt=0, le=10, description="Learning rate of the head in phase 2.")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="Backbone rate = lr * this (discriminative rates).")
    warmup_epochs: float = Field(0.5, ge=0, description="Linear warmup before the cosine decay.")
    augment: bool = Field(True, description="Random resized crop and flip in phase 2.")


class TrainParams(Section):
    out_dir: Path = Field(Path("artifacts/train"), description="Best checkpoint, resume checkpoint and training logs.")
    image_size: int = Field(96, ge=16, le=1024, description="Side of the square network input, in pixels.")
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_weighting: bool = Field(False, description="Weight the loss by inverse class frequency.")
    early_stopping_patience: int = Field(5, ge=0, description="Epochs without validation improvement before stopping; 0 turns it off.")
    head: HeadPhaseParams = HeadPhaseParams()
    finetune: FinetunePhaseParams = FinetunePhaseParams()
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto picks cuda, then mps, then cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA where supported, else fp16; fp32 on CPU.")
    min_crop_scale: float = Field(0.5, gt=0, le=1, description="Smallest area (fraction of the image) a random resized crop keeps.")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs).")
    deterministic: bool = Field(True, description="Deterministic algorithms and seeded RNGs.")
    seed: int = 0
    num_workers: int = Field(2, ge=0, description="Threads decoding images before training; 0 means one per CPU core.")
    resume: Literal["auto", "never"] = Field("auto", description="auto continues from the last checkpoint after a crash.")
    nproc_per_node: int = Field(1, ge=1, description="Processes for DDP via torchrun; >1 trains on several GPUs.")
    timeout_minutes: float = Field(120, gt=0, description="The retrain flow stops training after this long.")


# --------------------------------------------------------------------------- evaluate / export


class EvaluateParams(Section):
    out_dir: Path = Field(Path("artifacts/evaluate"), description="Metrics JSON and plot data.")
    top_k: int = Field(3, ge=1, description="k of the top-k accuracy.")
    calibration_bins: int = Field(15, ge=2, le=100, description="Bins of the expected calibration error.")
    worst_mistakes: int = Field(16, ge=0, le=256, description="Images in the grid of the most confident mistakes.")
    batch_size: int = Field(128, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")


class QuantizeParams(Section):
    enabled: bool = Field(False, description="Also make an int8 model with onnxruntime dynamic quantization.")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Keep the int8 model only if its test accuracy drops by at most this.")


class ExportParams(Section):
    out_dir: Path = Field(Path("artifacts/export"), description="model.onnx and the export report.")
    opset: int = Field(18, ge=18, le=21, description="ONNX opset; 18 is the dynamo exporter's native opset "
                       "(lower ones fail its down-conversion, 21 is the highest tested).")
    atol: float = Field(1e-4, gt=0, le=1e-2, description="Max |logit difference| between onnxruntime and PyTorch (fp32).")
    parity_batch_sizes: list[int] = Field([1, 3, 8], min_length=1)
    latency_runs: int = Field(50, ge=5, description="Timed runs for the latency percentiles.")
    quantize: QuantizeParams = QuantizeParams()


# --------------------------------------------------------------------------- handoff


class GateParams(Section):
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"] = Field(
        "macro_f1", description="The primary metric a candidate must improve.")
    min_delta: float = Field(0.002, ge=0, description="Least improvement of the primary metric that promotes.")
    max_class_drop: float = Field(0.05, ge=0, le=1, description="Largest drop of any class's recall that still promotes.")
    bootstrap: Literal["promote", "manual"] = Field(
        "promote", description="First model of a name: promote it, or publish it and wait for a manual promote.")
    bootstrap_min_metric: float = Field(0.0, ge=0, le=1, description="The first model needs at least this primary metric.")


class RegistryParams(Section):
    uri: str = Field("registry", description="Local directory or any fsspec URL (s3://bucket/prefix).")
    allow_dirty: bool = Field(False, description="Publish from a git tree with uncommitted changes (recorded in lineage).")
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options of the store, e.g. {endpoint_url: http://127.0.0.1:9000} for an "
        "S3-compatible server; keep credentials in the environment (AWS_ACCESS_KEY_ID...), not here.")


class ScheduleParams(Section):
    cron: str = Field("0 3 * * 1", description="When the retrain deployment runs (weekly, Monday 03:00).")
    timezone: str = "UTC"
    watch_interval_minutes: int = Field(10, ge=1, description="How often the watch flow looks for new data.")
    data_branch: str = Field("main", description="Git branch the watch flow checks for a new data version.")


class Params(Section):
    project: ProjectParams = ProjectParams()
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    cache: CacheParams = CacheParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()

    def report_paths(self, root: Path) -> dict[str, Path]:
        """The reports and model the stages write, under project root `root`: what the flow, the demo
        summary and publish read back."""
        return {
            "data_report": root / self.data.prepared_dir / "report.json",
            "weights": root / self.model.out_dir / "weights.json",
            "train_metrics": root / self.train.out_dir / "metrics.json",
            "test_metrics": root / self.evaluate.out_dir / "metrics.json",
            "onnx": root / self.export.out_dir / "model.onnx",
            "export_report": root / self.export.out_dir / "report.json",
        }

    def digest(self) -> str:
        """SHA-256 of the resolved params: the params part of a model's lineage."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message lists every problem."""


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Read, override and validate params; raise ParamsError naming each bad key."""
    path = Path(path)
    raw = _read_yaml(path)
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_describe(path, err)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """'train.head.epochs=3' -> ('train.head.epochs', 3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r} is not key=value (e.g. train.head.epochs=3)")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides_to_file(path: Path | str, overrides: dict[str, Any] | list[str]) -> Params:
    """Validate overrides, then write them into params.yaml (how a flow sets them for DVC)."""
    path = Path(path)
    params = load_params(path, overrides)
    raw = _read_yaml(path)
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    from tasks.io import atomic_write_text  # local: io imports nothing from here

    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return params


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project root or pass the path to params.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(item) for item in overrides)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s):"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            allowed = _allowed_keys(problem["loc"][:-1])
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        value = problem.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {problem['msg']}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def schema_keys(model: type[BaseModel] = Params, prefix: str = "") -> set[str]:
    """Every dotted key the schema knows, sections included (used to check dvc.yaml)."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.add(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= schema_keys(field.annotation, f"{dotted}.")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT_PARAMS))
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--schema", action="store_true", help="print the JSON schema with every key's description")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(Params.model_json_schema(), indent=2))
        return 0
    try:
        params = load_params(args.path, args.set)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
