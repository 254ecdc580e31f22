"""The promotion gate matrix: better, worse, tie, NaN, class regression, missing lineage, parity, split, first model."""

from __future__ import annotations

import math

import pytest

import numpy as np

from tasks.handoff.gate import NO_IMPROVEMENT, decide, non_finite, paired_test
from tasks.handoff.lineage import REQUIRED
from tasks.lib.config import GateParams
from tests.tasks.handoff.test_publish import synthetic_metrics

SPLIT = "a" * 64
GATE = GateParams(metric="macro_f1", min_delta=0.01, max_class_drop=0.05)
LINEAGE = {**{key: "x" for key in REQUIRED}, "git_dirty": False, "flow_run_id": None}
REPORT = {"parity_passed": True, "max_abs_diff": 1e-6}
# The candidate right on 30 images production gets wrong, wrong on 2 it gets right: clearly significant.
SIGNIFICANT = {"wins": 30, "losses": 2, "p_value": 1.5e-7, "n": 100, "accuracy_delta": 0.28}


def gate(candidate, production, *, gate_params=GATE, lineage=LINEAGE, report=REPORT, paired=SIGNIFICANT):
    return decide(candidate, production, gate_params, export_report=report, lineage=lineage, model_name="m",
                  paired=paired)


def failed(decision) -> list[str]:
    return [c["check"] for c in decision["checks"] if not c["ok"]]


# Boundaries use binary fractions, so `candidate - production` is exactly min_delta (0.81 - 0.80 is
# 0.010000000000000009 in floating point, which a wrong strict `>` would also pass).
EXACT_GATE = GateParams(metric="macro_f1", min_delta=0.125, max_class_drop=0.25)
JUST = 2.0 ** -20  # far above float noise, far below any real metric difference


@pytest.mark.parametrize(("candidate", "passed", "reason"), [
    (0.75, True, "macro_f1 improved by +0.2500 (>= min_delta 0.125); +28.0 points accuracy (30 images better, "
                 "2 worse), McNemar p=1.5e-07 on 100 images < significance 0.05"),
    (0.625, True, "macro_f1 improved by +0.1250 (>= min_delta 0.125); +28.0 points accuracy (30 images better, "
                  "2 worse), McNemar p=1.5e-07 on 100 images < significance 0.05"),  # exactly min_delta counts
    (0.625 - JUST, False, NO_IMPROVEMENT),                               # better, but by just less
    (0.5, False, NO_IMPROVEMENT),                                        # tie
    (0.25, False, NO_IMPROVEMENT),                                       # worse
])
def test_primary_metric_must_improve_by_min_delta(candidate, passed, reason):
    decision = gate(synthetic_metrics(candidate, SPLIT), synthetic_metrics(0.5, SPLIT), gate_params=EXACT_GATE)
    assert (decision["passed"], decision["reason"]) == (passed, reason)
    assert decision["delta"] == candidate - 0.5


@pytest.mark.parametrize(("recall", "passed"), [(0.5, True), (0.5 - JUST, False)])
def test_a_class_recall_drop_of_exactly_max_class_drop_still_promotes(recall, passed):
    candidate = synthetic_metrics(0.75, SPLIT, recalls=(1.0, 1.0, recall))
    production = synthetic_metrics(0.5, SPLIT, recalls=(0.75, 0.75, 0.75))
    assert 0.75 - 0.5 == EXACT_GATE.max_class_drop
    decision = gate(candidate, production, gate_params=EXACT_GATE)
    assert decision["passed"] is passed
    assert failed(decision) == ([] if passed else ["recall[class_2]"])


def test_a_tie_never_promotes_even_with_min_delta_zero():
    decision = gate(synthetic_metrics(0.8, SPLIT), synthetic_metrics(0.8, SPLIT),
                    gate_params=GateParams(min_delta=0.0))
    assert decision["passed"] is False and decision["reason"] == NO_IMPROVEMENT


def test_the_primary_metric_comes_from_params():
    candidate, production = synthetic_metrics(0.8, SPLIT), synthetic_metrics(0.8, SPLIT)
    candidate["accuracy"] = 0.9
    assert gate(candidate, production)["passed"] is False
    assert gate(candidate, production, gate_params=GateParams(metric="accuracy"))["passed"] is True


