"""publish_candidate end to end: a real git repo, real PNGs, real ONNX files, a local registry.

The helpers here (tiny ONNX models, a project tree with every artifact the pipeline
writes) are shared by the other registry tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import open_registry
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.io import sha256_file, write_json
from tasks.lib.preprocess import Preprocessing
from tasks.lib.split_files import SplitRow, read_split, split_digest, write_split
from tests.conftest import REPO_ROOT, run, write_image_folder

CLASSES = ["class_0", "class_1", "class_2"]
PREP = Preprocessing(crop_size=32, resize_size=32)
GOOD = np.eye(3, dtype=np.float32) * 10  # class c is the image's brightest channel (write_image_folder's colours)
CONFUSED = GOOD[:, [0, 1, 1]]            # never predicts class_2: its images go to class_1


def make_onnx(path: Path, weight: np.ndarray = GOOD, class_names: list[str] = CLASSES, tag: str = "a",
              prep: Preprocessing = PREP) -> Path:
    """A real classifier: global average pool of the RGB input, then a linear layer; metadata per the contract."""
    k = weight.shape[1]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])]
    return _save_onnx(path, nodes, {"weight": weight, "bias": np.zeros(k)}, k, class_names, tag, prep)


def make_memorising_onnx(path: Path, images: list[Path], answers: list[int], tag: str = "a",
                         class_names: list[str] = CLASSES, prep: Preprocessing = PREP) -> Path:
    """A real classifier that knows `images` by heart and gives each the class in `answers`.

    It keeps the mean colour of every image as the network sees it (after preprocessing) and answers
    an image of exactly that colour with its class; any other image gets GOOD's answer (its brightest
    channel). So a test can make a model that is right on exactly the test images it chooses.
    """
    from tasks.lib.onnx_classifier import load_classifier

    reader = load_classifier(make_onnx(path, GOOD, class_names, tag, prep))
    means = np.stack([reader.load(image).astype(np.float64).mean(axis=(1, 2)) for image in images])
    k = len(class_names)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),                      # (N, 3)
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["brightest"]),            # GOOD's logits
             helper.make_node("Unsqueeze", ["flat", "axis_1"], ["flat3"]),                   # (N, 1, 3)
             helper.make_node("Sub", ["flat3", "means"], ["diff"]),                          # (N, M, 3)
             helper.make_node("Mul", ["diff", "diff"], ["squared"]),
             helper.make_node("ReduceSum", ["squared", "axis_2"], ["distance"], keepdims=0),  # (N, M)
             helper.make_node("ArgMin", ["distance"], ["nearest"], axis=1, keepdims=0),
             helper.make_node("ReduceMin", ["distance"], ["closest"], axes=[1], keepdims=1),  # (N, 1)
             helper.make_node("Less", ["closest", "same"], ["known"]),
             helper.make_node("Gather", ["answers", "nearest"], ["answered"], axis=0),        # (N, K)
             helper.make_node("Where", ["known", "answered", "brightest"], ["logits"])]
    # Distinct test images differ by more than 1e-6 in squared mean colour; one image from itself, by float noise.
    return _save_onnx(path, nodes, {"weight": GOOD, "bias": np.zeros(k), "means": means,
                                    "answers": np.eye(k)[answers] * 10, "same": np.array([1e-9]),
                                    "axis_1": np.array([1], dtype=np.int64), "axis_2": np.array([2], dtype=np.int64)},
                      k, class_names, tag, prep)


def _save_onnx(path: Path, nodes: list[Any], initializers: dict[str, np.ndarray], k: int, class_names: list[str],
               tag: str, prep: Preprocessing) -> Path:
    tensors = [helper.make_tensor(name, TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT,
                                  value.shape, value.flatten().tolist()) for name, value in initializers.items()]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, prep.crop_size, prep.crop_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, {"class_names": json.dumps(class_names),
                                   "preprocessing": json.dumps(prep.to_dict()),
                                   "lineage": json.dumps({"tag": tag, "git_commit": "test"})})
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def answers_right_on(labels: list[int], share: float) -> list[int]:
    """Right on the first round(share * n) images of each class, every other one taken for the next class:
    each class's recall, precision and F1 are then that share (when it is a whole number of images)."""
    seen = Counter()
    counts = Counter(labels)
    answers = []
    for label in labels:
        right = math.isfinite(share) and seen[label] < round(share * counts[label])
        answers.append(label if right else (label + 1) % len(counts))
        seen[label] += 1
    return answers


