"""Every field of the caches' keys, changed alone: the cache misses and gives what a build from scratch gives.

Two caches reuse work across runs, and both would silently train on stale
data if a field were missing from their key:

- the decoded-row store (`tasks.lib.row_store.variant_key`): crop size, resize
  size, interpolation, JPEG draft (on/off and its size), Pillow's version and
  the row format. Mean and std are not in it: they are applied on the device.
- the feature cache (`tasks.training.features.context_key`): the extractor's
  state dict (parameters and buffers) and class, where the frozen prefix ends,
  the pixel variant, mean, std, train.image_size, channels_last, precision,
  device type, torch's version and the chunk format.

Each case changes one field from a shared baseline store and checks the miss
through the store itself (images decoded, a new feature context holding every
image), then compares the result with a build from scratch, byte for byte.
Cases that change nothing that matters must hit, so every check can fail both ways.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from torch import nn

from tasks import decode_cache
from tasks.decode_cache import build_cache
from tasks.lib import row_store
from tasks.lib.config import load_params
from tasks.lib.errors import StageError
from tasks.lib.image_cache import AUGMENT, EVAL, load_arrays, training_images
from tasks.lib.images import ImageLimits
from tasks.lib.io import read_json, sha256_file, write_json
from tasks.lib.models import build_model, feature_extractor
from tasks.lib.preprocess import Preprocessing, train_preprocessing
from tasks.lib.split_files import read_classes
from tasks.lib.split_files import SPLITS, SplitRow, read_split, write_split
from tasks.lib.weights import load_backbone_state
from tasks.train import load_data, preprocessing_for
from tasks.training import features as feature_cache
from tasks.training.freezing import set_trainable, split_frozen_prefix
from tasks.training.loop import Run
from tasks.training.phases import feature_context
from tasks.training.phases import features as computed_features
from tasks.training.runtime import Runtime
from tests.conftest import REPO_ROOT
from tests.tasks.test_decode_cache import arrays_of
from tests.tasks.test_train import ARCH, one_thread, tiny_params, write_weights  # noqa: F401

# --------------------------------------------------------------------------- images shaped like users' data

# (width, height), format, mode: non-square, several sizes, JPEG and PNG, colour, grayscale and alpha; the
# JPEGs are large enough that a draft decode at the sizes below really decodes at a reduced scale.
PHOTOS = [((160, 120), "jpg", "RGB"), ((120, 200), "jpg", "RGB"), ((224, 150), "jpg", "L"),
          ((90, 60), "png", "RGBA"), ((50, 70), "png", "L"), ((150, 150), "jpg", "RGB")]


def write_photo(path: Path, size: tuple[int, int], mode: str, seed: int, tint: int = 0) -> SplitRow:
    """A smooth picture (upsampled noise, as photos are smooth at this scale); tint shifts one channel."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    coarse[..., tint % 3] = np.maximum(coarse[..., tint % 3], 160)
    img = Image.fromarray(coarse, "RGBA").resize(size, Image.Resampling.BICUBIC)
    img = img.convert(mode) if mode != "RGBA" else img
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
    return SplitRow(path.name, 0, sha256_file(path))


# --------------------------------------------------------------------------- the decoded-row store

EVAL_PREP = Preprocessing(crop_size=24, resize_size=28)         # resize > crop: both sizes shape the pixels
AUGMENT_PREP = train_preprocessing(EVAL_PREP, 1.15)            # (28, 28)


@dataclass(frozen=True)
class Decode:
    """One way to build the decoded cache: the arrays' preprocessing, JPEG draft and image limits."""

    preps: dict[str, Preprocessing] = field(default_factory=lambda: {EVAL: EVAL_PREP, AUGMENT: AUGMENT_PREP})
    draft: bool = False
    limits: ImageLimits = ImageLimits()

    def build(self, root: Path, out: Path, store: Path | None) -> dict[str, Any]:
        return build_cache(root / "prepared", root / "raw", out, self.preps, workers=1, store_dir=store,
                           draft=self.draft, limits=self.limits)


WIDER = Preprocessing(crop_size=48, resize_size=48)             # cache.margin 2.0: a larger draft size too


@dataclass(frozen=True)
class DecodeCase:
    draft_base: bool                    # the baseline the case starts from: Decode(draft=draft_base)
    change: Callable[[pytest.MonkeyPatch], Decode]
    decoded: tuple[int, int, int]       # images decoded again per split (train 6, val 3, test 3): 0 is a hit
    pixels_differ: bool                 # whether the change gives other pixels (so stale rows would show)


