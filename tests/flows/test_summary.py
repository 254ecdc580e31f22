"""The line `python -m flows.retrain` prints: the held-out scores beside the baseline, as `make demo`'s line has."""

from __future__ import annotations

from pathlib import Path

from flows.summary import held_out_scores, result_line, summarize
from tasks.lib.config import load_params
from tasks.lib.io import write_json
from tests.conftest import REPO_ROOT

EVALUATE = {"accuracy": 0.8952, "accuracy_ci_low": 0.871, "accuracy_ci_high": 0.915, "macro_f1": 0.894,
            "macro_f1_ci_low": 0.87, "macro_f1_ci_high": 0.914, "ece": 0.041, "ece_uncalibrated": 0.06,
            "baseline_accuracy": 0.79, "lift": 0.1052, "n_test": 600}


def test_the_summary_line_has_test_accuracy_with_its_interval_the_baseline_and_the_lift(tmp_path: Path) -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    write_json(params.report_paths(tmp_path)["test_metrics"], EVALUATE)
    write_json(params.report_paths(tmp_path)["label_issues"], {"n_flagged": {"train": 9, "val": 2},
                                                                "n_excluded_from_training": 4, "suspects": []})
    published = {"registry_version": "v1", "promoted": True, "reason": "bootstrap", "model_card": "README.md"}
    summary = summarize(tmp_path, tmp_path, None, "abc.dir", params, {"prepare": "ran"}, published, "run-1", False)
    line = result_line(summary)
    assert line["test_accuracy"] == 0.8952 and line["test_accuracy_ci95"] == [0.871, 0.915]
    assert line["baseline_accuracy"] == 0.79 and line["lift_over_baseline"] == 0.1052
    assert {key: line[key] for key in held_out_scores(EVALUATE)} == held_out_scores(EVALUATE)   # demo's fields
    assert line["promoted"] is True and line["stages_run"] == ["prepare"]
    assert line["label_issues_flagged"] == {"train": 9, "val": 2} and line["label_issues_excluded"] == 4


def test_the_summary_line_says_when_the_fine_tune_phase_never_beat_the_head_phase(tmp_path: Path) -> None:
    """The weights shipped from phase 1 after a fine-tune phase that only cost time: the line says so, with the time."""
    params = load_params(REPO_ROOT / "params.yaml")
    paths = params.report_paths(tmp_path)
    write_json(paths["test_metrics"], EVALUATE)
    write_json(paths["train_metrics"], {"best_phase": "head", "best_epoch": 3, "finetune_epochs": 4,
                                        "finetune_seconds": 690.0, "finetune_best_val_macro_f1": 0.45,
                                        "head_best_val_macro_f1": 0.61})
    summary = summarize(tmp_path, tmp_path, None, "abc.dir", params, {"train": "ran"}, None, "run-1", False)
    note = result_line(summary)["shipped_weights"]
    assert note.startswith("The shipped weights are epoch 3, from the head phase")
    assert "finetune phase ran (4 epoch(s), 11.5 min) but never beat the head phase" in note

    write_json(paths["train_metrics"], {"best_phase": "finetune", "best_epoch": 9, "finetune_epochs": 6,
                                        "finetune_seconds": 300.0})
    summary = summarize(tmp_path, tmp_path, None, "abc.dir", params, {"train": "ran"}, None, "run-2", False)
    assert result_line(summary)["shipped_weights"] == ("The shipped weights are epoch 9, from the finetune phase "
                                                       "(the run's best validation macro-F1).")
