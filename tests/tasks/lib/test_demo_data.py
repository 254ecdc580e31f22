"""The demo materialiser: deterministic bytes, stratified subset, never overwrites data."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from tasks.lib.config import DemoParams
from tasks.lib.demo_data import CLASS_NAMES, materialise
from tasks.lib.errors import StageError

SOURCE = DemoParams().source_dir
needs_fashion = pytest.mark.usefixtures("fashion_mnist")  # fails without the files, saying how to install them


@needs_fashion
def test_materialising_twice_gives_identical_bytes(tmp_path: Path):
    for name in ("a", "b"):
        assert materialise(tmp_path / name, 3, 0, SOURCE, tmp_path / "dl") == 30
    comparison = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert sorted(comparison.common_dirs) == sorted(CLASS_NAMES)
    for cls in CLASS_NAMES:
        files = sorted(p.name for p in (tmp_path / "a" / cls).iterdir())
        assert len(files) == 3
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / cls, tmp_path / "b" / cls, files, shallow=False)
        assert match == files and not mismatch and not errors


@needs_fashion
def test_seed_picks_other_images(tmp_path: Path):
    materialise(tmp_path / "a", 3, 0, SOURCE, tmp_path / "dl")
    materialise(tmp_path / "b", 3, 1, SOURCE, tmp_path / "dl")
    assert {p.name for p in (tmp_path / "a" / "bag").iterdir()} != {p.name for p in (tmp_path / "b" / "bag").iterdir()}


def test_refuses_to_overwrite_existing_data(tmp_path: Path):
    (tmp_path / "raw" / "cats").mkdir(parents=True)
    (tmp_path / "raw" / "cats" / "mine.png").write_bytes(b"x")
    with pytest.raises(StageError, match="not empty"):
        materialise(tmp_path / "raw", 3, 0, SOURCE, tmp_path / "dl")
    assert (tmp_path / "raw" / "cats" / "mine.png").read_bytes() == b"x"
