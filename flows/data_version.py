"""Data versions: which DVC hash of data/raw a git revision holds, and an isolated working copy for it.

A data version is a git revision (commit, branch or tag) whose `data/raw.dvc`
pins the DVC hash of the image folder. Retraining on any revision other than
the workspace's own happens in a `git worktree` in a temporary folder that
shares the project's DVC cache and remotes, so the user's files, dvc.lock and
branch are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tasks.handoff.lineage import dvc_pointer_hash
from tasks.lib.config_support import yaml_error_text
from tasks.lib.io import process_alive

COPY_PREFIX = "retrain-"         # tempfile.mkdtemp(prefix=...): where isolated copies live
OWNER_FILE = "owner.pid"         # beside the copy: the process that made it, so a killed run's copy can go


class DataVersionError(RuntimeError):
    """A revision or a data version cannot be found; the message says which and what to do."""


def git(root: Path, *args: str) -> str:
    """Run git in root and return its stdout; raise DataVersionError with git's own message."""
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataVersionError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def check_rev(rev: str, what: str = "data_rev") -> str:
    """Refuse a revision git would read as an option (`--output=...`): branch and tag names never start with '-'."""
    if not rev or rev.startswith("-"):
        raise DataVersionError(f"{what} {rev!r} is not a revision: a branch, tag or commit never starts with '-' "
                               "(and is not empty)")
    return rev


def resolve_rev(root: Path, rev: str) -> str:
    """The commit a revision (branch, tag, sha, HEAD~1...) names."""
    check_rev(rev)
    try:
        return git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}").strip()
    except DataVersionError:
        raise DataVersionError(f"data_rev {rev!r} is not a commit, branch or tag of the git repository {root}; "
                               f"list them with `git log --oneline` or `git tag`") from None


def dvc_file(raw_dir: Path) -> Path:
    """data/raw -> data/raw.dvc, the pointer file `dvc add` writes."""
    return raw_dir.with_name(raw_dir.name + ".dvc")


def pointer_md5(text: str, where: str) -> str:
    """The DVC hash in the text of a .dvc file."""
    try:
        found = dvc_pointer_hash(text)
    except yaml.YAMLError as err:
        raise DataVersionError(f"{yaml_error_text(where, err)}: not valid YAML; re-track the data with "
                               f"`dvc add`") from None
    if not found:
        raise DataVersionError(f"{where}: has no outs[0].md5; re-track the data with `dvc add`")
    return found


def md5_at(root: Path, rev: str, raw_dir: Path) -> str:
    """DVC hash of raw_dir as committed at rev (read with `git show`, nothing checked out)."""
    path = dvc_file(raw_dir).as_posix()
    check_rev(rev, "revision")
    try:
        # --end-of-options and --: the revision is never an option, the blob never a path to diff.
        text = git(root, "show", "--end-of-options", f"{rev}:{path}", "--")
    except DataVersionError:
        raise DataVersionError(f"{path} does not exist at revision {rev!r} of {root}; "
                               f"track the data with `dvc add {raw_dir}` and commit {path}") from None
    return pointer_md5(text, f"{rev}:{path}")


def md5_in_workspace(root: Path, raw_dir: Path) -> str:
    """DVC hash that the workspace's .dvc file pins for raw_dir."""
    path = root / dvc_file(raw_dir)
    if not path.exists():
        raise DataVersionError(f"{path} not found: the data is not tracked by DVC; run `dvc add {raw_dir}`")
    return pointer_md5(path.read_text(), str(path))


def is_workspace_version(root: Path, rev: str | None, raw_dir: Path) -> bool:
    """True when rev is the workspace's own data version (None, or HEAD with an unchanged .dvc file)."""
    if rev is None:
        return True
    sha = resolve_rev(root, rev)
    head = git(root, "rev-parse", "HEAD").strip()
    if sha != head:
        return False
    return md5_at(root, sha, raw_dir) == md5_in_workspace(root, raw_dir)


@contextmanager
def isolated_copy(root: Path, rev: str, log: logging.Logger | logging.LoggerAdapter,
                  with_workspace_changes: bool = False) -> Iterator[Path]:
    """A detached git worktree of rev in a temporary folder, sharing root's DVC cache and remotes;
    with_workspace_changes, also the workspace's uncommitted changes and dvc.lock."""
    sha = resolve_rev(root, rev)
    sweep_stale_copies(root, log)
    parent = Path(tempfile.mkdtemp(prefix=COPY_PREFIX))
    (parent / OWNER_FILE).write_text(str(os.getpid()))
    workdir = parent / root.name
    log.info("Isolated working copy of %s (%s) in %s; the workspace %s stays as it is", rev, sha[:12], workdir, root)
    try:
        git(root, "worktree", "add", "--detach", str(workdir), sha)
        if with_workspace_changes:
            copy_workspace_changes(root, workdir)
        share_dvc_storage(root, workdir, log)
        yield workdir
    finally:
        try:
            git(root, "worktree", "remove", "--force", str(workdir))
        except DataVersionError as err:
            log.warning("%s", err)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def sweep_stale_copies(root: Path, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Remove the working copies of runs that were killed (SIGKILL leaves no chance to clean up): worktrees of
    root in a temporary folder whose owner process is gone."""
    for line in git(root, "worktree", "list", "--porcelain").splitlines():
        if not line.startswith("worktree "):
            continue
        workdir = Path(line.removeprefix("worktree "))
        owner = workdir.parent / OWNER_FILE
        if not workdir.parent.name.startswith(COPY_PREFIX) or not owner.is_file():
            continue
        pid = owner.read_text().strip()
        if pid.isdigit() and process_alive(int(pid)):
            continue
        log.info("Removing the working copy %s of a run that did not finish (process %s is gone)", workdir, pid)
        subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=root, capture_output=True)
        shutil.rmtree(workdir.parent, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def copy_workspace_changes(root: Path, workdir: Path) -> None:
    """The workspace as it is: tracked files changed since HEAD (staged or not), new files git does not
    ignore (a new module, a new test) and dvc.lock, copied into the worktree."""
    changed = [line for line in git(root, "diff", "--name-only", "-z", "HEAD").split("\0") if line]
    untracked = [line for line in git(root, "ls-files", "--others", "--exclude-standard", "-z").split("\0") if line]
    for rel in [*changed, *untracked, "dvc.lock"]:
        src, dst = root / rel, workdir / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif not src.exists() and dst.is_file():
            dst.unlink()


def share_dvc_storage(root: Path, workdir: Path, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Point the copy's DVC at root's cache and at root's local remotes (relative paths would move)."""
    from dvc.repo import Repo  # flows may import dvc; imported here because it takes a second

    with Repo(str(root)) as repo:
        cache_dir = repo.cache.local_cache_dir
        remotes = {name: conf.get("url", "") for name, conf in repo.config.get("remote", {}).items()}
    lines = ["[cache]", f"    dir = {cache_dir}"]
    for name, url in remotes.items():
        if url and "://" not in url:  # a local directory: DVC resolved it to an absolute path above
            lines += [f"['remote \"{name}\"']", f"    url = {url}"]
    # config.local is git-ignored and read on top of the committed .dvc/config.
    (workdir / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")
    log.info("The copy shares the DVC cache %s and remotes %s", cache_dir, ", ".join(remotes) or "(none)")


def raw_has_files(raw_dir: Path) -> bool:
    """Whether the data folder exists and holds at least one file."""
    return raw_dir.is_dir() and any(path.is_file() for path in raw_dir.rglob("*"))
