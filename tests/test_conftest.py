"""The shared fixtures' promises: tests that need installed data skip on a desk but fail in CI."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT

USES_FASHION = """
def test_needs_the_data(fashion_mnist):
    assert fashion_mnist.is_dir()
"""


@pytest.mark.parametrize(("ci", "outcome"), [("", {"skipped": 1}), ("true", {"errors": 1})])
def test_missing_fashion_mnist_skips_on_a_desk_and_fails_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                                ci: str, outcome: dict[str, int]) -> None:
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from tests.conftest import fashion_mnist")
    pytester.makepyfile(USES_FASHION)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(pytester.path / "nowhere"))
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(**outcome)
    if ci:
        result.stdout.fnmatch_lines(["*CI must not skip these tests*"])
