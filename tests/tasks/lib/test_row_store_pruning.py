"""Pruning a row-store variant keeps what a build may still read or write, and frees the rest; variant names.

Segments are real files in the store's layout: `<name>.npy` rows, `<name>.keys.npy` keys, and
`<name>.sum.json` written once the segment is complete; `<split>.uses.json` lists the segments the
split's last build reads.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from tasks.lib.preprocess import Preprocessing
from tasks.lib.row_store import KEEP_VARIANTS, STALE_INCOMPLETE_S, prune_segments, prune_variants, variant_key
from tasks.lib.segment_checks import sums_path


def segment(variant_dir: Path, name: str, finished: bool, age_s: float = 0.0) -> list[Path]:
    data = variant_dir / f"{name}.npy"
    np.save(data, np.zeros((2, 4, 4, 3), np.uint8))
    keys = variant_dir / f"{name}.keys.npy"
    np.save(keys, np.array([f"{name} 0", f"{name} 1"]))
    files = [data, keys]
    if finished:
        sums_path(data).write_text("{}")
        files.append(sums_path(data))
    when = time.time() - age_s
    for path in files:
        os.utime(path, (when, when))
    return files


def test_pruning_keeps_used_and_still_written_segments_and_deletes_unused_and_abandoned_ones(tmp_path: Path) -> None:
    variant = tmp_path / "variant"
    variant.mkdir()
    used = segment(variant, "train-0001", finished=True, age_s=3 * STALE_INCOMPLETE_S)
    (variant / "train.uses.json").write_text(json.dumps(["train-0001"]))
    unused = segment(variant, "train-0000", finished=True)
    being_written = segment(variant, "val-0002", finished=False, age_s=60)   # another build is writing it now
    abandoned = segment(variant, "val-0001", finished=False, age_s=STALE_INCOMPLETE_S + 3600)

    prune_segments(variant)

    assert all(path.exists() for path in used + being_written)
    assert not any(path.exists() for path in unused + abandoned)


def test_a_variant_folder_is_named_by_16_hex_digits_that_mean_and_std_do_not_change() -> None:
    """Stores on users' disks hold folders named by 16 digits: another length would orphan every one of them.
    Mean and std are applied on the device, after the stored pixels, so they must not split the cache."""
    plain = variant_key(Preprocessing(crop_size=224, resize_size=256), None)
    renormalised = variant_key(Preprocessing(crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5),
                                             std=(0.25, 0.25, 0.25)), None)
    assert re.fullmatch(r"[0-9a-f]{16}", plain) and renormalised == plain


def test_pruning_variants_leaves_a_linked_variant_and_what_it_points_to_and_goes_on(tmp_path: Path) -> None:
    """A variant folder that is a link (to a store on another disk, say) cannot be removed like a folder:
    pruning must neither follow it into the target nor stop the build, and still prunes the rest."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.0.npy").write_bytes(b"rows on another disk")
    names = [f"{i:016x}" for i in range(KEEP_VARIANTS + 2)]      # newest first
    for age, name in enumerate(names):
        folder = store / name
        if name == names[-1]:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(elsewhere, target_is_directory=True)
        else:
            folder.mkdir(parents=True)
            (folder / "train.0.npy").write_bytes(b"rows")
        when = time.time() - 3600 * age
        os.utime(folder.resolve(), (when, when))

    prune_variants(store, keep=[names[0]])

    assert sorted(p.name for p in store.iterdir()) == sorted(names[:KEEP_VARIANTS] + [names[-1]])
    assert (elsewhere / "train.0.npy").read_bytes() == b"rows on another disk"
