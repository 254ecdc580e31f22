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
