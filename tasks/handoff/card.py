"""The model card of a published version: card.json (facts) and README.md (the same facts, for people).

Built only from files the pipeline wrote, so it cannot drift from what was measured. README.md escapes
every value from data: a class folder named `<script>`, `| x |` or with a newline must not inject markup.
"""

from __future__ import annotations

import html
import re
from typing import Any

from tasks.lib.config import Params
from tasks.lib.console import terminal_safe
from tasks.lib.split_files import SPLITS

# Markdown that could make a value a link, code, or a new table cell; HTML is escaped as entities.
_MARKDOWN_ACTIVE = re.compile(r"([\\`\[\]|])")
# What opens a block when a value starts a line (the first class name does): a heading, quote, setext
# underline, fence or rule (# > = ~ _), a bullet or rule (- + * before a space, the end or another marker),
# an ordered list (1. 1) before a space or the end). Leading spaces (indented code) become entities first.
_BLOCK_MARKER = re.compile(r"^(?:[#>=~_]|[-+*](?=[\s\-+*]|$)|\d{1,9}[.)](?=\s|$))")

# What `predict` does, with onnxruntime, numpy and Pillow only: RGB as tasks.lib.images.INPUT_CONTRACT says, then
# the preprocessing from the model's metadata (so any size or normalisation works). test_card_snippet.py checks it.
SNIPPET = '''\
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

sess = ort.InferenceSession(sys.argv[1])
meta = sess.get_modelmeta().custom_metadata_map
prep, classes = json.loads(meta["preprocessing"]), json.loads(meta["class_names"])
t, dt = float(meta.get("abstain_threshold", 0)), float(meta.get("feature_distance_threshold", "inf"))  # abstention
img = ImageOps.exif_transpose(Image.open(sys.argv[2]))  # EXIF orientation applied
if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: scaled by the type's range, not clipped
    a = np.asarray(img, np.float64)
    a = a if img.mode == "F" else a / (255 if img.mode == "I" and a.max(initial=0) <= 255 else 65535)
    img = Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8))
img = img.convert("RGBA") if img.mode == "P" else img  # a palette's transparent entry becomes alpha
if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # alpha composited on white
    img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
img, r, c = img.convert("RGB"), prep["resize_size"], prep["crop_size"]
s = r / min(img.size)  # shorter side to resize_size, then the central crop_size square
img = img.resize((max(r, round(img.width * s)), max(r, round(img.height * s))), Image.Resampling[prep["interpolation"].upper()])
left, top = (img.width - c) // 2, (img.height - c) // 2
x = np.asarray(img.crop((left, top, left + c, top + c)), np.float32) / np.float32(255)
x = ((x - np.float32(prep["mean"])) / np.float32(prep["std"])).transpose(2, 0, 1)[None]
out = sess.run(None, {sess.get_inputs()[0].name: x}); p = out[1][0].astype(np.float64); p /= p.sum(); d = out[2][0] if len(out) > 2 else 0
print(classes[int(p.argmax())] if p.max() >= t and d <= dt else f"unknown (p={p.max():.4f})"); print(json.dumps(dict(zip(classes, p.tolist()))))
'''

LIMITATIONS = (
    "Judged only on the held-out test split of the data version above; images unlike it "
    "(other cameras, backgrounds, resolutions, classes not listed) may be classified confidently and wrongly.",
    "The probabilities output is calibrated on the validation split (temperature scaling); it is only as "
    "calibrated as the ECE above says, and less so on images unlike the training data.",
)


