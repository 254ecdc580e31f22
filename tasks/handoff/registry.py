"""The model registry: immutable published versions and a promotion log, on any fsspec store.

    <registry>/<model_name>/<version>/        model.onnx, README.md, card.json, metrics.json, ..., COMPLETE
    <registry>/<model_name>/promotion-log/    the newest complete entry IS production (`registry_pointer`)
    <registry>/<model_name>/reproductions/<version>/   one note per later run that rebuilt that exact ONNX file
    <registry>/<model_name>/approvals/<version>/       a person's decision on it, when gate.approval asked one

Version ids are `<UTC time to the ms>-<first 8 hex of the ONNX sha256>`: they sort by time as strings and
need no shared counter (which object stores cannot increment atomically). Readers see only versions with
`COMPLETE`, and nothing read is trusted: a version is verified against its manifest before production moves
onto it. docs/registry.md describes the layout and its guarantees.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.handoff.gate import class_difference
from tasks.handoff.lineage import missing_fields
from tasks.handoff.registry_files import MARKER, write_local, write_object_store
from tasks.handoff.registry_pointer import VERSION_RE, ProductionLog, RegistryError, utcnow
from tasks.lib.config import Params
from tasks.lib.io import StorageError, explained_storage_errors, sha256_bytes, sha256_stream

__all__ = ["ANY", "MARKER", "VERSION_FILES", "Registry", "RegistryError", "new_version_id", "open_registry"]

VERSION_FILES = ("model.onnx", "README.md", "card.json", "metrics.json", "export_report.json", "lineage.json",
                 "decision.json")
ANY = object()  # promote(expected=ANY): move production whatever it is now


def new_version_id(onnx_sha256: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique version id: UTC timestamp + the ONNX hash prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z-{onnx_sha256[:8]}"


class Registry:
    """One model name's versions and promotion log at a registry URI."""

    def __init__(self, uri: str, model_name: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.model_name = model_name
        self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{model_name}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.log = ProductionLog(self.fs, self.root, self.url(), model_name)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """A path or URL a person can open (what the model card link shows)."""
        return "/".join([self.uri, self.model_name, *parts])

    def versions(self) -> list[str]:
        """Complete versions, oldest first; half-written ones (no COMPLETE) are invisible."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if VERSION_RE.match(n) and self.fs.exists(self._path(n, MARKER)))

    def exists(self, version: str) -> bool:
        return VERSION_RE.match(version) is not None and self.fs.exists(self._path(version, MARKER))

    def read_bytes(self, version: str, name: str) -> bytes:
        self._require(version)
        try:
            return self.fs.cat_file(self._path(version, name))
        except FileNotFoundError:
            raise RegistryError(f"{self.url(version, name)}: missing from a complete version; the version is "
                                f"damaged (`registry verify {version}` lists what else changed)") from None

    def read_json(self, version: str, name: str) -> Any:
        """A version's JSON file; RegistryError naming the file when it is damaged."""
        data = self.read_bytes(version, name)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RegistryError(f"{self.url(version, name)}: not valid JSON ({err}); the version is damaged: "
                                f"restore the file from a backup, or leave the version unused "
                                f"(`registry verify {version}`)") from None

    def _require(self, version: str) -> None:
        if not self.exists(version):
            known = ", ".join(self.versions()[-5:]) or "none yet"
            raise RegistryError(f"{self.url(version)}: no such complete version of {self.model_name} "
                                f"(latest: {known}); see `registry list`")

    def pointer(self) -> dict[str, Any] | None:
        """Production's cache record plus `events` (every complete log entry, oldest first); None if it never moved."""
        head = self.log.head()
        if head is None:
            return None
        return {**json.loads(self.log.cache_of(head)), "events": self.log.read()[0]}

    def production(self) -> str | None:
        head = self.log.head()
        return head["version"] if head else None

    def production_problems(self) -> list[str]:
        """What is wrong around production: damaged log entries, a version that is not there, a stale cache."""
        problems = self.log.read()[1]
        head = self.log.head()
        if head and not self.exists(head["version"]):
            problems.append(f"{self.log.url}: production is {head['version']}, which is not a complete version of "
                            f"{self.model_name}; `registry rollback` or `registry promote VERSION` another one")
        if problem := self.log.cache_problem(head):
            problems.append(problem)
        return problems

    def find_by_onnx(self, onnx_sha256: str) -> str | None:
        """The version that already holds exactly this ONNX file, if any (re-publishing is idempotent)."""
        for version in reversed(self.versions()):
            if version.endswith(onnx_sha256[:8]) and self._manifest_or_none(version).get("model.onnx") == onnx_sha256:
                return version
        return None

    def manifest(self, version: str) -> dict[str, str]:
        """The sha256 of every file of a version, from its COMPLETE marker (RegistryError if damaged)."""
        try:
            files = json.loads(self.fs.cat_file(self._path(version, MARKER)))["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise RegistryError(f"{self.url(version, MARKER)}: the manifest is damaged ({type(err).__name__}); "
                                "this version cannot be verified or promoted") from None
        if not isinstance(files, dict):
            raise RegistryError(f"{self.url(version, MARKER)}: the manifest is damaged (files is not an object)")
        return files

    def _manifest_or_none(self, version: str) -> dict[str, str]:
        try:
            return self.manifest(version)
        except RegistryError:
            return {}

    def class_names(self, version: str) -> list[str] | None:
        """The classes a version's model card lists (None when its card cannot be read)."""
        try:
            card = self.read_json(version, "card.json")
        except RegistryError:
            return None
        classes = card.get("classes") if isinstance(card, dict) else None
        return classes if isinstance(classes, list) else None

    def class_names_differ(self, version: str, production: str | None) -> str | None:
        """Why `version` is not a drop-in replacement for `production` by its classes (None if it is)."""
        if production is None or production == version:
            return None
        mine, theirs = self.class_names(version), self.class_names(production)
        if mine == theirs:
            return None
        return f"{class_difference(mine, theirs, production)}: a model for other classes belongs under a new project.name"

    def write_version(self, version: str, files: dict[str, bytes]) -> str:
        """Write a new immutable version all-or-nothing; returns its URL."""
        if not VERSION_RE.match(version):
            raise RegistryError(f"version id {version!r} does not look like 20261127T210530.123Z-1a2b3c4d")
        if self.fs.exists(self._path(version)):
            raise RegistryError(f"{self.url(version)} already exists; versions are immutable, publish a new one")
        marker = json.dumps({"version": version, "written_at": utcnow(),
                             "files": {name: sha256_bytes(data) for name, data in files.items()}},
                            indent=2, sort_keys=True).encode()
        try:
            with explained_storage_errors(self.url(version)):
                if self.local:
                    write_local(Path(self.root), self._path(version), files, marker)
                else:
                    write_object_store(self.fs, self._path(version), files, marker)
        except StorageError as err:
            raise RegistryError(str(err)) from None
        return self.url(version)

    def record_reproduction(self, version: str, record: dict[str, Any]) -> str:
        """Note that a run rebuilt this version's exact ONNX file (beside the version: a version is immutable)."""
        return self._write_note("reproductions", version, record)

    def reproductions(self, version: str) -> list[dict[str, Any]]:
        """The runs that rebuilt this version, oldest first (names sort by time); unreadable notes are skipped."""
        return self._notes("reproductions", version)

    def record_approval(self, version: str, record: dict[str, Any]) -> str:
        """A person's decision on a gated version (approved, rejected or timed out; who, when, comment): the
        second half of its decision record, beside decision.json because a version is immutable."""
        return self._write_note("approvals", version, record)

    def approvals(self, version: str) -> list[dict[str, Any]]:
        """The people's decisions on this version, oldest first."""
        return self._notes("approvals", version)

    def _write_note(self, kind: str, version: str, record: dict[str, Any]) -> str:
        self._require(version)
        name = f"{utcnow().replace(':', '')}-{uuid.uuid4().hex[:8]}.json"
        path = self._path(kind, version, name)
        try:
            with explained_storage_errors(self.url(kind, version, name)):
                self.fs.makedirs(self._path(kind, version), exist_ok=True)
                self.fs.pipe_file(path, json.dumps({"version": version, **record}, indent=2, sort_keys=True).encode())
        except StorageError as err:
            raise RegistryError(str(err)) from None
        return self.url(kind, version, name)

    def _notes(self, kind: str, version: str) -> list[dict[str, Any]]:
        folder = self._path(kind, version)
        if not self.fs.exists(folder):
            return []
        notes = []
        for path in sorted(self.fs.ls(folder, detail=False)):
            try:
                notes.append(json.loads(self.fs.cat_file(path)))
            except (OSError, ValueError):
                continue
        return notes

    def promote(self, version: str, reason: str, *, expected: str | None | object = ANY,
                force: bool = False, approval: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make `version` production (it must verify; other class names need `force`); returns the entry.

        `expected` guards a gate decision: refused if production is no longer what the candidate was compared with.
        `approval`: the person's decision that let it through (gate.approval), kept in the log entry.
        """

        def change(head: dict[str, Any] | None) -> dict[str, Any] | None:
            current = head["version"] if head else None
            if expected is not ANY and current != expected:
                raise RegistryError(f"production moved from {expected} to {current} while {version} was gated; "
                                    "publish again to compare with the new production model")
            if current == version:
                return None
            self._require_verified(version, "promote")
            if not force and (differ := self.class_names_differ(version, current)):
                raise RegistryError(f"cannot promote {version}: {differ}; or pass --force to promote it anyway")
            previous = [*head["previous"], current] if head else []
            return {"action": "promote", "from": current, "version": version, "previous": previous, "reason": reason,
                    **({"approval": approval} if approval else {})}

        return self.log.append(change) or self.log.head() or {}

    def rollback(self, reason: str = "manual rollback") -> dict[str, Any]:
        """Make the version production replaced production again (it must still verify). Returns the entry."""

        def change(head: dict[str, Any] | None) -> dict[str, Any]:
            if not head or not head["previous"]:
                raise RegistryError(f"{self.log.url}: no earlier production version of {self.model_name} "
                                    "to roll back to")
            *rest, target = head["previous"]
            self._require_verified(target, "roll back to")
            return {"action": "rollback", "from": head["version"], "version": target, "previous": rest,
                    "reason": reason}

        return self.log.append(change) or {}

    def repair(self) -> dict[str, Any] | None:
        """Rewrite the `production` cache from the log (after a crash or a hand edit); None if it was right."""
        written = self.log.refresh_cache()
        return json.loads(written) if written else None

    def _require_verified(self, version: str, action: str) -> None:
        self._require(version)
        problems = self.verify(version)
        if problems:
            raise RegistryError(f"cannot {action} {version}: " + "; ".join(problems)
                                + f" (`registry verify {version}`)")

    def verify(self, version: str) -> list[str]:
        """Problems with a version ([] = fine): missing files, hashes that do not match, incomplete lineage."""
        if not self.exists(version):
            return [f"{self.url(version)} is not a complete version (no {MARKER} marker)"]
        try:
            manifest = self.manifest(version)
        except RegistryError as err:
            return [str(err)]
        problems = []
        for name, expected in manifest.items():
            path = self._path(version, name)
            if not self.fs.exists(path):
                problems.append(f"{name} is missing")
            elif (actual := _sha256_fs(self.fs, path)) != expected:
                problems.append(f"{name} sha256 {actual[:12]}... does not match the recorded {str(expected)[:12]}...")
        problems += [f"{name} is missing" for name in VERSION_FILES if name not in manifest]
        if "lineage.json" in manifest:
            problems += self._lineage_problems(version)
        return problems

    def _lineage_problems(self, version: str) -> list[str]:
        try:
            lineage = self.read_json(version, "lineage.json")
        except RegistryError as err:
            return [str(err)]
        missing = missing_fields(lineage if isinstance(lineage, dict) else None)
        if missing:
            return [f"lineage incomplete: missing {', '.join(missing)}"]
        onnx = self._path(version, "model.onnx")
        if self.fs.exists(onnx) and lineage["onnx_sha256"] != _sha256_fs(self.fs, onnx):
            return ["model.onnx sha256 does not match lineage.onnx_sha256"]
        return []   # a missing model.onnx is reported once, by verify's loop over the manifest


def _sha256_fs(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as handle:
        return sha256_stream(handle)


def approval_text(note: dict[str, Any]) -> str:
    """A person's decision in a line: 'approved by alice at 2026-12-08T01:02:03+00:00: looks right on the new
    shirts', or 'timed out at ...: nobody approved or rejected it within ...'."""
    if note.get("status") == "timed out":
        return f"timed out at {note.get('at')}: {note.get('comment')}"
    comment = f": {note['comment']}" if note.get("comment") else ""
    return f"{note.get('status')} by {note.get('by') or 'someone'} at {note.get('at')}{comment}"


def open_registry(params: Params, root: Path | None = None) -> Registry:
    """The registry named by params; a relative local path is taken relative to `root`."""
    uri = params.registry.uri
    if root is not None and "://" not in uri and not Path(uri).is_absolute():
        uri = str(Path(root) / uri)
    return Registry(uri, params.project.name, params.registry.storage_options)