DECODE_CASES = {
    "nothing changed": DecodeCase(False, lambda mp: Decode(), (0, 0, 0), False),
    "mean and std (applied on the device)": DecodeCase(False, lambda mp: Decode(preps={
        EVAL: Preprocessing(24, 28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), AUGMENT: AUGMENT_PREP}),
        (0, 0, 0), False),
    "image limits that admit the same images": DecodeCase(False, lambda mp: Decode(
        limits=ImageLimits(max_pixels=10**7, max_aspect_ratio=50.0)), (0, 0, 0), False),
    "crop size": DecodeCase(False, lambda mp: Decode(preps={EVAL: Preprocessing(20, 28), AUGMENT: AUGMENT_PREP}),
                            (6, 3, 3), True),
    "resize size": DecodeCase(False, lambda mp: Decode(preps={EVAL: Preprocessing(24, 34), AUGMENT: AUGMENT_PREP}),
                              (6, 3, 3), True),
    "interpolation": DecodeCase(False, lambda mp: Decode(preps={EVAL: Preprocessing(24, 28, "bicubic"),
                                                                  AUGMENT: AUGMENT_PREP}), (6, 3, 3), True),
    # the eval rows are still good: only train, which needs the new augment rows too, is decoded again
    "augment crop (cache.margin)": DecodeCase(False, lambda mp: Decode(preps={EVAL: EVAL_PREP, AUGMENT: WIDER}),
                                              (6, 0, 0), True),
    "jpeg draft on": DecodeCase(False, lambda mp: Decode(draft=True), (6, 3, 3), True),
    "jpeg draft off": DecodeCase(True, lambda mp: Decode(), (6, 3, 3), True),
    # the eval geometry is the same, but the draft size follows the largest resize: val and test decode again
    "jpeg draft size": DecodeCase(True, lambda mp: Decode(preps={EVAL: EVAL_PREP, AUGMENT: WIDER},
                                                                        draft=True), (6, 3, 3), True),
    "pillow version": DecodeCase(False, lambda mp: (mp.setattr(PIL, "__version__", "0.0.test"), Decode())[1],
                                 (6, 3, 3), False),
    "row format": DecodeCase(False, lambda mp: (mp.setattr(row_store, "ROW_FORMAT", row_store.ROW_FORMAT + 1),
                                                   Decode())[1], (6, 3, 3), False),
}


