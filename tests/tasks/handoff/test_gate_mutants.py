"""The gate's decision as a person reads it in the registry's decision.json, and its edges.

Mutation testing (`make mutate`) planted one-line bugs in tasks/handoff/gate.py that
test_gate.py let through: a check recorded under another name or without its evidence, a
crash on metrics without per-class scores, a recall regression left out of the record, a
p-value exactly at gate.significance counted as significant. These tests pin what a reader
of decision.json and of the model card relies on. Numbers are binary fractions, so every
expected value is exact.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.handoff.gate import NO_IMPROVEMENT, decide, non_finite, paired_test
from tasks.handoff.lineage import REQUIRED
from tasks.lib.config import GateParams
from tests.realistic import CLASS_NAMES
from tests.tasks.handoff.test_publish import synthetic_metrics

SPLIT = "c" * 64
LINEAGE = {**{key: "x" for key in REQUIRED}, "git_dirty": False, "flow_run_id": None}
REPORT = {"parity_passed": True, "max_abs_diff": 2.0 ** -20}
# Class names as users write them, in the order metrics.json lists them; the gate sorts them by code point:
# "Zebra" < "apple" < "Äpfel", unlike by case or by locale. Recalls below are given in this order.
CLASSES = [CLASS_NAMES[3], CLASS_NAMES[4], CLASS_NAMES[2]]
GATE = GateParams(metric="macro_f1", min_delta=0.125, max_class_drop=0.25, significance=0.05,
                  min_lift_over_baseline=0.0)
SIGNIFICANT = {"wins": 30, "losses": 2, "p_value": 1.5e-7, "n": 100, "accuracy_delta": 0.28}


def metrics(macro_f1: float, recalls: tuple[float, ...], *, accuracy: float | None = None,
            baseline: float = 0.25) -> dict[str, Any]:
    found = synthetic_metrics(macro_f1, SPLIT, recalls=recalls, classes=CLASSES)
    return {**found, "accuracy": macro_f1 if accuracy is None else accuracy, "baseline_accuracy": baseline}


def judge(candidate: dict[str, Any], production: dict[str, Any] | None, gate: GateParams = GATE, *,
          lineage: dict[str, Any] | None = LINEAGE, report: dict[str, Any] = REPORT,
          paired: dict[str, Any] | None = SIGNIFICANT, name: str = "flowers") -> dict[str, Any]:
    return decide(candidate, production, gate, export_report=report, lineage=lineage, model_name=name,
                  paired=paired)


def passed_check(name: str, **evidence: Any) -> dict[str, Any]:
    return {"check": name, "ok": True, "reason": "", **evidence}


def without_per_class(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k != "per_class"}


def failed_checks(decision: dict[str, Any]) -> list[str]:
    return [c["check"] for c in decision["checks"] if not c["ok"]]


def test_a_promotion_records_every_check_with_its_evidence():
    candidate = metrics(0.75, (0.75, 0.5, 1.0), baseline=0.5)
    production = metrics(0.5, (0.75, 0.375, 0.75))
    decision = judge(candidate, production)
    assert decision["checks"] == [
        passed_check("lineage", missing=[]),
        passed_check("export_parity", max_abs_diff=2.0 ** -20),
        passed_check("candidate_metrics_finite", bad=[]),
        passed_check("baseline_lift", lift=0.25),
        passed_check("production_metrics_finite", bad=[]),
        passed_check("same_test_split"),
        passed_check("same_classes"),
        passed_check("improvement", delta=0.25, min_delta=0.125),
        passed_check("significance", **SIGNIFICANT),
        passed_check("recall[Zebra]", drop=-0.25),      # production's classes in code-point order
        passed_check("recall[apple]", drop=0.0),
        passed_check("recall[Äpfel]", drop=-0.125),
    ]
    assert {k: decision[k] for k in ("passed", "metric", "delta", "bootstrap", "paired_test")} == {
        "passed": True, "metric": "macro_f1", "delta": 0.25, "bootstrap": False, "paired_test": SIGNIFICANT}


def test_a_refusal_records_why_each_check_failed_and_the_reason_joins_them():
    candidate = metrics(0.5, (0.75, 0.75, 0.375), accuracy=0.5, baseline=0.625)
    production = metrics(0.625, (0.75, 0.75, 0.75))
    lineage = {k: v for k, v in LINEAGE.items() if k != "data_hash"}
    decision = judge(candidate, production, lineage=lineage, report={"parity_passed": False, "max_abs_diff": 0.5})
    reasons = {
        "lineage": "incomplete lineage: missing data_hash",
        "export_parity": "export parity failed (or the export report does not say it passed)",
        "baseline_lift": "does not beat the pixel baseline: accuracy 0.5000 vs 0.6250 for logistic regression on "
                         "the same images (lift -0.1250, needs more than gate.min_lift_over_baseline 0); more "
                         "data, more epochs or another model may help",
        "improvement": NO_IMPROVEMENT,
        "recall[Zebra]": "recall of class Zebra dropped by 0.3750 (> max_class_drop 0.25)",
    }
    assert decision["checks"] == [
        {"check": "lineage", "ok": False, "reason": reasons["lineage"], "missing": ["data_hash"]},
        {"check": "export_parity", "ok": False, "reason": reasons["export_parity"], "max_abs_diff": 0.5},
        passed_check("candidate_metrics_finite", bad=[]),
        {"check": "baseline_lift", "ok": False, "reason": reasons["baseline_lift"], "lift": -0.125},
        passed_check("production_metrics_finite", bad=[]),
        passed_check("same_test_split"),
        passed_check("same_classes"),
        {"check": "improvement", "ok": False, "reason": NO_IMPROVEMENT, "delta": -0.125, "min_delta": 0.125},
        {"check": "recall[Zebra]", "ok": False, "reason": reasons["recall[Zebra]"], "drop": 0.375},
        passed_check("recall[apple]", drop=0.0),
        passed_check("recall[Äpfel]", drop=0.0),
    ]
    assert decision["passed"] is False and decision["reason"] == "; ".join(reasons.values())


def test_a_first_model_at_exactly_bootstrap_min_metric_is_promoted_and_recorded():
    at_minimum = GateParams(bootstrap="promote", bootstrap_min_metric=0.75)
    decision = judge(metrics(0.75, (0.75, 0.75, 0.75)), None, at_minimum, paired=None)
    assert decision["passed"] is True
    assert decision["checks"][-1] == passed_check("bootstrap", value=0.75)
    assert (decision["delta"], decision["bootstrap"], decision["metric"]) == (None, True, "macro_f1")
    below = judge(metrics(0.75 - 2.0 ** -20, (0.75, 0.75, 0.75)), None, at_minimum, paired=None)
    assert below["passed"] is False and failed_checks(below) == ["bootstrap"]
    assert below["checks"][-1]["value"] == 0.75 - 2.0 ** -20


def test_a_first_model_waiting_for_a_person_names_the_model():
    decision = judge(metrics(0.75, (0.75, 0.75, 0.75)), None, GateParams(bootstrap="manual"), paired=None,
                     name="street-signs")
    reason = ("bootstrap: first model of street-signs waits for a manual `registry promote` "
              "(gate.bootstrap=manual)")
    assert decision["checks"][-1] == {"check": "bootstrap", "ok": False, "reason": reason}
    assert (decision["passed"], decision["reason"], decision["delta"]) == (False, reason, None)


def test_production_that_could_not_be_scored_records_no_delta():
    decision = decide(metrics(0.75, (0.75, 0.75, 0.75)), None, GATE, export_report=REPORT, lineage=LINEAGE,
                      model_name="flowers", production_unscored="production v3 has no predictions")
    assert decision["checks"][-1] == {"check": "production_scored", "ok": False,
                                      "reason": "production v3 has no predictions"}
    assert decision["delta"] is None


def test_the_baseline_check_says_when_it_is_off_and_when_it_cannot_run():
    candidate = metrics(0.75, (0.75, 0.75, 0.75))
    off = judge(candidate, None, GateParams(min_lift_over_baseline=None), paired=None)
    assert passed_check("baseline_lift") in off["checks"]
    del candidate["baseline_accuracy"]
    missing = judge(candidate, None, paired=None)
    reason = ("the test metrics have no baseline_accuracy; re-run evaluate "
              "(or set gate.min_lift_over_baseline: null)")
    assert {"check": "baseline_lift", "ok": False, "reason": reason} in missing["checks"]
    assert missing["reason"] == reason


def test_non_finite_metrics_are_named_five_in_the_reason_and_all_in_the_record():
    candidate = metrics(0.75, (0.75, 0.75, 0.75), baseline=0.5)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "log_loss", "ece"):
        candidate[key] = math.nan
    decision = judge(candidate, metrics(0.5, (0.75, 0.75, 0.75)))
    bad = ["accuracy=nan", "balanced_accuracy=nan", "macro_f1=nan", "weighted_f1=nan", "log_loss=nan", "ece=nan"]
    check = next(c for c in decision["checks"] if c["check"] == "candidate_metrics_finite")
    assert check == {"check": "candidate_metrics_finite", "ok": False, "bad": bad,
                     "reason": f"candidate metric not finite: {', '.join(bad[:5])}"}


def test_production_metrics_that_are_not_finite_are_never_compared():
    production = {**metrics(0.5, (0.75, 0.75, 0.75)), "log_loss": math.inf}
    decision = judge(metrics(0.75, (0.75, 0.75, 0.75), baseline=0.5), production)
    assert failed_checks(decision) == ["production_metrics_finite"]
    assert decision["reason"] == "production metric not finite: log_loss=inf"


def test_a_value_that_is_not_a_number_is_named_by_its_full_path():
    assert non_finite({"per_class": {"Äpfel": {"recall": (0.5,)}}}) == ["per_class.Äpfel.recall=(0.5,)"]


def test_metrics_without_per_class_scores_are_refused_for_their_classes_not_crashed_on():
    better, worse = metrics(0.875, (0.75, 0.75, 0.75), baseline=0.5), metrics(0.5, (0.75, 0.75, 0.75))
    for candidate, production in ((without_per_class(better), worse), (better, without_per_class(worse))):
        decision = judge(candidate, production)
        assert decision["passed"] is False and failed_checks(decision) == ["same_classes"]
        assert decision["reason"].startswith("class names differ from production")


def test_every_recall_regression_is_recorded_even_when_the_class_sets_differ():
    production = synthetic_metrics(0.5, SPLIT, recalls=(0.75, 0.75), classes=["Zebra", "apple"])
    candidate = synthetic_metrics(0.75, SPLIT, recalls=(0.25, 0.75), classes=["apple", "Äpfel"])
    decision = judge(candidate, production)
    # Zebra is gone (same_classes says so) and sorts first; apple's drop must still be checked.
    assert failed_checks(decision) == ["same_classes", "recall[apple]"]


def test_a_metric_missing_from_either_side_is_no_improvement():
    complete = metrics(0.75, (0.75, 0.75, 0.75))
    lacking = {k: v for k, v in metrics(0.5, (0.75, 0.75, 0.75)).items() if k != "macro_f1"}
    for candidate, production in ((complete, lacking), (lacking, complete)):
        decision = judge(candidate, production)
        assert decision["passed"] is False and decision["reason"] == NO_IMPROVEMENT and decision["delta"] is None


def test_a_p_value_exactly_at_gate_significance_is_not_significant():
    # The exact McNemar p-value is a binary fraction: 5 wins, 0 losses give 2 / 2**5 = 1/16 exactly.
    level = GateParams(metric="macro_f1", min_delta=0.125, max_class_drop=0.25, significance=1 / 16)
    labels = [0] * 40
    production = [1] * 6 + [0] * 34
    for wins, passed in ((5, False), (6, True)):
        candidate = [0] * wins + [1] * (6 - wins) + [0] * 34
        paired = paired_test(labels, candidate, production)
        assert paired["p_value"] == 2 / 2 ** wins
        decision = judge(metrics(0.75, (0.75, 0.75, 0.75)), metrics(0.5, (0.75, 0.75, 0.75)), level, paired=paired)
        assert decision["passed"] is passed, decision["reason"]


def test_with_the_paired_test_off_the_reason_names_only_the_improvement():
    off = GateParams(metric="macro_f1", min_delta=0.125, max_class_drop=0.25, significance=None)
    decision = judge(metrics(0.75, (0.75, 0.75, 0.75)), metrics(0.5, (0.75, 0.75, 0.75)), off)
    assert decision["passed"] is True
    assert decision["reason"] == "macro_f1 improved by +0.2500 (>= min_delta 0.125)"
    assert "significance" not in [c["check"] for c in decision["checks"]]


def test_an_unknown_paired_test_refuses_and_says_how_to_go_on():
    decision = judge(metrics(0.75, (0.75, 0.75, 0.75)), metrics(0.5, (0.75, 0.75, 0.75)), paired=None)
    reason = ("no paired test: production's predictions on this test split are unknown "
              "(set gate.significance: null to promote without one)")
    assert {"check": "significance", "ok": False, "reason": reason} in decision["checks"]
    assert decision["reason"] == reason
    assert decision["delta"] == 0.25


# --------------------------------------------------------------------------- the class-mismatch sentence

def test_the_class_mismatch_sentence_names_a_few_classes_and_how_many_more() -> None:
    from tasks.handoff.gate import class_difference

    many = [f"c{i:02d}" for i in range(8)]
    assert class_difference(many[:2], many, "v7") == \
        "class names differ from production v7 (missing: c02, c03, c04 and 3 more)"
    assert class_difference(["b", "a"], ["a"], None) == "class names differ from production (new: b)"
    assert class_difference([], many[:4]) == "class names differ from production (missing: c00, c01, c02 and 1 more)"
    assert class_difference(["x", "y", "z"], ["a"]) == "class names differ from production (new: x, y, z; missing: a)"


def test_the_class_mismatch_sentence_tells_reordered_classes_from_an_unknown_list() -> None:
    from tasks.handoff.gate import class_difference

    assert class_difference(["b", "a"], ["a", "b"]) == "class names differ from production (same names in another order)"
    assert class_difference(None, None) == "class names differ from production (class list unknown)"
    assert class_difference(["a"], None) == "class names differ from production (new: a)"


def test_the_class_mismatch_reason_names_production_and_says_what_to_do() -> None:
    from tasks.handoff.gate import classes_differ_reason

    reason = classes_differ_reason(["cat"], ["dog"], "20261207T120000.000Z-1a2b3c4d")
    assert reason == ("class names differ from production 20261207T120000.000Z-1a2b3c4d (new: cat; missing: dog): "
                      "publish it under a new project.name, or `registry promote --force` it if it really "
                      "replaces production")
