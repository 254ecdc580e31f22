"""Every probability the handoff hands out, against an oracle that shares no code with the pipeline.

A real prepare -> train -> evaluate -> export run on a folder shaped like a user's: class names
that sort differently by code point, case-insensitively and by locale ("10 items", "Zebra",
"apple", "éclair"), non-square images of several sizes as RGB JPEG (one with an EXIF rotation),
grayscale PNG and half-transparent RGBA PNG. The oracle reads model.pt with torch.load, builds
the network with torchvision, decodes and preprocesses each file with Pillow and numpy from the
checkpoint's recorded size, interpolation, mean and std, and computes softmax(logits / T) itself.
Evaluate's numbers, the ONNX file's `probabilities` output and `predict --json` must all agree
with it, and every class index must mean the class classes.json gives it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from tasks import decode_cache, evaluate, export
from tasks.lib.config import Params
from tasks.lib.io import write_json
from tasks.prepare import run as prepare
from tasks.train import train
from tests.tasks.handoff.test_predict import predict
from tests.tasks.test_train import tiny_params, write_weights

# Code-point order (what prepare promises: sorted()); case-insensitive and locale orders differ.
CLASSES = ["10 items", "Zebra", "apple", "éclair"]
# Not ImageNet's: a pipeline that ignores the checkpoint's mean/std gives other numbers.
MEAN, STD = [0.45, 0.5, 0.4], [0.2, 0.25, 0.3]
# Wider and taller than they are square, odd and even: squashing, cropping off-centre or
# resizing the longer side all give other pixels.
SIZES = [(48, 36), (36, 56), (61, 40), (41, 33), (44, 70)]
PER_CLASS = 12
# Red, green, blue, yellow: apart in colour, and in brightness once converted to grayscale.
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 40]])
EXIF_ORIENTATION = 0x0112
ATOL = 3e-5   # float32 onnxruntime vs float32 torch (4e-6 seen), and predict's 6 printed decimals


def write_user_folder(raw: Path) -> None:
    """Each class a colour (so training learns something), each image noise on it in one of four forms."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = raw / name
        folder.mkdir(parents=True)
        base = COLOURS[c]
        for i in range(PER_CLASS):
            width, height = SIZES[(i + c) % len(SIZES)]
            pixels = np.clip(base + rng.integers(-40, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            kind = i % 4
            if kind == 0:
                image.save(folder / f"photo {i:02d}.jpg", quality=90)
            elif kind == 1:
                image.convert("L").save(folder / f"scan_{i:02d}.png")
            elif kind == 2:
                alpha = rng.integers(0, 256, size=(height, width), dtype=np.uint8)   # see-through in places
                Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(folder / f"cut-out_{i:02d}.png")
            else:   # stored sideways, shown upright: EXIF orientation 6 (rotate 90 degrees clockwise)
                exif = Image.Exif()
                exif[EXIF_ORIENTATION] = 6
                image.save(folder / f"phone_{i:02d}.JPG", quality=90, exif=exif.tobytes())


def pipeline_params(root: Path) -> Params:
    return tiny_params(root, **{
        "train.head.epochs": 3, "train.finetune.epochs": 0,
        "prepare.num_workers": 1, "cache.num_workers": 1,
        "evaluate.out_dir": str(root / "artifacts" / "evaluate"), "evaluate.device": "cpu",
        "evaluate.batch_size": 5, "evaluate.worst_mistakes": 2,
        "export.out_dir": str(root / "artifacts" / "export"), "export.latency_runs": 5,
        "export.parity_batch_sizes": [1, 3],
        # The stand-in backbone (random, BatchNorm fitted on noise) gives logits up to ~35, whose float32
        # rounding differs between onnxruntime and torch by ~1.5e-4, over the default absolute 1e-4.
        "export.atol": 1e-3})


def set_weights_mean_std(weights_dir: Path) -> None:
    record_path = weights_dir / "weights.json"
    record = json.loads(record_path.read_text())
    record["preprocessing"].update(mean=MEAN, std=STD)
    write_json(record_path, record)


def widen_recorded_preprocessing(checkpoint: Path) -> None:
    """Train always records resize == crop and bilinear; a checkpoint may carry any resize (timm's crop_pct)
    and interpolation, and every consumer must honour them. Rewritten here so a consumer that resizes to
    crop_size or always uses bilinear shows up."""
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["preprocessing"]["resize_size"] == payload["preprocessing"]["crop_size"] == 32
    payload["preprocessing"].update(resize_size=38, interpolation="bicubic")
    torch.save(payload, checkpoint)


@pytest.fixture(scope="module")
def handoff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Prepare, train, evaluate and export on the user-shaped folder; what each wrote."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 2 shared cores: spinning OpenMP threads make millisecond steps take seconds
    root = tmp_path_factory.mktemp("oracle")
    write_user_folder(root / "data" / "raw")
    params = pipeline_params(root)
    write_weights(Path(params.model.out_dir), params.model.arch)
    set_weights_mean_std(Path(params.model.out_dir))
    prepare(params)
    decode_cache.run(params)
    train(params)
    widen_recorded_preprocessing(Path(params.train.out_dir) / "model.pt")
    metrics = evaluate.run(params)
    export.run(params)
    yield {"params": params, "metrics": metrics}
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the oracle


def oracle_input(path: Path, prep: dict[str, Any]) -> np.ndarray:
    """The network's float32 (3, crop, crop) input, from the recorded settings alone.

    Upright by EXIF, transparency over white, shorter side to resize_size (the longer one
    rounded), the central crop (offset rounded down), /255, minus mean, over std.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if "A" in image.getbands():
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    side, crop = prep["resize_size"], prep["crop_size"]
    scale = side / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    pixels = np.asarray(image.resize((width, height), filters[prep["interpolation"]]), dtype=np.float64)
    top, left = (height - crop) // 2, (width - crop) // 2
    pixels = pixels[top:top + crop, left:left + crop] / 255.0
    pixels = (pixels - np.array(prep["mean"])) / np.array(prep["std"])
    return pixels.transpose(2, 0, 1).astype(np.float32)


def oracle(checkpoint: Path, files: list[Path]) -> dict[str, Any]:
    """Logits and probabilities computed from model.pt with plain torch."""
    payload = torch.load(checkpoint, weights_only=True)
    network = torchvision.models.get_model(payload["arch"], weights=None, num_classes=len(payload["class_names"]))
    network.load_state_dict(payload["state_dict"])
    network.eval()
    inputs = np.stack([oracle_input(path, payload["preprocessing"]) for path in files])
    with torch.no_grad():
        logits = network(torch.from_numpy(inputs)).double()
    temperature = float(payload["temperature"])
    return {"inputs": inputs, "logits": logits.numpy(), "temperature": temperature,
            "class_names": payload["class_names"],
            "probs": torch.softmax(logits / temperature, dim=1).numpy(),
            "raw_probs": torch.softmax(logits, dim=1).numpy()}


def split_files(params: Params, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The split's files and labels, each label checked against its folder's place in classes.json."""
    with open(Path(params.data.prepared_dir) / f"{split}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(row["label"]) for row in rows])
    assert [classes[label] for label in labels] == [Path(row["path"]).parts[0] for row in rows]
    return [Path(params.data.raw_dir) / row["path"] for row in rows], labels


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


# --------------------------------------------------------------------------- the test


@pytest.mark.slow(seconds=75)
def test_evaluate_onnx_and_predict_hand_out_the_checkpoints_calibrated_probabilities(
        handoff: dict[str, Any], tmp_path: Path) -> None:
    params = handoff["params"]
    prepared, raw = Path(params.data.prepared_dir), Path(params.data.raw_dir)
    classes = json.loads((prepared / "classes.json").read_text())
    assert classes == CLASSES == sorted(CLASSES)    # prepare: folder names in code-point order
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    truth = oracle(Path(params.train.out_dir) / "model.pt", files)
    assert truth["class_names"] == classes
    # The fixture has the power to tell: the fitted temperature moves probabilities far beyond ATOL,
    # and the files come in every mode and shape.
    assert abs(math.log(truth["temperature"])) > 0.05, truth["temperature"]
    assert np.abs(truth["probs"] - truth["raw_probs"]).max() > 100 * ATOL
    with Image.open(files[0]) as first:
        assert first.size != (32, 32)
    test_files, test_labels = split_files(params, "test", classes)
    modes = set()
    for path in test_files:
        with Image.open(path) as image:
            modes.add((image.format, image.mode, image.getexif().get(EXIF_ORIENTATION, 1)))
    assert {("JPEG", "RGB", 1), ("JPEG", "RGB", 6), ("PNG", "L", 1), ("PNG", "RGBA", 1)} <= modes, modes

    check_evaluate(handoff, files, truth, test_files, test_labels, classes)
    check_onnx(Path(params.export.out_dir) / "model.onnx", truth, classes)
    check_predict(Path(params.export.out_dir) / "model.onnx", files, truth, classes, tmp_path)


def check_evaluate(handoff: dict[str, Any], files: list[Path], truth: dict[str, Any], test_files: list[Path],
                   test_labels: np.ndarray, classes: list[str]) -> None:
    """The stage's stored numbers are those of the oracle's probabilities on the test split, in its order."""
    params, metrics = handoff["params"], handoff["metrics"]
    rows = [files.index(path) for path in test_files]
    probs, raw_probs = truth["probs"][rows], truth["raw_probs"][rows]
    assert metrics["temperature"] == pytest.approx(truth["temperature"], abs=1e-6)
    assert metrics["log_loss"] == pytest.approx(log_loss(probs, test_labels), abs=1e-5)
    assert metrics["log_loss_uncalibrated"] == pytest.approx(log_loss(raw_probs, test_labels), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx((probs.argmax(1) == test_labels).mean(), abs=1e-6)
    stored = json.loads((Path(params.evaluate.out_dir) / "predictions.json").read_text())
    assert stored["label"] == test_labels.tolist() and stored["predicted"] == probs.argmax(1).tolist()
    plots = Path(params.reports.dir) / "evaluate"
    assert [row["class"] for row in json.loads((plots / "per_class_f1.json").read_text())] == classes
    assert list(metrics["per_class"]) == classes
    confusion = json.loads((plots / "confusion.json").read_text())
    assert [row["actual"] for row in confusion] == [classes[label] for label in test_labels]
    assert [row["predicted"] for row in confusion] == [classes[p] for p in probs.argmax(1)]


def check_onnx(model: Path, truth: dict[str, Any], classes: list[str]) -> None:
    """The exported file's calibrated output on the oracle's inputs, and the names it carries."""
    metadata = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    assert json.loads(metadata["class_names"]) == classes
    recorded = json.loads(metadata["preprocessing"])
    assert (recorded["resize_size"], recorded["crop_size"], recorded["interpolation"]) == (38, 32, "bicubic")
    assert recorded["mean"] == pytest.approx(MEAN) and recorded["std"] == pytest.approx(STD)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probabilities"], {"input": truth["inputs"]})
    np.testing.assert_allclose(logits, truth["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probs, truth["probs"], atol=ATOL)


def check_predict(model: Path, files: list[Path], truth: dict[str, Any], classes: list[str], tmp_path: Path) -> None:
    """`predict --json` on the files themselves: every class's probability under the right name and index."""
    proc = predict([str(model), *map(str, files), "--json", "-k", str(len(classes)), "--batch-size", "7"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results] == [str(p) for p in files]
    for result, row in zip(results, truth["probs"], strict=True):
        got = {p["label"]: p["probability"] for p in result["predictions"]}
        assert all(classes[p["index"]] == p["label"] for p in result["predictions"]), result
        np.testing.assert_allclose([got[name] for name in classes], row, atol=ATOL, err_msg=result["file"])
        assert result["predictions"][0]["label"] == classes[int(row.argmax())]
