"""Shared test setup: offline settings and tiny real image folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Keep every tool offline and quiet, before anything imports Prefect or DVC. Prefect's home
# (its database) is a fresh folder outside the checkout: tests never touch the project's
# flow history, and nothing is left in the working tree.
TEST_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="pytest-prefect-home-"))
os.environ["PREFECT_HOME"] = str(TEST_PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["DVC_STUDIO_OFFLINE"] = "true"
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"

# `make mutate` (tests/mutate.py): while mutmut records which test calls which function, a child
# process (`python -m tasks...`, `dvc repro`) must not inherit its "stats" mode, in which mutated code
# looks for mutmut's settings in the child's folder and fails. mutmut keeps its own copy of the mode in
# this process; children of a run that tests one mutant still inherit that mutant.
if os.environ.get("MUTANT_UNDER_TEST") in ("stats", "list_all_tests"):
    del os.environ["MUTANT_UNDER_TEST"]


# What the pipeline writes inside a project: tests work in temporary folders and must leave these alone.
CHECKOUT_OUTPUTS = (".cache", ".prefect", "artifacts", "registry", "data/prepared", "metrics")
_OUTPUTS_BEFORE = pytest.StashKey[set]()


def _checkout_outputs() -> set[str]:
    return {str(p.relative_to(REPO_ROOT)) for top in CHECKOUT_OUTPUTS if (REPO_ROOT / top).exists()
            for p in [REPO_ROOT / top, *(REPO_ROOT / top).rglob("*")]}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_OUTPUTS_BEFORE] = _checkout_outputs()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(TEST_PREFECT_HOME, ignore_errors=True)
    before = session.config.stash.get(_OUTPUTS_BEFORE, None)
    if before is None:
        return
    new = sorted(_checkout_outputs() - before)
    if new:   # a test wrote into the checkout (a cache or output path not pointed at its tmp folder)
        print(f"\nerror: the tests wrote into the checkout: {', '.join(new[:5])}"
              f"{' ...' if len(new) > 5 else ''}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



def expected_seconds(item: pytest.Item) -> float:
    """How long a test takes on 2 busy cores: `@pytest.mark.slow(seconds=N)`, 30 for a bare `slow`, else 0."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("seconds", 30))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest tests first: with several workers (`make test` runs pytest-xdist) the short ones then
    fill in around them instead of one long test running alone at the end. A stable sort: the
    order within equal weights stays the collection order."""
    items.sort(key=lambda item: -expected_seconds(item))


FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def fashion_mnist() -> Path:
    """The Fashion-MNIST files. Missing, a test that needs them fails (never skips: CI would pass it unseen)."""
    missing = [name for name in FASHION_MNIST_FILES if not (FASHION_MNIST / name).exists()]
    if missing:
        pytest.fail(f"Fashion-MNIST is not in {FASHION_MNIST} (missing {', '.join(missing)}): run `make demo-data` "
                    "(it runs `apt-get install dataset-fashion-mnist`), or set FASHION_MNIST_DIR to a folder "
                    "holding those files", pytrace=False)
    return FASHION_MNIST


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of real PNGs; each class has its own colour so a model can learn it."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 200
        for i in range(per_class):
            noise = rng.integers(0, 50, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "raw")


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def init_dvc_repo(root: Path) -> Path:
    """A real git + DVC repo holding this project's code, params.yaml and dvc.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tasks", "flows"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, root / name)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "tests@example.invalid"], root)
    run(["git", "config", "user.name", "tests"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    return root


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    return init_dvc_repo(tmp_path / "repo")
