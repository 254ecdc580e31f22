"""The model registry: immutable published versions and a `production` pointer, on any fsspec store.

Layout (a local directory by default, or e.g. s3://bucket/prefix):

    <registry>/<model_name>/<version>/   model.onnx, README.md, card.json, metrics.json,
                                         export_report.json, lineage.json, decision.json, COMPLETE
    <registry>/<model_name>/production   JSON pointer: current version, the stack of earlier
                                         production versions (for rollback) and an event log
    <registry>/<model_name>/promotions/  one small JSON file per move of the pointer onto a version
                                         (promote, rollback, repair, a gated publish), written once

Version ids are `<UTC time to the ms>-<first 8 hex of the ONNX sha256>`, e.g. 20261127T210530.123Z-1a2b3c4d:
they sort by publication time as plain strings, need no shared counter (a `v0007`
counter would need a read-modify-write that object stores cannot make atomic), and
the hash suffix ties the name to the model bytes and keeps two publishes in the same
second apart.

All-or-nothing: on a local disk a version is written into a hidden `.tmp-*` folder and
renamed into place; on object stores (no rename) its files are written under the final
name and `COMPLETE` (a manifest of every file's sha256) is written last. Either way
readers see only versions that have COMPLETE; a crash leaves nothing visible (`registry_files`).

Nothing read from a registry is trusted: every version is verified (hashes against its
manifest and lineage) before the pointer is moved onto it, a damaged JSON file is
reported with its path instead of crashing the command, and "first model" (bootstrap)
means that no version was ever promoted (its own decision record, or a promotion
record for a manual promote), never merely that the pointer file is missing. Pointer
moves, locking and repair: `registry_pointer`.

The `registry` command (list, show, promote, rollback, verify, repair, publish) is
`tasks.handoff.registry_cli`.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.handoff.lineage import missing_fields
from tasks.handoff.registry_files import MARKER, write_local, write_object_store
from tasks.handoff.registry_pointer import (
    POINTER,
    REPAIR_HINT,
    VERSION_RE,
    PointerFile,
    RegistryError,
    parse_pointer,
    rebuilt_pointer,
    utcnow,
)
from tasks.lib.config import Params
from tasks.lib.io import StorageError, atomic_write_bytes, explained_storage_errors, sha256_bytes, sha256_stream

__all__ = ["ANY", "MARKER", "POINTER", "VERSION_FILES", "Registry", "RegistryError", "new_version_id",
           "open_registry"]

PROMOTIONS = "promotions"   # create-only records of pointer moves: they survive a lost pointer, on any store
VERSION_FILES = ("model.onnx", "README.md", "card.json", "metrics.json", "export_report.json", "lineage.json",
                 "decision.json")
ANY = object()  # promote(expected=ANY): move the pointer whatever production is now
POINTER_RETRY_PAUSES_S = (0.0, 0.05, 0.1, 0.2, 0.4)  # before a missing pointer counts as lost (~0.75 s)


def new_version_id(onnx_sha256: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique version id: UTC timestamp + the ONNX hash prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z-{onnx_sha256[:8]}"


class Registry:
    """One model name's versions and production pointer at a registry URI."""

    def __init__(self, uri: str, model_name: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.model_name = model_name
        self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{model_name}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.pointer_file = PointerFile(self.fs, self._path(POINTER), self.url(POINTER), self.local)

    # ----------------------------------------------------------------- paths

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """A path or URL a person can open (what the model card link shows)."""
        return "/".join([self.uri, self.model_name, *parts])

    # ----------------------------------------------------------------- reading

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

    def fetch(self, version: str, name: str, dest: Path) -> Path:
        """Copy one file of a version to a local path (the ONNX file for re-evaluation or predict)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, self.read_bytes(version, name))
        return dest

    def pointer(self, *, candidate: str | None = None) -> dict[str, Any] | None:
        """The production pointer, or None when no version was ever promoted.

        A pointer that is missing although versions were promoted, or that is damaged,
        raises RegistryError with the repair command: it never means "first model".
        `candidate` is the version being promoted now, whose own record does not count.
        """
        raw = self.pointer_file.read()
        if raw is not None:
            return parse_pointer(raw, self.pointer_file.url)
        promoted, unreadable = (([v for v in found if v != candidate]) for found in self.promoted_versions())
        if promoted or unreadable:
            if (raw := self._pointer_written_meanwhile()) is not None:
                return parse_pointer(raw, self.pointer_file.url)
            which = f"{', '.join(promoted[-3:])} were promoted" if promoted else \
                f"the decision records of {', '.join(unreadable[:3])} cannot be read"
            raise RegistryError(f"{self.pointer_file.url}: the production pointer is missing, but {which}; "
                                f"refusing to treat the next model as the first one. {REPAIR_HINT}")
        return None

    def _pointer_written_meanwhile(self) -> bytes | None:
        """The pointer, read again while the evidence of a promotion was being gathered without a lock.

        Every writer writes the pointer first and its promotion record after, so a record found
        after the pointer was seen missing usually means the first promotion landed in between;
        a gated publish renames its version (decision: promoted) into place just before it moves
        the pointer. Only a pointer still missing after these retries is really lost.
        """
        for pause in POINTER_RETRY_PAUSES_S:
            raw = self.pointer_file.read()
            if raw is not None:
                return raw
            time.sleep(pause)
        return None

    def production(self) -> str | None:
        pointer = self.pointer()
        return pointer["version"] if pointer else None

    def promoted_versions(self) -> tuple[list[str], list[str]]:
        """(versions ever made production, oldest first; versions whose decision record cannot be read).

        Promoted means: its own decision record says the gate promoted it (records written before the
        `promoted` flag existed count if the gate passed them), or a promotion record names it (a
        manual promote, a rollback or a repair onto it).
        """
        moved_to = {move["version"] for move in self.moves()}
        promoted, unreadable = [], []
        for version in self.versions():
            try:
                decision = self.read_json(version, "decision.json")
            except RegistryError:
                if version not in moved_to:
                    unreadable.append(version)
                else:
                    promoted.append(version)
                continue
            flag = decision.get("promoted", decision.get("passed")) if isinstance(decision, dict) else None
            if flag is True or version in moved_to:
                promoted.append(version)
        return promoted, unreadable

    def moves(self) -> list[dict[str, Any]]:
        """The promotion records, oldest first (a damaged one is skipped: it only ever adds evidence)."""
        folder = self._path(PROMOTIONS)
        if not self.fs.exists(folder):
            return []
        records = []
        for path in sorted(self.fs.ls(folder, detail=False)):
            try:
                record = json.loads(self.fs.cat_file(path))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("version"), str) and VERSION_RE.match(record["version"]):
                records.append(record)
        return records

    def _record_move(self, version: str, action: str, reason: str) -> None:
        """After the pointer moved onto `version`: a record of it that no later pointer damage can take away."""
        # Nanoseconds since the epoch first: the names sort in the order the moves happened.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        record = {"at": utcnow(), "action": action, "version": version, "reason": reason}
        with explained_storage_errors(self.url(PROMOTIONS, name)):
            self.fs.makedirs(self._path(PROMOTIONS), exist_ok=True)
            self.fs.pipe_file(self._path(PROMOTIONS, name), json.dumps(record, sort_keys=True).encode())

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
        return (f"class names differ from production {production} ({mine} vs {theirs}); a model for another "
                "dataset belongs under its own name: set project.name for the new dataset")

    # ----------------------------------------------------------------- writing

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

    # ----------------------------------------------------------------- pointer moves

    def promote(self, version: str, reason: str, *, expected: str | None | object = ANY,
                force: bool = False) -> dict[str, Any]:
        """Make `version` production (it must verify); the old one goes on the rollback stack.

        Promoting the current production version changes nothing. `expected` guards a gate
        decision: the move is refused if production is no longer the version the candidate
        was compared with. A version whose class names differ from production's needs `force`.
        """
        moved = False

        def change(raw: bytes | None) -> dict[str, Any] | None:
            nonlocal moved
            pointer = self._current(raw, candidate=version) or {"model": self.model_name, "version": None,
                                                                 "previous": [], "events": []}
            current = pointer["version"]
            if expected is not ANY and current != expected:
                raise RegistryError(f"production moved from {expected} to {current} while {version} was gated; "
                                    "publish again to compare with the new production model")
            if current == version:
                return None
            # Inside the pointer's lock: nothing can change the version or production between check and move.
            self._require_verified(version, "promote")
            if not force and (differ := self.class_names_differ(version, current)):
                raise RegistryError(f"cannot promote {version}: {differ}; or pass --force to promote it anyway")
            previous = [*pointer["previous"], current] if current else list(pointer["previous"])
            moved = True
            return self._moved(pointer, version, previous, "promote", reason)

        result = self.pointer_file.update(change) or self.pointer() or {}
        if moved:
            self._record_move(version, "promote", reason)
        return result

    def rollback(self, reason: str = "manual rollback") -> dict[str, Any]:
        """Point production back at the version it replaced (which must still verify)."""

        def change(raw: bytes | None) -> dict[str, Any]:
            pointer = self._current(raw)
            if not pointer or not pointer["previous"]:
                raise RegistryError(f"{self.pointer_file.url}: no earlier production version of {self.model_name} "
                                    "to roll back to")
            *rest, target = pointer["previous"]
            self._require_verified(target, "roll back to")
            return self._moved(pointer, target, rest, "rollback", reason)

        result = self.pointer_file.update(change) or {}
        if result.get("version"):
            self._record_move(result["version"], "rollback", reason)
        return result

    def repair(self, version: str | None = None) -> dict[str, Any] | None:
        """Rebuild a missing or damaged pointer from the versions' decision records; None if it is fine.

        Production becomes `version`, or else the version of the last promotion record (the
        last promote, rollback or repair) that still verifies, or else the newest version
        whose decision record says it was promoted and that verifies; the rollback stack
        holds the older promoted versions that verify, oldest first. The old event log cannot
        be recovered (a damaged pointer is kept beside it as production.damaged-<time>).
        """

        def change(raw: bytes | None) -> dict[str, Any] | None:
            if raw is not None and version is None and self._healthy(raw):
                return None
            promoted, _ = self.promoted_versions()
            usable = [v for v in promoted if not self.verify(v)]
            # The last move on record is where production was; else the newest version ever promoted.
            last_moves = [m["version"] for m in self.moves() if m["version"] in usable]
            target = version or (last_moves[-1] if last_moves else usable[-1] if usable else None)
            if target is None:
                raise RegistryError(f"{self.url()}: no version records a promotion and verifies; "
                                    "choose production yourself: `registry repair --version VERSION`")
            self._require_verified(target, "repair production to")
            copy = self.pointer_file.keep_damaged_copy(raw) if raw is not None else None
            skipped = sorted(set(promoted) - set(usable))
            reason = (f"rebuilt from the decision records of {len(promoted)} promoted version(s)"
                      + (f"; skipped (do not verify): {', '.join(skipped)}" if skipped else ""))
            return rebuilt_pointer(self.model_name, target, usable, reason, copy)

        result = self.pointer_file.update(change)
        if result is not None:
            self._record_move(result["version"], "repair", result["reason"])
        return result

    def _healthy(self, raw: bytes) -> bool:
        try:
            return self.exists(parse_pointer(raw, self.pointer_file.url)["version"])
        except RegistryError:
            return False

    def _current(self, raw: bytes | None, candidate: str | None = None) -> dict[str, Any] | None:
        """The pointer as read inside an update: parsed strictly, or the same checks as pointer() when missing."""
        return parse_pointer(raw, self.pointer_file.url) if raw is not None else self.pointer(candidate=candidate)

    def _require_verified(self, version: str, action: str) -> None:
        self._require(version)
        problems = self.verify(version)
        if problems:
            raise RegistryError(f"cannot {action} {version}: " + "; ".join(problems)
                                + f" (`registry verify {version}`)")

    def _moved(self, pointer: dict[str, Any], version: str, previous: list[str], action: str,
               reason: str) -> dict[str, Any]:
        event = {"at": utcnow(), "action": action, "from": pointer["version"], "to": version, "reason": reason}
        return {"model": self.model_name, "version": version, "updated_at": event["at"], "reason": reason,
                "previous": previous, "events": [*pointer["events"], event]}

    # ----------------------------------------------------------------- verify

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
        if lineage["onnx_sha256"] != _sha256_fs(self.fs, self._path(version, "model.onnx")):
            return ["model.onnx sha256 does not match lineage.onnx_sha256"]
        return []


def _sha256_fs(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as handle:
        return sha256_stream(handle)


def open_registry(params: Params, root: Path | None = None) -> Registry:
    """The registry named by params; a relative local path is taken relative to `root`."""
    uri = params.registry.uri if root is None else params.registry.location(root)
    return Registry(uri, params.project.name, params.registry.storage_options)
