"""Stage prepare: bad inputs, conversions, dedupe, stable stratified splits, leakage, real `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import prepare as prepare_module
from tasks.lib import check_store
from tasks.lib.check_store import CheckStore
from tasks.lib.config import PrepareParams
from tasks.lib.config import load_params
from tasks.lib.errors import StageError
from tasks.lib.images import BadImage, load_rgb
from tasks.lib.io import sha256_file
from tasks.lib.scan import FolderScan
from tasks.lib.split_files import read_classes
from tasks.lib.split_files import read_split
from tasks.lib.splits import split_fraction
from tasks.prepare import Counts, prepare
from tests.conftest import REPO_ROOT, init_dvc_repo, run, write_image_folder
from tests.realistic import CLASS_NAMES, wrong_orders, write_realistic_folder


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare.cache_dir is relative (.cache/prepare): each test gets its own."""
    monkeypatch.chdir(tmp_path)


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


def test_fail_policy_names_every_bad_file_and_leaves_the_old_outputs_alone(image_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    prepare(image_folder, out, cfg())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expected = add_bad_files(image_folder)
    with pytest.raises(StageError) as err:
        prepare(image_folder, out, cfg(bad_files="fail", max_pixels=150 * 150))
    for path in expected:
        assert path in str(err.value)
    assert "report.failed.json" in str(err.value)
    failed = json.loads((out / "report.failed.json").read_text())   # the report still says what was wrong
    assert failed["n_rejected"] == 4
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "report.failed.json"} == before
    prepare(image_folder, out, cfg(max_pixels=150 * 150))             # a good run removes the failure report
    assert not (out / "report.failed.json").exists()


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
    assert err.value.reason == "decompression_bomb" and "120000 pixels" in str(err.value)


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
    root = tmp_path / "raw"
    for i, split in enumerate(("train", "val", "test")):
        write_image_folder(root / split, classes=2, per_class=3, size=16, seed=i)
    coarse = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((96, 96), Image.Resampling.BICUBIC)        # smooth, like a photo
    photo.save(root / "train" / "class_0" / "photo.png")
    photo.resize((72, 72)).save(root / "val" / "class_0" / "photo_small.jpg", quality=70)   # resized + re-encoded
    Image.fromarray(255 - np.asarray(photo)).save(root / "test" / "class_0" / "negative.png")  # a distinct image
    report = prepare(root, tmp_path / "out", cfg(near_duplicates=True, near_duplicate_distance=4))
    pairs = report["leakage"]["near_duplicates"]
    assert [(p["path"], p["train_path"]) for p in pairs] == [("val/class_0/photo_small.jpg", "train/class_0/photo.png")]
    assert pairs[0]["distance"] <= 4


# --------------------------------------------------------------------------- the data-folder policy


def reasons(report: dict) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in report["rejected"]}


