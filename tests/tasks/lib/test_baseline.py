"""The built-in pixel baseline is scikit-learn's LogisticRegression, on the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.lib.baseline import fit_pixel_baseline, pixel_geometry, pixel_matrix, stratified_subset
from tasks.lib.split_files import SplitRow


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SplitRow], list[SplitRow]]:
    """scikit-learn's 8x8 digits as grey PNGs, every fourth image held out."""
    from sklearn.datasets import load_digits

    raw = tmp_path_factory.mktemp("digits")
    data = load_digits()
    rows = []
    for index, (image, label) in enumerate(zip(data.images, data.target)):
        path = f"{label}/{index:04d}.png"
        (raw / str(label)).mkdir(exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(raw / path)
        rows.append(SplitRow(path, int(label), ""))
    return raw, [r for i, r in enumerate(rows) if i % 4], rows[::4]


def test_matches_scikit_learn_logistic_regression(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    raw, train, test = digits
    baseline = fit_pixel_baseline(train, raw, 10, max_images=5000)
    assert baseline.geometry.describe() == "8x8 grey pixels" and baseline.train_images == len(train)
    ours = baseline.predict([raw / r.path for r in test])

    x_train = pixel_matrix([raw / r.path for r in train], baseline.geometry)
    x_test = pixel_matrix([raw / r.path for r in test], baseline.geometry)
    scaler = StandardScaler().fit(x_train)
    sklearn = LogisticRegression(max_iter=5000).fit(scaler.transform(x_train), [r.label for r in train])
    theirs = sklearn.predict(scaler.transform(x_test))
    labels = np.array([r.label for r in test])
    assert (ours == theirs).mean() >= 0.98                  # the same model, up to the solver's last steps
    assert abs((ours == labels).mean() - (theirs == labels).mean()) <= 0.01
    assert (ours == labels).mean() > 0.9


def test_colour_images_keep_their_channels_and_large_ones_are_shrunk(tmp_path):
    grey = Image.new("L", (64, 48), 100).convert("RGB")
    colour = Image.new("RGB", (300, 200), (200, 10, 10))
    grey.save(tmp_path / "grey.png")
    colour.save(tmp_path / "colour.png")
    assert pixel_geometry([tmp_path / "grey.png"]).describe() == "28x28 grey pixels"
    both = pixel_geometry([tmp_path / "grey.png", tmp_path / "colour.png"])
    assert not both.grey and pixel_matrix([tmp_path / "colour.png"], both).shape == (1, 28 * 28 * 3)


def test_stratified_subset_keeps_every_class():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    picked = stratified_subset(labels, 100)
    assert len(picked) <= 100 and set(labels[picked]) == {0, 1, 2}
    assert np.array_equal(picked, stratified_subset(labels, 100)) and np.all(np.diff(picked) > 0)
    assert len(stratified_subset(labels, 5000)) == 1000
