"""The promotion gate: may a candidate model replace the production one?

`decide()` is a pure function of the two models' test metrics (on the same test
split), the candidate's export report and lineage, and the gate params; every
check it makes is returned with the reason, so a "not promoted" is explained.
Scoring models is not its business: publish hands it both sets of metrics.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.handoff.lineage import missing_fields
from tasks.lib.config import GateParams

NO_IMPROVEMENT = "no improvement"  # exact text: the demo's second run reports it


def decide(candidate: dict[str, Any], production: dict[str, Any] | None, gate: GateParams, *,
           export_report: dict[str, Any], lineage: dict[str, Any] | None, model_name: str) -> dict[str, Any]:
    """Gate decision: {"passed", "reason", "checks", "metric", "delta"}; production None means first model."""
    checks = [_check_lineage(lineage), _check_parity(export_report), _check_finite("candidate", candidate)]
    if production is None:
        checks.append(_check_bootstrap(candidate, gate, model_name))
        delta = None
    else:
        checks += [_check_finite("production", production), _check_same_split(candidate, production),
                   _check_same_classes(candidate, production)]
        delta = _delta(candidate, production, gate.metric)
        checks += [_check_improvement(delta, gate), *_check_class_recalls(candidate, production, gate)]
    failed = [c["reason"] for c in checks if not c["ok"]]
    passed = not failed
    reason = "; ".join(failed) if failed else _success_reason(production, delta, gate, model_name)
    return {"passed": passed, "reason": reason, "checks": checks, "metric": gate.metric, "delta": delta,
            "bootstrap": production is None}


def _success_reason(production: dict[str, Any] | None, delta: float | None, gate: GateParams, name: str) -> str:
    if production is None:
        return f"bootstrap: first model of {name} (gate.bootstrap=promote)"
    return f"{gate.metric} improved by {delta:+.4f} (>= min_delta {gate.min_delta:g})"


def _check(name: str, ok: bool, reason: str = "", **detail: Any) -> dict[str, Any]:
    return {"check": name, "ok": bool(ok), "reason": "" if ok else reason, **detail}


def _check_lineage(lineage: dict[str, Any] | None) -> dict[str, Any]:
    missing = missing_fields(lineage)
    return _check("lineage", not missing, f"incomplete lineage: missing {', '.join(missing)}", missing=missing)


def _check_parity(report: dict[str, Any]) -> dict[str, Any]:
    ok = report.get("parity_passed") is True
    return _check("export_parity", ok, "export parity failed (or the export report does not say it passed)",
                  max_abs_diff=report.get("max_abs_diff"))


def _check_finite(which: str, metrics: dict[str, Any]) -> dict[str, Any]:
    bad = non_finite(metrics)
    return _check(f"{which}_metrics_finite", not bad, f"{which} metric not finite: {', '.join(bad[:5])}", bad=bad)


def non_finite(metrics: Any, prefix: str = "") -> list[str]:
    """Dotted names of every number in a metrics tree that is NaN, infinite or not a number at all."""
    if isinstance(metrics, dict):
        return [bad for key, value in metrics.items() for bad in non_finite(value, f"{prefix}{key}.")]
    if isinstance(metrics, bool) or metrics is None or isinstance(metrics, str):
        return []
    if isinstance(metrics, (int, float)):
        return [] if math.isfinite(metrics) else [f"{prefix[:-1]}={metrics}"]
    if isinstance(metrics, list):
        return [bad for i, value in enumerate(metrics) for bad in non_finite(value, f"{prefix}{i}.")]
    return [f"{prefix[:-1]}={metrics!r}"]


def _check_bootstrap(candidate: dict[str, Any], gate: GateParams, name: str) -> dict[str, Any]:
    if gate.bootstrap == "manual":
        return _check("bootstrap", False, f"bootstrap: first model of {name} waits for a manual "
                      "`registry promote` (gate.bootstrap=manual)")
    value = _metric(candidate, gate.metric)
    ok = value is not None and value >= gate.bootstrap_min_metric
    return _check("bootstrap", ok, f"bootstrap: {gate.metric}={value} is below gate.bootstrap_min_metric "
                  f"{gate.bootstrap_min_metric:g}", value=value)


def _check_same_split(candidate: dict[str, Any], production: dict[str, Any]) -> dict[str, Any]:
    a, b = candidate.get("test_split_sha256"), production.get("test_split_sha256")
    return _check("same_test_split", a is not None and a == b,
                  f"test splits differ (candidate {a}, production {b}); re-evaluate production first")


def _check_same_classes(candidate: dict[str, Any], production: dict[str, Any]) -> dict[str, Any]:
    a, b = sorted(candidate.get("per_class", {})), sorted(production.get("per_class", {}))
    return _check("same_classes", a == b, f"class names differ from production ({a} vs {b}); a model for "
                  "another dataset belongs under its own name: set project.name for the new dataset (or compare by "
                  "hand and `registry promote --force`)")


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _delta(candidate: dict[str, Any], production: dict[str, Any], name: str) -> float | None:
    a, b = _metric(candidate, name), _metric(production, name)
    return None if a is None or b is None else a - b


def _check_improvement(delta: float | None, gate: GateParams) -> dict[str, Any]:
    # A tie never promotes, even with min_delta 0: the new model must be strictly better.
    # The epsilon absorbs float noise so a delta of exactly min_delta still counts.
    ok = delta is not None and math.isfinite(delta) and delta > 0 and delta >= gate.min_delta - 1e-12
    return _check("improvement", ok, NO_IMPROVEMENT, delta=delta, min_delta=gate.min_delta)


def _check_class_recalls(candidate: dict[str, Any], production: dict[str, Any], gate: GateParams) -> list[dict[str, Any]]:
    checks = []
    for name, prod in sorted(production.get("per_class", {}).items()):
        cand = candidate.get("per_class", {}).get(name)
        if cand is None:
            continue  # reported by the same_classes check
        drop = float(prod["recall"]) - float(cand["recall"])
        checks.append(_check(f"recall[{name}]", drop <= gate.max_class_drop + 1e-12,
                             f"recall of class {name} dropped by {drop:.4f} (> max_class_drop {gate.max_class_drop:g})",
                             drop=drop))
    return checks
