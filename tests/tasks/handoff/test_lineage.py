"""The lineage record on a real git repository: data hash, commit, what counts as a dirty tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.handoff.lineage import LineageError, build_lineage, data_hash, git_state, missing_fields
from tasks.lib.config import load_params
from tests.conftest import REPO_ROOT, run

RAW = Path("data/raw")
POINTER_MD5 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir"
LOCK_MD5 = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.dir"


def commit(root: Path) -> str:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", "x"], root)
    return run(["git", "rev-parse", "HEAD"], root).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], root)
    (root / "data" / "raw.dvc").write_text(f"outs:\n- md5: {POINTER_MD5}\n  path: raw\n")
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    (root / "code.py").write_text("X = 1\n")
    commit(root)
    return root


def lineage(root: Path, *overrides: str) -> dict:
    params = load_params(root / "params.yaml", list(overrides))
    return build_lineage(params, root, onnx_sha256="o" * 64, test_split_sha256="t" * 64,
                         weights_record={"arch": params.model.arch}, weights_sha256="w" * 64,
                         checkpoint_sha256="c" * 64, flow_run_id=None)


def test_the_data_hash_is_what_prepare_ran_on_else_what_the_pointer_pins(repo: Path) -> None:
    assert data_hash(repo, RAW) == POINTER_MD5
    (repo / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  prepare:\n    deps:\n"
                                   f"    - path: data/raw\n      md5: {LOCK_MD5}\n")
    assert data_hash(repo, RAW) == LOCK_MD5   # dvc.lock: the data the pipeline really ran on
    (repo / "dvc.lock").write_text("stages: [\n")
    with pytest.raises(LineageError, match=r"dvc.lock, line 2, column 1: .*: not valid YAML; re-run `dvc repro`"):
        data_hash(repo, RAW)
    (repo / "dvc.lock").unlink()
    (repo / "data" / "raw.dvc").unlink()
    with pytest.raises(LineageError, match="track the data with `dvc add data/raw`"):
        data_hash(repo, RAW)


def test_pipeline_state_and_reports_never_make_the_tree_dirty_but_code_does(repo: Path) -> None:
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert git_state(repo, Path("metrics")) == (head, False, [])
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n")   # an override run rewrote it
    (repo / "data" / "raw.dvc").write_text(f"outs:\n- md5: {LOCK_MD5}\n  path: raw\n")   # `dvc add`
    (repo / "metrics").mkdir()
    (repo / "metrics" / "evaluate.json").write_text("{}")
    commit(repo)
    (repo / "metrics" / "evaluate.json").write_text('{"accuracy": 1}')   # tracked report rewritten by a run
    (repo / "untracked.txt").write_text("never counts")
    assert git_state(repo, Path("metrics"))[1:] == (False, [])
    (repo / "code.py").write_text("X = 2\n")
    assert git_state(repo, Path("metrics"))[1:] == (True, ["code.py"])


def test_a_dirty_tree_is_refused_unless_allowed_and_then_recorded(repo: Path) -> None:
    record = lineage(repo)
    assert missing_fields(record) == []
    assert record["git_dirty"] is False and record["data_hash"] == POINTER_MD5
    assert record["params"]["registry"]["uri"] == "registry"   # params as written, not resolved paths
    assert record["packages"]["torch"] and record["packages"]["onnx"]

    (repo / "code.py").write_text("X = 2\n")
    with pytest.raises(LineageError, match=r"dirty git tree \(code.py\).*registry.allow_dirty=true"):
        lineage(repo)
    allowed = lineage(repo, "registry.allow_dirty=true")
    assert allowed["git_dirty"] is True and allowed["git_dirty_files"] == ["code.py"]


def test_outside_a_git_repository_the_record_says_so(tmp_path: Path, repo: Path) -> None:
    plain = tmp_path / "plain"
    (plain / "data").mkdir(parents=True)
    (plain / "data" / "raw.dvc").write_text((repo / "data" / "raw.dvc").read_text())
    (plain / "params.yaml").write_text((repo / "params.yaml").read_text())
    with pytest.raises(LineageError, match="is not a git repository"):
        lineage(plain)
    assert lineage(plain, "registry.allow_dirty=true")["git_commit"] is None


def test_missing_fields_names_each_gap() -> None:
    assert missing_fields(None) == ["lineage record"]
    assert missing_fields({"data_hash": "x"}) == ["git_commit", "git_dirty", "params", "params_sha256", "packages",
                                                  "weights_sha256", "onnx_sha256", "test_split_sha256",
                                                  "flow_run_id"]
