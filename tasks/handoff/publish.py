"""Publish: the pipeline's artifacts -> a registry version, gated against production.

`publish_candidate` (the retrain flow's last step, `registry publish` by hand) checks the artifacts belong
together, builds the lineage, scores production's verified ONNX file on the candidate's test images, runs
the gate, writes the version and moves production only if the gate passed (and, where gate.approval
asks one, only once a person approved it: `settle_approval`). A candidate that fails is still
stored (the registry is the audit trail; a person may `registry promote` it). Publishing the same ONNX file
again writes no new version: it is gated again against the current production.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.handoff.card import build_card, render_readme
from tasks.handoff.gate import classes_differ_reason, decide, needs_approval, paired_test
from tasks.handoff.lineage import LineageError, build_lineage
from tasks.handoff.registry import Registry, RegistryError, approval_text, new_version_id, open_registry
from tasks.handoff.registry_pointer import utcnow
from tasks.lib.config import Params
from tasks.lib.errors import StageError
from tasks.lib.images import ImageLimits
from tasks.lib.io import read_json, sha256_bytes, sha256_file
from tasks.lib.metrics import compute_metrics
from tasks.lib.onnx_classifier import ModelError, load_classifier, score_onnx
from tasks.lib.split_files import labels_of, read_classes, read_split, split_digest, split_path
from tasks.lib.weights import weights_sha256

log = logging.getLogger(__name__)
# How long past its deadline a version still unanswered is noted as timed out by a later publish (or the
# timeout itself, when that is shorter).
APPROVAL_GRACE = dt.timedelta(hours=1)


@dataclass
class CandidateArtifacts:
    """The artifacts of one pipeline run that make up a registry version."""

    onnx_path: Path
    onnx_sha256: str
    class_names: list[str]
    metrics: dict[str, Any]
    metrics_bytes: bytes
    predictions: dict[str, Any]
    predictions_bytes: bytes
    export_report: dict[str, Any]
    export_report_bytes: bytes
    test_split_sha256: str
    weights_record: dict[str, Any]
    checkpoint_sha256: str | None
    train_metrics: dict[str, Any] | None
    data_report: dict[str, Any] | None
    label_issues: dict[str, Any] | None  # the train stage's labels that look wrong (prepare.label_issues)
    figures: dict[str, bytes]            # PNGs of the run that the model card shows, by file name


def publish_candidate(params: Params, root: Path, flow_run_id: str | None,
                      registry_root: Path | None = None) -> dict[str, Any]:
    """Gate and publish the artifacts under `root`; returns registry_version, promoted, reason, model_card, decision.

    registry_root: where a relative registry.uri starts (default `root`; an isolated copy passes its project).
    """
    root = Path(root)
    try:
        candidate = read_candidate(params, root)
        lineage = build_lineage(params, root, onnx_sha256=candidate.onnx_sha256,
                                test_split_sha256=candidate.test_split_sha256,
                                weights_record=candidate.weights_record,
                                weights_sha256=weights_sha256(candidate.weights_record),
                                checkpoint_sha256=candidate.checkpoint_sha256, flow_run_id=flow_run_id)
        registry = open_registry(params, Path(registry_root or root))
        for version in note_expired_approvals(registry):
            log.warning("Registry version %s waited for a person past its deadline: recorded as timed out", version)
        existing = registry.find_by_onnx(candidate.onnx_sha256)
        if existing:
            return _regate_existing(params, root, registry, existing, candidate, lineage)
        return _publish_new(params, root, registry, candidate, lineage)
    except (LineageError, RegistryError) as err:
        raise StageError(str(err)) from None


def _publish_new(params: Params, root: Path, registry: Registry, candidate: CandidateArtifacts,
                 lineage: dict[str, Any]) -> dict[str, Any]:
    production = registry.production()
    decision = _gate(params, root, registry, production, candidate, lineage)
    # What the gate decided, for people reading the version; production itself is the promotion log, and a
    # person's later decision (gate.approval) is a note beside the version.
    decision["promoted"] = decision["passed"] and not decision["awaiting_approval"]
    version = new_version_id(candidate.onnx_sha256)
    card = build_card(params=params, version=version, url=registry.url(version), class_names=candidate.class_names,
                      lineage=lineage, metrics=candidate.metrics, export_report=candidate.export_report,
                      decision=decision, train_metrics=candidate.train_metrics, data_report=candidate.data_report,
                      label_issues=candidate.label_issues, figures=sorted(candidate.figures))
    registry.write_version(version, {
        "model.onnx": candidate.onnx_path.read_bytes(),
        "README.md": render_readme(card).encode(),
        "card.json": _json_bytes(card),
        "metrics.json": candidate.metrics_bytes,
        "predictions.json": candidate.predictions_bytes,
        "export_report.json": candidate.export_report_bytes,
        "lineage.json": _json_bytes(lineage),
        "decision.json": _json_bytes(decision),
        **candidate.figures,
    })
    promoted = _move_pointer(registry, version, production, decision)
    return _result(registry, version, promoted, decision)


def _regate_existing(params: Params, root: Path, registry: Registry, version: str,
                     candidate: CandidateArtifacts, run_lineage: dict[str, Any]) -> dict[str, Any]:
    """The same ONNX file is already a version: note the reproduction and gate that version again, with this
    run's metrics (the current test split) and the version's own lineage."""
    production = registry.production()
    lineage = registry.read_json(version, "lineage.json")
    registry.record_reproduction(version, reproduction_note(run_lineage, lineage))
    decision = _gate(params, root, registry, production, candidate, lineage)
    decision["republished"] = f"this ONNX file is already version {version}; no new version was written"
    promoted = _move_pointer(registry, version, production, decision)
    return _result(registry, version, promoted, decision)


def reproduction_note(run: dict[str, Any], published: dict[str, Any]) -> dict[str, Any]:
    """Which run rebuilt a version's ONNX file, from which inputs, and whether each matches the published ones."""
    inputs = ("data_hash", "git_commit", "params_sha256", "weights_sha256", "test_split_sha256")
    return {"at": utcnow(), "flow_run_id": run.get("flow_run_id"), "onnx_sha256": run.get("onnx_sha256"),
            **{key: run.get(key) for key in inputs},
            "same_as_published": {key: run.get(key) == published.get(key) for key in inputs}}


