"""`python -m flows.retrain` on a fresh clone that has no data stops before any Prefect server starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run

# The command line of the working tree's flows.retrain, run in the clone (`-m` would import the clone's copy).
RETRAIN = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from flows.retrain import main; sys.exit(main())"
ADVICE = "run `make demo` for the demo data, or put one folder of images per class in data/raw and run " \
         "`dvc add data/raw` (then `git add data/raw.dvc` and commit it)"


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """A git clone of the project: data/raw.dvc committed, its data in no cache, its remote not there."""
    run(["git", "clone", "-q", str(REPO_ROOT), str(tmp_path / "clone")], tmp_path)
    return tmp_path / "clone"


def retrain_in(clone: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")   # PREFECT_HOME from the clone's prefect.toml: .prefect
    return subprocess.run([sys.executable, "-c", RETRAIN], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("dvc_file", ["committed, not pulled", "never added"])
def test_a_fresh_clone_without_data_is_told_what_to_do_before_a_server_starts(fresh_clone: Path,
                                                                              dvc_file: str) -> None:
    if dvc_file == "never added":
        (fresh_clone / "data" / "raw.dvc").unlink()
    proc = retrain_in(fresh_clone)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no data: data/raw has no images") and ADVICE in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    if dvc_file == "never added":
        assert "data/raw.dvc does not exist" in proc.stderr
    else:   # the pinned version is named, and where it was looked for
        assert "the version data/raw.dvc pins (" in proc.stderr and "storage/dvc" in proc.stderr
    assert not list(fresh_clone.glob(".prefect/*.db")), "a Prefect server database was created"


def test_the_readme_quotes_the_message_a_fresh_clone_without_data_gets() -> None:
    """What the README tells a new user to expect is what the command prints (the test above runs it)."""
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert "`error: no data: data/raw has no images`" in readme
    assert "`make demo`" in readme and "`dvc add data/raw`" in readme
