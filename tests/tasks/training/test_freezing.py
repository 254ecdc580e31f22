"""Splitting a model at its first trainable block: only where the pieces reproduce the model's own forward."""

from __future__ import annotations

import pytest
import torch

from tasks.lib.models import build_model
from tasks.training.freezing import set_trainable, split_frozen_prefix


@pytest.mark.parametrize(("arch", "first"), [
    ("efficientnet_lite0", "blocks.4"),       # timm: conv_stem, bn1, blocks.*, conv_head, ... classifier
    ("mobilenet_v3_small", "features.10"),    # torchvision: features.*, avgpool, (flatten), classifier
    ("resnet18", "layer2"),                   # conv1 ... layer4, avgpool, (flatten), fc
])
def test_a_plain_chain_splits_into_a_frozen_bottom_and_a_trainable_top(arch: str, first: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    assert set_trainable(model, "last_n", 3) == [first]
    lower, upper = split_frozen_prefix(model, first, 64)
    assert not any(p.requires_grad for p in lower.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in upper.parameters() if p.requires_grad}   # every trainable weight is in the top
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(upper(lower(x)), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["googlenet", "convnext_tiny", "densenet121"])
def test_a_forward_that_is_not_a_chain_is_not_split(arch: str) -> None:
    # googlenet transforms its input first, convnext's classifier wants 4-d input after the pool,
    # densenet applies a ReLU in forward() that is no module: each would train a different model.
    model = build_model(arch, 4)
    first = set_trainable(model, "last_n", 1)[0]
    assert split_frozen_prefix(model, first, 64) is None


def test_nothing_to_split_when_everything_trains() -> None:
    model = build_model("resnet18", 4)
    assert set_trainable(model, "all") == [""]
    assert split_frozen_prefix(model, "", 64) is None
