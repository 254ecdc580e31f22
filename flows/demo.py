"""`make demo`: demo data in, the whole pipeline through the retrain flow, one JSON summary line out.

Writes the deterministic demo subset into an empty data/raw (same bytes, so data/raw.dvc keeps its hash),
runs the `retrain` flow and prints one JSON summary as the last line of stdout; logs go to stderr. When the
flow could change nothing (everything current, production already this exact verified model) the summary
comes from the reports without starting Prefect, with `flow_state` "Up to date".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows.data_version import dvc_file, md5_in_workspace, raw_has_files
from flows.dvc_runner import read_stages, subprocess_env
from flows.lock import RetrainBusy, retrain_lock
from flows.summary import held_out_scores, label_issue_counts
from tasks.lib.config import Params, ParamsError, load_params
from tasks.lib.errors import StageError
from tasks.lib.io import read_json, sha256_file


class DemoError(RuntimeError):
    """The demo cannot go on; the message names the file or step."""


def ensure_demo_data(root: Path, params: Params) -> None:
    """Materialise the demo images when data/raw holds none, and track them with DVC."""
    raw = root / params.data.raw_dir
    if raw_has_files(raw):
        return
    from tasks.lib.demo_data import materialise

    demo = params.data.demo
    before = md5_in_workspace(root, params.data.raw_dir) if (root / dvc_file(params.data.raw_dir)).exists() else None
    print(f"Writing the demo data ({demo.per_class} images per class) to {raw}", file=sys.stderr)
    materialise(raw, demo.per_class, demo.seed, root / demo.source_dir, root / demo.download_dir)
    proc = subprocess.run(["dvc", "add", str(params.data.raw_dir)], cwd=root, capture_output=True, text=True,
                          env=subprocess_env())
    if proc.returncode != 0:
        raise DemoError(f"dvc add {params.data.raw_dir} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    after = md5_in_workspace(root, params.data.raw_dir)
    if before and after != before:
        print(f"warning: {dvc_file(params.data.raw_dir)} changed from {before} to {after}: data.demo settings "
              f"differ from the ones the committed demo data was made with", file=sys.stderr)


def up_to_date_result(root: Path, params: Params) -> dict[str, Any] | None:
    """What the retrain flow would return when it can change nothing (no retrain running, every stage current,
    production already this exact ONNX file); None when it must run. DemoError if production does not verify."""
    try:
        with retrain_lock(root, 0, {"flow_run_id": None, "data_rev": None, "checking": "make demo"}):
            return _result_if_current(root, params)
    except RetrainBusy:   # a retrain is under way: the flow waits for it and then decides
        return None


def _result_if_current(root: Path, params: Params) -> dict[str, Any] | None:
    onnx = params.report_paths(root)["onnx"]
    if not onnx.exists():
        return None
    try:
        stages = read_stages(root)
    except (OSError, ValueError, yaml.YAMLError):   # no or bad dvc.yaml: the flow reports it
        return None
    try:
        status = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True,
                                env=subprocess_env())
        if status.returncode != 0 or json.loads(status.stdout or "{}"):
            return None   # something is stale (or DVC has a complaint the flow will report)
    except (OSError, ValueError):   # no dvc, or output that is not JSON: the flow reports it
        return None
    from tasks.handoff.publish import require_verified_production  # the registry side: only when needed
    from tasks.handoff.registry import RegistryError, open_registry
    from tasks.lib.io import StorageError

    try:
        registry = open_registry(params, root)
        production = registry.production()
        if production is None or registry.find_by_onnx(sha256_file(onnx)) != production:
            return None
    except (RegistryError, StorageError, OSError, ValueError):   # the flow's publish step reports it properly
        return None
    # Production is this model by its manifest; its files must still be what the manifest says:
    # an edited or deleted model.onnx is said loudly, as the publish step would, never "Up to date".
    try:
        require_verified_production(registry, production)
    except RegistryError as err:
        raise DemoError(str(err)) from None
    except OSError:   # the store could not be read: the flow's publish step reports it properly
        return None
    return {"stages": stages, "stages_run": [], "stages_skipped": stages, "flow_run_id": None,
            "publish": {"registry_version": production, "promoted": False,
                        "reason": f"up to date: production is already this model ({production}); nothing to run",
                        "model_card": registry.url(production, "README.md")}}


def need(path: Path, missing: list[Path]) -> dict[str, Any]:
    """Read a JSON report, noting it as missing instead of failing on the first one."""
    if not path.exists():
        missing.append(path)
        return {}
    return read_json(path)


def build_summary(root: Path, params: Params, result: dict[str, Any], wall_s: float,
                  flow_state: str = "Completed") -> dict[str, Any]:
    """The summary line, from the stages' reports and the flow's result."""
    missing: list[Path] = []
    paths = params.report_paths(root)
    report = need(paths["data_report"], missing)
    weights = need(paths["weights"], missing)
    train = need(paths["train_metrics"], missing)
    test = need(paths["test_metrics"], missing)
    export = need(paths["export_report"], missing)
    if missing:
        raise DemoError("the pipeline finished but these outputs are missing: "
                        + ", ".join(str(p.relative_to(root)) for p in missing)
                        + "; run `dvc repro` to see which stage does not write them")
    published = result.get("publish") or {}
    n_images = report.get("n_images", {})
    return {
        "stages": result["stages"],
        "stages_run": result["stages_run"],
        "stages_skipped": result["stages_skipped"],
        "data_md5": md5_in_workspace(root, params.data.raw_dir),
        "n_images": {split: n_images.get(split) for split in ("train", "val", "test")},
        "rejected": report.get("n_rejected", len(report.get("rejected", []))),
        "wall_s": round(wall_s, 1),
        "arch": weights.get("arch"),
        "weights_sha256": weights.get("sha256"),
        "val_accuracy": train.get("val_accuracy"),
        "epochs": train.get("epochs"),
        "train_img_per_s": train.get("train_img_per_s"),
        **held_out_scores(test, train),
        **label_issue_counts(paths["label_issues"]),
        "onnx": export.get("onnx"),
        "onnx_max_abs_diff": export.get("max_abs_diff"),
        "ort_latency_ms_p50": export.get("ort_latency_ms_p50"),
        "registry_version": published.get("registry_version"),
        "promoted": published.get("promoted"),
        "reason": published.get("reason"),
        "model_card": published.get("model_card"),
        "flow_run_id": result.get("flow_run_id"),
        "flow_state": flow_state,
    }


def main() -> int:
    start = time.perf_counter()
    root = Path.cwd()
    try:
        params = load_params(root / "params.yaml")
        ensure_demo_data(root, params)
        current = up_to_date_result(root, params)
    except (ParamsError, DemoError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if current is not None:
        print("Data, code, params and the production model are as the last run left them: nothing to run "
              "(no Prefect flow run; `python -m flows.retrain` runs the flow regardless)", file=sys.stderr)
        print(json.dumps(build_summary(root, params, current, time.perf_counter() - start, "Up to date")), flush=True)
        return 0
    from flows.retrain import retrain  # imports Prefect (~3 s): after the cheap checks
    from flows.server import run_flow_command

    state = run_flow_command(root, lambda: retrain(root=str(root), return_state=True),
                             "demo interrupted; its stage, lock and temporary server are stopped")
    if isinstance(state, int):
        return state
    run_id = str(state.state_details.flow_run_id)
    if not state.is_completed():
        print(f"error: the retrain flow ended {state.name}: {state.message}", file=sys.stderr)
        print(json.dumps({"flow_run_id": run_id, "flow_state": state.name, "error": state.message,
                          "wall_s": round(time.perf_counter() - start, 1)}))
        return 1
    try:
        summary = build_summary(root, params, state.result(), time.perf_counter() - start, state.name)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
