"""The decoded cache: same pixels as decoding the files, checked readers, atomic builds, the DVC stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.decode_cache import build_cache
from tasks.lib import row_store, segment_checks
from tasks.lib.augment import device_batch
from tasks.lib.config import load_params
from tasks.lib.data import EvalDataset
from tasks.lib.errors import StageError
from tasks.lib.preprocess import train_preprocessing
from tasks.lib.image_cache import (AUGMENT, EVAL, MappedImages, SegmentedRows, load_arrays, open_split, read_meta,
                                   training_images)
from tasks.lib.images import load_rgb
from tasks.lib.io import sha256_file
from tasks.lib.preprocess import Preprocessing, resize_and_crop
from tasks.lib.split_files import SPLITS, SplitRow, write_split
from tests.conftest import REPO_ROOT, init_dvc_repo, run

PREP = Preprocessing(crop_size=24, resize_size=24)
PREPS = {EVAL: PREP, AUGMENT: train_preprocessing(PREP, 1.15)}
SIZES = [(40, 30), (30, 52), (24, 24), (61, 45), (33, 80), (48, 48)]


def write_photos(raw: Path) -> list[SplitRow]:
    """Real files of several sizes, modes and formats, one JPEG with an EXIF rotation."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(SIZES * 2):
        label = i % 2
        path = raw / f"class_{label}" / f"img_{i:02d}.{'jpg' if i % 3 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i == 4:
            img = img.convert("L")
        if i == 1:
            exif = Image.Exif()
            exif[0x0112] = 6    # orientation: rotate 90 degrees on display
            img.save(path, exif=exif.tobytes())
        else:
            img.save(path)
        rows.append(SplitRow(str(path.relative_to(raw)), label, sha256_file(path)))
    return rows


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path, dict[str, list[SplitRow]]]:
    raw = tmp_path / "raw"
    rows = write_photos(raw)
    splits = {"train": rows[:6], "val": rows[6:9], "test": rows[9:]}
    for name, split_rows in splits.items():
        write_split(tmp_path / "prepared" / f"{name}.csv", split_rows)
    build_cache(tmp_path / "prepared", raw, tmp_path / "decoded", PREPS, workers=2)
    return raw, tmp_path / "decoded", splits


def test_cached_eval_tensors_equal_the_eval_dataset(built: tuple[Path, Path, dict[str, list[SplitRow]]]) -> None:
    raw, decoded, splits = built
    mean, std = torch.tensor(PREP.mean), torch.tensor(PREP.std)
    for split in ("val", "test"):
        images, labels = open_split(decoded, split)
        dataset = EvalDataset(splits[split], raw, PREP)
        assert images.shape == (len(dataset), 24, 24, 3) and images.dtype == np.uint8
        for i in range(len(dataset)):
            want, label = dataset[i]
            got = device_batch(torch.from_numpy(np.array(images[i:i + 1])), mean, std, 24)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert labels[i] == label


def test_cached_train_arrays_equal_the_same_deterministic_resize(
        built: tuple[Path, Path, dict[str, list[SplitRow]]]) -> None:
    raw, decoded, splits = built
    for variant, prep in PREPS.items():
        images, labels = open_split(decoded, "train", variant)
        assert images.shape[1:] == (prep.crop_size, prep.crop_size, 3)
        for i, row in enumerate(splits["train"]):
            np.testing.assert_array_equal(images[i], np.asarray(resize_and_crop(load_rgb(raw / row.path), prep)))
        assert labels.tolist() == [r.label for r in splits["train"]]
    assert PREPS[AUGMENT].crop_size == round(24 * 1.15)


def test_readers_memory_map_and_meta_records_the_split(built: tuple[Path, Path, dict[str, list[SplitRow]]],
                                                       tmp_path: Path) -> None:
    _, decoded, _ = built
    images, _ = open_split(decoded, "val")
    assert isinstance(images, np.memmap) and not images.flags.writeable
    meta = read_meta(decoded, "train")
    assert meta["split_sha256"] == sha256_file(tmp_path / "prepared" / "train.csv")
    assert set(meta["arrays"]) == {EVAL, AUGMENT}
    assert set(read_meta(decoded, "test")["arrays"]) == {EVAL}    # random crops are for training only
    assert not list(tmp_path.glob(".decoded*"))                  # no temporary folder left behind