@dataclass
class ProductionSide:
    """Production's metrics and predictions on the candidate's test split, its ONNX sha256, or why it is unscored."""

    metrics: dict[str, Any] | None = None
    predicted: list[int] | None = None
    onnx_sha256: str | None = None
    unscored: str | None = None


def _gate(params: Params, root: Path, registry: Registry, production: str | None, candidate: CandidateArtifacts,
          lineage: dict[str, Any]) -> dict[str, Any]:
    """The gate decision, with both models' metrics and the paired test of their predictions."""
    side = _production_side(params, root, registry, production, candidate)
    paired = None
    if side.predicted is not None:
        paired = paired_test(candidate.predictions["label"], candidate.predictions["predicted"], side.predicted)
    decision = decide(candidate.metrics, side.metrics, params.gate, export_report=candidate.export_report,
                      lineage=lineage, model_name=params.project.name, paired=paired,
                      production_unscored=side.unscored)
    awaiting = needs_approval(decision, params.gate.approval)
    return {**decision, "production_version": production, "production_onnx_sha256": side.onnx_sha256,
            "candidate_metrics": candidate.metrics, "production_metrics": side.metrics,
            "gate_params": params.gate.model_dump(mode="json"),
            "awaiting_approval": awaiting, "approval_deadline": approval_deadline(params) if awaiting else None}


