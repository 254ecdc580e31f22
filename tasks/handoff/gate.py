"""The promotion gate: may a candidate model replace the production one?

`decide()` is a pure function of both models' metrics on the same test split, the candidate's export
report and lineage, and the gate params; every check is returned with its reason. Publish does the scoring.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tasks.handoff.lineage import missing_fields
from tasks.lib.config import GateParams
from tasks.lib.uncertainty import mcnemar_exact

NO_IMPROVEMENT = "no improvement"  # exact text: the demo's second run reports it


def decide(candidate: dict[str, Any], production: dict[str, Any] | None, gate: GateParams, *,
           export_report: dict[str, Any], lineage: dict[str, Any] | None, model_name: str,
           paired: dict[str, Any] | None = None, production_unscored: str | None = None) -> dict[str, Any]:
    """Gate decision: {"passed", "reason", "checks", "metric", "delta"}; production None means first model.

    paired: `paired_test()` of both models' predictions (None fails a significance check that is on).
    production_unscored: why production has no metrics on this split; then nothing is promoted.
    """
    checks = [_check_lineage(lineage), _check_parity(export_report), _check_finite("candidate", candidate),
              _check_lift(candidate, gate)]
    bootstrap = production is None and production_unscored is None
    if production_unscored is not None:
        checks.append(_check("production_scored", False, production_unscored))
        delta = None
    elif production is None:
        checks.append(_check_bootstrap(candidate, gate, model_name))
        delta = None
    else:
        checks += [_check_finite("production", production), _check_same_split(candidate, production),
                   _check_same_classes(candidate, production)]
        delta = _delta(candidate, production, gate.metric)
        improvement = _check_improvement(delta, gate)
        checks.append(improvement)
        if improvement["ok"] and gate.significance is not None:   # "no improvement" says it all otherwise
            checks.append(_check_significance(paired, gate.significance))
        checks += _check_class_recalls(candidate, production, gate)
    failed = [c["reason"] for c in checks if not c["ok"]]
    passed = not failed
    # Other classes make the split, improvement and recall checks moot: the class check alone says what to do.
    moot = [c["reason"] for c in checks if c["check"] == "same_classes" and not c["ok"]]
    reason = "; ".join(moot or failed) if failed else _success_reason(production, delta, gate, model_name, paired)
    return {"passed": passed, "reason": reason, "checks": checks, "metric": gate.metric, "delta": delta,
            "bootstrap": bootstrap, "paired_test": paired, "borderline": borderline(checks, paired)}


def borderline(checks: list[dict[str, Any]], paired: dict[str, Any] | None) -> bool:
    """Refused only for want of significance (it improved, and a paired test exists) or by the per-class guard:
    the refusals a person may overrule with `gate.approval`. Every other refusal is a fact, not a judgement."""
    failed = [c["check"] for c in checks if not c["ok"]]
    overrulable = {"significance"} if paired is not None else set()
    return bool(failed) and all(name in overrulable or name.startswith("recall[") for name in failed)


def needs_approval(decision: dict[str, Any], approval: str) -> bool:
    """Whether a person decides this candidate: gate.approval borderline asks for the borderline refusals,
    always for those and every candidate the gate passed."""
    if approval == "auto":
        return False
    return decision["borderline"] or (approval == "always" and decision["passed"])


def _success_reason(production: dict[str, Any] | None, delta: float | None, gate: GateParams, name: str,
                    paired: dict[str, Any] | None = None) -> str:
    if production is None:
        return f"bootstrap: first model of {name} (gate.bootstrap=promote)"
    reason = f"{gate.metric} improved by {delta:+.4f} (>= min_delta {gate.min_delta:g})"
    if gate.significance is not None and paired is not None:
        reason += f"; {paired_text(paired)} < significance {gate.significance:g}"
    return reason


def paired_test(labels: list[int], candidate: list[int], production: list[int]) -> dict[str, Any]:
    """Both models' per-image correctness on the same test images, through the exact McNemar test."""
    right = np.asarray(candidate) == np.asarray(labels)
    prod_right = np.asarray(production) == np.asarray(labels)
    result = mcnemar_exact(right, prod_right)
    return {**result, "n": len(labels), "accuracy_delta": float(right.mean() - prod_right.mean())}


def paired_text(paired: dict[str, Any]) -> str:
    """'+0.4 points accuracy (12 images better, 10 worse), McNemar p=0.41 on 315 images'."""
    return (f"{paired['accuracy_delta'] * 100:+.1f} points accuracy ({paired['wins']} images better, "
            f"{paired['losses']} worse), McNemar p={paired['p_value']:.2g} on {paired['n']} images")


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
    return _check("same_classes", a == b, classes_differ_reason(a, b))


def classes_differ_reason(candidate: list[str], production: list[str], version: str | None = None) -> str:
    """The gate's one sentence when the classes differ: what differs (a few names) and what to do."""
    return (f"{class_difference(candidate, production, version)}: publish it under a new project.name, or "
            "`registry promote --force` it if it really replaces production")


def class_difference(candidate: list[str] | None, production: list[str] | None, version: str | None = None,
                     shown: int = 3) -> str:
    """'class names differ from production v1 (new: bird; missing: cat, dog and 5 more)': never every name,
    which for a thousand classes would bury what to do."""
    mine, theirs = list(candidate or []), list(production or [])
    parts = [f"{label}: {_some(sorted(names), shown)}" for label, names in
             (("new", set(mine) - set(theirs)), ("missing", set(theirs) - set(mine))) if names]
    what = "; ".join(parts) or ("same names in another order" if mine and theirs else "class list unknown")
    return f"class names differ from production{f' {version}' if version else ''} ({what})"


def _some(names: list[str], shown: int) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


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


def _check_significance(paired: dict[str, Any] | None, significance: float) -> dict[str, Any]:
    if paired is None:
        return _check("significance", False, "no paired test: production's predictions on this test split are "
                      "unknown (set gate.significance: null to promote without one)")
    ok = paired["wins"] > paired["losses"] and paired["p_value"] < significance
    return _check("significance", ok, f"not significant: {paired_text(paired)} (needs p < gate.significance "
                  f"{significance:g})", **paired)


def _check_lift(candidate: dict[str, Any], gate: GateParams) -> dict[str, Any]:
    """The model must beat the pixel logistic-regression baseline evaluate fitted on the same split."""
    if gate.min_lift_over_baseline is None:
        return _check("baseline_lift", True)
    accuracy, baseline = _metric(candidate, "accuracy"), _metric(candidate, "baseline_accuracy")
    if accuracy is None or baseline is None:
        return _check("baseline_lift", False, "the test metrics have no baseline_accuracy; re-run evaluate "
                      "(or set gate.min_lift_over_baseline: null)")
    lift = accuracy - baseline
    ok = lift - gate.min_lift_over_baseline > 1e-9   # strictly more: a tie with the baseline does not beat it
    return _check("baseline_lift", ok, f"does not beat the pixel baseline: accuracy {accuracy:.4f} vs "
                  f"{baseline:.4f} for logistic regression on the same images (lift {lift:+.4f}, needs more than "
                  f"gate.min_lift_over_baseline {gate.min_lift_over_baseline:g}); more data, more epochs or "
                  "another model may help", lift=lift)


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
