"""Frozen-backbone features kept across training runs, so a retrain computes them only for new images.

An image's features are keyed by its content hash inside a context: a hash of the extractor's weights
and of everything else that decides its output (how the pixels were made, the device-side preprocessing,
device, dtype, torch version), so a stale entry is never used. Storage:
`cache.features_dir/<context>/<sha256>.npz` chunks, written whole and renamed, merged beyond MAX_CHUNKS;
the KEEP_CONTEXTS most recently used contexts are kept. Verify before reuse: a chunk whose bytes do not
match its name is deleted with a warning and its features computed again. A cache that cannot be
written is skipped after one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.lib.io import CHUNK, atomic_path, storage_error
from tasks.training.runtime import Runtime

log = logging.getLogger(__name__)

MAX_CHUNKS = 8
KEEP_CONTEXTS = 4
FORMAT = 2               # 2: chunks named by their checksum

_unwritable: set[Path] = set()   # feature caches this process could not write to: warned about once

Images = Any   # what `compute` takes: len() and indexing by an index tensor (a MappedImages, or `Rows` of one)


def cached_features(compute: Callable[[Images, str], torch.Tensor], images: Any, context: str, store_dir: Path,
                    rt: Runtime, desc: str) -> torch.Tensor:
    """compute(images, desc) for every image (`images.keys`: content hashes), from the store where present,
    computed and stored for the rest; `context` (`context_key`) is everything else that decides the output."""
    keys = images.keys
    store = FeatureStore(Path(store_dir), context)
    found = store.load(keys)
    missing = [i for i, key in enumerate(keys) if key not in found]
    log.info("%s: %d of %d images from the feature cache %s", desc, len(keys) - len(missing), len(keys), store.dir)
    fresh = compute(Rows(images, missing), desc) if missing else None
    if fresh is not None and rt.main:
        store.add([keys[i] for i in missing], fresh.cpu().numpy())
    if fresh is not None and rt.world > 1:
        # Rank 0 may merge and delete chunks while adding: no rank reads the store for the next set
        # before that is done, so every rank finds the same rows and computes (and gathers) the same rest.
        torch.distributed.barrier()
    if fresh is not None and len(missing) == len(keys):
        return fresh
    shape = tuple(fresh.shape[1:]) if fresh is not None else next(iter(found.values())).shape
    out = np.empty((len(keys), *shape), dtype=np.float32)   # feature vectors, or a block's activation maps
    for i, key in enumerate(keys):
        if key in found:
            out[i] = found[key]
    result = torch.from_numpy(out).to(rt.device)
    if fresh is not None:
        result[torch.as_tensor(missing, device=result.device)] = fresh.float()
    return result


class Rows:
    """A view of some rows of a MappedImages: what `compute` needs (len, indexing by a tensor)."""

    def __init__(self, images: Any, rows: Sequence[int]) -> None:
        self.images, self.rows = images, torch.as_tensor(list(rows), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.images[self.rows[index]]


def context_key(extractor: nn.Module, recipe: str) -> str:
    """A hash of the extractor (its class and every weight and buffer) and `recipe`, the rest of what decides
    its outputs (how the pixels were made, the device-side preprocessing, device, dtype, torch version)."""
    digest = hashlib.sha256()
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"format{FORMAT}/{type(extractor).__name__}/{recipe}".encode())
    return digest.hexdigest()[:24]


class FeatureStore:
    """The chunks of one context."""

    def __init__(self, root: Path, context: str) -> None:
        self.root, self.dir = root, root / context

    def load(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """key -> feature row for the wanted keys present in any sound chunk."""
        wanted, found = set(keys), {}
        for chunk in sorted(self.dir.glob("*.npz")):
            content = self._read(chunk)
            if content is None:
                continue
            for row, key in enumerate(content[0]):
                text = key.decode()
                if text in wanted:
                    found[text] = content[1][row]
        with contextlib.suppress(OSError):     # a read-only cache is still read
            os.utime(self.dir)                 # most recently used: pruned last
        return found

    def add(self, keys: Sequence[str], features: np.ndarray) -> None:
        """One new chunk, atomically; merge when there are too many; drop old contexts; an unwritable cache is
        skipped, with one warning per process naming it."""
        if self.root in _unwritable:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write(keys, features)
            chunks = sorted(self.dir.glob("*.npz"))
            if len(chunks) > MAX_CHUNKS:
                self._merge(chunks)
            self._prune_contexts()
        except OSError as err:
            _unwritable.add(self.root)
            log.warning("%s; training goes on without storing features in the cache %s (this run computes "
                        "them all, and so will the next one unless it can write there)",
                        storage_error(err, self.dir), self.root)

    def _read(self, chunk: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, features) of a chunk whose bytes match its name; None for one that does not (deleted, with a
        warning) and for one deleted meanwhile (merged by a concurrent run)."""
        try:
            if self._digest(chunk) != chunk.stem:
                raise ValueError("its bytes do not match its checksum (the file name)")
            with np.load(chunk) as data:
                return data["keys"], data["features"]
        except FileNotFoundError:
            return None
        except Exception as err:   # noqa: BLE001 (a damaged zip raises BadZipFile, EOFError, ...): never used
            log.warning("%s: %s; dropped from the feature cache, its images' features are computed again",
                        chunk, err)
            with contextlib.suppress(OSError):
                chunk.unlink()
            return None

    def _digest(self, path: Path) -> str:
        """sha256 of the context and the file's bytes: a chunk moved from another context fails too."""
        digest = hashlib.sha256(self.dir.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        return digest.hexdigest()

    def _write(self, keys: Sequence[str], features: np.ndarray) -> None:
        """One chunk named by the sha256 of its context and bytes, written whole and renamed into place."""
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.asarray(keys, dtype="S64"), features=features.astype(np.float32))
        data = buffer.getvalue()
        with atomic_path(self.dir / f"{hashlib.sha256(self.dir.name.encode() + data).hexdigest()}.npz") as tmp:
            tmp.write_bytes(data)

    def _merge(self, chunks: list[Path]) -> None:
        merged: dict[str, np.ndarray] = {}
        for chunk in chunks:
            content = self._read(chunk)
            if content is not None:
                merged.update((k.decode(), f) for k, f in zip(*content))
        if merged:
            self._write(list(merged), np.stack(list(merged.values())))
        for chunk in chunks:
            chunk.unlink(missing_ok=True)

    def _prune_contexts(self) -> None:
        contexts = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns,
                          reverse=True)
        for old in contexts[KEEP_CONTEXTS:]:
            if old != self.dir:
                shutil.rmtree(old, ignore_errors=True)
