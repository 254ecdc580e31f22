"""flows.data_version on a real git repository: which data a revision pins, and the isolated copy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.data_version import (DataVersionError, copy_workspace_changes, is_workspace_version, md5_at,
                                md5_in_workspace, pointer_md5, resolve_rev)
from tests.conftest import run

RAW = Path("data/raw")
V1 = "11111111111111111111111111111111.dir"
V2 = "22222222222222222222222222222222.dir"


def pointer(md5: str) -> str:
    return f"outs:\n- md5: {md5}\n  path: raw\n"


def commit(root: Path, message: str, tag: str | None = None) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", message], root)
    if tag:
        run(["git", "tag", tag], root)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Two data versions, v1 and v2, as `dvc add` + commit leave them (the pointer files only)."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], root)
    (root / "data" / "raw.dvc").write_text(pointer(V1))
    (root / "params.yaml").write_text("a: 1\n")
    commit(root, "data v1", tag="v1")
    (root / "data" / "raw.dvc").write_text(pointer(V2))
    commit(root, "data v2", tag="v2")
    return root


def test_each_revision_names_its_own_data_and_nothing_is_checked_out(repo: Path) -> None:
    assert md5_at(repo, "v1", RAW) == V1 and md5_at(repo, "v2", RAW) == V2 and md5_at(repo, "HEAD~1", RAW) == V1
    assert md5_in_workspace(repo, RAW) == V2
    assert resolve_rev(repo, "v1") == run(["git", "rev-parse", "v1"], repo).stdout.strip()
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def test_the_workspace_version_is_head_with_an_unchanged_pointer(repo: Path) -> None:
    assert is_workspace_version(repo, None, RAW) and is_workspace_version(repo, "HEAD", RAW)
    assert is_workspace_version(repo, "v2", RAW)
    assert not is_workspace_version(repo, "v1", RAW)
    (repo / "data" / "raw.dvc").write_text(pointer(V1))   # a `dvc add` not committed yet
    assert not is_workspace_version(repo, "HEAD", RAW)


def test_unknown_revisions_and_broken_pointers_say_what_to_do(repo: Path) -> None:
    with pytest.raises(DataVersionError, match="'v9' is not a commit, branch or tag.*git tag"):
        resolve_rev(repo, "v9")
    with pytest.raises(DataVersionError, match=r"data/raw.dvc does not exist at revision 'v9'"):
        md5_at(repo, "v9", RAW)
    with pytest.raises(DataVersionError, match="has no outs\\[0\\].md5; re-track the data with `dvc add`"):
        pointer_md5("outs: []\n", "data/raw.dvc")
    with pytest.raises(DataVersionError, match="x.dvc, line 2, column 1: .*: not valid YAML"):
        pointer_md5("outs: [\n", "x.dvc")
    (repo / "data" / "raw.dvc").unlink()
    with pytest.raises(DataVersionError, match="not tracked by DVC; run `dvc add data/raw`"):
        md5_in_workspace(repo, RAW)


def test_the_copy_gets_changed_new_and_deleted_files_but_not_ignored_ones(repo: Path, tmp_path: Path) -> None:
    (repo / ".gitignore").write_text("/scratch/\n")
    (repo / "old.txt").write_text("to be deleted\n")
    commit(repo, "ignore scratch, add old.txt")
    workdir = tmp_path / "copy"
    run(["git", "worktree", "add", "-q", "--detach", str(workdir), "HEAD"], repo)
    (repo / "params.yaml").write_text("a: 2\n")                # changed, not staged
    (repo / "new_module.py").write_text("X = 1\n")             # new, not ignored
    (repo / "dvc.lock").write_text("schema: '2.0'\n")          # the pipeline's state: always copied
    (repo / "scratch").mkdir()
    (repo / "scratch" / "big.bin").write_bytes(b"0" * 10)      # ignored: stays behind
    (repo / "old.txt").unlink()                                 # deleted in the workspace
    copy_workspace_changes(repo, workdir)
    assert (workdir / "params.yaml").read_text() == "a: 2\n"
    assert (workdir / "new_module.py").read_text() == "X = 1\n"
    assert (workdir / "dvc.lock").exists()
    assert not (workdir / "scratch").exists()
    assert not (workdir / "old.txt").exists()
    subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=repo, check=True)
