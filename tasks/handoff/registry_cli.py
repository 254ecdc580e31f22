"""`registry`: list, show, promote, rollback, verify, repair and publish model versions.

`registry.uri` and `project.name` come from params.yaml (`--params`, `-S key=value`). Exit status 1 when a
command is refused or fails, or a file it had to read is damaged (named on stderr, the rest still printed).
Text from the registry is printed with control characters escaped: a registry is not trusted input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tasks.handoff.registry import MARKER, Registry, RegistryError, approval_text, open_registry
from tasks.lib.config import DEFAULT_PARAMS, Params, ParamsError, load_params
from tasks.lib.console import quiet_broken_pipe, terminal_safe
from tasks.lib.errors import StageError
from tasks.lib.io import StorageError

TABLE_WIDTH = 100
# (header, row key, width): the reason gets whatever is left of TABLE_WIDTH.
COLUMNS = (("version", "version", 29), ("data", "data_hash", 8), ("accuracy", "accuracy", 8),
           ("macro_f1", "macro_f1", 8), ("ece", "ece", 6), ("status", "status", 7), ("gate", "gate", 4))


def summaries(reg: Registry) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per version and what is wrong around production ([] if nothing); damaged files are named in the rows."""
    try:
        pointer, problems = reg.pointer() or {"version": None, "previous": []}, reg.production_problems()
        known = True
    except RegistryError as err:
        pointer, problems, known = {"version": None, "previous": []}, [str(err)], False
    rows = [_summary(reg, version, pointer) for version in reg.versions()]
    if not known:  # which version is production is unknown, not "none of them"
        for row in rows:
            row["production"] = row["on_rollback_stack"] = None
    return rows, problems


def _summary(reg: Registry, version: str, pointer: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"version": version, "production": version == pointer["version"],
                           "on_rollback_stack": version in pointer["previous"], "damaged": []}
    records: dict[str, dict[str, Any]] = {}
    for name in ("metrics.json", "decision.json", "lineage.json"):
        try:
            record = reg.read_json(version, name)
        except RegistryError as err:
            row["damaged"].append(str(err))
            record = {}
        if not isinstance(record, dict):
            row["damaged"].append(f"{reg.url(version, name)}: not a JSON object")
            record = {}
        records[name] = record
    metrics, decision, lineage = records["metrics.json"], records["decision.json"], records["lineage.json"]
    row.update({"data_hash": lineage.get("data_hash"), "accuracy": metrics.get("accuracy"),
                "macro_f1": metrics.get("macro_f1"), "ece": metrics.get("ece"), "gate_passed": decision.get("passed"),
                "promoted_by_gate": decision.get("promoted"), "reason": decision.get("reason"),
                "approval": _approval(reg, version, decision)})
    return row


def _approval(reg: Registry, version: str, decision: dict[str, Any]) -> str | None:
    """A person's last word on the version (gate.approval), "waits for a person", or None if none was asked.
    Rejections and timeouts move no pointer, so this list is where the history of every decision shows."""
    notes = reg.approvals(version)
    if notes:
        return approval_text(notes[-1])
    return "waits for a person" if decision.get("awaiting_approval") else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """A table that fits TABLE_WIDTH columns: status PROD (production), prev (on the rollback stack) or DAMAGED."""
    fixed = sum(width + 2 for _, _, width in COLUMNS)
    lines = [_line([h for h, _, _ in COLUMNS] + ["reason"], TABLE_WIDTH - fixed)]
    for row in rows:
        status = "DAMAGED" if row["damaged"] else "PROD" if row["production"] else \
            "prev" if row["on_rollback_stack"] else ""
        gate = {True: "pass", False: "fail"}.get(row["gate_passed"], "?")
        cells = {**row, "status": status, "gate": gate, "data_hash": (row["data_hash"] or "")[:8]}
        reason = "; ".join(row["damaged"]) if row["damaged"] else \
            "; ".join(text for text in (row["approval"], row["reason"]) if text)
        lines.append(_line([_fmt(cells[key]) for _, key, _ in COLUMNS] + [_fmt(reason)], TABLE_WIDTH - fixed))
    return "\n".join(lines)


def _line(cells: list[str], reason_width: int) -> str:
    padded = [terminal_safe(c, one_line=True)[:w].ljust(w) for c, (_, _, w) in zip(cells, COLUMNS, strict=False)]
    reason = terminal_safe(cells[-1], one_line=True)
    if len(reason) > reason_width:
        reason = reason[:reason_width - 1] + "…"
    return "  ".join([*padded, reason]).rstrip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    rows, problems = summaries(reg)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"{terminal_safe(reg.url())}: no versions yet")
    else:
        print(format_table(rows))
    problems += [d for row in rows for d in row["damaged"]]
    return _report(problems)