@pytest.mark.timeout(60)        # a FIFO used to hang the stage forever
def test_links_and_special_files_follow_one_policy(image_folder: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere"
    write_image_folder(outside, classes=1, per_class=2, size=12, seed=9)
    folder = image_folder / "class_0"
    os.symlink("/etc/passwd", folder / "passwd.png")
    os.symlink(outside / "class_0" / "img_000.png", folder / "outside.png")
    os.symlink("img_001.png", folder / "inside.png")                       # followed: same content, merged
    os.symlink("nowhere.png", folder / "dangling.png")
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("/dev/zero", folder / "zero.png")
    os.mkfifo(folder / "fifo.png")
    os.symlink(image_folder / "class_1", image_folder / "class_linked")   # a linked class folder
    os.symlink(outside / "class_0", folder / "more")                      # a linked folder outside
    report = prepare(image_folder, tmp_path / "out", cfg())
    assert reasons(report) == {
        "class_0/passwd.png": "link_outside", "class_0/outside.png": "link_outside",
        "class_0/dangling.png": "dangling_link", "class_0/loop.png": "dangling_link",
        "class_0/zero.png": "link_outside", "class_0/fifo.png": "not_a_regular_file",
        "class_linked": "link_to_folder", "class_0/more": "link_outside"}
    assert report["classes"] == ["class_0", "class_1", "class_2"]
    assert {"path": "class_0/inside.png", "same_as": "class_0/img_001.png"} in report["duplicates"]["removed"] or \
        {"path": "class_0/img_001.png", "same_as": "class_0/inside.png"} in report["duplicates"]["removed"]
    assert not any("outside" in path or "passwd" in path for path in split_of(tmp_path / "out"))


def test_a_link_to_a_device_inside_the_folder_is_never_read(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=12)
    os.mkfifo(root / "class_0" / "pipe")                 # no image suffix, still reported (DVC would hang on it)
    os.symlink(root / "class_0" / "pipe", root / "class_1" / "to_pipe.png")
    report = prepare(root, tmp_path / "out", cfg(num_workers=2))
    assert reasons(report) == {"class_0/pipe": "not_a_regular_file", "class_1/to_pipe.png": "not_a_regular_file"}


def test_a_non_utf8_name_is_reported_and_the_run_goes_on(image_folder: Path, tmp_path: Path):
    raw = os.fsencode(image_folder)
    shutil.copy(image_folder / "class_0" / "img_000.png", raw + b"/class_0/caf\xe9.png")
    os.mkdir(raw + b"/cl\xffass")
    shutil.copy(image_folder / "class_1" / "img_000.png", raw + b"/cl\xffass/a.png")
    report = prepare(image_folder, tmp_path / "out", cfg())
    assert reasons(report) == {"class_0/caf\\xe9.png": "bad_file_name", "cl\\xffass": "bad_file_name"}
    assert report["classes"] == ["class_0", "class_1", "class_2"]
    assert len(split_of(tmp_path / "out")) == 24


def test_extreme_aspect_ratio_and_oversized_files_are_rejected(image_folder: Path, tmp_path: Path):
    Image.new("L", (1, 300000)).save(image_folder / "class_0" / "thin.png", optimize=True)   # ~700 bytes
    Image.new("RGB", (300, 300), "red").save(image_folder / "class_1" / "large.bmp")         # 270 KB
    report = prepare(image_folder, tmp_path / "out", cfg(max_file_bytes=100_000))
    assert reasons(report) == {"class_0/thin.png": "extreme_aspect_ratio", "class_1/large.bmp": "file_too_large"}


def test_a_failed_write_leaves_the_old_outputs_whole(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    prepare(image_folder, out, cfg())
    (out / ".gitignore").write_text("/train.csv\n")          # DVC keeps one here; it must survive
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.copy(image_folder / "class_0" / "img_000.png", image_folder / "class_2" / "new.png")
    write_json = prepare_module.write_json

    def fail_on_classes(path: Path, obj: object) -> None:
        if Path(path).name == "classes.json":
            raise OSError("disk full")
        write_json(path, obj)

    monkeypatch.setattr(prepare_module, "write_json", fail_on_classes)
    with pytest.raises(OSError, match="disk full"):
        prepare(image_folder, out, cfg())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # no staging folder, no new split


# --------------------------------------------------------------------------- incremental runs


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.csv", "val.csv", "test.csv", "classes.json",
                                                          "report.json")}


def test_incremental_runs_equal_runs_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(check_store, "RACY_SECONDS", 0.0)     # files written just now may use the stat fast path
    root = write_image_folder(tmp_path / "raw", classes=3, per_class=20, size=12)
    settings = dict(near_duplicates=True, num_workers=2)
    first = Counts()
    prepare(root, tmp_path / "inc", cfg(**settings), first)
    assert (first.decoded, first.unchanged) == (60, 0)
    again = Counts()
    prepare(root, tmp_path / "inc", cfg(**settings), again)
    assert (again.decoded, again.hashed, again.unchanged) == (0, 0, 60)

    write_image_folder(tmp_path / "more", classes=3, per_class=2, size=12, seed=7)
    for f in (tmp_path / "more").rglob("*.png"):
        shutil.copy(f, root / f.parent.name / f"new_{f.name}")                       # 6 added
    (root / "class_0" / "img_003.png").unlink()                                    # 1 removed
    Image.new("RGB", (12, 12), "white").save(root / "class_1" / "img_004.png")     # 1 modified
    shutil.copy(root / "class_2" / "img_005.png", root / "class_2" / "renamed.png")
    (root / "class_2" / "img_005.png").unlink()                                    # 1 renamed
    (root / "class_2" / "broken.png").write_bytes(b"not a png")                    # 1 bad
    changed = Counts()
    prepare(root, tmp_path / "inc", cfg(**settings), changed)
    assert changed.decoded == 6 + 1 + 1 and changed.hashed == 1 and changed.unchanged == 60 - 3
    prepare(root, tmp_path / "scratch", cfg(**settings, cache_dir=str(tmp_path / "fresh-cache")))
    assert outputs(tmp_path / "inc") == outputs(tmp_path / "scratch")


