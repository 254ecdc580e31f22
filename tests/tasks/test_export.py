"""The export stage: three architectures to validated ONNX, metadata, parity failures, and DVC end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
import yaml
from torch import nn

from tasks import export
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.images import INPUT_CONTRACT
from tasks.lib.io import sha256_file
from tasks.lib.models import load_checkpoint
from tasks.lib.onnx_classifier import load_classifier
from tasks.lib.preprocess import Preprocessing
from tasks.lib.split_files import read_classes, read_split
from tasks.train import train
from tests.conftest import init_dvc_repo, run
from tests.realistic import CLASS_NAMES, oracle_input, wrong_orders
from tests.tasks.test_evaluate import CLASSES, make_project
from tests.tasks.test_train import REALISTIC_ARCH, tiny_params, write_realistic_project


def onnx_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_export_is_validated_and_self_describing(tmp_path: Path, arch: str) -> None:
    params = make_project(tmp_path, arch=arch)
    if arch == "mobilenet_v3_small":  # one architecture also goes through int8 quantization
        params.export.quantize.enabled = True
        params.export.quantize.max_accuracy_drop = 1.0
    report = export.run(params)
    out = Path(params.export.out_dir)
    model_path = out / "model.onnx"
    assert json.loads((tmp_path / "metrics" / "export.json").read_text()) == report
    assert report["parity_passed"] and report["argmax_agree"]
    assert 0 <= report["max_abs_diff"] <= params.export.atol
    assert report["parity_batch_sizes"] == [1, 3, 8] and report["parity_images"] == 8
    assert report["onnx_sha256"] == export.sha256_file(model_path)
    # publish takes the pretrained-weights record from here, never from torch.load of the checkpoint
    assert report["weights"] == load_checkpoint(Path(params.train.out_dir) / "model.pt")[1]["weights"]
    assert report["opset"] == 18 and "dynamo" in report["exporter"]
    assert report["ort_latency_ms_p50"] > 0 and report["ort_latency_ms_p95"] >= report["ort_latency_ms_p50"]
    assert report["ort_throughput_img_per_s_b32"] > 0
    # metrics/export.json is what `dvc metrics show` and the registry read: every key, by its name.
    assert set(report) == {"onnx", "onnx_sha256", "onnx_bytes", "opset", "exporter", "atol", "parity_passed",
                           "max_abs_diff", "argmax_agree", "parity_worst_input", "parity_batch_sizes",
                           "parity_images", "ort_latency_ms_p50", "ort_latency_ms_p95",
                           "ort_throughput_img_per_s_b32", "ort_latency_runs", "ort_version", "cpu", "quantized",
                           "metadata", "weights", "distance_rel_diff"}
    assert report["ort_latency_runs"] == params.export.latency_runs and report["ort_version"] == ort.__version__
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx"] + (["model.int8.onnx"] if report["quantized"]["enabled"] else []))

    graph = onnx.load(str(model_path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = onnx_metadata(model_path)
    assert json.loads(meta["class_names"]) == CLASSES
    prep = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    assert prep.crop_size == 32 and prep.interpolation == "bilinear" and len(prep.mean) == len(prep.std) == 3
    assert meta["weights_sha256"] == "ab" * 32 and meta["data_sha256"] == "cd" * 32 and meta["arch"] == arch
    # Where and how it was built (commit, params, flow run) is the registry's lineage record, not the file's.
    assert not {"git_commit", "git_dirty", "params_sha256", "data_hash"} & set(meta)
    # The report repeats the metadata but for the two long JSON values, which the ONNX file holds.
    assert report["metadata"] == {k: v for k, v in meta.items() if k not in {"class_names", "preprocessing"}}
    assert report["metadata"]["arch"] == arch and {"class_names", "preprocessing"} <= set(meta)

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 3)  # any batch
    if report["quantized"]["enabled"]:
        q = report["quantized"]
        assert q["kept"] and q["bytes_int8"] < q["bytes_fp32"] / 2
        assert set(q) == {"enabled", "method", "kept", "accuracy_fp32", "accuracy_int8", "accuracy_drop",
                          "max_accuracy_drop", "bytes_fp32", "bytes_int8", "onnx", "onnx_sha256", "ort_latency_ms_p50"}
        assert q["method"] == "onnxruntime dynamic, int8 weights" and q["onnx"] == str(out / "model.int8.onnx")
        assert json.loads(onnx_metadata(out / "model.int8.onnx")["class_names"]) == CLASSES


class ChangesAfterExport(nn.Module):
    """Adds an input-dependent offset to the logits, except while being exported: ONNX and PyTorch disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if torch.compiler.is_exporting():
            return logits
        return logits + 0.01 * x.abs().mean(dim=(1, 2, 3))[:, None]