def approval_deadline(params: Params) -> str:
    """When a candidate waiting for a person is rejected unanswered (gate.approval_timeout_hours from now)."""
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(hours=params.gate.approval_timeout_hours)
    return deadline.isoformat(timespec="milliseconds")


def _production_side(params: Params, root: Path, registry: Registry, production: str | None,
                     candidate: CandidateArtifacts) -> ProductionSide:
    """Production's verified ONNX file scored on the candidate's test images (a second or two); its stored
    metrics are never read: a changed split or an edited record would make them the wrong evidence."""
    if production is None:
        return ProductionSide()
    onnx_bytes = verified_production_onnx(registry, production)
    onnx_sha256 = sha256_bytes(onnx_bytes)
    if onnx_sha256 == candidate.onnx_sha256:
        # The candidate is production (a re-run): the same bytes on the same split score the same. Its own
        # evaluation is that score; scoring it again would only add PyTorch-vs-onnxruntime rounding noise.
        return ProductionSide(candidate.metrics, candidate.predictions["predicted"], onnx_sha256)
    if (classes := registry.class_names(production)) is not None and classes != candidate.class_names:
        return ProductionSide(onnx_sha256=onnx_sha256,
                              unscored=classes_differ_reason(candidate.class_names, classes, production))
    prepared = root / params.data.prepared_dir
    with tempfile.TemporaryDirectory(prefix="registry-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        try:
            metrics, probs = score_test_split(onnx_path, prepared, root / params.data.raw_dir, read_classes(prepared),
                                              top_k=params.evaluate.top_k, bins=params.evaluate.calibration_bins,
                                              limits=params.prepare.limits())
        except ValueError as err:  # e.g. the class set changed: no comparison is possible, so no promotion
            # name the registry file, not the temporary copy that is gone once this returns
            message = str(err).replace(str(onnx_path), registry.url(production, "model.onnx"))
            return ProductionSide(onnx_sha256=onnx_sha256, unscored=(
                f"production {production} cannot be scored on this test split ({message}), so the candidate "
                "cannot be compared with it: set project.name if it is a model for another dataset, or compare "
                "by hand and `registry promote` it (--force when the classes differ)"))
    return ProductionSide(metrics, [int(p) for p in probs.argmax(axis=1)], onnx_sha256)


def verified_production_onnx(registry: Registry, version: str) -> bytes:
    """Production's model.onnx after the version verified; hashed again, so an edit after the check is caught."""
    require_verified_production(registry, version)
    onnx_bytes = registry.read_bytes(version, "model.onnx")
    if sha256_bytes(onnx_bytes) != registry.manifest(version).get("model.onnx"):
        raise RegistryError(damaged_production(registry, version, ["model.onnx changed after it was verified"]))
    return onnx_bytes


def require_verified_production(registry: Registry, version: str) -> None:
    """RegistryError naming what changed unless every file of the production version matches its manifest."""
    problems = registry.verify(version)
    if problems:
        raise RegistryError(damaged_production(registry, version, problems))


def damaged_production(registry: Registry, version: str, problems: list[str]) -> str:
    return (f"production version {version} of {registry.model_name} ({registry.url(version)}) does not verify: "
            f"{'; '.join(problems)}. Nothing is compared with, or published over, a production model whose files "
            f"changed after it was published: `registry verify {version}` lists what changed; restore those files "
            f"from a backup, or `registry rollback` to make the previous production version current again")


def score_test_split(onnx_path: Path, prepared_dir: Path, raw_dir: Path, class_names: list[str], *,
                     top_k: int, bins: int, limits: ImageLimits | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (evaluate's code, so the gate compares like with like) and probabilities of an ONNX model on the
    test split; ValueError when it cannot be scored."""
    test_file = split_path(prepared_dir, "test")
    rows = read_split(test_file)
    probs = score_onnx(onnx_path, class_names, [Path(raw_dir) / r.path for r in rows], limits)
    metrics = compute_metrics(probs, labels_of(rows), class_names, top_k, bins)
    return {**metrics, "test_split_sha256": split_digest(test_file)}, probs


def _move_pointer(registry: Registry, version: str, production: str | None, decision: dict[str, Any]) -> bool:
    if not decision["passed"] or decision["awaiting_approval"] or version == production:
        return False
    registry.promote(version, decision["reason"], expected=production)
    return True


def _result(registry: Registry, version: str, promoted: bool, decision: dict[str, Any]) -> dict[str, Any]:
    return {"registry_version": version, "promoted": promoted, "reason": decision["reason"],
            "awaiting_approval": decision["awaiting_approval"], "model_card": registry.url(version, "README.md"),
            "decision": json_safe(decision)}


def settle_approval(params: Params, registry_root: Path, published: dict[str, Any],
                    outcome: dict[str, Any]) -> dict[str, Any]:
    """Record a person's decision on a candidate that waited for one (`outcome`: status approved, rejected or
    timed out; by, at, comment) and promote it if approved; `published` updated with the result.

    Production must still be the model the candidate was compared with: a wait of hours is long enough for
    another promote, and then the approval no longer stands on its evidence.
    """
    registry = open_registry(params, registry_root)
    version, decision = published["registry_version"], published["decision"]
    record = {**outcome, "approval_mode": params.gate.approval, "gate_passed": decision["passed"],
              "borderline": decision["borderline"], "gate_reason": decision["reason"],
              "production_version": decision["production_version"]}
    try:
        registry.record_approval(version, record)
        reason = f"{approval_text(outcome)}; gate: {decision['reason']}"
        promoted = outcome["status"] == "approved"
        if promoted:
            registry.promote(version, reason, expected=decision["production_version"], approval=record)
    except RegistryError as err:
        raise StageError(str(err)) from None
    return {**published, "promoted": promoted, "reason": reason, "awaiting_approval": False, "approval": record}


def note_expired_approvals(registry: Registry, now: dt.datetime | None = None) -> list[str]:
    """Record "timed out" beside each version that waited for a person and got no answer by its deadline; returns
    the versions noted.

    A deployment run that suspended for the answer exits; when nobody resumes it, Prefect's server fails it at
    the deadline and no code of this project runs then, so the next publish writes the note. It waits an hour
    (or the timeout, if shorter) past the deadline: an answer given at the last minute writes its own note first.
    """
    now = now or dt.datetime.now(dt.UTC)
    noted = []
    for version in registry.versions():
        try:
            decision = registry.read_json(version, "decision.json")
        except RegistryError:
            continue   # a damaged version is `registry verify`'s to report, not a question of approval
        if not (isinstance(decision, dict) and decision.get("awaiting_approval")) or registry.approvals(version):
            continue
        deadline, hours = decision.get("approval_deadline"), decision["gate_params"]["approval_timeout_hours"]
        if not deadline or dt.datetime.fromisoformat(deadline) + min(APPROVAL_GRACE, dt.timedelta(hours=hours)) > now:
            continue   # still waiting, or written before deadlines were recorded
        registry.record_approval(version, {
            "status": "timed out", "by": None, "at": deadline, "noted_at": utcnow(), "flow_run_id": None,
            "comment": f"nobody approved or rejected it within gate.approval_timeout_hours={hours:g}",
            "gate_passed": decision.get("passed"), "production_version": decision.get("production_version")})
        noted.append(version)
    return noted


def json_safe(obj: Any) -> Any:
    """NaN and infinities as "nan", "inf": strict JSON writers accept them and the gate's evidence is kept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n").encode()


def read_candidate(params: Params, root: Path) -> CandidateArtifacts:
    """Load the candidate's artifacts and check they describe one and the same model and test split."""
    paths = params.report_paths(root)
    onnx_path, report_path, metrics_path = paths["onnx"], paths["export_report"], paths["test_metrics"]
    predictions_path = paths["test_predictions"]
    prepared = root / params.data.prepared_dir
    test_file = split_path(prepared, "test")
    for path in (onnx_path, report_path, metrics_path, predictions_path, test_file):
        if not path.exists():
            raise StageError(f"{path}: not found; run the pipeline first (dvc repro) so there is a model to publish")
    onnx_sha256 = sha256_file(onnx_path)
    report, metrics, predictions = read_json(report_path), read_json(metrics_path), read_json(predictions_path)
    test_split = split_digest(test_file)
    _check_consistent(onnx_path, onnx_sha256, report_path, report, metrics_path, metrics, test_split)
    if predictions.get("test_split_sha256") != test_split:
        raise StageError(f"{predictions_path} was computed on another test split than the current test.csv; "
                         "re-run the evaluate stage (dvc repro evaluate)")
    class_names = read_classes(prepared)
    _check_onnx_classes(onnx_path, class_names)
    checkpoint = root / params.train.out_dir / "model.pt"
    return CandidateArtifacts(
        onnx_path=onnx_path, onnx_sha256=onnx_sha256, class_names=class_names,
        metrics=metrics, metrics_bytes=metrics_path.read_bytes(),
        predictions=predictions, predictions_bytes=predictions_path.read_bytes(),
        export_report=report, export_report_bytes=report_path.read_bytes(),
        test_split_sha256=test_split, weights_record=_weights_record(params, root, report),
        checkpoint_sha256=sha256_file(checkpoint) if checkpoint.exists() else None,
        train_metrics=_optional_json(paths["train_metrics"]),
        data_report=_optional_json(paths["data_report"]),
        label_issues=_optional_json(paths["label_issues"]),
        figures=_figures(paths),
    )


def _check_consistent(onnx_path: Path, onnx_sha256: str, report_path: Path, report: dict[str, Any],
                      metrics_path: Path, metrics: dict[str, Any], test_split: str) -> None:
    if report.get("onnx_sha256") not in (None, onnx_sha256):
        raise StageError(f"{report_path} describes another ONNX file than {onnx_path} (sha256 differs); "
                         "re-run the export stage (dvc repro export)")
    if metrics.get("test_split_sha256") != test_split:
        raise StageError(f"{metrics_path} was computed on another test split than the current test.csv; "
                         "re-run the evaluate stage (dvc repro evaluate)")


def _check_onnx_classes(onnx_path: Path, class_names: list[str]) -> None:
    try:
        onnx_classes = load_classifier(onnx_path).class_names
    except ModelError as err:
        raise StageError(f"{err}; re-run the export stage (dvc repro export)") from None
    if onnx_classes != class_names:
        raise StageError(f"{onnx_path}: metadata class_names {onnx_classes} do not match classes.json {class_names}; "
                         "re-run the export stage (dvc repro export)")


def _weights_record(params: Params, root: Path, export_report: dict[str, Any]) -> dict[str, Any]:
    """The pretrained-weights record: the export report's copy, else weights.json (older export reports)."""
    if isinstance(export_report.get("weights"), dict):
        return export_report["weights"]
    path = params.report_paths(root)["weights"]
    if not path.exists():
        raise StageError(f"neither the export report nor {path} records the pretrained weights; "
                         "run the pipeline (dvc repro export)")
    return read_json(path)


def _figures(paths: dict[str, Path]) -> dict[str, bytes]:
    """The run's PNG figures that exist (a machine without matplotlib draws none)."""
    found = {"curves.png": paths["train_plots"] / "curves.png", "worst_mistakes.png": paths["worst_mistakes"],
             "label_issues.png": paths["train_plots"] / "label_issues.png",
             **{name: paths["evaluate_plots"] / name for name in ("confusion.png", "per_class_f1.png",
                                                                  "reliability.png")}}
    return {name: path.read_bytes() for name, path in found.items() if path.is_file()}


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None
