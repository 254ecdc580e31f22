"""The model card's onnxruntime snippet, run exactly as a rendered card prints it, answers as `predict` does.

The images are the kinds a consumer meets and `tasks.lib.images.load_rgb` handles (alpha composited on white,
a palette with a transparent entry, 16-bit grey, CMYK, an EXIF-rotated JPEG); the model is a real ONNX
network whose every logit depends on every input pixel, with the calibrated `probabilities` output and the
metadata `tasks.export` writes.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tasks import export
from tasks.handoff import predict
from tasks.handoff.card import build_card, render_readme
from tasks.lib.images import INPUT_CONTRACT
from tasks.lib.preprocess import Preprocessing
from tests.tasks.handoff.test_publish import make_params

CLASSES = ["cat", "dog", "bird", "fish"]
# Non-square crop and resize, bicubic, non-ImageNet mean/std: the snippet must follow the metadata.
PREP = Preprocessing(crop_size=24, resize_size=28, interpolation="bicubic", mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.25, 0.3))

# Run in `python -I` (no PYTHONPATH, no current folder on sys.path): importing anything of this project, or torch,
# raises, so the snippet is shown to need onnxruntime, numpy and Pillow only.
RUNNER = '''
import runpy, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tasks", "flows", "tests", "torch", "torchvision", "timm"):
            raise ImportError(f"the card's snippet imported {name}")
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def dense_model(path: Path, seed: int = 0) -> Path:
    """Flatten the input, one dense layer, softmax(logits / 1.7) as `probabilities`: any change of a pixel, of
    the crop or of the orientation changes the answer. The metadata is what tasks.export writes."""
    side = PREP.crop_size
    weight = np.random.default_rng(seed).normal(scale=0.05, size=(3 * side * side, len(CLASSES)))
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
             helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1)]
    tensors = [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.flatten().tolist()),
               helper.make_tensor("bias", TensorProto.FLOAT, [len(CLASSES)], [0.0] * len(CLASSES)),
               helper.make_tensor("temperature", TensorProto.FLOAT, [], [1.7])]
    graph = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", len(CLASSES)])
         for name in ("logits", "probabilities")], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    meta = {"class_names": CLASSES, "preprocessing": PREP, "temperature": 1.7, "arch": "dense"}
    helper.set_model_props(model, export.build_metadata(make_params(), meta))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def consumer_images(folder: Path) -> dict[str, Path]:
    """One file of each kind, each with content where plain `convert("RGB")` sees something else."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    # Transparent pixels keep colours of their own (as icons exported by drawing tools do): dropped alpha shows them.
    alpha = np.zeros((30, 40), np.uint8)
    alpha[8:22, 10:30] = 255
    alpha[:, :5] = 128                                          # and a half-transparent edge
    rgba = Image.fromarray(np.dstack([noise, alpha]), "RGBA")
    la = Image.fromarray(np.dstack([noise[..., 0], alpha]), "LA")
    palette = Image.fromarray(noise).quantize(16)
    palette.info["transparency"] = int(np.asarray(palette)[15, 20])   # the colour at the centre is see-through
    gray16 = Image.fromarray((rng.integers(0, 65536, size=(30, 40))).astype(np.uint16))  # I;16: values over 255
    cmyk = Image.fromarray(noise).convert("CMYK")
    files = {"rgba.png": rgba, "la.png": la, "palette.png": palette, "gray16.png": gray16, "cmyk.jpg": cmyk}
    for name, img in files.items():
        img.save(folder / name, **({"transparency": img.info["transparency"]} if name == "palette.png" else {}))
    exif = Image.Exif()
    exif[0x0112] = 6                                            # shown rotated 90 degrees clockwise
    Image.fromarray(noise).save(folder / "rotated.jpg", exif=exif, quality=95)
    return {path.stem: path for path in sorted(folder.iterdir())}


def snippet_from_card(tmp_path: Path) -> str:
    """The python block of a card rendered from real params, as a consumer copies it from README.md."""
    card = build_card(params=make_params(), version="v1", url="registry/m/v1", class_names=CLASSES, lineage={},
                      metrics={}, export_report={}, decision={"passed": True, "reason": "first model"},
                      train_metrics=None, data_report=None)
    (tmp_path / "README.md").write_text(render_readme(card))
    blocks = re.findall(r"```python\n(.*?)```", (tmp_path / "README.md").read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_snippet_imports_only_onnxruntime_numpy_pillow_and_the_standard_library(tmp_path: Path) -> None:
    tree = ast.parse(snippet_from_card(tmp_path))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"json", "sys", "numpy", "onnxruntime", "PIL"}
    assert len([line for line in snippet_from_card(tmp_path).splitlines() if line.strip()]) <= 23  # short to copy


def test_the_onnx_metadata_states_how_a_file_becomes_the_rgb_input(tmp_path: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(dense_model(tmp_path / "model.onnx"))).metadata_props}
    assert {key: meta.get(key) for key in INPUT_CONTRACT} == INPUT_CONTRACT
    assert "composited on white" in meta["alpha"] and "exif_transpose" in meta["exif_orientation"]


@pytest.mark.slow(seconds=10)
def test_the_cards_snippet_as_printed_answers_as_predict_does(tmp_path: Path, capsys) -> None:
    model = dense_model(tmp_path / "model.onnx")
    images = consumer_images(tmp_path / "images")
    script = tmp_path / "snippet.py"
    script.write_text(snippet_from_card(tmp_path))
    (tmp_path / "runner.py").write_text(RUNNER)

    assert predict.main([str(model), *map(str, images.values()), "--json", "--top-k", str(len(CLASSES))]) == 0
    expected = {Path(r["file"]).stem: r["predictions"] for r in json.loads(capsys.readouterr().out)}
    answers = {}
    for kind, image in images.items():
        proc = subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), str(script), str(model), str(image)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answers[kind] = proc.stdout.splitlines()

    # The top-1 label first (the snippet's first line): a snippet that drops alpha or EXIF gets these wrong.
    assert {kind: lines[0] for kind, lines in answers.items()} == {k: p[0]["label"] for k, p in expected.items()}
    for kind, lines in answers.items():
        probabilities = json.loads(lines[1])
        assert list(probabilities) == CLASSES
        for p in expected[kind]:
            assert probabilities[p["label"]] == pytest.approx(p["probability"], abs=1e-5), kind