def synthetic_metrics(macro_f1: float, split_sha256: str, recalls: tuple[float, ...] = (0.9, 0.9, 0.9),
                      classes: list[str] = CLASSES, n_test: int = 60) -> dict[str, Any]:
    """A metrics.json per the evaluate contract, with chosen numbers."""
    return {"accuracy": macro_f1, "balanced_accuracy": macro_f1, "macro_f1": macro_f1, "weighted_f1": macro_f1,
            "top_k_accuracy": 1.0, "top_k": 3, "log_loss": 0.3, "ece": 0.05, "n_test": n_test,
            "baseline_accuracy": 0.05, "test_split_sha256": split_sha256,
            "per_class": {c: {"precision": 0.9, "recall": r, "f1": 0.9, "support": n_test // len(classes)}
                          for c, r in zip(classes, recalls, strict=True)}}


def make_params(significance: float | None = None, **registry: Any) -> Params:
    """The paired test is off unless asked for: 12 test images cannot show a significant difference."""
    return Params.model_validate({"registry": {"uri": "registry", **registry}, "gate": {"significance": significance}})


def make_project(root: Path, params: Params, per_class: int = 20) -> Path:
    """A committed git repo with data, split files, dvc.lock and every artifact publish reads.

    20 test images per class: a model right on 16 of each has recall, precision and F1 0.8 in every
    class, so the gate's real scores of a model made for macro_f1 0.8 (set_candidate) are 0.8."""
    raw = write_image_folder(root / "data/raw", classes=3, per_class=per_class, size=32)
    prepared = root / "data/prepared"
    rows = [SplitRow(f"class_{c}/img_{i:03d}.png", c, sha256_file(raw / f"class_{c}/img_{i:03d}.png"))
            for c in range(3) for i in range(per_class)]
    write_split(prepared / "test.csv", rows)
    write_json(prepared / "classes.json", CLASSES)
    write_json(prepared / "report.json", {"n_images": {"train": 30, "val": 6, "test": len(rows)}})
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {
        "cmd": "python -m tasks.prepare", "deps": [{"path": "data/raw", "hash": "md5",
                                                    "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    write_json(root / "artifacts/weights/weights.json",
               {"arch": "resnet18", "weights": "packaged", "source": "package", "sha256": "ab" * 32,
                "file": "backbone.pt", "preprocessing": PREP.to_dict()})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    (root / ".gitignore").write_text("artifacts/\nregistry/\ndata/\n")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "tests@example.invalid"], root)
    run(["git", "config", "user.name", "tests"], root)
    run(["git", "add", "params.yaml", "dvc.lock", ".gitignore"], root)
    run(["git", "commit", "-q", "-m", "project"], root)
    return root


def set_candidate(root: Path, *, weight: np.ndarray = GOOD, tag: str = "a", macro_f1: float | None = None,
                  recalls: tuple[float, ...] = (0.9, 0.9, 0.9), parity: bool = True,
                  class_names: list[str] = CLASSES) -> str:
    """Write a candidate's model.onnx, export report, metrics and predictions.

    macro_f1 None: a linear model (`weight`) and its real metrics. Otherwise a model right on that share of
    each class's test images (make_memorising_onnx), with synthetic metrics that say macro_f1 and `recalls`:
    the candidate's side is what evaluate wrote; the gate scores production's side from its ONNX file, and
    for such a model that gives the same macro_f1 (to the nearest twentieth).
    """
    split = split_digest(root / "data/prepared/test.csv")
    rows = read_split(root / "data/prepared/test.csv")
    labels = [r.label for r in rows]
    onnx_path = root / "artifacts/export/model.onnx"
    if macro_f1 is None:
        from tasks.handoff.publish import score_test_split

        make_onnx(onnx_path, weight, class_names, tag=tag)
        metrics, probs = score_test_split(onnx_path, root / "data/prepared", root / "data/raw", class_names,
                                          top_k=3, bins=15)
        predicted = [int(p) for p in probs.argmax(axis=1)]
        metrics["baseline_accuracy"] = 0.05     # evaluate's pixel baseline, far below these toy models
    else:
        predicted = answers_right_on(labels, macro_f1)
        make_memorising_onnx(onnx_path, [root / "data/raw" / r.path for r in rows], predicted, tag, class_names)
        metrics = synthetic_metrics(macro_f1, split, recalls, class_names, n_test=len(rows))
    onnx_sha = sha256_file(onnx_path)
    write_json(root / "metrics/export.json",
               {"onnx": str(onnx_path), "onnx_sha256": onnx_sha, "opset": 17, "exporter": "onnx.helper",
                "parity_passed": parity, "max_abs_diff": 1e-6, "argmax_agree": 1.0, "ort_latency_ms_p50": 0.1,
                "ort_latency_ms_p95": 0.2, "ort_throughput_img_per_s_b32": 5000.0, "quantized": {"enabled": False}})
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics/evaluate.json").write_text(json.dumps(metrics))  # json.dumps: NaN allowed here
    write_json(root / "artifacts/evaluate/predictions.json", {"test_split_sha256": split, "label": labels,
                                                               "sha256": [r.sha256 for r in rows],
                                                               "predicted": predicted})
    return onnx_sha


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Params]:
    params = make_params()
    return make_project(tmp_path / "proj", params), params