METADATA = {"class_names": json.dumps(CLASSES),
            "preprocessing": json.dumps(Preprocessing(crop_size=16, resize_size=16).to_dict())}


def test_the_onnx_model_hands_out_calibrated_probabilities(tmp_path: Path) -> None:
    params = make_project(tmp_path, temperature=2.5)
    export.run(params)
    path = Path(params.export.out_dir) / "model.onnx"
    assert [o.name for o in ort.InferenceSession(str(path)).get_outputs()] == ["logits", "probabilities"]
    assert onnx_metadata(path)["temperature"] == "2.5"
    classifier = load_classifier(path)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    logits = classifier.logits(x).astype(np.float64)
    want = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(axis=1, keepdims=True)
    assert classifier.calibrated and np.allclose(classifier.probabilities(x), want, atol=1e-6)
    assert np.array_equal(classifier.probabilities(x).argmax(1), logits.argmax(1))


def test_parity_failure_names_the_worst_input_and_leaves_no_model(tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    images[5] *= 3  # the largest offset, so the worst input
    names = [f"img_{i}.png" for i in range(8)]
    target = tmp_path / "out" / "model.onnx"
    with pytest.raises(StageError, match=r"parity failed.*worst on img_5\.png") as err:
        export.export_model(ChangesAfterExport().eval(), target, images, names, METADATA, Params().export)
    assert "(atol 0.0001)" in str(err.value)
    assert list(target.parent.iterdir()) == []  # neither model.onnx nor a temporary file


def test_an_export_prints_nothing_but_the_stage_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The exporter's own progress chatter ("[torch.onnx] Obtain model graph...") stays out of a stage's output."""
    images = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    cfg = Params().export.model_copy(update={"latency_runs": 5})
    export.export_model(ChangesAfterExport().net.eval(), tmp_path / "model.onnx", images,
                        [f"img_{i}.png" for i in range(8)], METADATA, cfg)
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err and (tmp_path / "model.onnx").is_file()


def test_parity_runs_at_every_configured_batch_size(tmp_path: Path) -> None:
    """A graph whose batch is fixed at 1 passes parity at batch 1 and fails at batch 3, naming it."""
    model = ChangesAfterExport().net.eval()
    fixed = tmp_path / "fixed_batch.onnx"
    with torch.no_grad():  # no dynamic_shapes: the exported input is (1, 3, 16, 16)
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(fixed), dynamo=True, input_names=["input"],
                          output_names=["logits"], external_data=False, verbose=False)
    proto = onnx.load(str(fixed))
    onnx.helper.set_model_props(proto, METADATA)
    onnx.save(proto, str(fixed))
    classifier = load_classifier(fixed)
    images = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    names = [f"img_{i}.png" for i in range(8)]
    assert export.check_parity(model, classifier, images, names, [1], atol=1e-4).passed
    with pytest.raises(StageError, match=r"fails at batch size 3 \(on img_0\.png\)"):
        export.check_parity(model, classifier, images, names, [1, 3, 8], atol=1e-4)


def test_empty_test_split_is_a_clear_error(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    (Path(params.data.prepared_dir) / "test.csv").write_text("path,label,sha256\n")
    with pytest.raises(StageError, match="test.csv lists no images"):
        export.run(params)


# --------------------------------------------------------------------------- DVC end to end


def _upstream_outputs(repo: Path) -> None:
    """What prepare and train would have written, at the paths params.yaml names."""
    make_project(repo)
    (repo / ".gitignore").write_text("/artifacts/train/model.pt\n")  # train's out; kept out of git for speed
    run(["dvc", "add", "-q", "data/raw"], repo)


@pytest.mark.slow(seconds=75)
def test_dvc_repro_evaluate_and_export(tmp_path: Path) -> None:
    repo = init_dvc_repo(tmp_path / "repo")
    _upstream_outputs(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["device"] = "cpu"
    params["export"]["latency_runs"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "upstream outputs"], repo)

    run(["dvc", "repro", "-s", "evaluate"], repo)
    run(["dvc", "repro", "-s", "export"], repo)
    assert (repo / "artifacts/export/model.onnx").exists()

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    flat = json.dumps(shown)
    for key in ("macro_f1", "ece", "max_abs_diff", "ort_latency_ms_p50"):
        assert f'"{key}"' in flat
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)  # HEAD has none yet: all new
    assert any("accuracy" in key for changes in diff.values() for key in changes)

    html = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(html)], repo)
    page = (html / "index.html").read_text()
    for title in ("Confusion matrix", "F1 per class", "Reliability diagram", "worst_mistakes.png"):
        assert title in page
    assert list(html.rglob("*.png"))  # the mistakes grid is copied next to the page

    first = sha256_file(repo / "artifacts/export/model.onnx")
    # The same checkpoint exported again from another commit gives the same bytes: a registry
    # version is the model, not the commit that happened to export it.
    (repo / "NOTES.md").write_text("an unrelated change\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "unrelated"], repo)
    run(["dvc", "repro", "-f", "-s", "export"], repo)
    assert sha256_file(repo / "artifacts/export/model.onnx") == first

    # A re-export that fails parity (forced tolerance: the fp32 kernels of PyTorch and onnxruntime
    # differ by ~1e-7..1e-6 on resnet18, never by less than 1e-12) exits 1, names the worst
    # test image and removes the previous model.onnx instead of leaving it looking current.
    failed = run([sys.executable, "-m", "tasks.export", "-S", "export.atol=1e-12"], repo, check=False)
    assert failed.returncode == 1
    assert "parity failed" in failed.stderr and "(atol 1e-12)" in failed.stderr
    assert re.search(r"worst on class_\d/img_\d{3}\.png at batch size \d", failed.stderr), failed.stderr
    assert not (repo / "artifacts/export/model.onnx").exists()
    assert not list((repo / "artifacts/export").glob(".model.onnx*"))  # no temporary file either


# --------------------------------------------------------------------------- realistic classes and int8


@pytest.fixture(scope="module")
def realistic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 head trained on the realistic folder through the real prepare and train stages
    (val accuracy ~0.9): class names that sort differently by code point, case and locale."""
    root = tmp_path_factory.mktemp("realistic")
    write_realistic_project(root, REALISTIC_ARCH)
    train(tiny_params(root, **{"model.arch": REALISTIC_ARCH, "train.head.lr": 0.01, "train.head.epochs": 12,
                               "train.finetune.unfreeze": "none", "train.early_stopping_patience": 0}))
    return root


def realistic_export_params(root: Path, out: Path, checkpoint_dir: Path, max_accuracy_drop: float) -> Params:
    return tiny_params(root, **{
        "model.arch": REALISTIC_ARCH, "train.out_dir": str(checkpoint_dir), "export.out_dir": str(out / "export"),
        "reports.dir": str(out / "metrics"), "export.latency_runs": 5, "export.quantize.enabled": True,
        "export.quantize.max_accuracy_drop": max_accuracy_drop})


def held_out_files(root: Path) -> tuple[list[Path], np.ndarray]:
    rows = read_split(root / "data" / "prepared" / "test.csv")
    return [root / "data" / "raw" / row.path for row in rows], np.array([row.label for row in rows])


def onnx_logits(model: Path, files: list[Path]) -> np.ndarray:
    """Plain onnxruntime on the oracle's inputs, made from the file's own preprocessing metadata."""
    prep = json.loads(onnx_metadata(model)["preprocessing"])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": np.stack([oracle_input(f, prep) for f in files])})[0]


def torch_logits(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """The checkpoint's network rebuilt by torchvision, on the oracle's inputs."""
    payload = torch.load(checkpoint, weights_only=True)
    network = torchvision.models.get_model(payload["arch"], weights=None, num_classes=len(payload["class_names"]))
    network.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        x = torch.from_numpy(np.stack([oracle_input(f, payload["preprocessing"]) for f in files]))
        return network.eval()(x).numpy()


def op_types(model: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}


@pytest.mark.slow(seconds=60)
def test_onnx_class_names_are_the_prepared_order_and_int8_as_accurate_as_fp32_is_kept(
        realistic_model: Path, tmp_path: Path) -> None:
    """A consumer maps output i to class_names[i] from the ONNX file alone: that list must be classes.json
    and the checkpoint's, in code-point order, for names a case-insensitive or locale sort would reorder;
    and the name it gives each test image is the one the trained network (rebuilt independently) means.
    int8 that loses no test accuracy is kept under the strictest bound, 0: "at most" includes equal."""
    root = realistic_model
    report = export.run(realistic_export_params(root, tmp_path, root / "artifacts" / "train", 0.0))
    fp32, int8 = tmp_path / "export" / "model.onnx", tmp_path / "export" / "model.int8.onnx"
    classes = read_classes(root / "data" / "prepared")
    assert classes == sorted(CLASS_NAMES)
    assert all(classes != order for order in wrong_orders(CLASS_NAMES).values())
    assert torch.load(root / "artifacts" / "train" / "model.pt", weights_only=True)["class_names"] == classes
    assert json.loads(onnx_metadata(fp32)["class_names"]) == classes
    assert json.loads(onnx_metadata(int8)["class_names"]) == classes

    files, labels = held_out_files(root)
    meant = [classes[i] for i in torch_logits(root / "artifacts" / "train" / "model.pt", files).argmax(1)]
    named = [json.loads(onnx_metadata(fp32)["class_names"])[i] for i in onnx_logits(fp32, files).argmax(1)]
    assert named == meant and len(set(meant)) >= 4, (named, meant)    # several classes, so order shows

    quantized = report["quantized"]
    accuracy = {path: float((onnx_logits(path, files).argmax(1) == labels).mean()) for path in (fp32, int8)}
    assert {"ConvInteger", "MatMulInteger"} <= op_types(int8) and "ConvInteger" not in op_types(fp32)
    assert accuracy[int8] == accuracy[fp32] > 0.5
    assert quantized["kept"] and quantized["max_accuracy_drop"] == 0.0 and quantized["accuracy_drop"] == 0.0
    assert (quantized["accuracy_fp32"], quantized["accuracy_int8"]) == pytest.approx((accuracy[fp32], accuracy[int8]))
    assert quantized["onnx_sha256"] == sha256_file(int8)


@pytest.mark.slow(seconds=30)
def test_an_int8_model_that_loses_accuracy_past_the_bound_is_dropped_and_fp32_stays(
        realistic_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real cause of int8 failure: one outlier weight stretches the per-tensor int8 scale until every
    other weight of the layer rounds to zero. It sits on an input of the last layer that is silent on
    these images, so the float model predicts exactly as before; the int8 one predicts one class for
    all. With the default bound (0.01) the int8 file must not be kept, the report must say why, and
    model.onnx must be the float model."""
    root = realistic_model
    files, labels = held_out_files(root)
    payload = torch.load(root / "artifacts" / "train" / "model.pt", weights_only=True)
    network = torchvision.models.get_model(REALISTIC_ARCH, num_classes=len(CLASS_NAMES))
    network.load_state_dict(payload["state_dict"])
    network.fc = nn.Identity()
    with torch.no_grad():
        features = network.eval()(torch.from_numpy(np.stack([oracle_input(f, payload["preprocessing"])
                                                             for f in files])))
    silent = int(features.max(0).values.argmin())
    assert float(features[:, silent].abs().max()) == 0.0, "no input of the last layer is silent on the test images"
    weight = payload["state_dict"]["fc.weight"]
    weight[:, silent] += 300 * float(weight.abs().max())      # int8 step > 2x the largest other weight
    (tmp_path / "outlier").mkdir()
    torch.save(payload, tmp_path / "outlier" / "model.pt")
    stale = tmp_path / "export" / "model.int8.onnx"
    stale.parent.mkdir()
    stale.write_bytes(b"an int8 model from an earlier export")

    caplog.set_level("INFO", logger="tasks.export")
    report = export.run(realistic_export_params(root, tmp_path, tmp_path / "outlier", 0.01))
    fp32 = tmp_path / "export" / "model.onnx"
    quantized = report["quantized"]
    accuracy_fp32 = float((onnx_logits(fp32, files).argmax(1) == labels).mean())
    assert accuracy_fp32 == float((torch_logits(tmp_path / "outlier" / "model.pt", files).argmax(1) == labels).mean())
    assert not quantized["kept"] and quantized["accuracy_fp32"] == pytest.approx(accuracy_fp32)
    assert quantized["accuracy_drop"] == pytest.approx(quantized["accuracy_fp32"] - quantized["accuracy_int8"])
    assert quantized["accuracy_drop"] > 0.3 and "onnx" not in quantized
    assert "-> dropped" in caplog.text
    assert not stale.exists() and sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx"]
    assert "ConvInteger" not in op_types(fp32) and "quantization" not in onnx_metadata(fp32)
    assert report["onnx_sha256"] == sha256_file(fp32)


# --------------------------------------------------------------------------- what a consumer and a user read


def test_the_metadata_says_everything_a_consumer_needs_in_canonical_json() -> None:
    """Every metadata string, as a consumer reads it. The JSON values have sorted keys: the same checkpoint
    gives a byte-identical file even if the code lists Preprocessing's fields in another order."""
    params = Params()
    params.export.opset = 19
    prep = Preprocessing(crop_size=224, resize_size=256, interpolation="bicubic")
    meta = export.build_metadata(params, {"preprocessing": prep, "class_names": list(CLASS_NAMES), "arch": "resnet18",
                                          "temperature": 1.75, "data_sha256": "cd" * 32})
    assert meta == {
        **INPUT_CONTRACT,
        "class_names": '["10 items", "2 items", "Zebra", "apple", "\\u00c4pfel", "\\u00e9clair"]',
        "preprocessing": '{"crop_size": 224, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], '
                         '"resize_size": 256, "std": [0.229, 0.224, 0.225]}',
        "input_shape": '["batch", 3, 224, 224]',
        "input_format": "float32 NCHW, RGB scaled to [0,1] then (x - mean) / std",
        "resize_policy": "resize the shorter side to 256 px (bicubic), keep aspect, center-crop 224x224",
        "output": "logits: raw scores; probabilities: softmax(logits / temperature), calibrated on the validation "
                  "split; classes in class_names order",
        "temperature": "1.75",
        "arch": "resnet18",
        "data_sha256": "cd" * 32,
        "weights_sha256": "unknown",
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": "19",
    }
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert Preprocessing.from_dict(json.loads(meta["preprocessing"])) == prep


def test_a_parity_failure_names_the_first_five_disagreeing_images_and_counts_them_all() -> None:
    mismatches = [f"Äpfel/IMG {i:04d}.jpg (batch 8)" for i in range(7)]
    parity = export.Parity(passed=False, max_abs_diff=0.01234, worst_input="Zebra/wide 3.png", worst_batch_size=8,
                           argmax_agree=False, argmax_mismatches=mismatches, n_images=8, batch_sizes=[1, 8])
    assert export.parity_message(parity, 1e-4) == (
        "ONNX parity failed: max |logit diff| 0.0123 (atol 0.0001) worst on Zebra/wide 3.png at batch size 8; "
        "argmax differs on 7 image(s): Äpfel/IMG 0000.jpg (batch 8), Äpfel/IMG 0001.jpg (batch 8), "
        "Äpfel/IMG 0002.jpg (batch 8), Äpfel/IMG 0003.jpg (batch 8), Äpfel/IMG 0004.jpg (batch 8); "
        "no model.onnx was written. Check the model for train-mode or data-dependent ops.")


def test_the_command_line_help_describes_the_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        export.main(["--help"])
    assert done.value.code == 0
    assert "Export the trained model to a validated ONNX file." in capsys.readouterr().out.splitlines()
