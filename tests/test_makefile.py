"""The Makefile's housekeeping targets, run for real in a scratch copy of the project's layout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT

LAYOUT = ("artifacts/train/model.pt", "data/prepared/train.csv", ".prefect/prefect.db",
          "registry/demo/promotion-log/0000000001.json", "data/raw/shirt/a.png")


def scratch_project(root: Path) -> Path:
    shutil.copy(REPO_ROOT / "Makefile", root / "Makefile")
    for name in LAYOUT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


def make(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=root, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def test_make_clean_keeps_the_registry_and_the_data(tmp_path: Path) -> None:
    root = scratch_project(tmp_path)
    assert make(root, "clean").returncode == 0
    assert not (root / "artifacts").exists() and not (root / "data" / "prepared").exists()
    assert not (root / ".prefect").exists()
    assert (root / "registry/demo/promotion-log/0000000001.json").exists()
    assert (root / "data/raw/shirt/a.png").exists()


def test_make_clean_registry_asks_first_and_deletes_only_when_confirmed(tmp_path: Path) -> None:
    root = scratch_project(tmp_path)
    refused = make(root, "clean-registry")              # no terminal to answer on: nothing is deleted
    assert refused.returncode != 0 and "registry/ kept" in refused.stdout
    assert (root / "registry/demo/promotion-log/0000000001.json").exists()
    assert make(root, "clean-registry", "CONFIRM=yes").returncode == 0
    assert not (root / "registry").exists() and (root / "artifacts").exists()


def test_make_help_says_what_each_cleaning_target_deletes(tmp_path: Path) -> None:
    text = make(scratch_project(tmp_path), "help").stdout
    clean = next(line for line in text.splitlines() if line.startswith("make clean "))
    assert "artifacts/" in clean and "never the registry" in clean
    assert "registry/" in next(line for line in text.splitlines() if line.startswith("make clean-registry"))


def test_make_install_takes_cpu_only_torch_wheels_when_asked(tmp_path: Path) -> None:
    """TORCH=cpu installs the same pinned torch and torchvision from PyTorch's CPU-only index (dry run)."""
    root = scratch_project(tmp_path)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO_ROOT / name, root / name)
    default, cpu = (make(root, "-n", "install", *extra).stdout for extra in ((), ("TORCH=cpu",)))
    torch_line = next(line for line in cpu.splitlines() if "torch==2.14.1" in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line and "torchvision==0.29.1" in torch_line
    assert "torch==2.14.1" in default and "--index-url" not in default