def test_augmented_batches_from_the_cache_equal_those_from_decoding_and_repeat_under_a_seed(
        built: tuple[Path, Path, dict[str, list[SplitRow]]]) -> None:
    raw, decoded, splits = built
    preps = list(PREPS.values())
    cached = MappedImages(load_arrays(decoded, "train", splits["train"], preps)[1])
    fresh = torch.from_numpy(np.stack([np.asarray(resize_and_crop(load_rgb(raw / row.path), preps[1]))
                                       for row in splits["train"]]))
    idx = torch.tensor([4, 0, 2, 4])
    mean, std = torch.tensor(PREP.mean), torch.tensor(PREP.std)

    def batch(images: MappedImages | torch.Tensor, seed: int) -> torch.Tensor:
        return device_batch(images[idx], mean, std, 24, torch.Generator().manual_seed(seed))

    assert torch.equal(cached[idx], fresh[idx]) and torch.equal(cached[1:5], fresh[1:5])
    assert torch.equal(batch(cached, 7), batch(fresh, 7))
    assert torch.equal(batch(cached, 7), batch(cached, 7))
    assert not torch.equal(batch(cached, 7), batch(cached, 8))
    with pytest.raises(IndexError, match="out of range"):
        cached[torch.tensor([6])]


def test_stale_or_mismatched_caches_are_refused_with_the_fix(
        built: tuple[Path, Path, dict[str, list[SplitRow]]]) -> None:
    _, decoded, splits = built
    with pytest.raises(StageError, match="other train rows.*dvc repro decode_cache"):
        load_arrays(decoded, "train", splits["train"][:-1], [PREP])
    with pytest.raises(StageError, match="crop_size.*32.*dvc repro decode_cache"):
        load_arrays(decoded, "train", splits["train"], [Preprocessing(crop_size=32, resize_size=32)])
    with pytest.raises(FileNotFoundError, match="dvc repro decode_cache"):
        open_split(decoded.parent / "nowhere", "train")


def test_an_image_broken_after_prepare_is_named_and_the_old_cache_survives(
        built: tuple[Path, Path, dict[str, list[SplitRow]]], tmp_path: Path) -> None:
    raw, decoded, splits = built
    before = open_split(decoded, "val")[0].copy()
    broken = splits["val"][1].path
    (raw / broken).write_bytes(b"not an image any more")
    with pytest.raises(StageError, match=f"{broken}.*dvc repro prepare"):
        build_cache(tmp_path / "prepared", raw, decoded, PREPS, workers=2)
    np.testing.assert_array_equal(open_split(decoded, "val")[0], before)
    assert not list(tmp_path.glob(".decoded*"))


@pytest.mark.slow
def test_dvc_repro_builds_the_cache_and_skips_it_when_nothing_changed(tmp_path: Path) -> None:
    repo = init_dvc_repo(tmp_path / "repo")
    rows = write_photos(repo / "data" / "raw")
    for name, part in (("train", rows[:6]), ("val", rows[6:9]), ("test", rows[9:])):
        write_split(repo / "data" / "prepared" / f"{name}.csv", part)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["image_size"] = 24
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run(["dvc", "repro", "--single-item", "decode_cache"], repo)
    meta = json.loads((repo / "artifacts" / "decoded" / "train" / "meta.json").read_text())
    assert meta["arrays"][EVAL]["shape"] == [6, 24, 24, 3]
    assert meta["arrays"][AUGMENT]["crop_size"] == round(24 * 1.15)
    second = run(["dvc", "repro", "--single-item", "decode_cache"], repo)
    assert "didn't change, skipping" in second.stdout or "is cached" in second.stdout