def test_first_publish_bootstraps_and_an_unchanged_rerun_reports_no_improvement(project):
    root, params = project
    set_candidate(root, macro_f1=0.8)
    first = publish_candidate(params, root, "flow-run-1")
    registry = open_registry(params, root)
    assert first["promoted"] is True and first["reason"].startswith("bootstrap")
    assert registry.production() == first["registry_version"]
    assert Path(first["model_card"]).read_text().startswith(f"# {params.project.name} {first['registry_version']}")
    stored = registry.read_json(first["registry_version"], "lineage.json")
    assert stored["flow_run_id"] == "flow-run-1" and stored["git_dirty"] is False
    assert stored["data_hash"] == "0123456789abcdef0123456789abcdef.dir"
    assert stored["params"] == params.model_dump(mode="json") and stored["packages"]["onnxruntime"]
    assert registry.verify(first["registry_version"]) == []

    again = publish_candidate(params, root, "flow-run-2")
    assert again["promoted"] is False and again["reason"] == "no improvement"
    assert again["registry_version"] == first["registry_version"] and "republished" in again["decision"]
    assert registry.versions() == [first["registry_version"]]
    assert registry.production() == first["registry_version"]
    # The rebuild leaves a trace on the version it reproduced: when, which run, the same inputs.
    (note,) = registry.reproductions(first["registry_version"])
    assert note["flow_run_id"] == "flow-run-2" and note["onnx_sha256"] == stored["onnx_sha256"]
    assert note["data_hash"] == stored["data_hash"] and all(note["same_as_published"].values())
    assert registry.verify(first["registry_version"]) == []            # the version itself is untouched


