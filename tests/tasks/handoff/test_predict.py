"""The predict command: runs where torch cannot be imported and agrees with the PyTorch model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from tasks import export
from tasks.lib.images import load_rgb
from tasks.lib.models import load_checkpoint
from tasks.lib.preprocess import preprocess
from tests.conftest import REPO_ROOT, VENV_BIN
from tests.tasks.test_evaluate import make_project

# Put on PYTHONPATH, this makes every `import torch` (and torchvision, timm) raise in the child process.
NO_TORCH = '''
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"import of {name} blocked: predict must work without torch")
        return None

sys.meta_path.insert(0, NoTorch())
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A resnet18 checkpoint, its validated ONNX export, and the raw images."""
    root = tmp_path_factory.mktemp("predict")
    params = make_project(root)
    export.run(params)
    return {"onnx": Path(params.export.out_dir) / "model.onnx", "ckpt": Path(params.train.out_dir) / "model.pt",
            "raw": Path(params.data.raw_dir), "root": root}


def predict(args: list[str], tmp_path: Path, script: bool = False) -> subprocess.CompletedProcess:
    """Run predict in a child process in which importing torch raises."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO_ROOT)])}
    cmd = [str(VENV_BIN / "predict")] if script else [sys.executable, "-m", "tasks.handoff.predict"]
    return subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_blocker_really_blocks_torch(tmp_path: Path) -> None:
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    proc = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(blocker)},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "predict must work without torch" in proc.stderr


@pytest.mark.slow
def test_predict_without_torch_matches_pytorch(exported: dict[str, Path], tmp_path: Path) -> None:
    images = sorted(exported["raw"].rglob("*.png"))[::3]
    proc = predict([str(exported["onnx"]), *map(str, images), "--json", "-k", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results] == [str(p) for p in images]

    model, meta = load_checkpoint(exported["ckpt"])
    batch = torch.from_numpy(np.stack([preprocess(load_rgb(p), meta["preprocessing"]) for p in images]))
    with torch.no_grad():
        probs = torch.softmax(model(batch).double(), dim=1).numpy()
    for result, row in zip(results, probs, strict=True):
        top = result["predictions"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
        assert top[0]["label"] == meta["class_names"][int(row.argmax())]
        assert top[0]["probability"] == pytest.approx(row.max(), abs=1e-4)


@pytest.mark.slow
def test_bad_images_get_their_own_error_and_the_rest_are_predicted(exported: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    good = sorted(exported["raw"].rglob("*.png"))[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image name: skipped when scanning a folder")
    missing = tmp_path / "missing.png"

    proc = predict([str(exported["onnx"]), str(folder), str(missing)], tmp_path, script=True)
    assert proc.returncode == 1, proc.stderr  # some inputs failed
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {str(folder / n) for n in ("broken.png", "empty.jpg", "img_000.png", "img_001.png")} | {
        str(missing)}
    assert "ERROR empty_file" in lines[str(folder / "empty.jpg")]
    assert "ERROR" in lines[str(folder / "broken.png")] and "ERROR FileNotFoundError" in lines[str(missing)]
    assert "class_" in lines[str(folder / "img_000.png")] and "ERROR" not in lines[str(folder / "img_000.png")]
    assert "3 of 5 file(s) could not be predicted" in proc.stderr

    only_bad = predict([str(exported["onnx"]), str(folder / "broken.png"), "--json"], tmp_path)
    assert only_bad.returncode == 1  # nothing could be predicted either
    assert "error" in json.loads(only_bad.stdout)[0]


@pytest.mark.slow
def test_a_model_without_metadata_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(exported["onnx"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    image = next(exported["raw"].rglob("*.png"))
    proc = predict([str(bare), str(image)], tmp_path)
    assert proc.returncode == 2 and "class_names, preprocessing" in proc.stderr and "tasks.export" in proc.stderr
    proc = predict([str(tmp_path / "nope.onnx"), str(image)], tmp_path)
    assert proc.returncode == 2 and "model file not found" in proc.stderr


@pytest.mark.slow
def test_an_extreme_aspect_ratio_is_refused_per_file_and_the_others_predicted(exported: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"
    Image.new("L", (1, 300000)).save(thin, optimize=True)     # a few hundred bytes; resizing it whole needs ~11 GB
    good = next(exported["raw"].rglob("*.png"))
    proc = predict([str(exported["onnx"]), str(thin), str(good), "--json"], tmp_path)
    assert proc.returncode == 1, proc.stderr  # one input failed
    thin_result, good_result = json.loads(proc.stdout)
    assert thin_result["error"].startswith("extreme_aspect_ratio") and "predictions" in good_result
    allowed = predict([str(exported["onnx"]), str(thin), "--json", "--max-aspect-ratio", "400000"], tmp_path)
    assert allowed.returncode == 0 and "predictions" in json.loads(allowed.stdout)[0]


# --------------------------------------------------------------------------- untrusted models, registries, names


def tiny_model(path: Path, **metadata: str) -> Path:
    """The tiny 3-class ONNX classifier of the registry tests, with metadata entries replaced."""
    from tests.tasks.handoff.test_publish import make_onnx

    make_onnx(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props} | metadata
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    from tests.conftest import write_image_folder

    return sorted(write_image_folder(tmp_path / "img", classes=3, per_class=1).rglob("*.png"))


@pytest.mark.parametrize(("metadata", "message"), [
    ({"class_names": "[oops"}, "metadata class_names is not valid JSON"),
    ({"class_names": '["a", "b"]'}, "outputs (3,) logits but its metadata names 2 classes"),
    ({"class_names": '["a", "a", "b"]'}, "lists a class twice"),
    ({"class_names": '{"a": 1}'}, "class_names must be a non-empty list"),
    ({"preprocessing": '{"crop_size": 32}'}, "metadata preprocessing is unusable (KeyError"),
    ({"preprocessing": '{"crop_size": 48, "resize_size": 48, "interpolation": "bilinear", "mean": [0, 0, 0], '
                       '"std": [1, 1, 1]}'}, "does not accept a 48x48 image"),
    ({"preprocessing": '{"crop_size": 32, "resize_size": 32, "interpolation": "bilinear", "mean": [0, 0, 0], '
                       '"std": [1, 0, 1]}'}, "std positive"),
])
def test_unusable_metadata_exits_2_naming_the_problem(tmp_path: Path, images: list[Path], capsys,
                                                       metadata: dict[str, str], message: str) -> None:
    from tasks.handoff import predict as predict_module

    model = tiny_model(tmp_path / "model.onnx", **metadata)
    assert predict_module.main([str(model), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: ") and message in err and "Traceback" not in err


def test_exit_status_says_whether_every_input_was_predicted(tmp_path: Path, images: list[Path], capsys) -> None:
    from tasks.handoff import predict as predict_module

    model = tiny_model(tmp_path / "model.onnx")
    assert predict_module.main([str(model), *map(str, images)]) == 0
    assert predict_module.main([str(model), str(images[0]), str(tmp_path / "missing.png")]) == 1
    assert "1 of 2 file(s) could not be predicted" in capsys.readouterr().err


def test_class_names_with_control_characters_are_escaped_in_the_table(tmp_path: Path, images: list[Path],
                                                                      capsys) -> None:
    from tasks.handoff import predict as predict_module

    model = tiny_model(tmp_path / "model.onnx", class_names=json.dumps(["\x1b[2Jred", "green\nfake row", "b"]))
    assert predict_module.main([str(model), str(images[0]), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jred" in out and "green\\nfake row" in out and len(out.splitlines()) == 1


@pytest.mark.slow
def test_predict_from_a_registry_without_torch(tmp_path: Path, images: list[Path]) -> None:
    from tasks.handoff.publish import publish_candidate
    from tests.tasks.handoff.test_publish import make_params, make_project, set_candidate

    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="v1", macro_f1=0.8)
    v1 = publish_candidate(params, root, None)["registry_version"]
    registry = ["--registry", str(root / "registry"), "--name", params.project.name]
    proc = predict([*registry, str(images[2]), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["predictions"][0]["label"] == "class_2"
    assert predict([*registry, "--version", v1, str(images[0])], tmp_path).returncode == 0

    (root / "registry" / params.project.name / v1 / "model.onnx").write_bytes(b"tampered")
    proc = predict([*registry, str(images[0])], tmp_path)
    assert proc.returncode == 2 and f"{v1} does not verify: model.onnx sha256" in proc.stderr
    proc = predict(["--registry", str(root / "registry"), "--name", "nobody", str(images[0])], tmp_path)
    assert proc.returncode == 2 and "no production version of nobody" in proc.stderr


# --------------------------------------------------------------------------- hostile sizes and outputs, memory


def probabilities_model(path: Path, crop: int = 32, probabilities: str = "softmax", **metadata: str) -> Path:
    """A tiny classifier (average pool, then a linear layer: 3 classes) whose input side is free, so its metadata
    may claim any size; its `probabilities` output is a softmax, or a broken one:
    nan_on_images: NaN for any image that is not blank; wide: two values per class; nan: NaN for every input."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["softmax"], axis=1)]
    nodes += {
        "softmax": [helper.make_node("Identity", ["softmax"], ["probabilities"])],
        "wide": [helper.make_node("Concat", ["softmax", "softmax"], ["probabilities"], axis=1)],
        "nan": [helper.make_node("Div", ["softmax", "zero"], ["inf"]),
                helper.make_node("Sub", ["inf", "inf"], ["probabilities"])],
        "nan_on_images": [helper.make_node("ReduceSumSquare", ["input"], ["energy"], axes=[1, 2, 3], keepdims=1),
                          helper.make_node("Flatten", ["energy"], ["energy2"], axis=1),
                          helper.make_node("Neg", ["energy2"], ["negative"]),
                          helper.make_node("Sqrt", ["negative"], ["root"]),        # NaN unless the image is blank
                          helper.make_node("Add", ["softmax", "root"], ["probabilities"])],
    }[probabilities]
    weight = np.eye(3, dtype=np.float32) * 4
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, 3], weight.flatten().tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [3], [0.0] * 3),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    prep = {"crop_size": crop, "resize_size": crop, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    helper.set_model_props(model, {"class_names": json.dumps(["red", "green", "blue"]),
                                   "preprocessing": json.dumps(prep), **metadata})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("preprocessing", "message"), [
    ({"crop_size": 8192, "resize_size": 8192}, "crop_size 8192 is not between 1 and 1024 px"),
    ({"crop_size": 32, "resize_size": 8192}, "resize_size 8192 is more than 2 times crop_size 32"),
])
def test_a_model_claiming_a_huge_input_is_refused_before_any_image_is_read(
        tmp_path: Path, images: list[Path], capsys, preprocessing: dict[str, int], message: str) -> None:
    """A 355-byte ONNX file whose metadata claimed 8192 px once made two images take 3.4 GB."""
    from tasks.handoff import predict as predict_module

    prep = {"interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3, **preprocessing}
    model = probabilities_model(tmp_path / "huge.onnx", preprocessing=json.dumps(prep))
    assert model.stat().st_size < 1000
    assert predict_module.main([str(model), *map(str, images)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {model}: metadata preprocessing is unusable ({message}")


@pytest.mark.parametrize(("broken", "message"), [
    ("wide", "its probabilities output has shape (1, 6) for 1 image(s), not (1, 3) (one value per class)"),
    ("nan", "its probabilities output gives NaN, infinite or negative probabilities for 1 of 1 image(s)"),
    ("nan_on_images", "its probabilities output gives NaN, infinite or negative probabilities for 3 of 3 image(s)"),
])
def test_probabilities_of_the_wrong_shape_or_nan_make_the_model_unusable(tmp_path: Path, images: list[Path],
                                                                          capsys, broken: str, message: str) -> None:
    from tasks.handoff import predict as predict_module

    good = probabilities_model(tmp_path / "good.onnx")
    assert predict_module.main([str(good), *map(str, images), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3

    model = probabilities_model(tmp_path / f"{broken}.onnx", probabilities=broken)
    assert predict_module.main([str(model), *map(str, images), "--json"]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {model}: model unusable: {message}; re-export the model\n"
    assert "nan" not in out.lower() and "probability" not in out   # nothing was printed as a prediction


def peak_rss_of_predict(model: Path, folder: Path, tmp_path: Path) -> int:
    """Peak resident memory (bytes) of a real predict process over every image of folder.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking process (pytest's)."""
    measure = ("import re, sys; from tasks.handoff.predict import main; code = main(sys.argv[1:]); "
               "status = open('/proc/self/status').read(); "
               "print('peak', re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1), file=sys.stderr); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", measure, str(model), str(folder), "--threads", "1"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.split("peak ")[-1]) * 1024


@pytest.mark.slow(seconds=15)
def test_predict_memory_does_not_grow_with_the_number_of_inputs(tmp_path: Path) -> None:
    """It held every preprocessed image until the end: 110 KB each at 96 px, 706 MB for 5,000 files."""
    model = probabilities_model(tmp_path / "model.onnx", crop=96)
    png = tmp_path / "one.png"
    Image.new("RGB", (8, 8), "teal").save(png)
    folders = {}
    for n in (200, 2000):
        folders[n] = tmp_path / f"inbox-{n}"
        folders[n].mkdir()
        for i in range(n):
            (folders[n] / f"img_{i:05d}.png").write_bytes(png.read_bytes())
    small, large = (peak_rss_of_predict(model, folders[n], tmp_path) for n in (200, 2000))
    # Holding the 1,800 more images would take 1800 * 3 * 96 * 96 * 4 bytes = 199 MB more.
    assert large - small < 20 * 2**20, f"peak RSS {small / 2**20:.0f} MB for 200 images, {large / 2**20:.0f} MB for 2000"


@pytest.mark.parametrize("as_json", [False, True])
def test_results_are_printed_a_batch_at_a_time_in_input_order(tmp_path: Path, images: list[Path],
                                                              monkeypatch: pytest.MonkeyPatch, capsys,
                                                              as_json: bool) -> None:
    from tasks.handoff import predict as predict_module
    from tasks.lib.onnx_classifier import Classifier

    model = probabilities_model(tmp_path / "model.onnx")
    folder = images[0].parent.parent
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "skip.png").write_bytes(images[0].read_bytes())
    expected = [*map(str, images), str(tmp_path / "missing.png"), str(images[0])]
    # Count the images read when the first result reaches stdout (the real loader still reads them).
    loaded, read_before_output = [], []
    real_load = Classifier.load
    monkeypatch.setattr(Classifier, "load", lambda self, path, limits=None: (
        loaded.append(path), real_load(self, path, limits))[1])
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda text: (read_before_output.append(len(loaded)), real_write(text))[1])

    args = [str(model), str(folder), expected[3], expected[4], "--batch-size", "2"]
    assert predict_module.main(args + (["--json"] if as_json else [])) == 1
    out = capsys.readouterr().out
    shown = [r["file"] for r in json.loads(out)] if as_json else [line.split()[0] for line in out.splitlines()]
    assert shown == expected
    assert read_before_output[0] == 2      # the first batch was printed before the next image was read


# --------------------------------------------------------------------------- what a user reads: every value checked
#
# In process (mutation testing switches its planted bugs inside this process), with models whose
# probabilities an independent oracle knows: a linear layer over the channel means of the input.

def linear_model(path: Path, class_names: list[str], weight: np.ndarray, bias: np.ndarray, crop: int = 32) -> Path:
    """logits = mean of each input channel @ weight (3 x classes) + bias; no probabilities output, so predict
    reports the softmax of the logits. Preprocessing: resize + crop to `crop`, mean 0.5, std 0.25."""
    from onnx import TensorProto, helper

    n = len(class_names)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, n], np.asarray(weight, np.float32).flatten().tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [n], np.asarray(bias, np.float32).tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    prep = {"crop_size": crop, "resize_size": crop, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    helper.set_model_props(model, {"class_names": json.dumps(class_names), "preprocessing": json.dumps(prep)})
    onnx.save(model, str(path))
    return path


def softmax64(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return exp / exp.sum()


def tree_order(root: Path, files: list[Path]) -> list[Path]:
    """Depth first, each folder's names in code-point order: sorting by the path's components."""
    return sorted(files, key=lambda path: path.relative_to(root).parts)


def test_predictions_are_the_models_top_k_probabilities_for_realistic_images(tmp_path: Path, capsys) -> None:
    """Non-square JPEG/PNG images (RGB, grayscale, RGBA) and class names with spaces, digits and accents: each
    file's top 3 (the default) labels, indexes and probabilities are the ones recomputed from the metadata's
    preprocessing with an independent oracle, best first; the JSON is one indented array whatever the batching."""
    from tasks.handoff import predict as predict_module
    from tests.realistic import CLASS_NAMES, COLOURS, oracle_input, write_realistic_folder

    inbox = tmp_path / "inbox"
    written = write_realistic_folder(inbox, per_class=2)
    weight = (np.asarray(COLOURS, np.float64).T / 255 - 0.5) * 3   # each class leans towards its own colour
    bias = np.array([0.3, -0.2, 0.1, 0.0, -0.4, 0.2])
    model = linear_model(tmp_path / "model.onnx", list(CLASS_NAMES), weight, bias)
    prep = json.loads(next(p.value for p in onnx.load(str(model)).metadata_props if p.key == "preprocessing"))

    code = predict_module.main([str(model), str(inbox), "--json", "--batch-size", "5", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads(out)
    assert out == json.dumps(results, indent=2) + "\n"       # one array, indented as one, across three batches
    files = tree_order(inbox, [inbox / w.path for w in written])
    assert [r["file"] for r in results] == [str(path) for path in files]
    for result, path in zip(results, files, strict=True):
        probs = softmax64(oracle_input(path, prep).astype(np.float64).mean(axis=(1, 2)) @ weight + bias)
        best = sorted(range(len(CLASS_NAMES)), key=lambda j: -probs[j])[:3]
        assert result["predictions"] == [
            {"label": CLASS_NAMES[j], "index": j, "probability": pytest.approx(probs[j], abs=2e-6)} for j in best
        ], path.name
        assert all(p["probability"] == round(p["probability"], 6) for p in result["predictions"])  # 6 decimals

    assert predict_module.main([str(model), str(inbox)]) == 0   # the table: one batch, names aligned
    width = max(len(r["file"]) for r in results)
    assert capsys.readouterr().out.splitlines() == [
        f"{r['file']:<{width}}  " + "  ".join(f"{p['label']} {p['probability']:.4f}" for p in r["predictions"])
        for r in results]


def test_tied_probabilities_are_listed_in_class_order(tmp_path: Path, capsys) -> None:
    """A model can give several classes exactly the same probability (its float32 output saturates): top-k then
    lists them in class order, the same on every machine, and k is clamped to 1..the number of classes."""
    from tasks.handoff import predict as predict_module

    names = [f"class {i}" for i in range(10)]
    model = linear_model(tmp_path / "model.onnx", names, np.zeros((3, 10)), np.array([0.0, 1.0] * 5))
    image = tmp_path / "photo.png"
    Image.new("RGB", (48, 32), (90, 140, 200)).save(image)
    high, low = np.e / (5 * np.e + 5), 1 / (5 * np.e + 5)    # softmax of five logits 1 and five logits 0
    order = [1, 3, 5, 7, 9, 0, 2, 4, 6, 8]
    for top_k, shown in (("4", 4), ("1", 1), ("99", 10)):
        assert predict_module.main([str(model), str(image), "--json", "-k", top_k]) == 0
        predictions = json.loads(capsys.readouterr().out)[0]["predictions"]
        assert predictions == [{"label": names[i], "index": i, "probability": round(high if i % 2 else low, 6)}
                               for i in order[:shown]]


def write_inbox(inbox: Path) -> None:
    """Images as a user's folder holds them, beside what a scan must skip: hidden files and folders, files
    that are not images by name, and a link back to the folder itself (followed, it would never end)."""
    for name, size in (("Z.PNG", (40, 30)), ("b.png", (30, 45)), ("sub/c.jpg", (64, 48)), ("two\nlines.png", (32, 32)),
                       ("wide.png", (120, 40)), (".hidden.png", (32, 32)), (".cache/d.png", (32, 32))):
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 120, 40)).save(inbox / name, format="JPEG" if name.endswith("jpg") else "PNG")
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "notes.txt").write_text("not an image name: skipped when scanning a folder")
    (inbox / "README").write_text("no suffix")
    (inbox / "loop").symlink_to(inbox, target_is_directory=True)


def test_each_file_gets_its_predictions_or_its_own_error_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys) -> None:
    """What a user sees for a folder plus named files, as a table and as JSON, and the count of failures."""
    from tasks.handoff import predict as predict_module

    monkeypatch.chdir(tmp_path)
    write_inbox(tmp_path / "inbox")
    # Logits 2, 1, 0 whatever the image: softmax e^2, e, 1 over their sum.
    model = linear_model(tmp_path / "model.onnx", ["red", "green", "blue"], np.zeros((3, 3)), np.array([2.0, 1, 0]))
    total = np.e ** 2 + np.e + 1
    top = [{"label": name, "index": i, "probability": round(value / total, 6)}
           for i, (name, value) in enumerate((("red", np.e ** 2), ("green", np.e), ("blue", 1.0)))]
    args = [str(model), "inbox", "inbox/notes.txt", "missing.png", "--max-aspect-ratio", "2.5"]
    expected = [
        {"file": "inbox/Z.PNG", "predictions": top},
        {"file": "inbox/b.png", "predictions": top},
        {"file": "inbox/empty.jpg", "error": "empty_file: zero bytes"},
        {"file": "inbox/sub/c.jpg", "predictions": top},
        {"file": "inbox/two\nlines.png", "predictions": top},
        {"file": "inbox/wide.png", "error": "extreme_aspect_ratio: 120x40 is more than 2.5:1"},
        {"file": "inbox/notes.txt",
         "error": "not_an_image: not one of the supported formats (JPEG, PNG, BMP, GIF, TIFF, WEBP, PPM)"},
        {"file": "missing.png", "error": "FileNotFoundError: No such file or directory"},
    ]

    assert predict_module.main([*args, "--json", "--batch-size", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == json.dumps(expected, indent=2) + "\n"
    assert err == "4 of 8 file(s) could not be predicted\n"

    assert predict_module.main(args) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "inbox/Z.PNG           red 0.6652  green 0.2447  blue 0.0900",
        "inbox/b.png           red 0.6652  green 0.2447  blue 0.0900",
        "inbox/empty.jpg       ERROR empty_file: zero bytes",
        "inbox/sub/c.jpg       red 0.6652  green 0.2447  blue 0.0900",
        "inbox/two\\nlines.png  red 0.6652  green 0.2447  blue 0.0900",
        "inbox/wide.png        ERROR extreme_aspect_ratio: 120x40 is more than 2.5:1",
        "inbox/notes.txt       ERROR not_an_image: not one of the supported formats (JPEG, PNG, BMP, GIF, TIFF, "
        "WEBP, PPM)",
        "missing.png           ERROR FileNotFoundError: No such file or directory",
    ]
    assert err == "4 of 8 file(s) could not be predicted\n"


def test_the_aspect_ratio_limit_is_the_one_given(tmp_path: Path, capsys) -> None:
    """A 60:1 strip is refused under the default limit (prepare's 50:1) and predicted when the user allows it."""
    from tasks.handoff import predict as predict_module

    model = linear_model(tmp_path / "model.onnx", ["red", "green", "blue"], np.zeros((3, 3)), np.zeros(3))
    strip = tmp_path / "strip.png"
    Image.new("L", (600, 10), 128).save(strip)
    assert predict_module.main([str(model), str(strip), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == [
        {"file": str(strip), "error": "extreme_aspect_ratio: 600x10 is more than 50:1"}]
    assert predict_module.main([str(model), str(strip), "--json", "--max-aspect-ratio", "60.5"]) == 0
    assert [p["probability"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]] == [0.333333] * 3


def test_folders_without_images_are_named_in_the_error(tmp_path: Path, capsys) -> None:
    from tasks.handoff import predict as predict_module

    model = linear_model(tmp_path / "model.onnx", ["red", "green", "blue"], np.zeros((3, 3)), np.zeros(3))
    empty, notes = tmp_path / "empty", tmp_path / "only notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "notes.txt").write_text("no images here")
    (notes / ".hidden.png").write_bytes(b"")
    assert predict_module.main([str(model), str(empty), str(notes)]) == 1
    assert capsys.readouterr() == ("", f"error: no image files in {empty}, {notes}\n")


def test_the_table_keeps_one_line_per_file_whatever_a_name_or_error_holds() -> None:
    from tasks.handoff.predict import format_table

    table = format_table([
        {"file": "a\tb.png", "error": "truncated: decoder said\nsomething on two lines"},
        {"file": "c.png", "predictions": [{"label": "x", "index": 0, "probability": 0.75},
                                          {"label": "y\nz", "index": 1, "probability": 0.25}]},
    ])
    assert table.splitlines() == ["a\\tb.png  ERROR truncated: decoder said\\nsomething on two lines",
                                  "c.png     x 0.7500  y\\nz 0.2500"]


@pytest.mark.parametrize(("as_json", "printed"), [(True, "[]\n"), (False, "")])
def test_no_results_print_an_empty_json_array_or_nothing(capsys, as_json: bool, printed: str) -> None:
    from tasks.handoff.predict import print_results

    assert print_results(iter([]), as_json) == (0, 0)
    assert capsys.readouterr().out == printed


def test_predict_batches_reads_16_files_at_a_time_unless_told(tmp_path: Path) -> None:
    from tasks.handoff import predict as predict_module

    model = linear_model(tmp_path / "model.onnx", ["red", "green", "blue"], np.zeros((3, 3)), np.zeros(3))
    classifier = predict_module.load_classifier(model)
    files = [tmp_path / f"missing_{i:02d}.png" for i in range(17)]   # each gets its own error: no image is needed
    assert [len(batch) for batch in predict_module.predict_batches(classifier, files, top_k=1)] == [16, 1]


def test_command_line_defaults_are_the_documented_ones() -> None:
    """3 labels, 16 files per batch, onnxruntime's one thread per core (0), prepare's 50:1 aspect limit."""
    from tasks.handoff.predict import build_parser

    args = build_parser().parse_args(["model.onnx", "photo.jpg"])
    assert (args.top_k, args.batch_size, args.threads, args.max_aspect_ratio, args.json) == (3, 16, 0, 50.0, False)
    assert (args.registry, args.name, args.version) == (None, None, None)
    assert args.paths == [Path("model.onnx"), Path("photo.jpg")]


def test_help_is_the_documented_text(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`predict --help` as a user reads it; a change to it is deliberate: update predict_help.txt beside this file."""
    from tasks.handoff import predict as predict_module

    monkeypatch.setenv("COLUMNS", "100")   # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exit_info:
        predict_module.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == (Path(__file__).parent / "predict_help.txt").read_text()
