"""What a person reads of a retrain: the flow's result, its summary line and its markdown artifacts.

Plain functions over the stages' reports (no Prefect), so `make demo` reads them
without starting Prefect, and the retrain flow and the demo report the same fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.handoff.card import shipped_weights_note
from tasks.lib.config import Params
from tasks.lib.io import read_json

METRIC_ROWS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "top_k_accuracy",
               "log_loss", "ece", "n_test")


def held_out_scores(test: dict[str, Any], train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The held-out scores with their 95% intervals, the baseline and lift, and where the shipped weights come from:
    the same fields in `make demo`'s and `python -m flows.retrain`'s summary lines."""
    return {
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_ci95": [test.get("accuracy_ci_low"), test.get("accuracy_ci_high")],
        "macro_f1": test.get("macro_f1"),
        "macro_f1_ci95": [test.get("macro_f1_ci_low"), test.get("macro_f1_ci_high")],
        "ece": test.get("ece"),
        "ece_uncalibrated": test.get("ece_uncalibrated"),
        "baseline_accuracy": test.get("baseline_accuracy"),
        "lift_over_baseline": test.get("lift"),
        "shipped_weights": shipped_weights_note(train),
    }


def label_issue_counts(path: Path) -> dict[str, Any]:
    """The train stage's labels that look wrong, counted: flagged per split and left out of training."""
    report = read_json(path) if path.exists() else {}
    return {"label_issues_flagged": report.get("n_flagged"),
            "label_issues_excluded": report.get("n_excluded_from_training")}


def summarize(project: Path, workdir: Path, data_rev: str | None, data_md5: str, params: Params,
              outcomes: dict[str, str], published: dict[str, Any] | None, run_id: str,
              pushed: bool) -> dict[str, Any]:
    """The flow's result: what ran, what it produced, and the gate's decision."""
    paths = params.report_paths(workdir)
    metrics = read_json(paths["test_metrics"]) if paths["test_metrics"].exists() else {}
    train = read_json(paths["train_metrics"]) if paths["train_metrics"].exists() else None
    return {
        "flow_run_id": run_id,
        "project": str(project),
        "isolated": workdir != project,   # the paths below were in a temporary copy, removed after the run
        "data_rev": data_rev,
        "data_md5": data_md5,
        "stages": list(outcomes),
        "stages_run": [s for s, o in outcomes.items() if o == "ran"],
        "stages_skipped": [s for s, o in outcomes.items() if o == "skipped"],
        "pushed": pushed,
        "test_metrics": {k: metrics[k] for k in METRIC_ROWS if k in metrics},
        "quality": held_out_scores(metrics, train),   # read here: an isolated copy is gone once the flow returns
        "data_checks": label_issue_counts(paths["label_issues"]),
        "per_class": metrics.get("per_class", {}),
        "paths": {name: path.relative_to(workdir).as_posix() for name, path in paths.items()},
        "publish": published,
    }


def metrics_markdown(summary: dict[str, Any]) -> str:
    """Overall and per-class test metrics as markdown tables."""
    metrics = summary["test_metrics"]
    if not metrics:
        return "# Test metrics\n\nNo test metrics were found (evaluate did not write them).\n"
    lines = ["# Test metrics (held-out split)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in metrics.items()]
    if summary["per_class"]:
        lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for name, row in summary["per_class"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in ("precision", "recall", "f1", "support"))
                         + " |")
    return "\n".join(lines) + "\n"


def outputs_markdown(summary: dict[str, Any], workdir: Path) -> str:
    """Stage outcomes, output paths and the gate's decision as markdown."""
    published = summary["publish"] or {}
    lines = ["# Retrain outputs", "", f"Data version: `{summary['data_md5']}` (rev `{summary['data_rev'] or 'workspace'}`)",
             "", "| stage | outcome |", "|---|---|"]
    lines += [f"| {stage} | {'ran' if stage in summary['stages_run'] else 'skipped'} |" for stage in summary["stages"]]
    lines += ["", "| output | path |", "|---|---|"]
    lines += [f"| {name} | `{path}` |" for name, path in summary["paths"].items()]
    if published:
        lines += [f"| model card | `{published.get('model_card')}` |", "",
                  f"Registry version **{published.get('registry_version')}**: promoted = "
                  f"**{published.get('promoted')}** ({published.get('reason')})"]
    if summary["isolated"]:
        lines += ["", "These paths were in an isolated working copy (for the data version or the overrides), "
                      "removed after the run; the outputs stay in the DVC cache and the model in the registry."]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def result_line(result: dict[str, Any]) -> dict[str, Any]:
    """What a person reads after a run: stages, held-out scores against the baseline and the gate's decision."""
    published = result.get("publish") or {}
    return {"flow_run_id": result["flow_run_id"], "data_md5": result["data_md5"],
            "stages_run": result["stages_run"], "stages_skipped": result["stages_skipped"],
            **result.get("quality", {}), **result.get("data_checks", {}),
            **{key: published.get(key) for key in ("registry_version", "promoted", "reason", "model_card")
               if published}}