def test_registry_show_lists_the_runs_that_reproduced_a_version(project, capsys):
    from tasks.handoff.registry_cli import main as registry_cli

    root, params = project
    set_candidate(root, macro_f1=0.8)
    version = publish_candidate(params, root, "flow-run-1")["registry_version"]
    publish_candidate(params, root, "flow-run-7")
    where = ["--params", str(root / "params.yaml"), "-S", f"registry.uri={root / 'registry'}"]
    capsys.readouterr()
    assert registry_cli([*where, "show", version]) == 0
    assert "by flow run flow-run-7: the same ONNX file, from the same inputs" in capsys.readouterr().out
    assert registry_cli([*where, "show", version, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [n["flow_run_id"] for n in shown["reproductions"]] == ["flow-run-7"]


def test_better_candidate_is_promoted_worse_is_stored_with_its_reason(project):
    root, params = project
    set_candidate(root, tag="v1", macro_f1=0.80)
    v1 = publish_candidate(params, root, None)["registry_version"]
    set_candidate(root, tag="v2", macro_f1=0.85)
    better = publish_candidate(params, root, None)
    assert better["promoted"] is True and "improved by +0.0500" in better["reason"]
    set_candidate(root, tag="v3", macro_f1=0.84)
    worse = publish_candidate(params, root, None)
    assert worse["promoted"] is False and worse["reason"] == "no improvement"
    registry = open_registry(params, root)
    assert registry.versions() == sorted([v1, better["registry_version"], worse["registry_version"]])
    assert registry.production() == better["registry_version"]
    decision = registry.read_json(worse["registry_version"], "decision.json")
    assert decision["passed"] is False and decision["production_version"] == better["registry_version"]
    assert decision["candidate_metrics"]["macro_f1"] == 0.84 and decision["production_metrics"]["macro_f1"] == 0.85
    assert registry.pointer()["previous"] == [v1]


def test_nan_metric_and_failed_parity_are_stored_but_not_promoted(project):
    root, params = project
    set_candidate(root, tag="v1", macro_f1=0.5)
    publish_candidate(params, root, None)
    set_candidate(root, tag="nan", macro_f1=math.nan)
    nan = publish_candidate(params, root, None)
    assert nan["promoted"] is False and "candidate metric not finite: " in nan["reason"]
    assert "macro_f1=nan" in nan["reason"]
    json.dumps(nan, allow_nan=False)  # the flow writes the result with a strict JSON writer
    stored = open_registry(params, root).read_bytes(nan["registry_version"], "decision.json")
    assert json.loads(stored)["candidate_metrics"]["macro_f1"] == "nan"
    set_candidate(root, tag="parity", macro_f1=0.9, parity=False)
    parity = publish_candidate(params, root, None)
    assert parity["promoted"] is False and parity["reason"] == "export parity failed (or the export report does not say it passed)"


@pytest.mark.slow
def test_production_is_scored_from_its_onnx_file_on_the_candidates_test_split(project):
    root, params = project
    set_candidate(root, tag="prod", weight=CONFUSED)  # real metrics: class_2 never right
    prod = publish_candidate(params, root, None)
    assert prod["promoted"] is True
    prod_metrics = prod["decision"]["candidate_metrics"]
    assert prod_metrics["per_class"]["class_2"]["recall"] == 0.0

    # New data version: other test images, so a new split hash.
    write_image_folder(root / "data/raw", classes=3, per_class=6, size=32, seed=1)
    rows = [SplitRow(f"class_{c}/img_{i:03d}.png", c, sha256_file(root / f"data/raw/class_{c}/img_{i:03d}.png"))
            for c in range(3) for i in range(6)]
    write_split(root / "data/prepared/test.csv", rows)
    set_candidate(root, tag="cand", weight=GOOD)
    result = publish_candidate(params, root, None)
    decision = result["decision"]
    new_split = split_digest(root / "data/prepared/test.csv")
    assert decision["production_metrics"]["test_split_sha256"] == new_split != prod_metrics["test_split_sha256"]
    assert decision["production_metrics"]["n_test"] == 18
    assert decision["production_metrics"]["per_class"]["class_2"]["recall"] == 0.0
    assert decision["production_onnx_sha256"] == open_registry(params, root).manifest(prod["registry_version"])[
        "model.onnx"]
    assert result["promoted"] is True and decision["candidate_metrics"]["macro_f1"] == 1.0


@pytest.mark.slow
def test_the_gate_pairs_both_models_predictions_on_the_same_test_images(tmp_path):
    params = make_params(significance=0.05)
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="prod", macro_f1=0.8)             # right on 16 of the 20 images of each class
    publish_candidate(params, root, None)
    set_candidate(root, tag="cand", macro_f1=0.85)            # and on one more of each: 3 better, none worse
    result = publish_candidate(params, root, None)
    assert result["promoted"] is False
    assert result["reason"] == ("not significant: +5.0 points accuracy (3 images better, 0 worse), McNemar p=0.25 "
                                "on 60 images (needs p < gate.significance 0.05)")
    registry = open_registry(params, root)
    paired = registry.read_json(result["registry_version"], "decision.json")["paired_test"]
    assert (paired["wins"], paired["losses"], paired["n"]) == (3, 0, 60)
    set_candidate(root, tag="good", weight=GOOD)              # right on all 60: 12 better than production
    better = publish_candidate(params, root, None)
    assert better["promoted"] is True and "(12 images better, 0 worse), McNemar p=0.00049" in better["reason"]


# --------------------------------------------------------------------------- production's evidence is verified


def edit_records(registry, version: str, *, forge_manifest: bool) -> None:
    """What an adversary (or a bad restore) does: production's metrics.json and predictions.json rewritten so
    that production looks bad (every image wrong, macro_f1 0.1); forge_manifest: its COMPLETE manifest too,
    with the new files' sha256, so that the version still verifies."""
    folder = Path(registry.url(version))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(accuracy=0.1, balanced_accuracy=0.1, macro_f1=0.1, weighted_f1=0.1)
    for per_class in metrics["per_class"].values():
        per_class.update(precision=0.1, recall=0.1, f1=0.1)
    predictions = json.loads((folder / "predictions.json").read_text())
    predictions["predicted"] = [(label + 1) % 3 for label in predictions["label"]]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.json").write_text(json.dumps(predictions))
    if forge_manifest:
        marker = json.loads((folder / "COMPLETE").read_text())
        marker["files"].update({name: sha256_file(folder / name) for name in ("metrics.json", "predictions.json")})
        (folder / "COMPLETE").write_text(json.dumps(marker))
        assert registry.verify(version) == []


@pytest.mark.slow
def test_edited_production_records_stop_the_publish_instead_of_promoting_a_worse_model(tmp_path):
    params = make_params(significance=0.05)
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="prod", weight=GOOD)               # right on all 60 test images
    prod = publish_candidate(params, root, None)["registry_version"]
    set_candidate(root, tag="worse", macro_f1=0.7)             # right on 42
    assert publish_candidate(params, root, None)["reason"].startswith("no improvement")
    registry = open_registry(params, root)
    edit_records(registry, prod, forge_manifest=False)

    with pytest.raises(StageError) as err:
        publish_candidate(params, root, None)
    message = str(err.value)
    assert f"production version {prod} of {params.project.name}" in message and "does not verify" in message
    assert "metrics.json sha256" in message and "predictions.json sha256" in message
    assert f"`registry verify {prod}`" in message and "`registry rollback`" in message
    assert registry.production() == prod and len(registry.versions()) == 2


