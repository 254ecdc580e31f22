"""Lineage: the record that ties a published model to its data, code, params and environment.

Every registry version carries one (`lineage.json`). A model whose record is
incomplete cannot be promoted: production must always be traceable to the exact
data version, git commit and parameters that made it.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.config import Params
from tasks.lib.config_support import yaml_error_text

LINEAGE_FORMAT = 1
# Packages whose versions can change a model's numbers or its file format.
PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "pillow", "prefect", "dvc", "fsspec")
# Keys that must hold a value for the record to be complete. `flow_run_id` must be
# present but may be null: a version published by hand (`registry publish`) has none.
REQUIRED = ("data_hash", "git_commit", "git_dirty", "params", "params_sha256", "packages", "weights_sha256",
            "onnx_sha256", "test_split_sha256")
# Changes to these tracked files do not make the tree "dirty": they are pipeline and
# data state that the flow itself rewrites (params overrides, `dvc repro`, `dvc add`),
# and the record already pins them by value (full params) and by hash (data_hash).
PIPELINE_STATE = ("dvc.lock", "params.yaml")


class LineageError(ValueError):
    """The lineage of a candidate cannot be established (missing dvc.lock, dirty tree...)."""


def data_hash(root: Path, raw_dir: Path) -> str:
    """DVC hash of the raw data folder: prepare's dep in dvc.lock, else the .dvc file."""
    lock, dvc_file = root / "dvc.lock", root / f"{raw_dir}.dvc"
    if lock.exists() and (found := _lock_dep_hash(lock, raw_dir)):
        return found
    if dvc_file.exists() and (found := dvc_pointer_hash(dvc_file.read_text())):
        return found
    raise LineageError(f"{lock} has no prepare-stage dep {raw_dir} and {dvc_file} has no md5; "
                       f"track the data with `dvc add {raw_dir}` and run `dvc repro` first")


def dvc_pointer_hash(text: str) -> str | None:
    """The hash a .dvc pointer file pins (outs[0].md5, or etag); None if none. yaml.YAMLError if malformed."""
    outs = (yaml.safe_load(text) or {}).get("outs") or [{}]
    found = outs[0].get("md5") or outs[0].get("etag")
    return str(found) if found else None


def _lock_dep_hash(lock: Path, raw_dir: Path) -> str | None:
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as err:
        raise LineageError(f"{yaml_error_text(str(lock), err)}: not valid YAML; "
                           f"re-run `dvc repro` to rewrite it") from None
    for dep in (stages.get("prepare") or {}).get("deps") or []:
        if Path(dep.get("path", "")) == Path(raw_dir):
            return dep.get("md5") or dep.get("etag")
    return None


def git_state(root: Path, reports_dir: Path) -> tuple[str | None, bool, list[str]]:
    """(HEAD commit or None outside a repo, dirty?, changed tracked files that count, never under reports_dir)."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None, True, []
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()]
    dirty = [path for path in changed if not _is_pipeline_state(path, reports_dir)]
    return head.strip(), bool(dirty), dirty


def _is_pipeline_state(path: str, reports_dir: Path) -> bool:
    return Path(path).is_relative_to(reports_dir) or Path(path).name in PIPELINE_STATE or path.endswith(".dvc")


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions; None for a package this machine lacks (prefect and dvc may be absent on a GPU box)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_lineage(params: Params, root: Path, *, onnx_sha256: str, test_split_sha256: str,
                  weights_record: dict[str, Any], weights_sha256: str | None, checkpoint_sha256: str | None,
                  flow_run_id: str | None) -> dict[str, Any]:
    """The full record; refuses a dirty git tree unless registry.allow_dirty is set."""
    commit, dirty, dirty_files = git_state(root, params.reports.dir)
    if dirty and not params.registry.allow_dirty:
        what = ", ".join(dirty_files[:10]) if commit else f"{root} is not a git repository"
        raise LineageError(f"refusing to publish from a dirty git tree ({what}); commit the changes, "
                           "or set registry.allow_dirty=true to publish anyway (the lineage will say dirty=true)")
    return {
        "format": LINEAGE_FORMAT,
        "data_hash": data_hash(root, params.data.raw_dir),
        "git_commit": commit,
        "git_dirty": dirty,
        "git_dirty_files": dirty_files,
        "params": params.model_dump(mode="json"),
        "params_sha256": params.digest(),
        "packages": package_versions(),
        "weights": weights_record,
        "weights_sha256": weights_sha256,
        "checkpoint_sha256": checkpoint_sha256,
        "onnx_sha256": onnx_sha256,
        "test_split_sha256": test_split_sha256,
        "flow_run_id": flow_run_id,
    }


def missing_fields(lineage: dict[str, Any] | None) -> list[str]:
    """Names of the required lineage fields that are absent or empty ([] means complete)."""
    if not lineage:
        return ["lineage record"]
    missing = [key for key in REQUIRED if lineage.get(key) in (None, "", {}, [])]
    if "flow_run_id" not in lineage:
        missing.append("flow_run_id")
    return missing
