"""flows.demo: the demo data step keeps the committed data/raw.dvc; missing outputs are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows.demo import DemoError, build_summary, ensure_demo_data
from tasks.lib.config import load_params
from tests.conftest import REPO_ROOT, run


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
