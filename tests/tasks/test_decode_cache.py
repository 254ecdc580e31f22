"""The decoded cache: same pixels as decoding the files, checked readers, atomic builds, the DVC stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.augment import device_batch
from tasks.cli import StageError
from tasks.config import load_params
from tasks.data import EvalDataset, decode_arrays, train_preprocessing
from tasks.decode_cache import (AUGMENT, EVAL, MappedImages, build_cache, load_arrays, open_split, read_meta,
                                 training_images)
from tasks.images import load_rgb
from tasks.io import SplitRow, sha256_file, write_split
from tasks.preprocess import Preprocessing, resize_and_crop
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
    fresh = torch.from_numpy(decode_arrays(splits["train"], raw, preps, workers=1)[1])
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


def test_training_reads_the_cache_when_it_matches_and_decodes_when_it_does_not(
        built: tuple[Path, Path, dict[str, list[SplitRow]]], caplog: pytest.LogCaptureFixture) -> None:
    raw, decoded, splits = built
    params = load_params(REPO_ROOT / "params.yaml", {"cache.dir": str(decoded), "data.raw_dir": str(raw),
                                                      "cache.num_workers": 1})
    marked = np.load(decoded / "train" / "eval.npy", mmap_mode="r+")
    marked[0] = 7                       # only the cache has this pixel value: proves it was read
    marked.flush()
    (images,) = training_images(params, "train", splits["train"], [PREP])
    assert isinstance(images, MappedImages) and int(images[torch.tensor([0])].max()) == 7

    (fresh,) = training_images(params, "train", splits["train"][1:], [PREP])     # other rows: stale cache
    want = np.asarray(resize_and_crop(load_rgb(raw / splits["train"][1].path), PREP))
    np.testing.assert_array_equal(fresh[torch.tensor([0])][0].numpy(), want)
    assert "dvc repro decode_cache" in caplog.text and "decoding the train images" in caplog.text


def test_the_train_stage_reads_its_images_from_the_cache(built: tuple[Path, Path, dict[str, list[SplitRow]]],
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tasks.train import load_data
    from tasks.train_runtime import Runtime

    raw, decoded, _ = built
    params = load_params(REPO_ROOT / "params.yaml", {
        "cache.dir": str(decoded), "data.raw_dir": str(raw), "data.prepared_dir": str(tmp_path / "prepared"),
        "train.image_size": 24, "cache.margin": 1.15, "train.finetune.augment": True})
    data = load_data(params, PREP, Runtime(device=torch.device("cpu"), amp_dtype=None))
    for images, variant, split in ((data.train_eval, EVAL, "train"), (data.train_big, AUGMENT, "train"),
                                   (data.val_x, EVAL, "val")):
        assert isinstance(images.array, np.memmap)
        assert Path(images.array.filename) == decoded / split / f"{variant}.npy"
    assert "decoding" not in caplog.text