@pytest.mark.slow
def test_a_forged_manifest_does_not_fool_the_gate_it_scores_productions_onnx_file(tmp_path):
    params = make_params(significance=0.05)
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="prod", weight=GOOD)
    prod = publish_candidate(params, root, None)["registry_version"]
    set_candidate(root, tag="worse", macro_f1=0.7)
    registry = open_registry(params, root)
    edit_records(registry, prod, forge_manifest=True)

    worse = publish_candidate(params, root, None)
    assert worse["promoted"] is False and worse["reason"].startswith("no improvement; recall of class")
    decision = worse["decision"]
    assert decision["production_metrics"]["macro_f1"] == 1.0 and decision["delta"] == pytest.approx(-0.3)
    assert registry.production() == prod


@pytest.mark.parametrize("damage", ["edited", "deleted"])
def test_a_damaged_production_onnx_file_stops_the_publish(project, damage):
    root, params = project
    set_candidate(root, tag="prod", macro_f1=0.9)
    prod = publish_candidate(params, root, None)["registry_version"]
    onnx_file = root / "registry" / params.project.name / prod / "model.onnx"
    if damage == "edited":   # another valid model put in its place: one that every candidate beats
        onnx_file.write_bytes(make_onnx(root / "other.onnx", CONFUSED).read_bytes())
    else:
        onnx_file.unlink()
    set_candidate(root, tag="cand", macro_f1=0.8)

    with pytest.raises(StageError) as err:
        publish_candidate(params, root, None)
    message = str(err.value)
    assert f"production version {prod}" in message and "does not verify" in message
    expected = "model.onnx sha256" if damage == "edited" else "model.onnx is missing"
    assert expected in message and f"`registry verify {prod}`" in message and "`registry rollback`" in message
    registry = open_registry(params, root)
    assert registry.production() == prod and registry.versions() == [prod]


