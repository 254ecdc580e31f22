"""Verified downloads: a file fetched over HTTP(S) into a cache, checked by SHA-256 before every use.

The pin is a full SHA-256, or (trust on first use) a file-name hash prefix whose full hash is then written next
to the file and enforced from then on. Transient failures retry here with exponential backoff, the one retry
layer for a download: once spent the stage fails with exit 1, not 75, so the flow does not retry it again.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.lib.errors import StageError, TransientError
from tasks.lib.io import CHUNK, STORAGE_PROBLEMS, atomic_path, atomic_write_text, sha256_file, storage_error
from tasks.lib.progress import progress

log = logging.getLogger(__name__)


def ensure_cached(url: str, dest: Path, *, sha256: str | None, hash_prefix: str | None = None, offline: bool = False,
                  retries: int = 3, retry_delay: float = 1.0, timeout: float = 60.0) -> str:
    """Make `dest` a verified copy of `url` (download only when missing or bad); return its sha256. The pin is
    `sha256`, else the sidecar `<dest>.sha256`, else (first download) the file-name hash prefix."""
    sidecar = sidecar_path(dest)
    expected = sha256 or (sidecar.read_text().strip() if sidecar.exists() else None)
    if dest.exists():
        actual = sha256_file(dest)
        if _hash_ok(actual, expected, hash_prefix):
            _pin_first_use(sidecar, sha256, actual)
            return actual
        # Truncated by a crash, altered, or another file under the same name: never use it.
        log.warning("%s: sha256 %s does not match the pin %s; deleting it and fetching again",
                    dest, actual, expected or hash_prefix)
        dest.unlink()
    if offline:
        pin = f" (sha256 {expected})" if expected else ""
        raise StageError(f"model.offline is true and {url} is not in the cache: download it on a connected machine "
                         f"and put it at {dest.resolve()}{pin}, or set model.offline: false")
    actual = download(url, dest, sha256=expected, hash_prefix=hash_prefix, retries=retries,
                      retry_delay=retry_delay, timeout=timeout)
    _pin_first_use(sidecar, sha256, actual)
    return actual


def sidecar_path(dest: Path) -> Path:
    """Where the trust-on-first-use hash of a cached file is kept."""
    return dest.with_name(dest.name + ".sha256")


def _pin_first_use(sidecar: Path, pinned: str | None, actual: str) -> None:
    """Record the full hash of a file only prefix-checked so far; every later use must match it."""
    if pinned is None and not sidecar.exists():
        atomic_write_text(sidecar, actual + "\n")
        log.info("pinned %s (trust on first use) in %s", actual, sidecar)


def _hash_ok(actual: str, expected: str | None, prefix: str | None) -> bool:
    return (expected is None or actual == expected) and (prefix is None or actual.startswith(prefix))


def download(url: str, dest: Path, *, sha256: str | None, hash_prefix: str | None = None, retries: int = 3,
             retry_delay: float = 1.0, timeout: float = 60.0) -> str:
    """Download `url` to `dest` atomically, verifying the hash; retry transient failures with backoff."""
    for attempt in range(retries + 1):
        try:
            return _download_once(url, dest, sha256, hash_prefix, timeout)
        except TransientError as err:
            if attempt == retries:
                raise StageError(f"{url}: download failed after {retries + 1} attempt(s), last error: {err}; "
                                 "check the network, or raise model.download_retries") from None
            delay = retry_delay * 2**attempt
            log.warning("%s: %s; retry %d/%d in %.1f s", url, err, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _download_once(url: str, dest: Path, sha256: str | None, hash_prefix: str | None, timeout: float) -> str:
    response = _open(url, timeout)
    with response, atomic_path(dest) as tmp:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        actual, received = _stream(response, tmp, total, dest.name)
        if total is not None and received != total:
            raise TransientError(f"connection dropped after {received} of {total} bytes")
        if not _hash_ok(actual, sha256, hash_prefix):
            raise StageError(f"{url}: downloaded sha256 {actual} does not match the pinned {sha256 or hash_prefix + '…'}; "
                             "the file was not kept. Check the URL and model.sha256")
        return actual


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "finetune-pipeline"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code >= 500 or err.code in (408, 429):
            raise TransientError(f"HTTP {err.code} {err.reason}") from None
        raise StageError(f"{url}: HTTP {err.code} {err.reason}; the server refuses or does not have this file, "
                         "check model.weights") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise TransientError(str(getattr(err, "reason", err))) from None


def _stream(response: http.client.HTTPResponse, tmp: Path, total: int | None, name: str) -> tuple[str, int]:
    """Copy the body to tmp with a byte progress bar; return (sha256, bytes received)."""
    digest, received = hashlib.sha256(), 0
    bar = progress(desc=f"download {name}", total=total, unit="B", unit_scale=True)
    try:
        with open(tmp, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead
        if isinstance(err, OSError) and err.errno in STORAGE_PROBLEMS:  # the disk's fault: retrying cannot help
            raise storage_error(err, tmp) from None
        raise TransientError(f"connection lost after {received} bytes: {err!r}") from None
    finally:
        bar.close()
    return digest.hexdigest(), received
