"""Prepare's check cache is optional: a full disk under it (a real ENOSPC, on a small tmpfs) costs one warning
naming the file, never the stage."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, in_ci, write_image_folder

PARAMS = "data:\n  raw_dir: raw\n  prepared_dir: {out}\nprepare:\n  cache_dir: {cache}\n  num_workers: 2\n"
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
# A user namespace needs no privileges; plain --mount needs root (CAP_SYS_ADMIN). Either way the tmpfs
# is mounted for the command alone and vanishes with it: nothing to unmount, nothing seen outside.
NAMESPACES = (["unshare", "--mount", "--map-root-user"], ["unshare", "--mount"])
FILL = "dd if=/dev/zero of=cache/filler bs=4096 2>/dev/null || true\n"   # stops at ENOSPC: the disk is full


def private_mounts() -> list[str]:
    """An unshare command line under which `mount` affects only the command it runs."""
    for command in NAMESPACES:
        if shutil.which(command[0]) and subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    message = "no private mount namespace here (unshare missing or not permitted) to mount a small tmpfs"
    if in_ci():
        pytest.fail(message + "; CI must not skip this test")
    pytest.skip(message)


def on_a_small_disk(project: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in project with `cache/` a 1 MiB tmpfs of its own; PREPARE in it runs the stage."""
    body = "set -e\nmount -t tmpfs -o size=1m tmpfs cache\n"
    body += script.replace("PREPARE", f"{sys.executable} -m tasks.prepare")
    return subprocess.run([*private_mounts(), "sh", "-c", body], cwd=project, capture_output=True, text=True,
                          timeout=300, env=ENV)


def outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("train.csv", "val.csv", "test.csv", "classes.json")}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "raw", classes=3, per_class=12, size=32)
    write_image_folder(tmp_path / "more", classes=3, per_class=3, size=32, seed=5)
    (tmp_path / "cache").mkdir()
    (tmp_path / "params.yaml").write_text(PARAMS.format(out="out", cache="cache"))
    return tmp_path


def assert_one_warning_and_the_same_splits(proc: subprocess.CompletedProcess, project: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "check cache" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], proc.stderr
    assert f"prepare's check cache {project / 'cache' / 'checks.sqlite'} cannot be used (" in warnings[0]
    assert ", no space left on its disk); going on without it" in warnings[0]
    # The splits of a run whose cache is healthy.
    (project / "params.yaml").write_text(PARAMS.format(out="reference", cache="healthy-cache"))
    subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=project, check=True, capture_output=True, env=ENV)
    assert outputs(project / "out") == outputs(project / "reference")


@pytest.mark.slow(seconds=10)
def test_a_cache_on_a_full_disk_from_the_start_costs_one_warning(project: Path) -> None:
    assert_one_warning_and_the_same_splits(on_a_small_disk(project, f"{FILL}PREPARE\n"), project)


@pytest.mark.slow(seconds=15)
def test_a_disk_that_fills_between_runs_costs_one_warning(project: Path) -> None:
    """The cache exists and answers; recording the new images fails."""
    add = "".join(f"cp {image} raw/{image.parent.name}/new_{image.name}\n"
                  for image in sorted((project / "more").rglob("*.png")))
    proc = on_a_small_disk(project, f"PREPARE 2>first.log\n{FILL}{add}PREPARE\n")
    assert "check cache" not in (project / "first.log").read_text()      # the first run had room
    assert_one_warning_and_the_same_splits(proc, project)
