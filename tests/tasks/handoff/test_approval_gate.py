"""Which gate refusals are borderline (a person may overrule them with gate.approval), and when a person is asked."""

from __future__ import annotations

import pytest

from tasks.handoff.gate import needs_approval
from tests.tasks.handoff.test_gate import SIGNIFICANT, SPLIT, gate
from tests.tasks.handoff.test_publish import synthetic_metrics

NOT_SIGNIFICANT = {"wins": 5, "losses": 4, "p_value": 1.0, "n": 315, "accuracy_delta": 0.003}


def test_better_but_not_significant_is_borderline():
    decision = gate(synthetic_metrics(0.85, SPLIT), synthetic_metrics(0.8, SPLIT), paired=NOT_SIGNIFICANT)
    assert decision["passed"] is False and decision["borderline"] is True


def test_refused_only_by_the_per_class_guard_is_borderline():
    decision = gate(synthetic_metrics(0.9, SPLIT, recalls=(1.0, 1.0, 0.80)),
                    synthetic_metrics(0.8, SPLIT, recalls=(0.8, 0.8, 0.90)))
    assert decision["passed"] is False and decision["borderline"] is True


@pytest.mark.parametrize(("candidate", "production", "paired", "lineage"), [
    (0.8, 0.8, SIGNIFICANT, None),                 # incomplete lineage, even though nothing else failed
    (0.8, 0.85, NOT_SIGNIFICANT, "ok"),            # worse: no improvement is a fact, not a judgement
    (0.85, 0.8, None, "ok"),                       # no paired test: nothing to weigh
])
def test_other_refusals_and_passes_are_not_borderline(candidate, production, paired, lineage):
    kwargs = {} if lineage == "ok" else {"lineage": lineage}
    decision = gate(synthetic_metrics(candidate, SPLIT), synthetic_metrics(production, SPLIT), paired=paired, **kwargs)
    assert decision["borderline"] is False
    assert gate(synthetic_metrics(0.9, SPLIT), synthetic_metrics(0.8, SPLIT))["borderline"] is False  # a pass


def test_a_recall_drop_with_another_failure_is_not_borderline():
    decision = gate(synthetic_metrics(0.9, SPLIT, recalls=(1.0, 1.0, 0.80)),
                    synthetic_metrics(0.8, SPLIT, recalls=(0.8, 0.8, 0.90)), report={"parity_passed": False})
    assert decision["borderline"] is False


@pytest.mark.parametrize(("approval", "passed", "borderline", "asked"), [
    ("auto", True, False, False), ("auto", False, True, False),
    ("borderline", True, False, False), ("borderline", False, True, True), ("borderline", False, False, False),
    ("always", True, False, True), ("always", False, True, True), ("always", False, False, False),
])
def test_who_is_asked(approval, passed, borderline, asked):
    assert needs_approval({"passed": passed, "borderline": borderline}, approval) is asked