def build_card(*, params: Params, version: str, url: str, class_names: list[str], lineage: dict[str, Any],
               metrics: dict[str, Any], export_report: dict[str, Any], decision: dict[str, Any],
               train_metrics: dict[str, Any] | None, data_report: dict[str, Any] | None,
               label_issues: dict[str, Any] | None = None, figures: list[str] | None = None) -> dict[str, Any]:
    """Every fact of the card as one JSON-ready dict."""
    return {
        "model": params.project.name,
        "version": version,
        "url": url,
        "intended_use": (f"Classify an image into one of {len(class_names)} classes "
                         f"({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}), "
                         "for images like those in the training data."),
        "classes": class_names,
        "data": {"version": lineage.get("data_hash"), "raw_dir": str(params.data.raw_dir),
                 "n_images": (data_report or {}).get("n_images"),
                 "test_split_sha256": lineage.get("test_split_sha256"),
                 "label_issues": _label_issues(label_issues)},
        "training": _training(params, train_metrics),
        "test_metrics": {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
                                                      "top_k_accuracy", "top_k", "log_loss", "n_test")},
        "intervals": {name: [metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")]
                      for name in ("accuracy", "macro_f1")},
        "baseline": {"accuracy": metrics.get("baseline_accuracy"), "lift": metrics.get("lift"),
                     "model": metrics.get("baseline")},
        "per_class": metrics.get("per_class", {}),
        "calibration": {"ece": metrics.get("ece"), "log_loss": metrics.get("log_loss"),
                        "ece_uncalibrated": metrics.get("ece_uncalibrated"),
                        "log_loss_uncalibrated": metrics.get("log_loss_uncalibrated"),
                        "temperature": metrics.get("temperature"), "bins": params.evaluate.calibration_bins},
        "export": {k: export_report.get(k) for k in ("opset", "exporter", "parity_passed", "max_abs_diff",
                                                      "argmax_agree", "onnx_sha256", "quantized")},
        "latency": {k: export_report.get(k) for k in ("ort_latency_ms_p50", "ort_latency_ms_p95",
                                                       "ort_throughput_img_per_s_b32")},
        "gate": {k: decision.get(k) for k in ("passed", "reason", "metric", "delta", "production_version",
                                               "paired_test")},
        "lineage": {k: lineage.get(k) for k in ("data_hash", "git_commit", "git_dirty", "params_sha256",
                                                 "weights_sha256", "onnx_sha256", "flow_run_id")},
        "abstention": metrics.get("abstention"),
        "limitations": [*LIMITATIONS, _answers_always(metrics.get("abstention")), *_weak_classes(metrics)],
        "figures": list(figures or []),
        "usage": {"predict": "predict model.onnx IMAGE_OR_FOLDER [...] --top-k 3 [--json] [--abstain]",
                  "snippet": SNIPPET},
    }


