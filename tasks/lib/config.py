"""params.yaml, read once into one typed schema: every stage calls `load_params()`, and unknown keys, wrong types
and out-of-range values fail with the dotted key, the bad value and what is allowed, before any work starts.

Print the schema with `python -m tasks.lib.config --schema` (`--json` for the
raw JSON Schema), check a file with `python -m tasks.lib.config [params.yaml] [-S key=value ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from tasks.lib.config_support import (
    ParamsError,
    check_cron,
    check_timezone,
    count_values,
    describe,
    format_schema_table,
    number_problem,
    numeric,
    parse_overrides,
    read_yaml,
    schema_rows,
    set_dotted,
)
from tasks.lib.console import quiet_broken_pipe
from tasks.lib.io import atomic_write_text

DEFAULT_PARAMS = Path("params.yaml")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit


class Section(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored; numbers are finite, and
    neither a boolean nor a quoted number is taken for a number (YAML's `true` is not the count 1, and
    `"3"` is text: quoted by mistake, or written by `dvc exp run -S 'key="3"'`)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and numeric(field.annotation) and (problem := number_problem(value)):
            raise ValueError(problem)
        return value


class ProjectParams(Section):
    name: str = Field("fashion-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Model name in the registry (letters, digits, . _ -).")


class DemoParams(Section):
    per_class: int = Field(200, ge=2, le=7000, description="Fashion-MNIST images per class written to data/raw.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Which images the demo subset takes.")
    source_dir: Path = Field(Path("/usr/share/datasets/fashion-mnist"),
                             description="Where the Fashion-MNIST .gz files are (Debian's dataset-fashion-mnist).")
    download_dir: Path = Field(Path(".cache/fashion-mnist"),
                               description="Where torchvision downloads them when source_dir has none.")


class DataParams(Section):
    raw_dir: Path = Field(Path("data/raw"), description="The input ImageFolder (one sub-folder per class), tracked by DVC.")
    prepared_dir: Path = Field(Path("data/prepared"), description="Split files, class map and data report.")
    demo: DemoParams = DemoParams()


class PrepareParams(Section):
    train: float = Field(0.7, gt=0, lt=1, description="Fraction of each class in the train split.")
    val: float = Field(0.15, gt=0, lt=1, description="Fraction of each class in the validation split.")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction of each class in the held-out test split.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Salt of the content-hash split; changing it reshuffles every split.")
    bad_files: Literal["skip", "fail"] = Field("skip", description="skip: report bad files and go on; fail: stop the stage.")
    max_pixels: int = Field(89_478_485, ge=1, description="Images with more pixels are rejected as decompression "
                            "bombs, from the header, before decoding (also Pillow's own limit in every decoding process).")
    max_aspect_ratio: float = Field(50.0, ge=1, description="Images whose long side is more than this many times "
                                    "the short side are rejected (extreme_aspect_ratio).")
    max_file_bytes: int = Field(256 * 2**20, ge=1, description="Files larger than this are rejected (file_too_large) "
                                "without being read; no file is ever read past it.")
    near_duplicates: bool = Field(False, description="Also look for near-duplicates across splits by perceptual hash.")
    near_duplicate_distance: int = Field(4, ge=0, le=64, description="Max Hamming distance of two 64-bit dHashes to count as near-duplicates.")
    num_workers: int = Field(0, ge=0, description="Processes decoding images; 0 means one per CPU core.")
    label_issues: Literal["report", "exclude", "off"] = Field("report", description="Images whose label looks "
                                                             "wrong (cleanlab, in the train stage): report lists them "
                                                             "in reports.dir/label_issues.json; exclude also leaves the "
                                                             "likeliest out of training (never val or test).")
    cache_dir: Path = Field(Path(".cache/prepare"), description="Per-image results (content hash, decode check, "
                            "dHash) kept across runs so only new or changed files are decoded; git-ignored, not a "
                            "DVC output, safe to delete.")

    def limits(self) -> Any:
        """The tasks.lib.images.ImageLimits of these params (imported here: config stays free of Pillow)."""
        from tasks.lib.images import ImageLimits

        return ImageLimits(self.max_pixels, self.max_aspect_ratio, self.max_file_bytes)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> PrepareParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"prepare.train + prepare.val + prepare.test must be 1.0, got {total:g}")
        return self


class CacheParams(Section):
    out_dir: Path = Field(Path("artifacts/decoded"), description="Stage decode_cache writes decoded uint8 images "
                          "here (memory-mapped .npy, one folder per split; rebuilt from the split files, never committed).")
    margin: float = Field(1.15, ge=1.0, le=2.0, description="Train images are stored this much larger than "
                          "train.image_size, the room random resized crops take from.")
    num_workers: int = Field(0, ge=0, description="Processes decoding images; 0 means one per CPU core.")
    jpeg_draft: bool = Field(True, description="Decode JPEGs at 1/2, 1/4 or 1/8 scale (Pillow's draft) when the "
                             "stored size is that much smaller, and resample only what the center crop keeps: "
                             "several times faster on large photos; the pixels differ slightly from evaluate's "
                             "(see benchmarks/README.md); false makes them identical.")
    store_dir: Path = Field(Path(".cache/decoded"), description="Decoded rows with each row's content hash, in "
                            "segments the outputs hard-link, so the next build decodes and writes only new images; "
                            "git-ignored, not a DVC output, safe to delete.")
    features_dir: Path = Field(Path(".cache/features"), description="Backbone features of the frozen head phase, "
                               "per image, weights and preprocessing, reused by the next training run; git-ignored, "
                               "safe to delete.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dir" in data:    # params files written before the rename
            raise ValueError("cache.dir is now called cache.out_dir (it is the decode_cache stage's output, not a "
                             "cache like store_dir and features_dir): rename the key in the params file or -S override")
        return data


class ModelParams(Section):
    arch: str = Field("efficientnet_lite0", description="A torchvision classification model name, or efficientnet_lite0 (timm).")
    weights: str = Field("packaged", min_length=1, description="none | packaged (efficientnet_lite0) | a torchvision Weights member (IMAGENET1K_V2, DEFAULT) | a local file | an https URL.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Pinned SHA-256 of the weights file (required for URLs and local files; optional for torchvision names, which are otherwise pinned on first download).")
    hub_dir: Path = Field(Path(".cache/torch/hub"), description="torch.hub cache where downloads land (<hub_dir>/checkpoints/<file>).")
    offline: bool = Field(False, description="Never download: use the cache or fail at once.")
    download_retries: int = Field(3, ge=0, le=20, description="Retries of a failed download, with exponential backoff.")
    download_timeout_s: float = Field(60, gt=0, le=3600, description="Seconds a stalled download waits for data before it counts as failed (and is retried).")
    out_dir: Path = Field(Path("artifacts/weights"), description="fetch_weights writes the verified weights and their record here.")

    @model_validator(mode="after")
    def _pin_applies(self) -> ModelParams:
        if self.sha256 is not None and self.weights.strip() == "none":
            raise ValueError("model.sha256 is set but model.weights is none (random init, no file to check); "
                             "remove model.sha256 or name the weights it pins")
        return self


class HeadPhaseParams(Section):
    epochs: int = Field(30, ge=0, description="Epochs of phase 1 (backbone frozen, only the new head trains).")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate of the head.")
    augment: bool = Field(False, description="Random augmentation in phase 1; false lets the head train on cached features.")


class FinetunePhaseParams(Section):
    unfreeze: Literal["none", "all", "last_n"] = Field("last_n", description="What phase 2 unfreezes.")
    last_n: int = Field(3, ge=1, description="Blocks unfrozen when unfreeze is last_n.")
    epochs: int = Field(15, ge=0, description="Epochs of phase 2.")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate of the head in phase 2.")
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="Backbone rate = lr * this (discriminative rates).")
    warmup_epochs: float = Field(2, ge=0, description="Linear warmup before the cosine decay.")
    augment: bool = Field(False, description="Random resized crop and flip in phase 2; false runs the frozen "
                          "bottom of the network once per image and trains the unfrozen top on its activations.")
    batchnorm: Literal["frozen", "train"] = Field("frozen", description="frozen: with pretrained weights every "
                                                  "BatchNorm keeps its running statistics (scale and shift still "
                                                  "train); train: batch statistics, as when training from scratch.")


class TrainParams(Section):
    out_dir: Path = Field(Path("artifacts/train"), description="Best checkpoint and resume checkpoint; metrics and "
                          "training curves go to reports.dir.")
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
    hflip: bool = Field(True, description="Random horizontal flips when a phase augments; false where a mirror "
                        "image is another class (digits, text).")
    min_crop_scale: float = Field(0.5, gt=0, le=1, description="Smallest area (fraction of the image) a random resized crop keeps.")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs).")
    cuda_graphs: bool = Field(True, description="On CUDA, replay the cached-feature head step from a CUDA graph "
                              "(AdamW only; same batches and update, ~100x faster epochs); false runs it eagerly.")
    deterministic: bool = Field(True, description="Deterministic algorithms and seeded RNGs.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random number generator in training.")
    num_workers: int = Field(2, ge=0, description="Threads decoding images before training; 0 means one per CPU core.")
    resume: Literal["auto", "never"] = Field("auto", description="auto continues from the last checkpoint after a crash.")
    nproc_per_node: int = Field(1, ge=1, description="Processes for DDP via torchrun; >1 trains on several GPUs.")
    timeout_minutes: float = Field(120, gt=0, description="The retrain flow stops training after this long.")


class EvaluateParams(Section):
    out_dir: Path = Field(Path("artifacts/evaluate"), description="Each test image's prediction (predictions.json, "
                          "for the gate's paired test) and the worst-mistakes grid; metrics and plots go to reports.dir.")
    top_k: int = Field(3, ge=1, description="k of the top-k accuracy.")
    calibration_bins: int = Field(15, ge=2, le=100, description="Bins of the expected calibration error.")
    worst_mistakes: int = Field(16, ge=0, le=256, description="Images in the grid of the most confident mistakes.")
    batch_size: int = Field(128, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    baseline_max_images: int = Field(5000, ge=10, description="Train images (a stratified subset) the built-in "
                                     "pixel logistic-regression baseline is fitted on; bounds its cost.")


class QuantizeParams(Section):
    enabled: bool = Field(False, description="Also make an int8 model with onnxruntime dynamic quantization.")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Keep the int8 model only if its test accuracy drops by at most this.")


class ExportParams(Section):
    out_dir: Path = Field(Path("artifacts/export"), description="model.onnx (and model.int8.onnx); the export "
                          "report goes to reports.dir.")
    opset: int = Field(18, ge=18, le=21, description="ONNX opset; 18 is the dynamo exporter's native opset "
                       "(lower ones fail its down-conversion, 21 is the highest tested).")
    atol: float = Field(1e-4, gt=0, le=1e-2, description="Max |logit difference| between onnxruntime and PyTorch (fp32).")
    parity_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 3, 8], min_length=1, description="Batch sizes at which onnxruntime must match PyTorch.")
    latency_runs: int = Field(50, ge=5, description="Timed runs for the latency percentiles.")
    quantize: QuantizeParams = QuantizeParams()
    abstain_at_accuracy: float | None = Field(None, gt=0, le=1, description="Abstention: the lowest confidence "
                                              "threshold whose answered validation images are at least this accurate "
                                              "goes into the ONNX metadata (predict --abstain says unknown below it); "
                                              "null: no threshold (the card still shows the risk-coverage curve).")
    abstain_at_coverage: float | None = Field(None, gt=0, le=1, description="Abstention instead by coverage: the "
                                              "threshold that answers this share of the validation images.")

    @model_validator(mode="after")
    def _one_abstention_target(self) -> ExportParams:
        if self.abstain_at_accuracy is not None and self.abstain_at_coverage is not None:
            raise ValueError("export.abstain_at_accuracy and export.abstain_at_coverage are both set; the threshold "
                             "has one target: set one of them to null")
        return self

    @property
    def abstain_target(self) -> dict[str, float] | None:
        """What the abstention threshold is chosen for, as evaluate records it and export checks it."""
        if self.abstain_at_accuracy is not None:
            return {"accuracy": self.abstain_at_accuracy}
        return None if self.abstain_at_coverage is None else {"coverage": self.abstain_at_coverage}


class ReportsParams(Section):
    dir: Path = Field(Path("metrics"), description="Metrics and plots of train, evaluate and export: small files "
                      "that git tracks (not ignored), so `dvc exp show`, `dvc metrics diff` and `dvc plots diff` "
                      "compare experiments and commits.")


class GateParams(Section):
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"] = Field(
        "macro_f1", description="The primary metric a candidate must improve.")
    min_delta: float = Field(0.002, ge=0, description="Least improvement of the primary metric that promotes.")
    max_class_drop: float = Field(0.05, ge=0, le=1, description="Largest drop of any class's recall that still promotes.")
    bootstrap: Literal["promote", "manual"] = Field(
        "promote", description="First model of a name: promote it, or publish it and wait for a manual promote.")
    bootstrap_min_metric: float = Field(0.0, ge=0, le=1, description="The first model needs at least this primary metric.")
    significance: float | None = Field(0.05, gt=0, lt=1, description="An improvement promotes only if the exact "
                                       "McNemar test on the same test images gives p below this; null turns the "
                                       "test off.")
    min_lift_over_baseline: float | None = Field(0.0, ge=-1, le=1, description="Test accuracy must beat the "
                                                 "built-in pixel logistic-regression baseline by more than this; "
                                                 "null turns the check off.")
    approval: Literal["auto", "borderline", "always"] = Field(
        "auto", description="Who decides: auto (the gate alone); borderline (a person approves or rejects, in the "
        "Prefect UI or `python -m flows.approval`, a candidate that is better but not significantly so, or that only "
        "the per-class guard refused); always (a person decides every candidate the gate passed, and the borderline "
        "ones).")
    approval_timeout_hours: float = Field(72, gt=0, description="A candidate waiting for approval longer than this "
                                          "is rejected (recorded as timed out).")


class RegistryParams(Section):
    uri: str = Field("registry", description="Local directory or any fsspec URL (s3://bucket/prefix).")
    allow_dirty: bool = Field(False, description="Publish from a git tree with uncommitted changes (recorded in lineage).")
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options of the store, e.g. {endpoint_url: http://127.0.0.1:9000} for an "
        "S3-compatible server; keep credentials in the environment (AWS_ACCESS_KEY_ID...), not here.")

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, uri: str) -> str:
        if not uri.strip():
            raise ValueError("must name a directory or an fsspec URL (e.g. registry, s3://bucket/models)")
        return uri


class ScheduleParams(Section):
    cron: Annotated[str, AfterValidator(check_cron)] = Field(
        "0 3 * * 1", description="When the retrain deployment runs (weekly, Monday 03:00).")
    timezone: Annotated[str, AfterValidator(check_timezone)] = Field(
        "UTC", description="IANA time zone of the cron schedule (UTC, Europe/Paris, ...).")
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
    reports: ReportsParams = ReportsParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()

    def report_paths(self, root: Path) -> dict[str, Path]:
        """The reports and model the stages write, under project root `root`: what the flow, the demo
        summary and publish read back."""
        return {
            "data_report": root / self.data.prepared_dir / "report.json",
            "weights": root / self.model.out_dir / "weights.json",
            "train_metrics": root / self.reports.dir / "train.json",
            "test_metrics": root / self.reports.dir / "evaluate.json",
            "test_predictions": root / self.evaluate.out_dir / "predictions.json",
            "feature_distance": root / self.evaluate.out_dir / "feature_distance.npz",
            "worst_mistakes": root / self.evaluate.out_dir / "worst_mistakes.png",
            "onnx": root / self.export.out_dir / "model.onnx",
            "export_report": root / self.reports.dir / "export.json",
            "train_plots": root / self.reports.dir / "train",
            "label_issues": root / self.reports.dir / "label_issues.json",
            "evaluate_plots": root / self.reports.dir / "evaluate",
        }

    def digest(self) -> str:
        """SHA-256 of the resolved params: the params part of a model's lineage."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Read, override and validate params; raise ParamsError naming each bad key and where it came from.
    model.arch is checked by whoever builds a model (tasks.lib.models.check_arch imports torchvision)."""
    path = Path(path)
    raw = read_yaml(path)
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        set_dotted(raw, key, value)
    count_values(raw, f"{path} with its overrides")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(describe(path, err, parsed, Params)) from None


def apply_overrides_to_file(path: Path | str, overrides: dict[str, Any] | list[str]) -> Params:
    """Validate overrides, then write them into params.yaml (how a flow sets them for DVC)."""
    path = Path(path)
    params = load_params(path, overrides)
    raw = read_yaml(path)
    for key, value in parse_overrides(overrides).items():
        set_dotted(raw, key, value)
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return params


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lib.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT_PARAMS))
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--schema", action="store_true", help="print every key: type, allowed values, default, description")
    parser.add_argument("--json", action="store_true", help="with --schema: the raw JSON Schema instead")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(Params.model_json_schema(), indent=2) if args.json
              else format_schema_table(schema_rows(Params)))
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