@pytest.mark.parametrize("unchanged", [True, False])
def test_checking_streams_a_window_at_a_time_whether_files_are_new_or_not(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          unchanged: bool):
    """The first results come before the walk has gone past one window: nothing collects every file (a rerun
    over unchanged files once held all of them until the end)."""
    monkeypatch.setattr(check_store, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(prepare_module, "LOOKUP_BLOCK", 2)
    monkeypatch.setattr(prepare_module, "WINDOW", 4)
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=10, size=12)
    if unchanged:
        prepare(root, tmp_path / "out", cfg())
    walked = []

    def candidates():
        for c in FolderScan(root).candidates():
            walked.append(c.path)
            yield c

    with CheckStore(cfg().cache_dir, root, cfg().limits()) as store:
        checker = prepare_module.Checker(root, cfg(), store)
        stream = checker.run(candidates())
        next(stream)
        assert len(walked) <= 4
        assert len([next(stream) for _ in range(19)]) == 19 and len(walked) == 20
    assert (checker.counts.unchanged, checker.counts.decoded) == ((20, 0) if unchanged else (0, 20))


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(check_store, "RACY_SECONDS", 0.0)
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=12)
    target, other = root / "class_0" / "a.bmp", root / "class_1" / "b.bmp"
    Image.new("RGB", (12, 12), "red").save(target)
    Image.new("RGB", (12, 12), "blue").save(other)              # BMPs of one size have one file size
    prepare(root, tmp_path / "out", cfg())
    before = target.stat()
    target.write_bytes(other.read_bytes())                      # in place: same inode, same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    report = prepare(root, tmp_path / "out", cfg())
    assert report["label_conflicts"][0]["paths"] == ["class_0/a.bmp", "class_1/b.bmp"]


def test_files_changed_just_before_a_run_are_hashed_again_but_not_decoded(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=12)   # written within RACY_SECONDS
    prepare(root, tmp_path / "out", cfg())
    again = Counts()
    prepare(root, tmp_path / "out", cfg(), again)
    assert (again.decoded, again.hashed, again.unchanged) == (0, 6, 0)


def test_a_change_of_limits_never_reuses_old_checks(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=12)
    assert prepare(root, tmp_path / "out", cfg())["n_rejected"] == 0
    with pytest.raises(StageError, match="no usable image.*class_0, class_1"):   # every image over the limit now
        prepare(root, tmp_path / "out", cfg(max_pixels=100))


def test_the_cache_forgets_images_that_are_gone(tmp_path: Path):
    root = write_image_folder(tmp_path / "raw", classes=2, per_class=3, size=12)
    prepare(root, tmp_path / "out", cfg())
    (root / "class_0" / "img_000.png").unlink()
    prepare(root, tmp_path / "out", cfg())
    db = sqlite3.connect(tmp_path / ".cache" / "prepare" / "checks.sqlite")
    assert db.execute("SELECT count(*) FROM files").fetchone()[0] == 5
    assert db.execute("SELECT count(*) FROM checks").fetchone()[0] == 5


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


def test_the_report_warns_when_images_are_upscaled_more_than_one_and_a_half_times(tmp_path: Path) -> None:
    icons = write_image_folder(tmp_path / "icons", classes=2, per_class=6, size=48)   # icons read at 96 px: 2x
    report = prepare(icons, tmp_path / "out_icons", cfg(), input_size=96)
    assert report["median_short_side"] == 48
    assert report["warnings"] == [
        "images are upscaled 2.0x: median short side 48 px, train.image_size 96; the network sees interpolation "
        "rather than detail, so consider a smaller train.image_size (e.g. -S train.image_size=64, faster) and "
        "compare the lift over the pixel baseline that evaluate reports"]
    fashion = write_image_folder(tmp_path / "fashion", classes=2, per_class=6, size=28)   # the demo's 3.4x
    assert prepare(fashion, tmp_path / "out_fashion", cfg(), input_size=96)["warnings"][0].startswith(
        "images are upscaled 3.4x: median short side 28 px")
    fair = write_image_folder(tmp_path / "fair", classes=2, per_class=6, size=64)        # 1.5x: no noise
    assert prepare(fair, tmp_path / "out_fair", cfg(), input_size=96)["warnings"] == []
    assert prepare(icons, tmp_path / "out_none", cfg())["warnings"] == []                # no input size, no opinion


