"""`python -m tests.mutate --sample N`: a seeded sample of a module's mutants, scored with its Wilson interval.

The pure parts only (drawing the sample, scoring it, the line printed): running mutmut takes minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy.stats import binomtest

from tests import mutate

# mutmut's names: the module, the function, a number per mutant.
NAMES = [f"tasks.export.x_{fn}__mutmut_{i}" for fn in ("export", "_parity", "main") for i in range(1, 104)]


def statuses() -> dict[str, str]:
    return {name: "not checked" for name in NAMES}


def test_a_seeded_sample_is_the_same_sample_on_every_rerun_whatever_order_mutmut_lists_the_mutants_in() -> None:
    listed = statuses()
    reversed_listing = dict(reversed(list(listed.items())))
    first = mutate.draw_sample(listed, 40, seed=mutate.SAMPLE_SEED)
    assert first == mutate.draw_sample(reversed_listing, 40, seed=mutate.SAMPLE_SEED)
    assert len(set(first)) == 40 and set(first) <= set(NAMES)
    assert first != mutate.draw_sample(listed, 40, seed=mutate.SAMPLE_SEED + 1)


def test_a_sample_larger_than_the_module_tests_every_mutant() -> None:
    assert mutate.draw_sample(statuses(), 1000, seed=1) == sorted(NAMES)


def test_the_sample_score_counts_only_the_sampled_mutants_and_names_the_module_total(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = statuses()
    chosen = mutate.draw_sample(listed, 40, seed=mutate.SAMPLE_SEED)
    survivors = chosen[:3]
    listed.update({name: "killed" for name in NAMES if name not in survivors})   # unsampled kills must not count
    listed.update({name: "survived" for name in survivors})
    monkeypatch.setattr(mutate, "results", lambda work: listed)   # mutmut's listing, without running mutmut

    score = mutate.score("tasks/export.py", tmp_path, only=chosen)

    assert (score.mutants, score.caught, score.sampled_from) == (40, 37, len(NAMES))
    assert score.missed == survivors
    # The interval is the 95% Wilson score interval, as scipy computes it.
    expected = binomtest(37, 40).proportion_ci(confidence_level=0.95, method="wilson")
    assert score.interval == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert mutate.summary_line(score).startswith(
        "tasks/export.py: 92.5% [80.1%, 97.4%] (95% Wilson interval) estimated from a sample of 40 of 309 "
        "mutants, not a full run (37 of 40 caught; 37 killed, 3 survived; 0 equivalent set aside)")


def test_a_full_run_prints_no_interval_and_no_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mutate, "results", lambda work: {"a": "killed", "b": "survived"})
    line = mutate.summary_line(mutate.score("tasks/export.py", tmp_path))
    assert line == "tasks/export.py: 50.0% (1 of 2 caught; 1 killed, 1 survived; 0 equivalent set aside)"


@pytest.mark.parametrize("argv, sample, seed", [
    (["tasks/export.py"], None, mutate.SAMPLE_SEED),
    (["--sample", "40", "tasks/export.py"], 40, mutate.SAMPLE_SEED),
    (["--sample", "40", "--seed", "7", "tasks/export.py"], 40, 7),
])
def test_sample_and_seed_options(argv: list[str], sample: int | None, seed: int) -> None:
    args = mutate.parse_args(argv)
    assert (args.sample, args.seed, args.modules) == (sample, seed, ["tasks/export.py"])


def test_a_sample_of_no_mutants_is_refused_with_the_option_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        mutate.parse_args(["--sample", "0", "tasks/export.py"])
    assert "--sample must be at least 1 mutant, got 0" in capsys.readouterr().err