def _label_issues(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The train stage's label check in brief: counts, what was done, the likeliest LABEL_ISSUES_SHOWN."""
    if not report:
        return None
    return {key: report.get(key) for key in ("method", "mode", "n_checked", "n_flagged", "n_excluded_from_training",
                                             "note")} | {"top": report.get("suspects", [])[:LABEL_ISSUES_SHOWN]}


def _training(params: Params, train_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe as configured, what each phase did (epochs, seconds, best val macro-F1, when train.json says),
    and which phase and epoch the shipped weights are."""
    train = params.train
    run = train_metrics or {}
    phases = [{"phase": "head", "backbone": "frozen", "epochs": train.head.epochs, "lr": train.head.lr}]
    if train.finetune.unfreeze != "none" and train.finetune.epochs > 0:
        phases.append({"phase": "finetune", "backbone": f"unfrozen ({train.finetune.unfreeze})",
                       "epochs": train.finetune.epochs, "lr": train.finetune.lr})
    for phase in phases:
        name = phase["phase"]
        phase.update(epochs_run=run.get(f"{name}_epochs"), seconds=run.get(f"{name}_seconds"),
                     best_val_macro_f1=run.get(f"{name}_best_val_macro_f1"))
    return {"arch": params.model.arch, "weights": params.model.weights, "image_size": train.image_size,
            "optimizer": train.optimizer, "batch_size": train.batch_size, "phases": phases,
            "epochs_run": run.get("epochs"), "best_epoch": run.get("best_epoch"), "best_phase": run.get("best_phase"),
            "val_accuracy": run.get("val_accuracy"), "device": run.get("device"),
            "shipped_weights": shipped_weights_note(run)}


def shipped_weights_note(train_metrics: dict[str, Any] | None) -> str | None:
    """Which phase and epoch the shipped weights come from, in one or two sentences; said plainly when the
    fine-tune phase ran and never beat the head phase (with what it cost). None when train.json does not say."""
    run = train_metrics or {}
    phase, epoch = run.get("best_phase"), run.get("best_epoch")
    if not phase or epoch is None:
        return None
    note = f"The shipped weights are epoch {epoch}, from the {phase} phase (the run's best validation macro-F1)."
    # finetune_img_per_s: what train.json said of a fine-tune phase before it recorded its epochs and seconds.
    if phase != "head" or not (run.get("finetune_epochs") or "finetune_img_per_s" in run):
        return note
    cost = f"{run['finetune_epochs']} epoch(s), {_duration(run.get('finetune_seconds'))}" \
        if run.get("finetune_epochs") else "its epochs"
    scores = ""
    if isinstance(run.get("finetune_best_val_macro_f1"), float) and isinstance(run.get("head_best_val_macro_f1"), float):
        scores = (f" (its best validation macro-F1 {run['finetune_best_val_macro_f1']:.4f} against "
                  f"{run['head_best_val_macro_f1']:.4f})")
    return (f"{note} The finetune phase ran ({cost}) but never beat the head phase{scores}, so none of its "
            "weights were shipped: set train.finetune.epochs to 0 to save that time, or try a lower train.finetune.lr.")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "time not recorded"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _answers_always(record: dict[str, Any] | None) -> str:
    if not record or record.get("threshold") is None:
        return ("Always answers with one of the listed classes: it has no abstention threshold "
                f"({(record or {}).get('note') or 'set export.abstain_at_accuracy'}), so screen out-of-scope "
                "inputs upstream.")
    ood, noise = record.get("out_of_domain") or {}, record.get("noise") or {}
    digits = "" if ood.get("not_applicable") else f"{_pct(ood.get('rejected'))} of the digits and "
    return ("Answers with one of the listed classes unless the caller applies its abstention rule "
            f"(predict --abstain); that turned away {digits}{_pct(noise.get('rejected'))} of the noise images of the "
            "abstention section, so screen out-of-scope inputs upstream too.")


def _weak_classes(metrics: dict[str, Any]) -> list[str]:
    per_class = metrics.get("per_class") or {}
    ranked = sorted(per_class.items(), key=lambda item: item[1].get("recall", 0.0))[:3]
    if not ranked:
        return []
    listed = ", ".join(f"{name} (recall {scores.get('recall', 0):.3f})" for name, scores in ranked)
    return [f"Weakest classes on the test split: {listed}."]


def render_readme(card: dict[str, Any]) -> str:
    """The card as Markdown."""
    lines = [f"# {_md(card['model'])} {_md(card['version'])}", "", "## Intended use", _md(card["intended_use"]), "",
             "## Classes", ", ".join(_md(name) for name in card["classes"]), "", "## Data", *_data_lines(card["data"]),
             "",
             "## Training recipe", *_training_lines(card["training"]), "", "## Test metrics",
             *_test_lines(card), "",
             "### Per class", *_table(["class", "precision", "recall", "f1", "support"],
                                       [[n, *(_num(s.get(k)) for k in ("precision", "recall", "f1", "support"))]
                                        for n, s in card["per_class"].items()]), "",
             "## Calibration", *_calibration_lines(card["calibration"]), "",
             *abstention_lines(card.get("abstention")),
             *_figure_lines(card.get("figures") or []),
             "## Export and parity", *_table(["", ""], [[k, _num(v)] for k, v in card["export"].items()]), "",
             "## Latency (onnxruntime, CPU)", *_table(["", ""], [[k, _num(v)] for k, v in card["latency"].items()]), "",
             "## Promotion gate", f"Passed: {card['gate']['passed']}. Reason: {_md(card['gate']['reason'])}", "",
             "## Lineage", *_table(["", ""], [[k, _num(v)] for k, v in card["lineage"].items()]), "",
             "## Known limitations", *(f"- {_md(item)}" for item in card["limitations"]), "",
             "## How to call it", "With this project installed:", "", "```bash", card["usage"]["predict"], "```", "",
             "With onnxruntime, numpy and Pillow only (`python snippet.py model.onnx image.jpg`):", "",
             "```python", card["usage"]["snippet"].rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _test_lines(card: dict[str, Any]) -> list[str]:
    """The metrics table (95% intervals beside accuracy and macro-F1), then the model against the pixel baseline."""
    intervals = card.get("intervals") or {}
    rows = []
    for name, value in card["test_metrics"].items():
        low, high = intervals.get(name) or (None, None)
        rows.append([name, _num(value), f"[{_num(low)}, {_num(high)}]" if low is not None else ""])
    lines = _table(["metric", "value", "95% interval"], rows)
    baseline = card.get("baseline") or {}
    if baseline.get("accuracy") is not None:
        lift = f", lift {baseline['lift']:+.4f}" if isinstance(baseline.get("lift"), float) else ""
        lines += ["", f"Against the built-in baseline ({_md(baseline['model'] or 'pixel logistic regression')}, "
                      f"the same train and test images): accuracy {_num(baseline['accuracy'])}{lift}."]
    return lines


LABEL_ISSUES_SHOWN = 5
FIGURE_TITLES = {"curves.png": "Training curves", "label_issues.png": "Labels that look wrong (train and val)", "confusion.png": "Confusion matrix (test split)",
                 "per_class_f1.png": "F1 per class (test split)", "reliability.png": "Reliability (test split)",
                 "worst_mistakes.png": "The most confident mistakes (test split)"}


def _figure_lines(names: list[str]) -> list[str]:
    """The run's PNGs, stored beside this card in the version: they show offline in any Markdown viewer."""
    shown = [name for name in FIGURE_TITLES if name in names]
    if not shown:
        return []
    lines = ["## Figures", ""]
    for name in shown:
        lines += [f"### {FIGURE_TITLES[name]}", f"![{FIGURE_TITLES[name]}]({name})", ""]
    return lines


def abstention_lines(record: dict[str, Any] | None) -> list[str]:
    """When the model says "not sure": the thresholds, their operating point and risk-coverage key points on the
    test split, and how they treat out-of-domain images, stated plainly when that is poor."""
    if not record:
        return []
    point, ood = record.get("test"), record["out_of_domain"]
    if point:
        target = ", ".join(f"{k} {v:g}" for k, v in (record.get("target") or {}).items())
        distance = record.get("distance") or {}   # cards published before the distance existed have none
        far = "" if distance.get("threshold") is None else (
            f", or when the image's features lie farther than {_num(distance['threshold'])} (output "
            "`feature_distance`: squared Mahalanobis distance to the nearest class mean of the training images; "
            f"metadata `feature_distance_threshold`, which keeps {_pct(distance['keep'])} of the validation images)")
        lines = [f"Below a top probability of {_num(point['threshold'])} (metadata `abstain_threshold`, chosen on the "
                 f"validation split for {_md(target)}){far} the model is not sure: `predict --abstain` "
                 "says `unknown (p=...)`, and so does the snippet below.", "",
                 f"On the test split: {_operating_point(point)} ({point['answered']} images answered)."]
    else:
        why = record.get("note") or "export.abstain_at_accuracy and export.abstain_at_coverage are null"
        lines = [f"No abstention threshold ({_md(why)}): the model answers every image. The curve shows what a "
                 "threshold would trade."]
    lines += ["", *_table(["answering (test split, confidence alone)", "threshold", "accuracy", "95% interval"], [
        [_pct(p["coverage"]), _num(p["threshold"]), _pct(p["accuracy"]),
         f"[{_pct(p['accuracy_ci_low'])}, {_pct(p['accuracy_ci_high'])}]"] for p in record["risk_coverage"]]), ""]
    strangers = [_out_of_domain_line(o, point is not None) for o in (ood, record.get("noise")) if o]
    return ["## When it is not sure (abstention)", *lines, *"\n\n".join(strangers).split("\n"), ""]


def _operating_point(point: dict[str, Any]) -> str:
    """'at 90.0% coverage, 95.1% accurate [93.2%, 96.5%]'."""
    return (f"at {_pct(point['coverage'])} coverage, {_pct(point['accuracy'])} accurate "
            f"[{_pct(point['accuracy_ci_low'])}, {_pct(point['accuracy_ci_high'])}]")


def _out_of_domain_line(ood: dict[str, Any], has_threshold: bool) -> str:
    if ood.get("not_applicable"):
        return (f"Out of domain: the check with {_md(ood['source'])} does not apply to this model: "
                f"{_md(ood['not_applicable'])}.")
    auroc = ood["auroc"]
    verdict = ("good" if auroc >= 0.9 else "partial" if auroc >= 0.7 else
               "poor: confidence barely tells these images from real ones" if auroc > 0.5 else
               "poor: these images get higher confidence than real ones")
    by_distance = "" if ood.get("auroc_distance") is None else (
        f"; the feature distance separates them with AUROC {_num(ood['auroc_distance'])}")
    rejected = ""
    if has_threshold:
        count = f"{ood['rejected_count']} of them ({_pct(ood['rejected'])})" if "rejected_count" in ood else _pct(ood["rejected"])
        rejected = f" The abstention rule rejects {count}"
        rejected += "." if ood["rejected"] >= 0.5 else ": do not count on it to screen out images unlike the training data."
    return (f"Out of domain: {ood['n_images']} images of {_md(ood['source'])}, a kind of image the model never saw. "
            f"Their mean top probability is {_num(ood['mean_confidence'])}; confidence separates them from the test "
            f"images with AUROC {_num(auroc)} (0.5 is chance), which is {verdict}{by_distance}.{rejected}")


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    bins = calibration["bins"]
    if calibration.get("temperature") is None:
        return [f"Expected calibration error (ECE, {bins} bins): {_num(calibration['ece'])}"]
    return [f"Temperature scaling (T = {_num(calibration['temperature'])}, fitted on the validation split) is "
            "applied in the model's `probabilities` output.", "",
            *_table(["on the test split", "ECE", "log loss"], [
                ["raw softmax of the logits", _num(calibration.get("ece_uncalibrated")),
                 _num(calibration.get("log_loss_uncalibrated"))],
                ["calibrated probabilities", _num(calibration["ece"]), _num(calibration.get("log_loss"))]]),
            "", f"ECE over {bins} confidence bins."]


def _data_lines(data: dict[str, Any]) -> list[str]:
    counts = data.get("n_images") or {}
    ordered = sorted(counts.items(), key=lambda item: SPLITS.index(item[0]) if item[0] in SPLITS else len(SPLITS))
    sizes = ", ".join(f"{split} {n}" for split, n in ordered) or "unknown"
    return [f"- data version (DVC hash of {_md(data['raw_dir'])}): {_md(data['version'])}",
            f"- images per split: {_md(sizes)}", f"- test split sha256: {_md(data['test_split_sha256'])}",
            *_label_issue_lines(data.get("label_issues"))]


def _label_issue_lines(issues: dict[str, Any] | None) -> list[str]:
    if not issues:
        return []
    if issues.get("note"):
        return [f"- labels that look wrong: not checked ({_md(issues['note'])})"]
    flagged, checked = issues.get("n_flagged") or {}, issues.get("n_checked") or {}
    excluded = issues.get("n_excluded_from_training") or 0
    lines = [f"- labels that look wrong: {flagged.get('train')} of {checked.get('train')} training and "
             f"{flagged.get('val')} of {checked.get('val')} validation images ({_md(issues.get('method'))}); "
             + (f"{excluded} left out of training (prepare.label_issues=exclude)" if excluded else
                "none left out of training (prepare.label_issues=" + _md(issues.get("mode")) + ")")]
    lines += [f"  - {_md(s['path'])} ({s['split']}): labelled {_md(s['given'])}, looks like "
              f"{_md(s['suggested'])} (score {s['score']:.2f})" for s in issues.get("top") or []]
    return lines


def _training_lines(training: dict[str, Any]) -> list[str]:
    lines = [f"- architecture `{training['arch']}`, pretrained weights `{training['weights']}`, "
             f"input {training['image_size']} px, {training['optimizer']}, batch {training['batch_size']}"]
    lines += [f"- phase {p['phase']}: backbone {p['backbone']}, {p['epochs']} epoch(s), lr {p['lr']:g}"
              + _phase_run(p) for p in training["phases"]]
    if training.get("epochs_run") is not None:
        lines.append(f"- ran {training['epochs_run']} epochs, best epoch {training['best_epoch']}, "
                     f"val accuracy {_num(training['val_accuracy'])} on {training['device']}")
    if training.get("shipped_weights"):
        lines.append(f"- {_md(training['shipped_weights'])}")
    return lines


def _phase_run(phase: dict[str, Any]) -> str:
    """What the phase did, when train.json records it: early stopping can end it before its configured epochs."""
    if phase.get("epochs_run") is None:
        return ""
    return (f"; ran {phase['epochs_run']} epoch(s) in {_duration(phase.get('seconds'))}, "
            f"best val macro-F1 {_num(phase.get('best_val_macro_f1'))}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(_md(cell) for cell in r)} |" for r in rows)]


def _md(value: object) -> str:
    """A value from data as inert Markdown on one line, wherever it sits: control characters and newlines shown
    as escapes, HTML as entities, the characters that make links, code or table cells backslash-escaped, and
    so is a block marker at its start (a class named `# x` must not become a heading of the card)."""
    text = _MARKDOWN_ACTIVE.sub(r"\\\1", html.escape(terminal_safe(value, one_line=True), quote=False))
    text = re.sub(r"^ +", lambda spaces: "&#32;" * len(spaces.group()), text)
    return _BLOCK_MARKER.sub(lambda marker: f"{marker.group()[:-1]}\\{marker.group()[-1]}", text)


def _num(value: Any) -> str:
    if isinstance(value, float):
        # Parity differences are ~1e-5: four decimals would print them as 0.0000.
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_num(v)}" for k, v in value.items())
    return "" if value is None else str(value)