def test_training_reads_the_cache_when_it_matches_and_refuses_it_when_it_does_not(
        built: tuple[Path, Path, dict[str, list[SplitRow]]]) -> None:
    raw, decoded, splits = built
    params = load_params(REPO_ROOT / "params.yaml", {"cache.out_dir": str(decoded), "data.raw_dir": str(raw),
                                                      "cache.num_workers": 1, "cache.jpeg_draft": False,
                                                      "cache.store_dir": str(decoded.parent / "store")})
    marked = np.load(decoded / "train" / "eval.0.npy", mmap_mode="r+")
    marked[0] = 7                       # only the cache has this pixel value: proves it was read
    marked.flush()
    (images,) = training_images(params, "train", splits["train"], [PREP])
    assert isinstance(images, MappedImages) and int(images[torch.tensor([0])].max()) == 7

    with pytest.raises(StageError, match="built from other train rows.*rebuild with `dvc repro decode_cache`"):
        training_images(params, "train", splits["train"][1:], [PREP])     # other rows: a stale cache


def test_the_train_stage_reads_its_images_from_the_cache(built: tuple[Path, Path, dict[str, list[SplitRow]]],
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tasks.train import load_data
    from tasks.training.runtime import Runtime

    raw, decoded, _ = built
    params = load_params(REPO_ROOT / "params.yaml", {
        "cache.out_dir": str(decoded), "data.raw_dir": str(raw), "data.prepared_dir": str(tmp_path / "prepared"),
        "train.image_size": 24, "cache.margin": 1.15, "train.finetune.augment": True,
        "cache.store_dir": str(tmp_path / "store"), "cache.jpeg_draft": False})     # as `built` built it
    data = load_data(params, PREP, Runtime(device=torch.device("cpu"), amp_dtype=None), num_classes=2)
    for images, variant, split in ((data.train_eval, EVAL, "train"), (data.train_margin, AUGMENT, "train"),
                                   (data.val_x, EVAL, "val")):
        assert isinstance(images.array, np.memmap)
        assert Path(images.array.filename) == decoded / split / f"{variant}.0.npy"    # built from scratch: one segment
    assert "decoding" not in caplog.text


# --------------------------------------------------------------------------- incremental builds


def arrays_of(decoded: Path) -> dict[str, Any]:
    """What a built cache holds, as a reader sees it: each split's arrays row by row, labels and meta.json
    (its segment lists aside: how rows are laid out in files is the store's business)."""
    content: dict[str, Any] = {}
    for split in SPLITS:
        meta = read_meta(decoded, split)
        for name, info in meta["arrays"].items():
            content[f"{split}/{name}"] = np.asarray(open_split(decoded, split, name)[0]).tobytes()
            info.pop("segments")
        content[f"{split}/labels"] = open_split(decoded, split)[1].tolist()
        content[f"{split}/meta"] = meta
    return content


def segments_of(decoded: Path, split: str, name: str = EVAL) -> list[Path]:
    return [decoded / split / f for f in read_meta(decoded, split)["arrays"][name]["segments"]]


def photo(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> SplitRow:
    """A smooth JPEG large enough for draft decoding at the test's sizes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse.save(path, quality=90)
    return SplitRow(path.name, seed % 2, sha256_file(path))


@pytest.mark.parametrize("draft", [False, True])
def test_incremental_builds_equal_builds_from_scratch(tmp_path: Path, draft: bool) -> None:
    raw, prepared, store = tmp_path / "raw", tmp_path / "prepared", tmp_path / "store"
    rows = [photo(raw / f"img_{i:02d}.jpg", i) for i in range(12)]

    def build(splits: dict[str, list[SplitRow]], out: Path, store_dir: Path | None) -> dict:
        for name, split_rows in splits.items():
            write_split(prepared / f"{name}.csv", sorted(split_rows, key=lambda r: r.path))
        return build_cache(prepared, raw, out, PREPS, workers=2, store_dir=store_dir, draft=draft)

    first = build({"train": rows[:8], "val": rows[8:10], "test": rows[10:]}, tmp_path / "inc", store)
    assert [first[s]["decoded"] for s in SPLITS] == [8, 2, 2]
    again = build({"train": rows[:8], "val": rows[8:10], "test": rows[10:]}, tmp_path / "inc", store)
    assert [again[s]["decoded"] for s in SPLITS] == [0, 0, 0]

    added = [photo(raw / f"new_{i}.jpg", 100 + i) for i in range(2)]
    modified = photo(raw / "img_03.jpg", 55)                 # same name, new content
    moved = rows[9]                                          # val -> train: its eval row is reused across splits
    train = [r for r in rows[:8] if r.path not in ("img_03.jpg", "img_05.jpg")] + added + [modified, moved]
    splits = {"train": train, "val": rows[8:9], "test": rows[10:]}
    changed = build(splits, tmp_path / "inc", store)
    assert changed["train"]["decoded"] == 3 + 1              # added + modified, and moved (no augment row stored)
    assert changed["val"]["decoded"] == changed["test"]["decoded"] == 0
    build(splits, tmp_path / "scratch", None)
    assert arrays_of(tmp_path / "inc") == arrays_of(tmp_path / "scratch")


def build_splits(tmp_path: Path, splits: dict[str, list[SplitRow]], out: str, store: bool = True) -> dict:
    for name, split_rows in splits.items():
        write_split(tmp_path / "prepared" / f"{name}.csv", sorted(split_rows, key=lambda r: r.path))
    return build_cache(tmp_path / "prepared", tmp_path / "raw", tmp_path / out, PREPS, workers=2,
                       store_dir=tmp_path / "store" if store else None)


def test_adding_images_decodes_and_writes_only_them_and_links_the_stored_segment_unchanged(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rows = [photo(raw / f"img_{i:02d}.jpg", i) for i in range(10)]
    base = {"train": rows[:6], "val": rows[6:8], "test": rows[8:]}
    build_splits(tmp_path, base, "out")
    (old,) = segments_of(tmp_path / "out", "train")
    before = old.stat()

    added = [photo(raw / f"img_{i:02d}a.jpg", 100 + i) for i in (1, 4)]      # sort between the stored ones
    summary = build_splits(tmp_path, {**base, "train": rows[:6] + added}, "out")
    assert summary["train"]["decoded"] == 2 and summary["train"]["copied"] == 0
    assert summary["val"]["decoded"] == summary["test"]["decoded"] == 0
    kept, new = segments_of(tmp_path / "out", "train")
    # the same file (inode and mtime), so DVC finds its hash in its state instead of reading it again
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.load(new, mmap_mode="r").shape[0] == 2                          # the new images only
    assert isinstance(open_split(tmp_path / "out", "train")[0], SegmentedRows)
    build_splits(tmp_path, {**base, "train": rows[:6] + added}, "scratch", store=False)
    assert arrays_of(tmp_path / "out") == arrays_of(tmp_path / "scratch")


def test_segments_stay_few_and_the_store_holds_only_what_splits_use(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(row_store, "MAX_SEGMENTS", 3)
    raw = tmp_path / "raw"
    rows = [photo(raw / f"img_{i:02d}.jpg", i) for i in range(12)]
    splits = {"train": rows[:8], "val": rows[8:10], "test": rows[10:]}
    build_splits(tmp_path, splits, "out")
    for k in range(4):                                       # four retrains, one new image each
        splits["train"] = splits["train"] + [photo(raw / f"new_{k}.jpg", 200 + k)]
        summary = build_splits(tmp_path, splits, "out")
        assert summary["train"]["decoded"] == 1 and len(segments_of(tmp_path / "out", "train")) <= 3
    sizes = [np.load(f, mmap_mode="r").shape[0] for f in segments_of(tmp_path / "out", "train")]
    assert summary["train"]["copied"] == 0 and sizes[0] == 8 and len(sizes) == 3
    merged = build_splits(tmp_path, {**splits, "train": splits["train"] + [photo(raw / "new_9.jpg", 209)]}, "out")
    assert merged["train"]["copied"] == sum(sizes[1:])       # the small segments; the first 8 rows stay put
    assert merged["train"]["segments"] == {EVAL: 2, AUGMENT: 2}
    splits["train"] = splits["train"][6:] + [photo(raw / "new_9.jpg", 209)]   # 6 of the first 8 removed
    first = segments_of(tmp_path / "out", "train")[0].stat().st_ino
    trimmed = build_splits(tmp_path, splits, "out")
    assert trimmed["train"]["copied"] == 2 and trimmed["train"]["decoded"] == 0      # their 2 rows moved
    assert first not in {f.stat().st_ino for f in segments_of(tmp_path / "out", "train")}
    assert first not in {f.stat().st_ino for f in (tmp_path / "store").rglob("*.npy")}     # and it was deleted
    uses = {name for f in (tmp_path / "store").rglob("*.uses.json") for name in json.loads(f.read_text())}
    assert {f.name.removesuffix(".keys.npy") for f in (tmp_path / "store").rglob("*.keys.npy")} == uses
    assert len(list((tmp_path / "store").rglob("*.npy"))) == 2 * len(uses)     # no data file without its keys
    build_splits(tmp_path, splits, "scratch", store=False)
    assert arrays_of(tmp_path / "out") == arrays_of(tmp_path / "scratch")


def test_segmented_rows_index_like_an_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 256, (7, 2, 2, 3), dtype=np.uint8)
    order = np.array([5, 0, 6, 2, 1, 3, 4])               # where each row lies in the two segments below
    stored = np.empty_like(whole)
    stored[order] = whole
    images = SegmentedRows([stored[:4], stored[4:]], order)
    assert len(images) == 7 and images.shape == whole.shape
    np.testing.assert_array_equal(np.asarray(images), whole)
    np.testing.assert_array_equal(images[3], whole[3])
    np.testing.assert_array_equal(images[-1], whole[-1])
    np.testing.assert_array_equal(images[2:6], whole[2:6])
    np.testing.assert_array_equal(images[[6, 0, 6]], whole[[6, 0, 6]])
    assert torch.equal(MappedImages(images)[torch.tensor([4, 1])], torch.from_numpy(whole[[4, 1]]))
    with pytest.raises(IndexError, match="out of range"):
        images[[7]]


def test_rows_are_never_reused_across_preprocessing_or_draft_changes(built: tuple[Path, Path, dict],
                                                                      tmp_path: Path) -> None:
    raw, _, _ = built
    store = tmp_path / "store"
    build_cache(tmp_path / "prepared", raw, tmp_path / "a", PREPS, workers=1, store_dir=store)
    other = {EVAL: Preprocessing(crop_size=20, resize_size=22)}
    summary = build_cache(tmp_path / "prepared", raw, tmp_path / "b", other, workers=1, store_dir=store)
    assert summary["val"]["decoded"] == 3
    summary = build_cache(tmp_path / "prepared", raw, tmp_path / "c", PREPS, workers=1, store_dir=store, draft=True)
    assert summary["val"]["decoded"] == 3
    summary = build_cache(tmp_path / "prepared", raw, tmp_path / "d", PREPS, workers=1, store_dir=store)
    assert summary["val"]["decoded"] == 0 and arrays_of(tmp_path / "a") == arrays_of(tmp_path / "d")


def test_the_store_shares_its_disk_blocks_with_the_outputs_and_survives_their_deletion(
        built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    raw, _, _ = built
    store = tmp_path / "store"
    build_cache(tmp_path / "prepared", raw, tmp_path / "out", PREPS, workers=1, store_dir=store)
    assert (tmp_path / "out" / "train" / "eval.0.npy").stat().st_nlink == 2    # a hard link, not a copy
    shutil.rmtree(tmp_path / "out")                                           # what `dvc repro` does first
    summary = build_cache(tmp_path / "prepared", raw, tmp_path / "out", PREPS, workers=1, store_dir=store)
    assert all(info["decoded"] == 0 for info in summary.values())
    assert len(list(store.rglob("*.keys.npy"))) == 4          # eval x 3 splits + augment x train: nothing piles up


def test_draft_rows_are_the_crop_only_resample_of_the_draft_decode_and_close_to_evaluate(tmp_path: Path) -> None:
    rows = [photo(tmp_path / "raw" / f"p{i}.jpg", i, size=(400, 300)) for i in range(4)]
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split in SPLITS:
        write_split(prepared / f"{split}.csv", rows)
    prep = Preprocessing(crop_size=48, resize_size=48)
    build_cache(prepared, tmp_path / "raw", tmp_path / "c", {EVAL: prep}, workers=1, draft=True)
    images, _ = open_split(tmp_path / "c", "val")
    for got, row in zip(images, rows):
        drafted = load_rgb(tmp_path / "raw" / row.path, draft_size=48)
        np.testing.assert_array_equal(got, np.asarray(resize_and_crop(drafted, prep, resample_crop_only=True)))
        whole = np.asarray(resize_and_crop(drafted, prep), np.int16)       # the same decode, resized whole
        assert np.abs(whole - got).max() <= 1                               # only the crop was resampled
        evaluate = np.asarray(resize_and_crop(load_rgb(tmp_path / "raw" / row.path), prep), np.int16)
        assert not np.array_equal(evaluate, got)                  # it did decode at a reduced scale
        assert np.abs(evaluate - got).mean() < 3                  # and stays close on a smooth photo


def test_a_failing_image_is_named_whatever_the_error(built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    raw, decoded, splits = built
    thin = splits["val"][0].path
    Image.new("L", (1, 300000)).save(raw / thin, format="PNG")
    # recorded as prepare would with other limits: the content hash matches, the decoder refuses
    write_split(tmp_path / "prepared" / "val.csv", [SplitRow(thin, 0, sha256_file(raw / thin))] + splits["val"][1:])
    with pytest.raises(StageError, match=f"{thin}.*extreme_aspect_ratio"):
        build_cache(tmp_path / "prepared", raw, decoded, PREPS, workers=2)


def test_the_stage_never_imports_torch_and_stores_what_train_asks_for() -> None:
    from tasks.decode_cache import cache_preprocessings
    from tasks.lib.models import default_preprocessing

    code = ("import sys\nfrom tasks.decode_cache import cache_preprocessings\nfrom tasks.lib.config import load_params\n"
            "cache_preprocessings(load_params())\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    assert run([sys.executable, "-c", code], REPO_ROOT).stdout.strip() == "[]"
    for arch in ("efficientnet_lite0", "resnet18", "mobilenet_v3_small"):
        params = load_params(REPO_ROOT / "params.yaml", {"model.arch": arch, "train.image_size": 112})
        assert cache_preprocessings(params)[EVAL] == default_preprocessing(arch, 112)


# --------------------------------------------------------------------------- what is stored is what was hashed


def store_content(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_an_image_changed_between_prepare_and_the_build_is_refused_and_nothing_is_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = tmp_path / "raw"
    rows = [photo(raw / f"img_{i:02d}.jpg", i) for i in range(8)]
    splits = {"train": rows[:4], "val": rows[4:6], "test": rows[6:]}
    build_splits(tmp_path, splits, "out")
    stored, built = store_content(tmp_path / "store"), arrays_of(tmp_path / "out")

    trouser = photo(raw / "trouser.jpg", 40)                  # prepare hashed this file...
    build_splits(tmp_path, {**splits, "val": splits["val"] + [trouser]}, "unused", store=False)
    shutil.copyfile(raw / rows[0].path, raw / trouser.path)   # ...then it was synced over with a bag's bytes
    write_split(tmp_path / "prepared" / "val.csv", splits["val"] + [trouser])
    with pytest.raises(StageError, match=f"trouser.jpg: changed_since_prepare .*{trouser.sha256}.*"
                                         f"prepared/val.csv.*dvc repro prepare"):
        build_cache(tmp_path / "prepared", raw, tmp_path / "out", PREPS, workers=2, store_dir=tmp_path / "store")
    assert store_content(tmp_path / "store") == stored and arrays_of(tmp_path / "out") == built

    fixed = SplitRow(trouser.path, trouser.label, sha256_file(raw / trouser.path))     # prepare ran again
    build_splits(tmp_path, {**splits, "val": splits["val"] + [fixed]}, "out")
    images, _ = open_split(tmp_path / "out", "val")
    np.testing.assert_array_equal(images[2], np.asarray(resize_and_crop(load_rgb(raw / rows[0].path), PREP)))


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build_and_a_running_ones_is_not(
        built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    raw, decoded, _ = built
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()                                             # its pid is no process now, as after a SIGKILL
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (ended.pid, running.pid):
            for kind in ("tmp", "old"):
                (tmp_path / f".decoded.{kind}-{pid}" / "train").mkdir(parents=True)
                (tmp_path / f".decoded.{kind}-{pid}" / "train" / "eval.0.npy").write_bytes(b"\0" * 1000)
        build_cache(tmp_path / "prepared", raw, decoded, PREPS, workers=1)
        assert sorted(p.name for p in tmp_path.glob(".decoded*")) == [f".decoded.old-{running.pid}",
                                                                       f".decoded.tmp-{running.pid}"]
    finally:
        running.kill()
        running.wait()


def store_segment(store: Path, split: str, name: str = EVAL) -> Path:
    """The one stored segment of a split's array (the split's outputs link to it)."""
    key = row_store.variant_key(PREPS[name], None)
    (segment,) = [p for p in (store / key).glob(f"{split}.*.npy") if not p.name.endswith(".keys.npy")]
    return segment


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as handle:              # in place: same inode, as bit rot or a stray write
        handle.seek(at)
        value = handle.read(1)
        handle.seek(at)
        handle.write(bytes([value[0] ^ 0x5A]))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "swapped", "keys"])
def test_a_damaged_segment_is_dropped_with_a_warning_and_rebuilt_equal_to_a_build_from_scratch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    monkeypatch.setattr(segment_checks, "CHECK_BLOCK", 1000)      # several blocks a segment, hashed on two threads
    raw, store = tmp_path / "raw", tmp_path / "store"
    rows = [photo(raw / f"img_{i:02d}.jpg", i) for i in range(10)]
    splits = {"train": rows[:6], "val": rows[6:8], "test": rows[8:]}
    build_splits(tmp_path, splits, "out")
    val, test, train = store_segment(store, "val"), store_segment(store, "test"), store_segment(store, "train")
    kept = train.stat()
    if damage == "flipped":
        flip_byte(val, val.stat().st_size - 100)
    elif damage == "truncated":
        os.truncate(val, val.stat().st_size - 1000)
    elif damage == "swapped":                      # the same size: test pixels would pass for validation's
        os.replace(val, tmp_path / "aside.npy")
        os.replace(test, val)
        os.replace(tmp_path / "aside.npy", test)
    else:                                          # its keys: two rows' hashes exchanged
        keys = val.with_name(val.name.replace(".npy", ".keys.npy"))
        np.save(keys, np.load(keys)[::-1])

    summary = build_splits(tmp_path, splits, "out")
    damaged = ["val", "test"] if damage == "swapped" else ["val"]
    assert [summary[s]["decoded"] for s in SPLITS] == [0] + [2 if s in damaged else 0 for s in ("val", "test")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(w.split(": ")[0] for w in warnings) == sorted([str(val), str(test)][:len(damaged)])
    assert all("dropped from the row store, its images are decoded again" in w for w in warnings)
    assert not val.exists()
    # the unchanged segment is still linked as it was (same inode, same mtime): DVC need not read it again
    assert (train.stat().st_ino, train.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert segments_of(tmp_path / "out", "train")[0].stat().st_ino == kept.st_ino
    build_splits(tmp_path, splits, "scratch", store=False)
    assert arrays_of(tmp_path / "out") == arrays_of(tmp_path / "scratch")