@pytest.fixture(scope="module")
def decode_baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Raw images, split files, and a row store built by each baseline (copied by every case, never changed)."""
    root = tmp_path_factory.mktemp("decode")
    rows = [write_photo(root / "raw" / f"img_{i:02d}.{fmt}", size, mode, seed=i)
            for i, (size, fmt, mode) in enumerate(PHOTOS * 2)]
    for split, part in zip(SPLITS, (rows[:6], rows[6:9], rows[9:])):
        write_split(root / "prepared" / f"{split}.csv", part)
    stores = {draft: root / f"store-draft-{draft}" for draft in (False, True)}
    for draft, store in stores.items():
        Decode(draft=draft).build(root, root / f"out-draft-{draft}", store)
    return stores


def split_pixels(decoded: Path) -> dict[str, bytes]:
    return {key: value for key, value in arrays_of(decoded).items() if isinstance(value, bytes)}


@pytest.mark.parametrize("name", DECODE_CASES)
def test_each_decode_setting_alone_misses_the_row_store_and_equals_a_build_from_scratch(
        name: str, decode_baselines: dict[bool, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = DECODE_CASES[name]
    store = decode_baselines[case.draft_base]
    root = store.parent
    shutil.copytree(store, tmp_path / "store")

    setting = case.change(monkeypatch)
    summary = setting.build(root, tmp_path / "out", tmp_path / "store")
    assert tuple(summary[split]["decoded"] for split in SPLITS) == case.decoded, name
    setting.build(root, tmp_path / "scratch", None)
    assert arrays_of(tmp_path / "out") == arrays_of(tmp_path / "scratch"), name
    # a stale row would show: the new setting's pixels are not the baseline's
    before = split_pixels(root / f"out-draft-{case.draft_base}")       # the baseline's arrays
    assert (split_pixels(tmp_path / "out") != before) == case.pixels_differ, name


# Each changes one field of the geometry (listed here, not taken from the code under test).
OTHER_GEOMETRY = {"crop_size": Preprocessing(20, 28), "resize_size": Preprocessing(24, 34),
                  "interpolation": Preprocessing(24, 28, "bicubic")}


@pytest.mark.parametrize("geometry", OTHER_GEOMETRY)
def test_the_decoded_cache_is_not_read_for_a_preprocessing_that_differs_in_one_geometry_field(
        geometry: str, decode_baselines: dict[bool, Path]) -> None:
    """The train stage reads cache.out_dir only for the preprocessing it was built with; otherwise it stops."""
    root = decode_baselines[False].parent
    decoded_cache = root / "out-draft-False"            # Decode() built it
    other = OTHER_GEOMETRY[geometry]
    changed = [f for f in ("crop_size", "resize_size", "interpolation", "mean", "std")
               if getattr(other, f) != getattr(EVAL_PREP, f)]
    assert changed == [geometry]
    val = read_split(root / "prepared" / "val.csv")
    with pytest.raises(StageError, match="dvc repro decode_cache"):
        load_arrays(decoded_cache, "val", val, [other])
    params = load_params(REPO_ROOT / "params.yaml", {"cache.out_dir": str(decoded_cache), "data.raw_dir": str(root / "raw"),
                                                      "train.num_workers": 1, "cache.jpeg_draft": False})
    (same,) = training_images(params, "val", val, [EVAL_PREP])
    assert Path(same.array.filename).parent == decoded_cache / "val"       # the cache, for what it was built for
    with pytest.raises(StageError, match="changed since the build: rebuild with `dvc repro decode_cache`"):
        training_images(params, "val", val, [other])


def test_the_decoded_cache_is_not_read_when_jpeg_draft_changed_since_it_was_built(
        decode_baselines: dict[bool, Path]) -> None:
    """Switching cache.jpeg_draft and training without dvc repro stops: the drafted pixels are not reused."""
    root = decode_baselines[False].parent
    val = read_split(root / "prepared" / "val.csv")
    for built_with in (False, True):
        params = load_params(REPO_ROOT / "params.yaml", {
            "cache.out_dir": str(root / f"out-draft-{built_with}"), "data.raw_dir": str(root / "raw"),
            "train.num_workers": 1, "cache.jpeg_draft": not built_with})
        with pytest.raises(StageError, match=f"built with cache.jpeg_draft {str(built_with).lower()}.*rebuild"):
            training_images(params, "val", val, [EVAL_PREP])


# --------------------------------------------------------------------------- the feature cache

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None)


@dataclass
class Features:
    """One way to compute the train split's backbone features: params, runtime, and which part of the network."""

    overrides: dict[str, Any] = field(default_factory=dict)
    rt: Runtime = field(default_factory=lambda: CPU)
    cut: int | None = None                     # phase 2's frozen prefix below the last `cut` blocks; None: phase 1
    image_size: int | None = None              # train.image_size seen by the runner only (same stored arrays)
    network: Callable[[nn.Module], nn.Module] | None = None

    def compute(self, root: Path, store: Path) -> tuple[torch.Tensor, list[str]]:
        """What training computes, through the real loader, model builder and tasks.training.phases.features."""
        params = tiny_params(root, **{"cache.features_dir": str(store), "cache.jpeg_draft": False, **self.overrides})
        state, record = load_backbone_state(params.model.out_dir)
        prep = preprocessing_for(params.model.arch, params.train.image_size, record)
        classes = read_classes(params.data.prepared_dir)
        data = load_data(params, prep, self.rt, len(classes))
        model = build_model(params.model.arch, len(classes), state).eval()
        cfg = params.train.model_copy(update={"image_size": self.image_size or params.train.image_size})
        run = Run(cfg, self.rt, data, model, features_dir=params.cache.features_dir)
        if self.cut is None:
            extractor = feature_extractor(model)
        else:
            first = set_trainable(model, "last_n", self.cut)
            extractor, _ = split_frozen_prefix(model, first[0], cfg.image_size)
        if self.network is not None:
            extractor = self.network(extractor)
        return computed_features(run, extractor, data.train_eval, "features train"), data.train_eval.keys


