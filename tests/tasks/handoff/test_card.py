"""The model card: every section is filled from the artifacts (its snippet: test_card_snippet.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.handoff.card import SNIPPET
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import open_registry
from tasks.lib.io import write_json
from tests.tasks.handoff.test_publish import make_params, make_project, set_candidate

SECTIONS = ["## Intended use", "## Classes", "## Data", "## Training recipe", "## Test metrics", "### Per class",
            "## Calibration", "## Export and parity", "## Latency", "## Promotion gate", "## Lineage",
            "## Known limitations", "## How to call it"]


def test_card_has_every_section_filled_from_the_artifacts(tmp_path: Path):
    params = make_params()
    root = make_project(tmp_path / "proj", params)
    write_json(root / "metrics/train.json", {"val_accuracy": 0.97, "epochs": 7, "best_epoch": 5,
                                                       "train_img_per_s": 900.0, "device": "cpu"})
    set_candidate(root, macro_f1=0.875, recalls=(0.95, 0.5, 0.9))
    result = publish_candidate(params, root, "run-7")
    registry = open_registry(params, root)
    readme = registry.read_bytes(result["registry_version"], "README.md").decode()
    card = registry.read_json(result["registry_version"], "card.json")

    positions = [readme.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert card["classes"] == ["class_0", "class_1", "class_2"]
    assert card["data"]["n_images"] == {"train": 30, "val": 6, "test": 60}
    assert "images per split: train 30, val 6, test 60" in readme
    assert card["data"]["version"] == "0123456789abcdef0123456789abcdef.dir"
    assert card["training"]["arch"] == params.model.arch and card["training"]["best_epoch"] == 5
    assert [p["phase"] for p in card["training"]["phases"]] == ["head", "finetune"]
    assert f"phase head: backbone frozen, {params.train.head.epochs} epoch(s)" in readme
    assert card["test_metrics"]["macro_f1"] == 0.875 and "| macro_f1 | 0.8750 |" in readme
    assert "| class_1 | 0.9000 | 0.5000 | 0.9000 | 20 |" in readme
    assert card["calibration"]["ece"] == 0.05 and card["export"]["parity_passed"] is True
    assert card["latency"]["ort_latency_ms_p50"] == 0.1 and card["lineage"]["flow_run_id"] == "run-7"
    assert "Weakest classes on the test split: class_1 (recall 0.500)" in readme
    assert "predict model.onnx" in readme and SNIPPET.rstrip() in readme
    assert card["gate"]["passed"] is True and "bootstrap" in card["gate"]["reason"]


def test_the_runs_figures_travel_with_the_version_and_show_in_the_card(tmp_path: Path):
    from tasks.lib import figures

    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, macro_f1=0.875)
    history = [{"epoch": e, "phase": "head" if e < 3 else "finetune", "train_loss": 1 / e, "val_loss": 1.2 / e,
                "val_accuracy": 0.5 + e / 10, "val_macro_f1": 0.45 + e / 10} for e in range(1, 5)]
    assert figures.training_curves(history, root / "metrics/train/curves.png")
    assert figures.confusion(np.array([[3, 1, 0], [0, 4, 0], [1, 0, 3]]), ["a", "b$", "c"],
                             root / "metrics/evaluate/confusion.png")
    version = publish_candidate(params, root, None)["registry_version"]
    registry = open_registry(params, root)
    assert registry.read_bytes(version, "curves.png") == (root / "metrics/train/curves.png").read_bytes()
    assert registry.verify(version) == []                     # the figures are in the version's manifest
    readme = registry.read_bytes(version, "README.md").decode()
    assert "![Training curves](curves.png)" in readme and "![Confusion matrix (test split)](confusion.png)" in readme
    assert "reliability.png" not in readme                    # only the figures that exist
    assert registry.read_json(version, "card.json")["figures"] == ["confusion.png", "curves.png"]


def test_class_names_cannot_inject_html_break_tables_or_add_lines():
    from tasks.handoff.card import render_readme

    hostile = ["<script>alert(1)</script>", "| x |", "two\nlines", "\x1b[31mred", "[link](javascript:x)"]
    card = {"model": "m", "version": "v", "intended_use": f"Classify into {', '.join(hostile)}", "classes": hostile,
            "training": {"arch": "a", "weights": "w", "image_size": 1, "optimizer": "o", "batch_size": 1,
                         "phases": []},
            "data": {"raw_dir": "d", "version": "h", "test_split_sha256": "s", "n_images": None},
            "test_metrics": {}, "per_class": {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1}
                                              for name in hostile},
            "calibration": {"ece": 0.0, "bins": 15}, "export": {}, "latency": {},
            "gate": {"passed": False, "reason": f"recall of class {hostile[1]} dropped"},
            "lineage": {}, "limitations": [f"Weakest classes: {hostile[2]}"],
            "usage": {"predict": "predict", "snippet": "print(1)\n"}}
    readme = render_readme(card)
    assert "<script>" not in readme and "&lt;script&gt;alert(1)&lt;/script&gt;" in readme
    assert "\x1b" not in readme and "two\nlines" not in readme
    assert r"two\\nlines" in readme and r"\\x1b\[31mred" in readme  # shown as escapes, themselves escaped
    assert "[link](javascript" not in readme and r"\[link\](javascript:x)" in readme  # no live link
    per_class = readme[readme.index("### Per class"):readme.index("## Calibration")].strip().splitlines()[1:]
    assert len(per_class) == 2 + len(hostile)  # header, separator, one row per class: nothing broke out
    assert all(row.replace("\\|", "").count("|") == 6 for row in per_class)


# A value at the start of a line could open a block of its own: a heading, a quote, a list, a rule, a setext
# underline, a fence or an indented code block.
BLOCK_MARKUP = ["# Injected heading", "###### h6", "#", "> quote", "- item", "+ item", "* item", "-", "1. item",
                "7) item", "---", "- - -", "===", "***", "___", "~~~", "```", "    code", "  # indented heading",
                "   > indented quote", "\t# tab", "<div>", "| a | b |"]


def _card(classes: list[str]) -> dict:
    return {"model": "m", "version": "v", "intended_use": "Classify.", "classes": classes,
            "training": {"arch": "a", "weights": "w", "image_size": 1, "optimizer": "o", "batch_size": 1,
                         "phases": []},
            "data": {"raw_dir": "d", "version": "h", "test_split_sha256": "s", "n_images": None},
            "test_metrics": {}, "per_class": {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1}
                                              for name in classes},
            "calibration": {"ece": 0.0, "bins": 15}, "export": {}, "latency": {},
            "gate": {"passed": False, "reason": classes[0]}, "lineage": {}, "limitations": classes,
            "usage": {"predict": "predict", "snippet": "print(1)\n"}}


def _blocks(readme: str) -> list[str]:
    """The README's block structure as CommonMark (with GitHub's tables) parses it: headings, lists, rules..."""
    from markdown_it import MarkdownIt

    return [token.type for token in MarkdownIt("commonmark").enable("table").parse(readme) if token.type != "inline"]


def test_a_class_name_that_is_markdown_cannot_restructure_the_card():
    from tasks.handoff.card import render_readme

    plain = _blocks(render_readme(_card(["a"])))
    restructured = [name for name in BLOCK_MARKUP if _blocks(render_readme(_card([name]))) != plain]
    assert restructured == []
    readme = render_readme(_card(["# Injected heading"]))
    assert "## Classes\n\\# Injected heading\n" in readme      # shown as the text it is


def _history(head_f1: list[float], finetune_f1: list[float]) -> list[dict]:
    """Rows as tasks.training.phases writes them for each epoch (head epochs on cached features are fast)."""
    rows = [("head", f1, 2.0) for f1 in head_f1] + [("finetune", f1, 50.0) for f1 in finetune_f1]
    return [{"epoch": epoch, "phase": phase, "train_loss": 0.5, "seconds": seconds, "train_img_per_s": 900 / seconds,
             "val_loss": 1.0 - f1, "val_accuracy": f1 + 0.02, "val_macro_f1": f1, "lr": 0.01}
            for epoch, (phase, f1, seconds) in enumerate(rows, start=1)]


def _train_json(history: list[dict]) -> dict:
    """train.json as tasks.train.summary_metrics writes it: the best epoch's numbers, then each phase's facts."""
    from tasks.train import phase_summary

    best = max(history, key=lambda row: row["val_macro_f1"])          # the first best epoch, as early stopping keeps
    return {"val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"], "epochs": len(history),
            "best_epoch": best["epoch"], "best_phase": best["phase"], **phase_summary(history),
            "train_seconds": sum(row["seconds"] for row in history), "device": "cpu"}


def _rendered(train_metrics: dict | None) -> tuple[dict, str]:
    from tasks.handoff.card import build_card, render_readme

    card = build_card(params=make_params(), version="v3", url="registry/m/v3", class_names=["a", "b"], lineage={},
                      metrics={}, export_report={}, decision={"passed": True, "reason": "first"},
                      train_metrics=train_metrics, data_report=None)
    return card, render_readme(card)


def test_a_fine_tune_that_never_beat_the_head_phase_is_said_plainly_with_its_cost():
    # What the icons did: the head phase peaked at 0.61, fine-tuning collapsed to 0.14-0.45 for three epochs.
    card, readme = _rendered(_train_json(_history([0.55, 0.61, 0.60], [0.14, 0.45, 0.30])))
    assert card["training"]["best_phase"] == "head" and card["training"]["best_epoch"] == 2
    recipe = readme[readme.index("## Training recipe"):readme.index("## Test metrics")]
    assert "The shipped weights are epoch 2, from the head phase" in recipe
    assert ("The finetune phase ran (3 epoch(s), 2.5 min) but never beat the head phase (its best validation "
            "macro-F1 0.4500 against 0.6100), so none of its weights were shipped") in recipe
    assert "ran 3 epoch(s) in 6 s, best val macro-F1 0.6100" in recipe      # the head phase's line
    assert [p["epochs_run"] for p in card["training"]["phases"]] == [3, 3]


def test_a_fine_tune_that_made_the_weights_is_named_without_a_warning():
    card, readme = _rendered(_train_json(_history([0.55, 0.61], [0.70, 0.72, 0.71])))
    assert "The shipped weights are epoch 4, from the finetune phase" in readme
    assert "never beat" not in readme


def test_train_metrics_of_older_runs_still_name_the_phase_and_say_what_they_can():
    # Before train.json recorded each phase's epochs and seconds it had only their image rates.
    old = {"val_accuracy": 0.62, "epochs": 6, "best_epoch": 2, "best_phase": "head", "head_img_per_s": 9000.0,
           "finetune_img_per_s": 300.0, "device": "cuda"}
    _, readme = _rendered(old)
    assert "epoch 2, from the head phase" in readme and "The finetune phase ran (its epochs) but never beat" in readme
    _, readme = _rendered(None)                          # no train.json at all: the card says nothing it cannot know
    assert "shipped weights" not in readme


def test_the_labels_that_look_wrong_are_counted_listed_and_shown_in_the_card(tmp_path: Path):
    from tasks.lib import figures

    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, macro_f1=0.875)
    suspects = [{"split": "train", "index": i, "path": f"class_0/{i}.png", "given": "class_0", "suggested": "class_2",
                 "score": 1 - i / 100} for i in range(7)]
    write_json(root / "metrics/label_issues.json", {"method": "k-NN votes", "mode": "exclude", "suspects": suspects,
                                                    "n_checked": {"train": 30, "val": 6},
                                                    "n_flagged": {"train": 7, "val": 0}, "n_excluded_from_training": 7})
    assert figures.image_mosaic([np.zeros((8, 8, 3), np.uint8)] * 2, ["a -> b", "c -> d"],
                                root / "metrics/train/label_issues.png", "suspects")
    version = publish_candidate(params, root, None)["registry_version"]
    registry = open_registry(params, root)
    readme = registry.read_bytes(version, "README.md").decode()
    card = registry.read_json(version, "card.json")
    assert card["data"]["label_issues"]["n_flagged"] == {"train": 7, "val": 0}
    assert [s["path"] for s in card["data"]["label_issues"]["top"]] == [f"class_0/{i}.png" for i in range(5)]
    assert "labels that look wrong: 7 of 30 training and 0 of 6 validation images (k-NN votes); 7 left out of " \
           "training (prepare.label_issues=exclude)" in readme
    assert "  - class_0/0.png (train): labelled class_0, looks like class_2 (score 1.00)" in readme
    assert "class_0/4.png" in readme and "class_0/5.png" not in readme       # the top 5 only
    assert "![Labels that look wrong (train and val)](label_issues.png)" in readme
