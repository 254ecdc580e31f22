"""Which parameters train in each phase, and how BatchNorm behaves while they do.

`set_trainable` is the one switch: `none` trains only the new head (phase 1),
`last_n` the last N backbone blocks and everything after them, `all` the
whole network. `backbone_blocks` finds the blocks by structure, so every
torchvision and timm classifier works without a table to maintain.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.lib.models import find_head

# Containers whose children are the backbone's blocks, tried in this order (see backbone_blocks).
BLOCK_CONTAINERS = ("features", "blocks", "stages", "encoder.layers", "layers", "trunk_output")


def backbone_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the backbone's blocks in forward order: the children of the first BLOCK_CONTAINERS
    entry the model has, else ResNet's layer1..N, else its top-level children (never the head or parameter-free)."""
    head_top = find_head(model).split(".")[0]
    for name in BLOCK_CONTAINERS:
        try:
            container = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and name.split(".")[0] != head_top:
            return [f"{name}.{child}" for child, m in container.named_children() if _has_params(m)]
    layers = [n for n, m in model.named_children() if n.startswith("layer") and n[5:].isdigit() and _has_params(m)]
    if layers:
        return layers
    return [n for n, m in model.named_children() if n != head_top and _has_params(m)]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def set_trainable(model: nn.Module, unfreeze: str, last_n: int = 1) -> list[str]:
    """Freeze the backbone, then unfreeze none, all, or (last_n) everything from the Nth-last block on (timm's
    conv_head included); the head always trains. Returns the first unfrozen block ([] for none)."""
    head = find_head(model)
    start: str | None = None
    if unfreeze == "all":
        start = ""
    elif unfreeze == "last_n":
        blocks = backbone_blocks(model)
        start = blocks[-min(last_n, len(blocks))] if blocks else head
    on = False
    for name, param in model.named_parameters():
        if start is not None and (name == start or name.startswith(start + ".") or start == ""):
            on = True
        param.requires_grad_(on or name.startswith(head + "."))
    return [start] if start is not None else []


def set_train_mode(model: nn.Module, pretrained: bool = True) -> None:
    """Train mode, but with pretrained weights every BatchNorm keeps the running statistics the head was fitted
    to: batch statistics shift every feature at once (demo train accuracy fell from 95% to 10% in one step)."""
    model.train()
    if not pretrained:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def split_frozen_prefix(model: nn.Module, first_trainable: str, image_size: int) -> tuple[nn.Module, nn.Module] | None:
    """The model as `upper(lower(x))`, `lower` (frozen, computed once) everything before block
    `first_trainable`; None unless the chain of modules reproduces the model's own output on a test batch
    (transform_input, class tokens, ... are not such a chain)."""
    if not first_trainable:
        return None
    chain = _forward_chain(model, first_trainable)
    names = [name for name, _ in chain]
    if first_trainable not in names:
        return None
    cut = names.index(first_trainable)
    head_top = find_head(model).split(".")[0]
    upper_modules = []
    for name, module in chain[cut:]:
        if name == head_top:
            upper_modules.append(nn.Flatten(1))   # as torchvision's forward does before the classifier
        upper_modules.append(module)
    lower, upper = nn.Sequential(*(module for _, module in chain[:cut])), nn.Sequential(*upper_modules)
    block = model.get_submodule(first_trainable)
    if any(p.requires_grad for p in lower.parameters()) or not _same_output(model, lower, upper, block, image_size):
        return None
    return lower, upper


def _forward_chain(model: nn.Module, target: str, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Children in registration order, opening the plain containers (Sequential, ModuleList) that hold `target`."""
    chain: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        dotted = f"{prefix}{name}"
        if target.startswith(dotted + ".") and isinstance(child, (nn.Sequential, nn.ModuleList)):
            chain += _forward_chain(child, target, dotted + ".")
        else:
            chain.append((dotted, child))
    return chain


@torch.no_grad()
def _same_output(model: nn.Module, lower: nn.Module, upper: nn.Module, block: nn.Module, image_size: int) -> bool:
    """On a random batch: `lower` gives exactly what the block receives inside the model's own forward, and
    `upper` turns that into the model's output (each compared at the scale of the tensor)."""
    was_training = model.training
    model.eval()
    seen: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        device = next(model.parameters()).device
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
        want = model(x)
        inside, mine = seen[0], lower(x)
        return _close(mine, inside) and _close(upper(inside), want)
    except (RuntimeError, TypeError, ValueError, IndexError):   # shapes that do not chain: not a plain chain
        return False
    finally:
        hook.remove()
        model.train(was_training)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.abs().max()) or 1.0
    return got.shape == want.shape and bool(((got - want).abs().max() <= 1e-4 * scale))
