"""flows.demo: the demo data step keeps the committed data/raw.dvc; missing outputs are named; a run that
could change nothing is answered without the flow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.demo import DemoError, build_summary, ensure_demo_data, main, up_to_date_result
from tasks.lib.config import Params, load_params
from tasks.lib.io import write_json
from tests.conftest import REPO_ROOT, run, write_image_folder


@pytest.mark.slow
def test_demo_data_reproduces_the_committed_data_version(tmp_path: Path, fashion_mnist: Path) -> None:
    root = tmp_path / "clone"
    root.mkdir()
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    (root / "data").mkdir()
    committed = run(["git", "show", "HEAD:data/raw.dvc"], REPO_ROOT).stdout
    (root / "data" / "raw.dvc").write_text(committed)

    ensure_demo_data(root, load_params(root / "params.yaml"))
    assert (root / "data" / "raw.dvc").read_text() == committed  # same bytes -> same DVC hash
    assert len(list((root / "data" / "raw").rglob("*.png"))) == yaml.safe_load(committed)["outs"][0]["nfiles"]

    # Data present: nothing is written again and DVC is not asked (the files keep their inodes and times).
    before = {p: p.stat() for p in (root / "data").rglob("*")}
    ensure_demo_data(root, load_params(root / "params.yaml"))
    after = {p: p.stat() for p in (root / "data").rglob("*")}
    assert after.keys() == before.keys()
    assert all((after[p].st_ino, after[p].st_mtime_ns) == (before[p].st_ino, before[p].st_mtime_ns) for p in before)


def test_summary_names_every_missing_output(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text("outs:\n- md5: abc.dir\n  path: raw\n")
    params = load_params(REPO_ROOT / "params.yaml")
    result = {"stages": [], "stages_run": [], "stages_skipped": [], "publish": None, "flow_run_id": "x"}
    with pytest.raises(DemoError) as err:
        build_summary(tmp_path, params, result, 1.0)
    for path in ("data/prepared/report.json", "artifacts/weights/weights.json", "metrics/train.json",
                 "metrics/evaluate.json", "metrics/export.json"):
        assert path in str(err.value)


def test_a_run_that_could_change_nothing_is_answered_without_the_flow(tmp_path: Path) -> None:
    """Up to date = no retrain running, `dvc status` clean and production already this ONNX file;
    each of those failing sends `make demo` through the flow."""
    from flows.lock import retrain_lock
    from tasks.handoff.publish import publish_candidate
    from tests.tasks.handoff.test_publish import GOOD, make_params, make_project, set_candidate

    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root)
    (root / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: 'true'\n    deps: [data/raw]\n")
    run(["dvc", "init", "-q"], root)
    run(["dvc", "repro", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "a one-stage pipeline"], root)
    assert up_to_date_result(root, params) is None   # nothing published yet: the gate has a decision to make

    version = publish_candidate(params, root, "run-1")["registry_version"]
    current = up_to_date_result(root, params)
    assert current is not None and current["flow_run_id"] is None
    assert current["stages_run"] == [] and current["stages_skipped"] == ["prepare"]
    assert current["publish"]["registry_version"] == version and current["publish"]["promoted"] is False
    assert Path(current["publish"]["model_card"]).exists()

    with retrain_lock(root, 0, {"flow_run_id": "another"}):   # a retrain under way decides for itself
        assert up_to_date_result(root, params) is None

    set_candidate(root, weight=GOOD * 2, tag="b")   # a model that is not production yet
    assert up_to_date_result(root, params) is None
    set_candidate(root)
    assert up_to_date_result(root, params) is not None

    write_image_folder(root / "data/raw", classes=3, per_class=5, size=32)   # one more image per class
    assert up_to_date_result(root, params) is None   # dvc status: prepare's deps changed


def published_project(tmp_path: Path) -> tuple[Path, Params, str]:
    """A project with nothing to do: a one-stage pipeline over a DVC-tracked data/raw, current and committed,
    every report the summary reads, and its model already production; (root, params, production version)."""
    from tasks.handoff.publish import publish_candidate
    from tests.tasks.handoff.test_publish import make_params, make_project, set_candidate

    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root)
    write_json(root / "metrics/train.json", {"val_accuracy": 1.0, "epochs": 1})
    (root / ".gitignore").write_text("artifacts/\nregistry/\nmetrics/\n/data/prepared/\n")
    (root / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: 'true'\n    deps: [data/raw]\n")
    run(["dvc", "init", "-q"], root)
    run(["dvc", "add", "-q", "data/raw"], root)
    run(["dvc", "repro", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "a one-stage pipeline over data version v1"], root)
    return root, params, publish_candidate(params, root, "run-1")["registry_version"]


def damage_onnx(root: Path, params: Params, version: str, damage: str) -> None:
    """Production's model.onnx in the registry, edited (another valid model in its place) or deleted."""
    from tests.tasks.handoff.test_publish import CONFUSED, make_onnx

    onnx_file = root / "registry" / params.project.name / version / "model.onnx"
    if damage == "edited":
        onnx_file.write_bytes(make_onnx(root / "artifacts/other.onnx", CONFUSED).read_bytes())
    else:
        onnx_file.unlink()


@pytest.mark.parametrize("damage", ["edited", "deleted"])
def test_make_demo_reports_a_damaged_production_instead_of_up_to_date(tmp_path: Path, monkeypatch, capsys,
                                                                      damage: str) -> None:
    root, params, version = published_project(tmp_path)
    monkeypatch.chdir(root)
    assert main() == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["flow_state"] == "Up to date" and summary["registry_version"] == version

    damage_onnx(root, params, version, damage)
    assert main() == 1
    captured = capsys.readouterr()
    assert captured.out == ""                    # no summary line that says all is well
    assert f"production version {version} of {params.project.name}" in captured.err
    assert ("model.onnx sha256" if damage == "edited" else "model.onnx is missing") in captured.err
    assert f"`registry verify {version}`" in captured.err and "`registry rollback`" in captured.err
