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

from tasks import export
from tasks.images import load_rgb
from tasks.models import load_checkpoint
from tasks.preprocess import preprocess
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
    cmd = [str(VENV_BIN / "predict")] if script else [sys.executable, "-m", "tasks.predict"]
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
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {str(folder / n) for n in ("broken.png", "empty.jpg", "img_000.png", "img_001.png")} | {
        str(missing)}
    assert "ERROR empty_file" in lines[str(folder / "empty.jpg")]
    assert "ERROR" in lines[str(folder / "broken.png")] and "ERROR FileNotFoundError" in lines[str(missing)]
    assert "class_" in lines[str(folder / "img_000.png")] and "ERROR" not in lines[str(folder / "img_000.png")]
    assert "3 of 5 file(s) could not be predicted" in proc.stderr

    only_bad = predict([str(exported["onnx"]), str(folder / "broken.png"), "--json"], tmp_path)
    assert only_bad.returncode == 1  # nothing could be predicted
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