def write_photo_project(root: Path) -> None:
    """Three classes of non-square JPEG and PNG photos, train/val/test split files and 'pretrained' weights."""
    rows: dict[str, list[SplitRow]] = {split: [] for split in SPLITS}
    for c in range(3):
        for i, (size, fmt, mode) in enumerate(PHOTOS[:4] if c else PHOTOS[:3] + PHOTOS[5:]):
            path = root / "data" / "raw" / f"class {c}" / f"photo_{i}.{fmt}"
            row = write_photo(path, (size[0] * 2 // 3 + 20, size[1] * 2 // 3 + 20), mode, seed=10 * c + i, tint=c)
            split = "train" if i < 3 else ("val" if c < 2 else "test")
            rows[split].append(SplitRow(f"class {c}/{path.name}", c, row.sha256))
    rows["test"].append(rows["val"][0])
    for split, part in rows.items():
        write_split(root / "data" / "prepared" / f"{split}.csv", part)
    write_json(root / "data" / "prepared" / "classes.json", [f"class {c}" for c in range(3)])
    write_weights(root / "artifacts" / "weights", ARCH)


def edited_weights(project: Path, out: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the project's weights folder with the record and the state dict edited, hashes recorded again."""
    shutil.copytree(project / "artifacts" / "weights", out)
    record, state = read_json(out / "weights.json"), torch.load(out / "backbone.pt", weights_only=True)
    edit(record, state)
    torch.save(state, out / "backbone.pt")
    record["sha256"] = record["file_sha256"] = sha256_file(out / "backbone.pt")
    write_json(out / "weights.json", record)
    return out


def last_batchnorm_mean(record: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """A buffer, not a parameter, and the last one of the backbone: only a hash of the whole state dict sees it."""
    key = [k for k in state if k.endswith("running_mean")][-1]
    state[key] += 0.5


def mirrored(extractor: nn.Module) -> nn.Module:
    """The same state dict in another network class (one whose forward differs)."""
    class Mirrored(type(extractor)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.flip(-1))

    extractor.__class__ = Mirrored
    return extractor


def decoded_by_the_stage(project: Path, out: Path, **cache: Any) -> dict[str, Any]:
    """Run the decode_cache stage into out; the overrides that make training read it."""
    params = tiny_params(project, **{"cache.out_dir": str(out / "decoded"), "cache.store_dir": str(out / "rows"),
                                     "cache.num_workers": 1, **{f"cache.{k}": v for k, v in cache.items()}})
    decode_cache.run(params)
    return {"cache.out_dir": str(out / "decoded"), **{f"cache.{k}": v for k, v in cache.items()}}


@dataclass(frozen=True)
class FeatureCase:
    setting: Callable[[Path, Path, pytest.MonkeyPatch], Features]     # (project, case folder, monkeypatch)
    hit: bool
    values_differ: bool | None = True    # whether the change gives other features (so stale ones would show);
    #                                      None: it depends on the kernels the machine picks


FEATURE_CASES = {
    "nothing changed": FeatureCase(lambda p, d, mp: Features(), hit=True),
    "same frozen prefix": FeatureCase(lambda p, d, mp: Features(cut=1), hit=True),
    "training-only settings": FeatureCase(lambda p, d, mp: Features(overrides={
        "train.hflip": False, "train.min_crop_scale": 0.3, "train.head.lr": 0.5, "train.batch_size": 3,
        "train.finetune.epochs": 7}), hit=True),
    "the stage's decoded cache in another folder (same pixels)": FeatureCase(
        lambda p, d, mp: Features(overrides=decoded_by_the_stage(p, d, jpeg_draft=False)), hit=True),
    "weights": FeatureCase(lambda p, d, mp: (write_weights(d / "w", ARCH, seed=1),
                                             Features(overrides={"model.out_dir": str(d / "w")}))[1], hit=False),
    "one batchnorm statistic": FeatureCase(lambda p, d, mp: Features(overrides={
        "model.out_dir": str(edited_weights(p, d / "w", last_batchnorm_mean))}), hit=False),
    "mean": FeatureCase(lambda p, d, mp: Features(overrides={"model.out_dir": str(edited_weights(
        p, d / "w", lambda record, _: record["preprocessing"].update(mean=[0.5, 0.456, 0.406])))}), hit=False),
    "std": FeatureCase(lambda p, d, mp: Features(overrides={"model.out_dir": str(edited_weights(
        p, d / "w", lambda record, _: record["preprocessing"].update(std=[0.229, 0.3, 0.225])))}), hit=False),
    "pixels (jpeg draft)": FeatureCase(
        lambda p, d, mp: Features(overrides=decoded_by_the_stage(p, d, jpeg_draft=True)), hit=False),
    "image size seen by the network": FeatureCase(lambda p, d, mp: Features(image_size=28), hit=False),
    "frozen prefix ends at another block": FeatureCase(lambda p, d, mp: Features(cut=2), hit=False),
    "network class": FeatureCase(lambda p, d, mp: Features(network=mirrored), hit=False),
    "precision (bf16)": FeatureCase(lambda p, d, mp: Features(rt=Runtime(torch.device("cpu"), torch.bfloat16)),
                                    hit=False),
    "channels_last": FeatureCase(lambda p, d, mp: Features(overrides={"train.channels_last": True}), hit=False,
                                 values_differ=None),
    "torch version": FeatureCase(lambda p, d, mp: (mp.setattr(torch, "__version__", "0.0.test"), Features())[1],
                                 hit=False, values_differ=False),
    "feature format": FeatureCase(lambda p, d, mp: (mp.setattr(feature_cache, "FORMAT", feature_cache.FORMAT + 1),
                                                    Features())[1], hit=False, values_differ=False),
}


@dataclass(frozen=True)
class FeatureBaseline:
    project: Path
    store: Path
    features: dict[int | None, torch.Tensor]      # by cut: phase 1's features and phase 2's activations


@pytest.fixture(scope="module")
def feature_baseline(tmp_path_factory: pytest.TempPathFactory) -> FeatureBaseline:
    """A photo project and a feature store holding phase 1's features and phase 2's activations (last_n 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as in every test (one_thread): the same kernels, the same bits
    try:
        project = tmp_path_factory.mktemp("features")
        write_photo_project(project)
        store = project / "store"
        return FeatureBaseline(project, store, {cut: Features(cut=cut).compute(project, store)[0] for cut in (None, 1)})
    finally:
        torch.set_num_threads(threads)


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def stored_keys(context: Path) -> set[str]:
    keys: set[str] = set()
    for chunk in context.glob("*.npz"):
        with np.load(chunk) as data:
            keys |= {k.decode() for k in data["keys"]}
    return keys


@pytest.mark.parametrize("name", FEATURE_CASES)
def test_each_feature_setting_alone_misses_the_feature_cache_and_equals_features_from_scratch(
        name: str, feature_baseline: FeatureBaseline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = FEATURE_CASES[name]
    store = tmp_path / "features"
    shutil.copytree(feature_baseline.store, store)
    before = store_files(store)
    setting = case.setting(feature_baseline.project, tmp_path, monkeypatch)

    got, keys = setting.compute(feature_baseline.project, store)
    baseline = feature_baseline.features[None if setting.cut is None else 1]
    if case.hit:
        assert store_files(store) == before, name                   # nothing computed, nothing stored
        assert torch.equal(got, baseline), name
        return
    new = {p.parent.name for p in store.rglob("*.npz")} - {Path(p).parent.name for p in before}
    assert len(new) == 1, f"{name}: no new feature context, the stored features were reused"
    assert stored_keys(store / new.pop()) == set(keys), name       # every image computed and stored anew
    assert {k: v for k, v in store_files(store).items() if k in before} == before, name
    scratch, _ = setting.compute(feature_baseline.project, tmp_path / "scratch")
    assert torch.equal(got, scratch), name
    if case.values_differ is not None:
        assert (got.shape != baseline.shape or not torch.equal(got, baseline)) == case.values_differ, name


def test_the_feature_key_names_the_device_type(feature_baseline: FeatureBaseline) -> None:
    """No GPU here: the key itself must differ between devices (the rest of the path is the one tested above)."""
    params = tiny_params(feature_baseline.project)
    state, record = load_backbone_state(params.model.out_dir)
    prep = preprocessing_for(params.model.arch, params.train.image_size, record)
    data = load_data(params, prep, CPU, 3)
    model = build_model(params.model.arch, 3, state).eval()
    extractor = feature_extractor(model)
    keys = [feature_context(Run(params.train, Runtime(device=torch.device(device), amp_dtype=None), data, model),
                            extractor, data.train_eval.pixels) for device in ("cpu", "cpu", "cuda")]
    assert keys[0] == keys[1] != keys[2]     # only the device's type is read
