"""The checksums of a row-store segment (tasks.lib.row_store), `<segment>.sum.json`: the rows file's size, the
sha256 of each CHECK_BLOCK of it and of the keys file. Written last: a segment without them is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.lib.io import sha256_file, write_json

log = logging.getLogger(__name__)

CHECK_BLOCK = 1 << 23     # rows bytes hashed as one piece (8 MiB): a large segment is checked on every core at once


def seal_segment(data: Path) -> None:
    """Record the checksums of a written segment (its rows file and keys file): the mark of a finished segment."""
    keys = data.with_name(data.name.removesuffix(".npy") + ".keys.npy")
    size = data.stat().st_size
    blocks = [_block_digest(data, at) for at in range(0, size, CHECK_BLOCK)]
    write_json(sums_path(data), {"bytes": size, "block_bytes": CHECK_BLOCK, "blocks": blocks,
                                  "keys_sha256": sha256_file(keys)})


def failing_segments(segments: Sequence[Path], threads: int = 1) -> dict[Path, str]:
    """The segments (rows files) whose content differs from their checksums, each with what differs.

    Every CHECK_BLOCK of every segment is hashed on `threads` threads at once (hashlib lets go of the GIL)."""
    sums, blocks = {}, []
    for data in segments:
        sums[data] = read_sums(data) or "its checksums are gone (pruned by another build meanwhile?)"
        if isinstance(sums[data], dict):
            blocks += [(data, at) for at in range(0, sums[data]["bytes"], CHECK_BLOCK)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = dict(zip(blocks, pool.map(lambda block: _block_digest(*block), blocks)))
    failing = {}
    for data, recorded in sums.items():
        if isinstance(recorded, str):
            failing[data] = recorded
            continue
        size = _size(data)
        if size != recorded["bytes"]:
            failing[data] = f"{size} bytes, {recorded['bytes']} when written (truncated or replaced)"
        elif [digests[(data, at)] for at in range(0, size, CHECK_BLOCK)] != recorded["blocks"]:
            failing[data] = "its rows differ from what was written (changed bytes, or another segment's file)"
    return failing


def drop_segment(data: Path, why: str) -> None:
    """Delete a segment that failed its check (checksums first: what is left is an unfinished segment)."""
    log.warning("%s: %s; dropped from the row store, its images are decoded again", data, why)
    for path in (sums_path(data), data.with_name(data.name.removesuffix(".npy") + ".keys.npy"), data):
        path.unlink(missing_ok=True)


def read_sums(data: Path) -> dict | str | None:
    """A segment's checksums; None when there are none (unfinished or pruned), a string saying why when unusable."""
    try:
        sums = json.loads(sums_path(data).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"unreadable checksums ({err})"
    fields = {"bytes": int, "block_bytes": int, "blocks": list, "keys_sha256": str}
    if not isinstance(sums, dict) or any(not isinstance(sums.get(k), t) for k, t in fields.items()) \
            or sums["block_bytes"] != CHECK_BLOCK:
        return "unusable checksums (not written by this version)"
    return sums


def sums_path(data: Path) -> Path:
    return data.with_name(data.name.removesuffix(".npy") + ".sum.json")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _block_digest(path: Path, at: int) -> str | None:
    """sha256 of bytes [at, at + CHECK_BLOCK) of a file (fewer at its end); None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as handle:
            left = CHECK_BLOCK
            while left and (chunk := os.pread(handle.fileno(), min(left, 1 << 20), at)):
                digest.update(chunk)
                at, left = at + len(chunk), left - len(chunk)
    except OSError:
        return None
    return digest.hexdigest()