def test_nan_metrics_never_promote():
    candidate = synthetic_metrics(math.nan, SPLIT)
    decision = gate(candidate, synthetic_metrics(0.5, SPLIT))
    assert decision["passed"] is False
    assert "candidate_metrics_finite" in failed(decision) and "improvement" in failed(decision)
    assert decision["reason"].startswith("candidate metric not finite: accuracy=nan")
    # A NaN hidden in a per-class score counts too, as does an infinite log loss.
    candidate = synthetic_metrics(0.9, SPLIT, recalls=(0.9, math.nan, 0.9))
    candidate["log_loss"] = math.inf
    decision = gate(candidate, synthetic_metrics(0.5, SPLIT))
    assert not decision["passed"] and "per_class.class_1.recall=nan" in decision["reason"]
    assert "log_loss=inf" in decision["reason"]


def test_a_class_recall_regression_blocks_an_overall_improvement():
    candidate = synthetic_metrics(0.9, SPLIT, recalls=(1.0, 1.0, 0.80))
    production = synthetic_metrics(0.8, SPLIT, recalls=(0.8, 0.8, 0.90))
    decision = gate(candidate, production)
    assert decision["passed"] is False and failed(decision) == ["recall[class_2]"]
    assert decision["reason"] == "recall of class class_2 dropped by 0.1000 (> max_class_drop 0.05)"
    # A drop within max_class_drop is fine.
    candidate["per_class"]["class_2"]["recall"] = 0.86
    assert gate(candidate, production)["passed"] is True


def test_missing_lineage_never_promotes():
    incomplete = {k: v for k, v in LINEAGE.items() if k not in ("data_hash", "flow_run_id")}
    decision = gate(synthetic_metrics(0.9, SPLIT), synthetic_metrics(0.8, SPLIT), lineage=incomplete)
    assert decision["passed"] is False
    assert decision["reason"] == "incomplete lineage: missing data_hash, flow_run_id"
    assert gate(synthetic_metrics(0.9, SPLIT), None, lineage=None)["reason"].startswith(
        "incomplete lineage: missing lineage record")


def test_failed_or_unknown_parity_never_promotes():
    for report in ({"parity_passed": False}, {}):
        decision = gate(synthetic_metrics(0.9, SPLIT), synthetic_metrics(0.8, SPLIT), report=report)
        assert decision["passed"] is False and failed(decision) == ["export_parity"]


def test_different_test_splits_are_not_compared():
    decision = gate(synthetic_metrics(0.9, SPLIT), synthetic_metrics(0.8, "b" * 64))
    assert decision["passed"] is False and "same_test_split" in failed(decision)
    assert "test splits differ" in decision["reason"]


def test_a_changed_class_set_needs_a_person():
    production = synthetic_metrics(0.8, SPLIT, recalls=(0.9, 0.9), classes=["a", "b"])
    decision = gate(synthetic_metrics(0.9, SPLIT), production)
    assert decision["passed"] is False and "same_classes" in failed(decision)
    assert "a new project.name" in decision["reason"] and "--force" in decision["reason"]


def test_a_model_for_other_classes_gets_one_short_sentence_that_says_what_to_do():
    """Icons for 6 categories against a 200-class production: a few names, not every name, and no advice
    (re-evaluate production, recall drops) that only follows from the classes being different."""
    classes = [f"category_{i:03d}_with_a_long_name" for i in range(200)]
    production = synthetic_metrics(0.8, "b" * 64, recalls=(0.9,) * 200, classes=classes, n_test=600)
    icons = ["apps", "devices", "emblems", "mimetypes", "places", "status"]
    decision = gate(synthetic_metrics(0.9, SPLIT, recalls=(0.2,) * 6, classes=icons), production)
    assert decision["passed"] is False and "same_classes" in failed(decision)
    assert decision["reason"] == (
        "class names differ from production (new: apps, devices, emblems and 3 more; missing: "
        "category_000_with_a_long_name, category_001_with_a_long_name, category_002_with_a_long_name and 197 more): "
        "publish it under a new project.name, or `registry promote --force` it if it really replaces production")


def test_first_model_follows_the_bootstrap_rule():
    candidate = synthetic_metrics(0.6, SPLIT)
    promote = gate(candidate, None, gate_params=GateParams(bootstrap="promote"))
    assert promote["passed"] is True and promote["bootstrap"] is True
    assert promote["reason"] == "bootstrap: first model of m (gate.bootstrap=promote)"
    manual = gate(candidate, None, gate_params=GateParams(bootstrap="manual"))
    assert manual["passed"] is False and "waits for a manual `registry promote`" in manual["reason"]
    too_low = gate(candidate, None, gate_params=GateParams(bootstrap="promote", bootstrap_min_metric=0.7))
    assert too_low["passed"] is False and "below gate.bootstrap_min_metric 0.7" in too_low["reason"]
    nan_first = gate(synthetic_metrics(math.nan, SPLIT), None)
    assert nan_first["passed"] is False