def _report(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {terminal_safe(problem)}", file=sys.stderr)
    return 1 if problems else 0


def _production_or_named(reg: Registry, version: str | None, command: str) -> str:
    version = version or reg.production()
    if version is None:
        raise RegistryError(f"{reg.url()}: no production version; name one (`registry {command} VERSION`)")
    return version


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    version = _production_or_named(reg, args.version, "show")
    reg.read_bytes(version, MARKER)  # an unknown version fails here, naming it and the latest ones
    problems: list[str] = []
    try:
        production: bool | None = version == reg.production()
    except RegistryError:
        production = None  # unknown; the version was named, so the pointer's damage is not this command's
    if args.json:
        shown = {"version": version, "url": reg.url(version), "production": production,
                 "card": _json_or_none(reg, version, "card.json", problems),
                 "decision": _json_or_none(reg, version, "decision.json", problems),
                 "reproductions": reg.reproductions(version), "approvals": reg.approvals(version)}
        print(terminal_safe(json.dumps(shown, indent=2)))
    else:
        try:
            print(terminal_safe(reg.read_bytes(version, "README.md").decode("utf-8", errors="replace")))
        except RegistryError as err:
            problems.append(str(err))
        for note in reg.reproductions(version):
            differs = [key for key, same in note.get("same_as_published", {}).items() if not same]
            print(terminal_safe(f"Reproduced {note.get('at')} by flow run {note.get('flow_run_id')}: the same ONNX file"
                            + (f", from another {', '.join(differs)}" if differs else ", from the same inputs")))
        for note in reg.approvals(version):   # a person's decision (gate.approval), beside the immutable version
            run = f" (flow run {note['flow_run_id']})" if note.get("flow_run_id") else ""
            print(terminal_safe(f"Approval{run}: {approval_text(note)}"))
    return _report(problems)


def _json_or_none(reg: Registry, version: str, name: str, problems: list[str]) -> Any:
    try:
        return reg.read_json(version, name)
    except RegistryError as err:
        problems.append(str(err))
        return None


def _cmd_verify(reg: Registry, args: argparse.Namespace) -> int:
    version = _production_or_named(reg, args.version, "verify")
    problems = reg.verify(version)
    for problem in problems:
        print(f"{version}: {terminal_safe(problem)}")
    if not problems:
        print(f"{version}: ok (every file matches its sha256, lineage complete)")
    return 1 if problems else 0


def _cmd_promote(reg: Registry, args: argparse.Namespace) -> int:
    if reg.production() == args.version:
        print(f"{reg.model_name}: {args.version} is already production; nothing changed")
        return 0
    if args.force and (differ := reg.class_names_differ(args.version, reg.production())):
        print(f"warning: {terminal_safe(differ)}; promoting anyway (--force)", file=sys.stderr)
    entry = reg.promote(args.version, args.reason, force=args.force)
    print(f"{reg.model_name}: production is now {entry['version']} (was {entry['from']})")
    return 0


def _cmd_rollback(reg: Registry, args: argparse.Namespace) -> int:
    entry = reg.rollback(args.reason)
    print(f"{reg.model_name}: rolled back production to {entry['version']} (was {entry['from']})")
    return 0


def _cmd_repair(reg: Registry, args: argparse.Namespace) -> int:
    cache = reg.repair()
    if cache is None:
        print(f"{reg.model_name}: nothing to repair; production is {reg.production()}")
        return 0
    print(f"{reg.model_name}: rewrote {reg.url('production')} from the promotion log: production is "
          f"{cache['version']} (entry {cache['seq']}), rollback stack {cache['previous'] or '(empty)'}")
    return 0


def _cmd_publish(params: Params, args: argparse.Namespace) -> int:
    from tasks.handoff.publish import publish_candidate

    result = publish_candidate(params, Path.cwd(), args.flow_run_id)
    print(json.dumps({k: result[k] for k in ("registry_version", "promoted", "reason", "model_card")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry", description="List, inspect, promote, roll back, verify and "
                                     "repair published models (registry.uri and project.name from params.yaml).")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S registry.uri=s3://bucket/models")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="versions with data hash, key metrics, status (PROD, prev) and gate")
    listing.add_argument("--json", action="store_true", help="every field of every version as JSON")
    show = sub.add_parser("show", help="a version's model card (default: production)")
    show.add_argument("version", nargs="?")
    show.add_argument("--json", action="store_true", help="card, decision and URL as JSON")
    promote = sub.add_parser("promote", help="make a version production (bypasses the gate; it must verify)")
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual promote")
    promote.add_argument("--force", action="store_true", help="promote although its class names differ from "
                         "production's")
    rollback = sub.add_parser("rollback", help="point production back at the version it replaced (it must verify)")
    rollback.add_argument("--reason", default="manual rollback")
    verify = sub.add_parser("verify", help="recompute hashes and check lineage (default: production)")
    verify.add_argument("version", nargs="?")
    sub.add_parser("repair", help="rewrite the production file (a cache for outside readers) from the promotion log")
    publish = sub.add_parser("publish", help="publish the current artifacts through the gate (what the flow does)")
    publish.add_argument("--flow-run-id", default=None)
    return parser


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        if args.command == "publish":
            return _cmd_publish(params, args)
        reg = open_registry(params)
        handler = {"list": _cmd_list, "show": _cmd_show, "promote": _cmd_promote, "rollback": _cmd_rollback,
                   "verify": _cmd_verify, "repair": _cmd_repair}[args.command]
        return handler(reg, args)
    except (RegistryError, ParamsError, StageError, FileNotFoundError, StorageError) as err:
        print(f"error: {terminal_safe(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
