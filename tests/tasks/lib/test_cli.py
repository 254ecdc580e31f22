"""tasks.lib.cli: every stage's entry parses --params/-S, maps expected failures to one clear line and exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib.cli import stage_main
from tasks.lib.config import Params
from tasks.lib.errors import StageError, TransientError
from tasks.lib.progress import progress
from tests.conftest import REPO_ROOT

PARAMS = ["--params", str(REPO_ROOT / "params.yaml")]


def test_overrides_reach_the_stage_validated_and_typed() -> None:
    seen: list[Params] = []
    code = stage_main(seen.append, "test stage", PARAMS + ["-S", "train.head.epochs=3", "-S", "train.seed=7"])
    assert code == 0 and seen[0].train.head.epochs == 3 and seen[0].train.seed == 7


@pytest.mark.parametrize(("argv", "message"), [
    (["-S", "train.head.epochs=-1"], "train.head.epochs"),
    (["-S", "train.no_such_key=1"], "unknown key"),
    (["--params", "nowhere/params.yaml"], "nowhere/params.yaml: not found"),
])
def test_bad_params_exit_1_with_a_message_naming_the_key_or_file(argv: list[str], message: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    ran: list[Params] = []
    code = stage_main(ran.append, "test stage", (argv if argv[0] == "--params" else PARAMS + argv))
    assert code == 1 and not ran
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_expected_stage_failures_are_one_line_bugs_keep_their_traceback(capsys: pytest.CaptureFixture) -> None:
    def fails_cleanly(params: Params) -> None:
        raise StageError("data/raw: input folder not found; put one sub-folder of images per class there")

    assert stage_main(fails_cleanly, "test stage", PARAMS) == 1
    assert capsys.readouterr().err == ("error: data/raw: input folder not found; "
                                       "put one sub-folder of images per class there\n")

    def has_a_bug(params: Params) -> None:
        raise KeyError("a programming error")

    with pytest.raises(KeyError):  # not swallowed into a one-liner: a bug must show where it is
        stage_main(has_a_bug, "test stage", PARAMS)


def test_missing_inputs_are_expected_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def reads_a_missing_file(params: Params) -> None:
        (tmp_path / "classes.json").read_text()

    assert stage_main(reads_a_missing_file, "test stage", PARAMS) == 1
    assert "classes.json" in capsys.readouterr().err


def test_a_transient_failure_exits_75_so_the_flow_retries_it(capsys: pytest.CaptureFixture) -> None:
    def network_hiccup(params: Params) -> None:
        raise TransientError("https://example.org/w.pth: connection reset; the flow retries the stage")

    assert stage_main(network_hiccup, "test stage", PARAMS) == 75
    assert capsys.readouterr().err == "error: https://example.org/w.pth: connection reset; the flow retries the stage\n"


def test_the_log_progress_writes_a_line_per_quarter_not_per_item(capsys: pytest.CaptureFixture) -> None:
    # Under pytest stderr is not a terminal, so this is what a stage's log shows.
    assert list(progress(range(8), desc="checking", unit="img")) == list(range(8))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" img,")[0] for line in lines] == [f"checking: {n}/8 ({25 * n // 2}%)" for n in (2, 4, 6, 8)]


def test_a_bar_that_is_not_shown_still_counts_without_writing(capsys: pytest.CaptureFixture) -> None:
    bar = progress(desc="worker", total=4, show=False)
    bar.update(2)
    bar.set_postfix(loss="0.1")
    bar.close()
    assert capsys.readouterr().err == ""