def test_a_production_model_that_could_not_be_scored_is_never_a_first_model():
    decision = decide(synthetic_metrics(0.9, SPLIT), None, GATE, export_report=REPORT, lineage=LINEAGE,
                      model_name="m", production_unscored="production v1 cannot be scored on this test split")
    assert decision["passed"] is False and decision["bootstrap"] is False
    assert failed(decision) == ["production_scored"]
    assert decision["reason"] == "production v1 cannot be scored on this test split"


def test_several_failures_are_all_reported():
    decision = gate(synthetic_metrics(0.7, SPLIT), synthetic_metrics(0.8, SPLIT), report={"parity_passed": False})
    assert decision["reason"].split("; ") == ["export parity failed (or the export report does not say it passed)",
                                              NO_IMPROVEMENT]


def test_non_finite_walks_nested_metrics():
    assert non_finite({"a": 1.0, "b": {"c": [1, math.inf]}, "d": "text", "e": None, "f": True}) == ["b.c.1=inf"]


# --------------------------------------------------------------------------- significance and the baseline


def test_a_small_improvement_on_few_images_is_not_significant_and_the_reason_gives_the_numbers():
    labels = np.zeros(315, dtype=int)
    production = np.where(np.arange(315) < 263, 0, 1)             # 263 right (0.835)
    candidate = production.copy()
    candidate[263:268] = 0                                        # 5 more right ...
    candidate[:4] = 1                                             # ... 4 fewer: +1 image, +0.3 points
    paired = paired_test(labels.tolist(), candidate.tolist(), production.tolist())
    assert (paired["wins"], paired["losses"], paired["n"]) == (5, 4, 315)
    decision = gate(synthetic_metrics(0.85, SPLIT), synthetic_metrics(0.8, SPLIT), paired=paired)
    assert decision["passed"] is False and failed(decision) == ["significance"]
    assert decision["reason"] == ("not significant: +0.3 points accuracy (5 images better, 4 worse), McNemar p=1 "
                                  "on 315 images (needs p < gate.significance 0.05)")
    assert decision["paired_test"] == paired


def test_significance_null_turns_the_paired_test_off_and_unknown_pairs_refuse_while_it_is_on():
    candidate, production = synthetic_metrics(0.9, SPLIT), synthetic_metrics(0.8, SPLIT)
    assert gate(candidate, production, paired=None, gate_params=GateParams(significance=None))["passed"] is True
    unknown = gate(candidate, production, paired=None)
    assert unknown["passed"] is False and "no paired test" in unknown["reason"]


def test_no_improvement_is_not_also_called_not_significant():
    decision = gate(synthetic_metrics(0.8, SPLIT), synthetic_metrics(0.8, SPLIT),
                    paired={"wins": 0, "losses": 0, "p_value": 1.0, "n": 12, "accuracy_delta": 0.0})
    assert decision["reason"] == NO_IMPROVEMENT


@pytest.mark.parametrize(("accuracy", "baseline", "min_lift", "passed"), [
    (0.75, 0.5, 0.0, True),
    (0.75, 0.75, 0.0, False),                 # a tie does not beat the baseline
    (0.625, 0.75, 0.0, False),
    (0.75, 0.625, 0.125, False),              # exactly min_lift is not more than it
    (0.75, 0.625 - JUST, 0.125, True),
    (0.625, 0.75, -0.25, True),               # a negative limit tolerates a model below the baseline
])
def test_the_model_must_beat_the_pixel_baseline(accuracy, baseline, min_lift, passed):
    candidate = {**synthetic_metrics(0.9, SPLIT), "accuracy": accuracy, "baseline_accuracy": baseline}
    params = GateParams(metric="macro_f1", min_delta=0.01, min_lift_over_baseline=min_lift)
    for production in (synthetic_metrics(0.8, SPLIT), None):     # the first model too
        decision = gate(candidate, production, gate_params=params)
        assert decision["passed"] is passed, decision["reason"]
        if not passed:
            assert failed(decision) == ["baseline_lift"]
            assert decision["reason"].startswith(f"does not beat the pixel baseline: accuracy {accuracy:.4f} vs "
                                                 f"{baseline:.4f} for logistic regression on the same images")


def test_a_baseline_check_needs_the_baseline_or_null():
    candidate = synthetic_metrics(0.9, SPLIT)
    del candidate["baseline_accuracy"]
    assert "have no baseline_accuracy" in gate(candidate, None)["reason"]
    assert gate(candidate, None, gate_params=GateParams(min_lift_over_baseline=None))["passed"] is True