def test_a_production_model_for_other_classes_is_not_compared_and_not_replaced(project):
    root, params = project
    write_json(root / "data/prepared/classes.json", ["cat", "dog", "eel"])
    set_candidate(root, tag="pets", class_names=["cat", "dog", "eel"])
    version = publish_candidate(params, root, None)["registry_version"]
    write_json(root / "data/prepared/classes.json", CLASSES)
    set_candidate(root, tag="cand", weight=GOOD)
    result = publish_candidate(params, root, None)
    assert result["promoted"] is False and result["decision"]["bootstrap"] is False
    assert result["reason"].startswith(f"class names differ from production {version} (new: ")
    assert "missing: cat, dog, eel)" in result["reason"]
    assert "a new project.name" in result["reason"] and "--force" in result["reason"]


def test_the_onnx_file_scored_is_the_one_verified(project, monkeypatch):
    """A production model.onnx replaced after the verification and before the read is refused too."""
    from tasks.handoff.registry import Registry

    root, params = project
    set_candidate(root, tag="prod", macro_f1=0.9)
    prod = publish_candidate(params, root, None)["registry_version"]
    onnx_file = root / "registry" / params.project.name / prod / "model.onnx"
    replacement = make_onnx(root / "other.onnx", CONFUSED).read_bytes()
    verify = Registry.verify

    def verify_then_replace(registry: Registry, version: str) -> list[str]:
        problems = verify(registry, version)
        onnx_file.write_bytes(replacement)   # a concurrent writer, right after the check
        return problems

    monkeypatch.setattr(Registry, "verify", verify_then_replace)
    set_candidate(root, tag="cand", macro_f1=0.8)
    with pytest.raises(StageError, match=f"production version {prod} .* does not verify: model.onnx changed after "
                                         f"it was verified.*registry rollback"):
        publish_candidate(params, root, None)
    assert open_registry(params, root).versions() == [prod]


