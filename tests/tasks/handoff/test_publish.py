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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import open_registry
from tasks.lib.cli import StageError
from tasks.lib.config import Params
from tasks.lib.io import SplitRow, read_split, sha256_file, split_digest, write_json, write_split
from tasks.lib.preprocess import Preprocessing
from tests.conftest import REPO_ROOT, run, write_image_folder

CLASSES = ["class_0", "class_1", "class_2"]
PREP = Preprocessing(crop_size=32, resize_size=32)
GOOD = np.eye(3, dtype=np.float32) * 10  # class c is the image's brightest channel (write_image_folder's colours)
CONFUSED = GOOD[:, [0, 1, 1]]            # never predicts class_2: its images go to class_1


def make_onnx(path: Path, weight: np.ndarray = GOOD, class_names: list[str] = CLASSES, tag: str = "a",
              prep: Preprocessing = PREP) -> Path:
    """A real classifier: global average pool of the RGB input, then a linear layer; metadata per the contract."""
    k = weight.shape[1]
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, prep.crop_size, prep.crop_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, k], weight.astype(np.float32).flatten().tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [k], [0.0] * k)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, {"class_names": json.dumps(class_names),
                                   "preprocessing": json.dumps(prep.to_dict()),
                                   "lineage": json.dumps({"tag": tag, "git_commit": "test"})})
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def synthetic_metrics(macro_f1: float, split_sha256: str, recalls: tuple[float, ...] = (0.9, 0.9, 0.9),
                      classes: list[str] = CLASSES) -> dict[str, Any]:
    """A metrics.json per the evaluate contract, with chosen numbers."""
    return {"accuracy": macro_f1, "balanced_accuracy": macro_f1, "macro_f1": macro_f1, "weighted_f1": macro_f1,
            "top_k_accuracy": 1.0, "top_k": 3, "log_loss": 0.3, "ece": 0.05, "n_test": 12, "baseline_accuracy": 0.05,
            "test_split_sha256": split_sha256,
            "per_class": {c: {"precision": 0.9, "recall": r, "f1": 0.9, "support": 4}
                          for c, r in zip(classes, recalls, strict=True)}}


def make_params(significance: float | None = None, **registry: Any) -> Params:
    """The paired test is off unless asked for: 12 test images cannot show a significant difference."""
    return Params.model_validate({"registry": {"uri": "registry", **registry}, "gate": {"significance": significance}})


def make_project(root: Path, params: Params, per_class: int = 4) -> Path:
    """A committed git repo with data, split files, dvc.lock and every artifact publish reads."""
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
                  recalls: tuple[float, ...] = (0.9, 0.9, 0.9), parity: bool = True) -> str:
    """Write a candidate's model.onnx, export report and metrics (synthetic numbers, or real when macro_f1 is None)."""
    onnx_path = make_onnx(root / "artifacts/export/model.onnx", weight, tag=tag)
    onnx_sha = sha256_file(onnx_path)
    write_json(root / "metrics/export.json",
               {"onnx": str(onnx_path), "onnx_sha256": onnx_sha, "opset": 17, "exporter": "onnx.helper",
                "parity_passed": parity, "max_abs_diff": 1e-6, "argmax_agree": 1.0, "ort_latency_ms_p50": 0.1,
                "ort_latency_ms_p95": 0.2, "ort_throughput_img_per_s_b32": 5000.0, "quantized": {"enabled": False}})
    split = split_digest(root / "data/prepared/test.csv")
    rows = read_split(root / "data/prepared/test.csv")
    labels = [r.label for r in rows]
    if macro_f1 is None:
        from tasks.handoff.publish import score_onnx

        metrics, probs = score_onnx(onnx_path, root / "data/prepared", root / "data/raw", CLASSES, top_k=3, bins=15)
        predicted = [int(p) for p in probs.argmax(axis=1)]
        metrics["baseline_accuracy"] = 0.05     # evaluate's pixel baseline, far below these toy models
    else:
        metrics = synthetic_metrics(macro_f1, split, recalls)
        right = round(macro_f1 * len(rows)) if math.isfinite(macro_f1) else 0   # the first `right` images
        predicted = [label if i < right else (label + 1) % 3 for i, label in enumerate(labels)]
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
def test_changed_test_split_re_evaluates_production_from_its_onnx_file(project):
    root, params = project
    set_candidate(root, tag="prod", weight=CONFUSED)  # real metrics: class_2 never right
    prod = publish_candidate(params, root, None)
    assert prod["promoted"] is True
    prod_metrics = prod["decision"]["candidate_metrics"]
    assert prod_metrics["per_class"]["class_2"]["recall"] == 0.0

    # New data version: more test images, so a new split hash.
    write_image_folder(root / "data/raw", classes=3, per_class=6, size=32, seed=1)
    rows = [SplitRow(f"class_{c}/img_{i:03d}.png", c, sha256_file(root / f"data/raw/class_{c}/img_{i:03d}.png"))
            for c in range(3) for i in range(6)]
    write_split(root / "data/prepared/test.csv", rows)
    set_candidate(root, tag="cand", weight=GOOD)
    result = publish_candidate(params, root, None)
    decision = result["decision"]
    assert decision["production_re_evaluated"] is True
    new_split = split_digest(root / "data/prepared/test.csv")
    assert decision["production_metrics"]["test_split_sha256"] == new_split != prod_metrics["test_split_sha256"]
    assert decision["production_metrics"]["n_test"] == 18
    assert decision["production_metrics"]["per_class"]["class_2"]["recall"] == 0.0
    assert result["promoted"] is True and decision["candidate_metrics"]["macro_f1"] == 1.0


@pytest.mark.slow
def test_the_gate_pairs_both_models_predictions_on_the_same_test_images(tmp_path):
    params = make_params(significance=0.05)
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="prod", weight=CONFUSED)          # wrong on every class_2 image
    prod = publish_candidate(params, root, None)
    registry = open_registry(params, root)
    stored = registry.read_json(prod["registry_version"], "predictions.json")
    assert stored["predicted"].count(2) == 0 and len(stored["predicted"]) == 12
    set_candidate(root, tag="cand", weight=GOOD)              # right on those 4 too, and nowhere worse
    result = publish_candidate(params, root, None)
    assert result["promoted"] is False
    assert result["reason"] == ("not significant: +33.3 points accuracy (4 images better, 0 worse), McNemar p=0.12 "
                                "on 12 images (needs p < gate.significance 0.05)")
    paired = registry.read_json(result["registry_version"], "decision.json")["paired_test"]
    assert (paired["wins"], paired["losses"], paired["n"]) == (4, 0, 12)


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
from tasks.lib.config import load_params
from tasks.handoff.publish import publish_candidate

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
