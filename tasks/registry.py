"""The model registry: immutable published versions and a `production` pointer, on any fsspec store.

Layout (a local directory by default, or e.g. s3://bucket/prefix):

    <registry>/<model_name>/<version>/   model.onnx, README.md, card.json, metrics.json,
                                         export_report.json, lineage.json, decision.json, COMPLETE
    <registry>/<model_name>/production   JSON pointer: current version, the stack of earlier
                                         production versions (for rollback) and an event log

Version ids are `<UTC time to the ms>-<first 8 hex of the ONNX sha256>`, e.g. 20261127T210530.123Z-1a2b3c4d:
they sort by publication time as plain strings, need no shared counter (a `v0007`
counter would need a read-modify-write that object stores cannot make atomic), and
the hash suffix ties the name to the model bytes and keeps two publishes in the same
second apart.

All-or-nothing: on a local disk a version is written into a hidden `.tmp-*` folder and
renamed into place; on object stores (no rename) its files are written under the final
name and `COMPLETE` (a manifest of every file's sha256) is written last. Either way
readers see only versions that have COMPLETE; a crash leaves nothing visible. The
pointer is one small object replaced in one step (os.replace locally, a single PUT on
S3), so it is always readable and always names a complete version. Moving it is a
read-modify-write: the retrain flow's one-run-at-a-time lock serialises publishes, and a
gated promotion re-checks that production is still the model it was compared with.

Commands: `registry list | show V | promote V | rollback | verify V | publish`
(also `python -m tasks.registry`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.config import DEFAULT_PARAMS, Params, ParamsError, load_params
from tasks.io import atomic_write_bytes, sha256_bytes, sha256_stream
from tasks.lineage import missing_fields

POINTER = "production"
MARKER = "COMPLETE"
VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
VERSION_FILES = ("model.onnx", "README.md", "card.json", "metrics.json", "export_report.json", "lineage.json",
                 "decision.json")
# Test hook: called with a stage name ("version_files_written", "version_committed") so a
# test can kill the process or raise exactly there and prove a crash leaves no half state.
CRASH_HOOK: Callable[[str], None] | None = None
ANY = object()  # promote(expected=ANY): move the pointer whatever production is now


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


def _crash_point(stage: str) -> None:
    if CRASH_HOOK is not None:
        CRASH_HOOK(stage)


def new_version_id(onnx_sha256: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique version id: UTC timestamp + the ONNX hash prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z-{onnx_sha256[:8]}"


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Registry:
    """One model name's versions and production pointer at a registry URI."""

    def __init__(self, uri: str, model_name: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.model_name = model_name
        self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{model_name}"
        self.local = isinstance(self.fs, LocalFileSystem)

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
        return self.fs.cat_file(self._path(version, name))

    def read_json(self, version: str, name: str) -> Any:
        return json.loads(self.read_bytes(version, name))

    def _require(self, version: str) -> None:
        if not self.exists(version):
            known = ", ".join(self.versions()[-5:]) or "none yet"
            raise RegistryError(f"{self.url(version)}: no such complete version of {self.model_name} "
                                f"(latest: {known}); see `registry list`")

    def fetch(self, version: str, name: str, dest: Path) -> Path:
        """Copy one file of a version to a local path (the ONNX file for re-evaluation)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, self.read_bytes(version, name))
        return dest

    def pointer(self) -> dict[str, Any] | None:
        """The production pointer, or None before the first promotion."""
        path = self._path(POINTER)
        self.fs.invalidate_cache()
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def production(self) -> str | None:
        pointer = self.pointer()
        return pointer["version"] if pointer else None

    def find_by_onnx(self, onnx_sha256: str) -> str | None:
        """The version that already holds exactly this ONNX file, if any (re-publishing is idempotent)."""
        for version in reversed(self.versions()):
            if version.endswith(onnx_sha256[:8]) and self.manifest(version).get("model.onnx") == onnx_sha256:
                return version
        return None

    def manifest(self, version: str) -> dict[str, str]:
        return json.loads(self.fs.cat_file(self._path(version, MARKER)))["files"]

    # ----------------------------------------------------------------- writing

    def write_version(self, version: str, files: dict[str, bytes]) -> str:
        """Write a new immutable version all-or-nothing; returns its URL."""
        if not VERSION_RE.match(version):
            raise RegistryError(f"version id {version!r} does not look like 20261127T210530.123Z-1a2b3c4d")
        if self.fs.exists(self._path(version)):
            raise RegistryError(f"{self.url(version)} already exists; versions are immutable, publish a new one")
        marker = json.dumps({"version": version, "written_at": _utcnow(),
                             "files": {name: sha256_bytes(data) for name, data in files.items()}},
                            indent=2, sort_keys=True).encode()
        if self.local:
            self._write_local(version, files, marker)
        else:
            self._write_object_store(version, files, marker)
        return self.url(version)

    def _write_local(self, version: str, files: dict[str, bytes], marker: bytes) -> None:
        self._sweep_stale_tmp()
        tmp = Path(self._path(f".tmp-{version}-{uuid.uuid4().hex[:8]}"))
        tmp.mkdir(parents=True)
        try:
            for name, data in files.items():
                _write_synced(tmp / name, data)
            _crash_point("version_files_written")
            _write_synced(tmp / MARKER, marker)
            # rename(2) of a directory is atomic and fails if the target exists and is non-empty.
            os.rename(tmp, self._path(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _crash_point("version_committed")

    def _sweep_stale_tmp(self, max_age_s: float = 3600) -> None:
        """Remove temp folders a killed writer left behind (old enough that no writer still owns them)."""
        for tmp in Path(self.root).glob(".tmp-*"):
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)

    def _write_object_store(self, version: str, files: dict[str, bytes], marker: bytes) -> None:
        for name, data in files.items():
            self.fs.pipe_file(self._path(version, name), data)
        _crash_point("version_files_written")
        self.fs.pipe_file(self._path(version, MARKER), marker)  # last: readers check it
        _crash_point("version_committed")

    def _write_pointer(self, pointer: dict[str, Any]) -> None:
        data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
        if self.local:
            atomic_write_bytes(Path(self._path(POINTER)), data)  # temp file + os.replace
        else:
            self.fs.pipe_file(self._path(POINTER), data)  # one PUT: readers see the old or the new object

    # ----------------------------------------------------------------- pointer moves

    def promote(self, version: str, reason: str, *, expected: str | None | object = ANY) -> dict[str, Any]:
        """Make `version` production (lineage must be complete); the old one goes on the rollback stack.

        `expected` guards a gate decision: the move is refused if production is no
        longer the version the candidate was compared with.
        """
        self._require(version)
        problems = self.verify(version)
        if problems:
            raise RegistryError(f"cannot promote {version}: " + "; ".join(problems))
        pointer = self.pointer() or {"model": self.model_name, "version": None, "previous": [], "events": []}
        current = pointer["version"]
        if expected is not ANY and current != expected:
            raise RegistryError(f"production moved from {expected} to {current} while {version} was gated; "
                                "publish again to compare with the new production model")
        if current == version:
            raise RegistryError(f"{version} is already production")
        previous = [*pointer["previous"], current] if current else list(pointer["previous"])
        return self._move(pointer, version, previous, "promote", reason)

    def rollback(self, reason: str = "manual rollback") -> dict[str, Any]:
        """Point production back at the version it replaced."""
        pointer = self.pointer()
        if not pointer or not pointer["previous"]:
            raise RegistryError(f"{self.url(POINTER)}: no earlier production version of {self.model_name} "
                                "to roll back to")
        *rest, target = pointer["previous"]
        self._require(target)
        return self._move(pointer, target, rest, "rollback", reason)

    def _move(self, pointer: dict[str, Any], version: str, previous: list[str], action: str,
              reason: str) -> dict[str, Any]:
        event = {"at": _utcnow(), "action": action, "from": pointer["version"], "to": version, "reason": reason}
        new = {"model": self.model_name, "version": version, "updated_at": event["at"], "reason": reason,
               "previous": previous, "events": [*pointer["events"], event]}
        self._write_pointer(new)
        return new

    # ----------------------------------------------------------------- verify

    def verify(self, version: str) -> list[str]:
        """Problems with a version ([] = fine): missing files, hashes that do not match, incomplete lineage."""
        if not self.exists(version):
            return [f"{self.url(version)} is not a complete version (no {MARKER} marker)"]
        problems = []
        for name, expected in self.manifest(version).items():
            path = self._path(version, name)
            if not self.fs.exists(path):
                problems.append(f"{name} is missing")
            elif (actual := _sha256_fs(self.fs, path)) != expected:
                problems.append(f"{name} sha256 {actual[:12]}... does not match the recorded {expected[:12]}...")
        problems += [f"{name} is missing" for name in VERSION_FILES if name not in self.manifest(version)]
        if "lineage.json" in self.manifest(version):
            lineage = self.read_json(version, "lineage.json")
            missing = missing_fields(lineage)
            if missing:
                problems.append(f"lineage incomplete: missing {', '.join(missing)}")
            elif lineage["onnx_sha256"] != _sha256_fs(self.fs, self._path(version, "model.onnx")):
                problems.append("model.onnx sha256 does not match lineage.onnx_sha256")
        return problems

    # ----------------------------------------------------------------- summaries

    def summary(self, version: str, production: str | None) -> dict[str, Any]:
        """Key facts of one version for `list`."""
        metrics = self.read_json(version, "metrics.json")
        decision = self.read_json(version, "decision.json")
        return {"version": version, "production": version == production,
                "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
                "ece": metrics.get("ece"), "gate_passed": decision.get("passed"), "reason": decision.get("reason")}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sha256_fs(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as handle:
        return sha256_stream(handle)


def open_registry(params: Params, root: Path | None = None) -> Registry:
    """The registry named by params; a relative local path is taken relative to `root`."""
    uri = params.registry.uri
    if root is not None and "://" not in uri and not Path(uri).is_absolute():
        uri = str(Path(root) / uri)
    return Registry(uri, params.project.name, params.registry.storage_options)


# --------------------------------------------------------------------------- command line


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["version", "production", "accuracy", "macro_f1", "ece", "gate_passed", "reason"]
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "*" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    production = reg.production()
    rows = [reg.summary(v, production) for v in reg.versions()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"{reg.url()}: no versions yet")
    else:
        _print_table(rows)
    return 0


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    version = args.version or reg.production()
    if version is None:
        raise RegistryError(f"{reg.url()}: no production version; name one (`registry show VERSION`)")
    shown = {"version": version, "url": reg.url(version), "production": version == reg.production(),
             "card": reg.read_json(version, "card.json"), "decision": reg.read_json(version, "decision.json")}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(reg.read_bytes(version, "README.md").decode())
    return 0


def _cmd_promote(reg: Registry, args: argparse.Namespace) -> int:
    pointer = reg.promote(args.version, args.reason)
    print(f"{reg.model_name}: production is now {pointer['version']} (was {pointer['events'][-1]['from']})")
    return 0


def _cmd_rollback(reg: Registry, args: argparse.Namespace) -> int:
    pointer = reg.rollback(args.reason)
    print(f"{reg.model_name}: rolled back production to {pointer['version']} (was {pointer['events'][-1]['from']})")
    return 0


def _cmd_verify(reg: Registry, args: argparse.Namespace) -> int:
    version = args.version or reg.production()
    if version is None:
        raise RegistryError(f"{reg.url()}: no production version; name one (`registry verify VERSION`)")
    problems = reg.verify(version)
    for problem in problems:
        print(f"{version}: {problem}")
    if not problems:
        print(f"{version}: ok (every file matches its sha256, lineage complete)")
    return 1 if problems else 0


def _cmd_publish(params: Params, args: argparse.Namespace) -> int:
    from tasks.publish import publish_candidate

    result = publish_candidate(params, Path.cwd(), args.flow_run_id)
    print(json.dumps({k: result[k] for k in ("registry_version", "promoted", "reason", "model_card")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry", description="List, inspect, promote, roll back and verify "
                                     "published models (registry.uri and project.name from params.yaml).")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S registry.uri=s3://bucket/models")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="versions with their key metrics; * marks production")
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="a version's model card (default: production)")
    show.add_argument("version", nargs="?")
    show.add_argument("--json", action="store_true", help="card, decision and URL as JSON")
    promote = sub.add_parser("promote", help="make a version production (bypasses the gate, not lineage)")
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual promote")
    rollback = sub.add_parser("rollback", help="point production back at the version it replaced")
    rollback.add_argument("--reason", default="manual rollback")
    verify = sub.add_parser("verify", help="recompute hashes and check lineage (default: production)")
    verify.add_argument("version", nargs="?")
    publish = sub.add_parser("publish", help="publish the current artifacts through the gate (what the flow does)")
    publish.add_argument("--flow-run-id", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import StageError

    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        if args.command == "publish":
            return _cmd_publish(params, args)
        reg = open_registry(params)
        handler = {"list": _cmd_list, "show": _cmd_show, "promote": _cmd_promote, "rollback": _cmd_rollback,
                   "verify": _cmd_verify}[args.command]
        return handler(reg, args)
    except (RegistryError, ParamsError, StageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
