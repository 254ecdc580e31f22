"""The shared fixtures' promises: a test that needs installed data fails without it, on a desk and in CI."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT

USES_FASHION = """
def test_needs_the_data(fashion_mnist):
    assert fashion_mnist.is_dir()
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_fashion_mnist_fails_and_says_how_to_install_it(pytester: pytest.Pytester,
                                                                monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from tests.conftest import fashion_mnist")
    pytester.makepyfile(USES_FASHION)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(pytester.path / "nowhere"))
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Fashion-MNIST is not in*nowhere*make demo-data*apt-get install "
                                 "dataset-fashion-mnist*"])