def test_dirty_tree_refuses_unless_allowed_and_pipeline_state_is_not_dirt(project):
    root, params = project
    set_candidate(root, macro_f1=0.8)
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n# edited by the flow\n")
    (root / "dvc.lock").write_text((root / "dvc.lock").read_text() + "\n")
    clean = publish_candidate(params, root, None)  # params.yaml / dvc.lock changes are recorded by value/hash
    assert open_registry(params, root).read_json(clean["registry_version"], "lineage.json")["git_dirty"] is False

    (root / "code.py").write_text("x = 1\n")
    run(["git", "add", "code.py"], root)
    run(["git", "commit", "-q", "-m", "code"], root)
    (root / "code.py").write_text("x = 2\n")
    set_candidate(root, tag="dirty", macro_f1=0.9)
    with pytest.raises(StageError, match=r"dirty git tree \(code.py\).*registry.allow_dirty"):
        publish_candidate(params, root, None)
    assert open_registry(params, root).versions() == [clean["registry_version"]]

    allowed = make_params(allow_dirty=True)
    result = publish_candidate(allowed, root, None)
    lineage = open_registry(allowed, root).read_json(result["registry_version"], "lineage.json")
    assert lineage["git_dirty"] is True and lineage["git_dirty_files"] == ["code.py"]


def test_stale_metrics_are_refused_with_the_stage_to_rerun(project):
    root, params = project
    set_candidate(root, macro_f1=0.8)
    metrics_path = root / "metrics/evaluate.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "test_split_sha256": "0" * 64}))
    with pytest.raises(StageError, match="metrics/evaluate.json was computed on another test split.*dvc repro evaluate"):
        publish_candidate(params, root, None)


def test_the_weights_record_comes_from_the_export_report_never_from_unpickling_the_checkpoint(project):
    root, params = project
    set_candidate(root, macro_f1=0.8)
    record = {"arch": "resnet18", "weights": "IMAGENET1K_V1", "source": "torchvision", "sha256": "cd" * 32}
    report_path = root / "metrics/export.json"
    write_json(report_path, {**json.loads(report_path.read_text()), "weights": record})
    checkpoint = root / params.train.out_dir / "model.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"not a pickle: publish must not load it")
    result = publish_candidate(params, root, None)
    lineage = open_registry(params, root).read_json(result["registry_version"], "lineage.json")
    assert lineage["weights"] == record and lineage["weights_sha256"] == "cd" * 32
    assert lineage["checkpoint_sha256"] == sha256_file(checkpoint)


def test_missing_lineage_blocks_promotion(project):
    root, params = project
    (root / "dvc.lock").unlink()
    run(["git", "rm", "-q", "--cached", "dvc.lock"], root)
    run(["git", "commit", "-q", "-m", "no lock"], root)
    set_candidate(root, macro_f1=0.8)
    with pytest.raises(StageError, match="dvc.lock has no prepare-stage dep data/raw"):
        publish_candidate(params, root, None)


CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
import tasks.handoff.registry_files as registry_files
from tasks.handoff.publish import publish_candidate
from tasks.lib.config import load_params

stage = sys.argv[1]
registry_files.CRASH_HOOK = lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == stage else None
publish_candidate(load_params(Path("params.yaml")), Path.cwd(), None)
"""


@pytest.mark.parametrize("stage", ["version_files_written", "version_committed"])
def test_sigkill_between_version_and_pointer_keeps_production(project, stage):
    root, params = project
    set_candidate(root, tag="v1", macro_f1=0.8)
    v1 = publish_candidate(params, root, None)["registry_version"]
    pointer_before = (root / "registry" / params.project.name / "production").read_bytes()
    set_candidate(root, tag="v2", macro_f1=0.9)

    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, stage], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    registry = open_registry(params, root)
    assert (root / "registry" / params.project.name / "production").read_bytes() == pointer_before
    assert registry.production() == v1
    if stage == "version_files_written":  # half-written: invisible, and swept once it is old
        assert registry.versions() == [v1]
        leftovers = list((root / "registry" / params.project.name).glob(".tmp-*"))
        assert len(leftovers) == 1
        os.utime(leftovers[0], (0, 0))
    else:  # complete but never promoted: visible, not production
        assert len(registry.versions()) == 2
    # Publishing again finishes the job without a duplicate version.
    result = publish_candidate(params, root, None)
    assert result["promoted"] is True and registry.production() == result["registry_version"] != v1
    assert len(registry.versions()) == 2
    assert not list((root / "registry" / params.project.name).glob(".tmp-*"))
