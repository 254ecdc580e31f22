"""Stage prepare: bad inputs, conversions, dedupe, stable stratified splits, leakage, real `dvc repro`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.cli import StageError
from tasks.config import PrepareParams
from tasks.images import BadImage, load_rgb
from tasks.io import read_split
from tasks.prepare import prepare, split_fraction
from tests.conftest import init_dvc_repo, run, write_image_folder


def cfg(**kwargs) -> PrepareParams:
    return PrepareParams(**{"num_workers": 1, **kwargs})


def split_of(out: Path) -> dict[str, str]:
    """path -> split name, over the three split files."""
    return {row.path: split for split in ("train", "val", "test") for row in read_split(out / f"{split}.csv")}


def add_bad_files(root: Path) -> dict[str, str]:
    """One file of each kind that must be rejected; returns path -> expected reason."""
    folder = root / "class_0"
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    good = folder / "img_000.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("RGB", (200, 200), "red").save(folder / "bomb.png")  # over the test's pixel limit below
    return {"class_0/empty.png": "empty_file", "class_0/notes.jpg": "not_an_image",
            "class_0/truncated.png": "truncated", "class_0/bomb.png": "decompression_bomb"}


def test_bad_files_are_reported_and_never_split(image_folder: Path, tmp_path: Path):
    expected = add_bad_files(image_folder)
    report = prepare(image_folder, tmp_path / "out", cfg(max_pixels=150 * 150))
    assert {r["path"]: r["reason"] for r in report["rejected"]} == expected
    assert set(split_of(tmp_path / "out")).isdisjoint(expected)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["n_rejected"] == 4


def test_fail_policy_names_every_bad_file_and_writes_no_splits(image_folder: Path, tmp_path: Path):
    expected = add_bad_files(image_folder)
    with pytest.raises(StageError) as err:
        prepare(image_folder, tmp_path / "out", cfg(bad_files="fail", max_pixels=150 * 150))
    for path in expected:
        assert path in str(err.value)
    assert not (tmp_path / "out" / "train.csv").exists()
    assert (tmp_path / "out" / "report.json").exists()  # the report still says what was wrong


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "LA", "P", "L", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    else:
        Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (8, 8)
    if mode == "I;16":  # 40000/65535 of full scale, not clipped to white
        assert img.getpixel((0, 0)) == (156, 156, 156)


def test_exif_orientation_is_applied(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), "blue").save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_bomb_detected_from_header_without_decoding(tmp_path: Path):
    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(BadImage) as err:
        load_rgb(path, max_pixels=1000)
    assert err.value.reason == "decompression_bomb" and "400x300" in str(err.value)


def test_hidden_files_and_folders_are_ignored(image_folder: Path, tmp_path: Path):
    (image_folder / "class_0" / ".DS_Store").write_bytes(b"\0\1")
    hidden = image_folder / ".git_like"
    hidden.mkdir()
    shutil.copy(image_folder / "class_0" / "img_000.png", hidden / "x.png")
    (image_folder / "class_1" / ".thumbs").mkdir()
    (image_folder / "class_1" / ".thumbs" / "y.png").write_bytes(b"")
    report = prepare(image_folder, tmp_path / "out", cfg())
    assert report["classes"] == ["class_0", "class_1", "class_2"]
    assert report["n_rejected"] == 0 and report["n_files_scanned"] == 24


def test_empty_class_stops_with_its_name(image_folder: Path, tmp_path: Path):
    (image_folder / "class_empty").mkdir()
    (image_folder / "class_broken").mkdir()
    (image_folder / "class_broken" / "a.png").write_bytes(b"")
    with pytest.raises(StageError, match="class_broken, class_empty"):
        prepare(image_folder, tmp_path / "out", cfg())


def test_single_class_stops(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=1)
    with pytest.raises(StageError, match="at least two"):
        prepare(root, tmp_path / "out", cfg())


def test_missing_input_folder_says_what_to_do(tmp_path: Path):
    with pytest.raises(StageError, match="not found"):
        prepare(tmp_path / "nowhere", tmp_path / "out", cfg())


def test_duplicates_counted_once_and_label_conflicts_excluded(image_folder: Path, tmp_path: Path):
    shutil.copy(image_folder / "class_0" / "img_001.png", image_folder / "class_0" / "copy.png")
    shutil.copy(image_folder / "class_0" / "img_002.png", image_folder / "class_1" / "conflict.png")
    report = prepare(image_folder, tmp_path / "out", cfg())
    assert report["duplicates"]["removed"] == [{"path": "class_0/img_001.png", "same_as": "class_0/copy.png"}]
    assert report["label_conflicts"][0]["classes"] == ["class_0", "class_1"]
    used = split_of(tmp_path / "out")
    assert "class_0/img_002.png" not in used and "class_1/conflict.png" not in used
    assert sum(report["n_images"].values()) == 26 - 1 - 2  # 26 files: one duplicate merged, both conflicting copies out


def test_split_is_deterministic_stratified_and_leak_free(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=4, per_class=100, size=8)
    first = prepare(root, tmp_path / "a", cfg())
    prepare(root, tmp_path / "b", cfg())
    for name in ("train.csv", "val.csv", "test.csv", "classes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for counts in first["per_class"].values():  # each class near 70/15/15 (binomial spread of hash thresholds)
        assert 55 <= counts["train"] <= 85 and 5 <= counts["val"] <= 27 and 5 <= counts["test"] <= 27
    hashes = [{r.sha256 for r in read_split(tmp_path / "a" / f"{s}.csv")} for s in ("train", "val", "test")]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])


def test_adding_images_never_moves_existing_ones(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=3, per_class=40, size=8, seed=1)
    prepare(root, tmp_path / "before", cfg())
    write_image_folder(tmp_path / "more", classes=3, per_class=40, size=8, seed=2)
    for cls in (tmp_path / "more").iterdir():
        for f in cls.iterdir():
            shutil.copy(f, root / cls.name / f"new_{f.name}")
    prepare(root, tmp_path / "after", cfg())
    before, after = split_of(tmp_path / "before"), split_of(tmp_path / "after")
    assert len(after) == 2 * len(before)
    assert all(after[path] == split for path, split in before.items())


def test_seed_changes_the_split():
    assert split_fraction("ab" * 32, 1) != split_fraction("ab" * 32, 2)


def test_predefined_layout_is_kept_and_cross_split_copies_removed(tmp_path: Path):
    root = tmp_path / "raw"
    for i, split in enumerate(("train", "val", "test")):
        write_image_folder(root / split, classes=2, per_class=3, size=8, seed=i)
    shutil.copy(root / "train" / "class_0" / "img_000.png", root / "test" / "class_0" / "leak.png")
    report = prepare(root, tmp_path / "out", cfg())
    assert report["layout"] == "predefined" and report["n_images"] == {"train": 6, "val": 6, "test": 6}
    assert "test/class_0/leak.png" not in split_of(tmp_path / "out")
    assert split_of(tmp_path / "out")["val/class_1/img_002.png"] == "val"


def test_near_duplicates_across_splits_are_reported(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=30, size=16)
    report = prepare(root, tmp_path / "out", cfg(near_duplicates=True, near_duplicate_distance=64))
    # Distance 64 matches every pair: the check runs and reports val/test against train.
    n_train = report["n_images"]["train"]
    assert len(report["leakage"]["near_duplicates"]) == n_train * (report["n_images"]["val"] + report["n_images"]["test"])


@pytest.mark.slow
def test_dvc_repro_prepare_in_a_real_repo(tmp_path: Path):
    repo = init_dvc_repo(tmp_path / "repo")
    write_image_folder(repo / "data" / "raw", classes=3, per_class=10, size=16)
    add_bad_files(repo / "data" / "raw")
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("max_pixels: 89478485", "max_pixels: 22500"))
    run(["dvc", "add", "data/raw"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data"], repo)
    first = run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in first.stdout
    report = json.loads((repo / "data/prepared/report.json").read_text())
    assert report["n_rejected"] == 4 and report["policy"] == "skip"
    second = run(["dvc", "repro", "prepare"], repo)
    assert "didn't change, skipping" in second.stdout and "Running stage" not in second.stdout
    params.write_text(params.read_text().replace("seed: 42", "seed: 7"))
    third = run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in third.stdout