def test_the_console_line_names_the_report_and_the_top_reasons_for_rejected_files(
        image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "data" / "raw"
    shutil.copytree(image_folder, raw)
    add_bad_files(raw)
    (raw / "class_1" / "more notes.jpg").write_text("text again")
    params = load_params(REPO_ROOT / "params.yaml", ["prepare.num_workers=1", "prepare.max_pixels=22500"])
    prepare_module.run(params)   # relative data/raw and data/prepared: the test's own folder
    line = capsys.readouterr().out
    assert "5 rejected (2 not_an_image, 1 decompression_bomb, 1 empty_file, 1 other reason): " \
           "see data/prepared/report.json," in line
    assert json.loads((tmp_path / "data/prepared/report.json").read_text())["n_rejected"] == 5


# --------------------------------------------------------------------------- class names as users name them


def assert_labels_follow_folders(raw: Path, out: Path, classes: list[str]) -> dict[str, str]:
    """Every split row's label is its folder's place in classes.json, and its path opens the very file it
    hashed; returns path -> split."""
    where = {}
    for split in ("train", "val", "test"):
        for row in read_split(out / f"{split}.csv"):
            assert classes[row.label] == row.path.split("/")[0], row
            assert sha256_file(raw / row.path) == row.sha256, row.path
            where[row.path] = split
    return where


def test_classes_json_is_code_point_order_and_every_label_names_its_folder(tmp_path: Path) -> None:
    """classes.json is the folder names in Python's sorted() order (code point: digits, capitals,
    lower case, then accented letters), not case-insensitive, natural or locale order; each split row's
    label indexes its own folder there; names and paths with spaces, commas, quotes and non-ASCII
    letters (and a decomposed é, as macOS writes it) come back byte for byte."""
    names = (*CLASS_NAMES, "cafe\u0301 crème")
    written = write_realistic_folder(tmp_path / "raw", classes=names, per_class=5)
    report = prepare(tmp_path / "raw", tmp_path / "out", cfg())
    classes = json.loads((tmp_path / "out" / "classes.json").read_text(encoding="utf-8"))
    assert classes == sorted(names) == ["10 items", "2 items", "Zebra", "apple", "cafe\u0301 crème", "Äpfel",
                                        "éclair"]
    for how, order in wrong_orders(names).items():
        assert classes != order, f"the fixture cannot tell code-point order from {how} order"
    assert read_classes(tmp_path / "out") == report["classes"] == classes == list(report["per_class"])
    assert report["n_rejected"] == 0 and report["duplicates"]["n_removed"] == 0
    where = assert_labels_follow_folders(tmp_path / "raw", tmp_path / "out", classes)
    assert sorted(where) == sorted(w.path for w in written)


@pytest.mark.parametrize("new_class", ["0 new", "Ärger", "Mango"])
def test_a_class_added_later_takes_its_sorted_place_and_relabels_as_from_scratch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_class: str) -> None:
    """A rerun that finds a new class folder (first, last or in between by code point) while the old
    images come from the cache: classes.json and every label are what a run from scratch writes, and no
    old image changes split. (The cache answers unchanged files before new ones are decoded, so the
    order images arrive in is not the order of their classes.)"""
    monkeypatch.setattr(check_store, "RACY_SECONDS", 0.0)     # unchanged files come from the cache
    raw = tmp_path / "raw"
    write_realistic_folder(raw, per_class=5)
    prepare(raw, tmp_path / "inc", cfg())
    before = split_of(tmp_path / "inc")
    write_realistic_folder(tmp_path / "more", classes=[new_class], per_class=5, seed=9)
    shutil.copytree(tmp_path / "more" / new_class, raw / new_class)
    again = Counts()
    prepare(raw, tmp_path / "inc", cfg(), again)
    assert again.unchanged == len(before) and again.decoded == 5
    classes = json.loads((tmp_path / "inc" / "classes.json").read_text(encoding="utf-8"))
    assert classes == sorted([*CLASS_NAMES, new_class])
    after = assert_labels_follow_folders(raw, tmp_path / "inc", classes)
    assert all(after[path] == split for path, split in before.items())
    prepare(raw, tmp_path / "scratch", cfg(cache_dir=str(tmp_path / "fresh-cache")))
    assert outputs(tmp_path / "inc") == outputs(tmp_path / "scratch")
