"""A revision or branch that starts with '-' would be read by git as an option (`--output=FILE` writes a file):
refused before git runs, by the watch command line and by the data-version helpers the flows share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.data_version import DataVersionError, md5_at, resolve_rev
from tests.conftest import REPO_ROOT, run


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: raw\n")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "add", "."], root)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", "data"], root)
    return root


@pytest.mark.parametrize("rev", ["--output=/tmp/pwned", "-p", ""])
def test_revisions_that_look_like_options_are_refused(repo: Path, tmp_path: Path, rev: str):
    with pytest.raises(DataVersionError, match="never starts with '-'"):
        md5_at(repo, rev, Path("data/raw"))
    with pytest.raises(DataVersionError, match="never starts with '-'"):
        resolve_rev(repo, rev)
    assert md5_at(repo, "main", Path("data/raw")) == "0123456789abcdef0123456789abcdef.dir"


def test_watch_refuses_such_a_branch_before_anything_runs(tmp_path: Path):
    target = tmp_path / "written-by-git"
    proc = subprocess.run([sys.executable, "-m", "flows.watch", f"--branch=--output={target}"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--branch '--output=" in proc.stderr and "never starts with '-'" in proc.stderr
    assert not target.exists()
