"""The one model builder used by train, evaluate and export: a pretrained backbone whose ImageNet classifier is
replaced by a new head, found by structure (`find_head`) so every torchvision classifier works without a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from tasks.lib.io import atomic_path
from tasks.lib.preprocess import Preprocessing, imagenet_preprocessing

TIMM_ARCHS = frozenset({"efficientnet_lite0"})
CHECKPOINT_FORMAT = 1


def check_arch(arch: str) -> None:
    if arch not in TIMM_ARCHS and arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"model.arch {arch!r} is not a torchvision classification model nor one of {sorted(TIMM_ARCHS)}; "
            f"see torchvision.models.list_models(module=torchvision.models)"
        )


def build_backbone(arch: str) -> nn.Module:
    """The architecture with its original 1000-class ImageNet head and random weights."""
    check_arch(arch)
    if arch in TIMM_ARCHS:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=1000)
    kwargs: dict[str, Any] = {"weights": None}
    if arch in ("googlenet", "inception_v3"):
        # Keep the auxiliary heads so pretrained state dicts load strictly (drop_aux_heads removes them
        # after), and take the input transform torchvision's pretrained weights were trained with.
        kwargs.update(aux_logits=True, init_weights=False, transform_input=True)
    return torchvision.models.get_model(arch, **kwargs)


def drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet and Inception return aux logits in train mode; the new model has one head."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def find_head(model: nn.Module) -> str:
    """Dotted name of the final classification layer: the last Linear, else the last 1x1 Conv (SqueezeNet)."""
    last_linear = last_conv = None
    for name, module in model.named_modules():
        if "aux" in name.lower():
            continue
        if isinstance(module, nn.Linear):
            last_linear = name
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last_conv = name
    head = last_linear or last_conv
    if head is None:
        raise ValueError(f"{type(model).__name__}: no Linear or 1x1 Conv layer to use as the classification head")
    return head


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the classification layer for a freshly initialised one with num_classes outputs."""
    name = find_head(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    _set_submodule(model, name, new)
    return name


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_model(arch: str, num_classes: int, backbone_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Backbone (with pretrained state when given, loaded strictly) plus a new head."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    model = build_backbone(arch)
    if backbone_state is not None:
        model.load_state_dict(backbone_state, strict=True)
    drop_aux_heads(model)
    replace_head(model, num_classes)
    return model


def head_module(model: nn.Module) -> nn.Module:
    return model.get_submodule(find_head(model))


def feature_extractor(model: nn.Module) -> nn.Module:
    """A deep copy of the model with its head swapped for Identity: outputs what the head takes in. Its own
    parameters, equal to `model`'s while the backbone is frozen (the head phase, which uses it)."""
    import copy

    head_name = find_head(model)
    head = model.get_submodule(head_name)
    _set_submodule(model, head_name, nn.Identity())
    try:
        extractor = copy.deepcopy(model)
    finally:
        _set_submodule(model, head_name, head)
    return extractor


def default_preprocessing(arch: str, image_size: int, crop_pct: float = 1.0) -> Preprocessing:
    """ImageNet mean/std (what every supported pretrained weight expects) at the training size."""
    check_arch(arch)
    return imagenet_preprocessing(image_size, crop_pct)


def save_checkpoint(path: Path | str, model: nn.Module, *, arch: str, class_names: list[str],
                    preprocessing: Preprocessing, weights: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """The trained model and everything needed to rebuild and call it, written atomically."""
    payload = {
        "format_version": CHECKPOINT_FORMAT,
        "arch": arch,
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "preprocessing": preprocessing.to_dict(),
        "weights": dict(weights),
        **(extra or {}),
    }
    # Save through a handle: given a path, torch.save names the archive after the
    # (random) temporary file, and identical models would hash differently.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model in eval mode; return it with the checkpoint's metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the train stage first (dvc repro train)")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {payload.get('format_version')!r}, expected {CHECKPOINT_FORMAT}; retrain")
    model = build_model(payload["arch"], len(payload["class_names"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"])
    return model, meta


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
