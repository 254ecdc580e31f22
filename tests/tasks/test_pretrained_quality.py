"""The packaged efficientnet_lite0 weights are mapped right: sensible ImageNet top-5, useful features.

A wrong by-position mapping or wrong preprocessing still loads strictly, so only the
model's behaviour can show it; these tests run it through the record's own preprocessing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.fetch_weights import fetch_weights
from tasks.lib.config import ModelParams
from tasks.lib.models import build_backbone, feature_extractor
from tasks.lib.preprocess import Preprocessing, preprocess
from tasks.lib.weights import load_backbone_state

# ImageNet classes a photo of a Chinese temple may sensibly get.
BUILDINGS = {"palace", "bell cote", "church", "monastery", "stupa", "mosque", "dome", "boathouse", "castle",
             "triumphal arch", "cinema", "library", "thatch", "beacon", "altar", "lakeside"}


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("lite0")
    fetch_weights(ModelParams(arch="efficientnet_lite0", weights="packaged", out_dir=tmp / "out", hub_dir=tmp / "hub"))
    state, record = load_backbone_state(tmp / "out")
    assert state is not None
    return state, record


def imagenet_top5(model: torch.nn.Module, img: Image.Image, prep: Preprocessing) -> list[str]:
    import torchvision

    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(img, prep))[None])[0]
    return [categories[i] for i in logits.topk(5).indices.tolist()]


@pytest.mark.slow
def test_imagenet_top5_on_sample_photos_is_sensible(lite0: tuple[dict, dict]) -> None:
    from sklearn.datasets import load_sample_image

    state, record = lite0
    model = build_backbone("efficientnet_lite0").eval()
    model.load_state_dict(state, strict=True)
    prep = Preprocessing.from_dict(record["preprocessing"])
    china = imagenet_top5(model, Image.fromarray(load_sample_image("china.jpg")), prep)
    flower = imagenet_top5(model, Image.fromarray(load_sample_image("flower.jpg")), prep)
    # Measured: china.jpg -> palace 0.33, bell cote, boathouse, lakeside, beacon;
    #           flower.jpg -> daisy 0.16, honeycomb, mushroom, chambered nautilus, lampshade.
    assert china[0] in BUILDINGS and len(BUILDINGS.intersection(china)) >= 3, china
    assert "daisy" in flower, flower


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format): magic with the number of dims, big-endian sizes, then uint8 data."""
    with gzip.open(path) as handle:
        data = handle.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def features(state: dict | None, images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    torch.manual_seed(0)  # the random-init baseline is the same network every run
    model = build_backbone("efficientnet_lite0")
    if state is not None:
        model.load_state_dict(state, strict=True)
    extractor = feature_extractor(model).eval()
    batch = np.stack([preprocess(Image.fromarray(img).convert("RGB"), prep) for img in images])
    with torch.no_grad():
        return extractor(torch.from_numpy(batch)).numpy()


@pytest.mark.slow
def test_pretrained_features_beat_random_init_on_fashion_mnist(lite0: tuple[dict, dict], fashion_mnist: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    state, record = lite0
    images, labels = read_idx(fashion_mnist / "train-images-idx3-ubyte.gz"), read_idx(fashion_mnist / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:50] for c in range(10)]
    train = np.concatenate([p[:30] for p in picks])  # 30 train / 20 test images per class
    test = np.concatenate([p[30:] for p in picks])
    pretrained = Preprocessing.from_dict(record["preprocessing"])
    prep = Preprocessing(crop_size=96, resize_size=96, interpolation=pretrained.interpolation,
                         mean=pretrained.mean, std=pretrained.std)

    accuracy = {}
    for name, weights in (("pretrained", state), ("random", None)):
        train_x, test_x = features(weights, images[train], prep), features(weights, images[test], prep)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        with threadpool_limits(1):  # many BLAS threads on 2 busy cores made this fit 100x slower
            probe.fit(train_x, labels[train])
        accuracy[name] = probe.score(test_x, labels[test])
    # Measured (96 px, 30 train / 20 test per class): pretrained 0.80, random init 0.605 (this
    # sample); over 8 other samples pretrained 0.73-0.83, random 0.56-0.66, margin 0.10-0.20.
    # With 60/30 per class: 0.80 vs 0.63; with ImageNet mean/std instead of 0.5/0.5 pretrained drops to 0.73.
    assert accuracy["pretrained"] >= 0.70, accuracy
    assert accuracy["pretrained"] >= accuracy["random"] + 0.08, accuracy
