"""Every `bash` block of README.md and of the docs pages, in order, in a fresh clone, as a new user would paste
them.

Markers (an HTML comment on the line before a block, invisible on GitHub):
    <!-- readme-test: skip (why) -->                  the whole block is left out
    <!-- readme-test: skip-command CMD (why) -->      lines of the block starting with CMD are left out
The clone gets small-data params (committed, as a user's own settings would be) so the
whole README runs in minutes; the blocks themselves run exactly as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tasks.lib.config import apply_overrides_to_file
from tests.conftest import REPO_ROOT, run

MARKER = re.compile(r"<!--\s*readme-test:\s*(skip-command|skip)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
# Small data and a small model: the README's commands, minutes instead of tens of minutes.
SMALL = ["data.demo.per_class=12", "model.arch=mobilenet_v3_small", "model.weights=none", "train.image_size=32",
         "train.batch_size=16", "train.head.epochs=1", "train.finetune.epochs=0", "evaluate.worst_mistakes=0",
         "export.latency_runs=5", "export.parity_batch_sizes=[1,2]",
         # a random-init net on 120 images need not beat the pixel baseline: the commands are what is tested
         "gate.min_lift_over_baseline=null"]


# README.md first (it sets everything up), then the reference pages it links to.
PAGES = ("README.md", "docs/architecture.md", "docs/data.md", "docs/training.md", "docs/operations.md",
         "docs/registry.md", "docs/security.md", "docs/development.md", "docs/testing.md")


@dataclass
class Block:
    line: int
    commands: list[str]
    skip: str | None = None
    skip_commands: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    """The bash blocks of a markdown text with the markers that precede them."""
    blocks: list[Block] = []
    pending: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if (marker := MARKER.search(lines[i])):
            pending.append((marker.group(1), marker.group(2)))
        elif (fence := FENCE.match(lines[i])):
            indent, lang = fence.groups()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if lang == "bash":
                body = [line[len(indent):] for line in lines[i + 1:end]]
                block = Block(i + 1, body)
                for kind, arg in pending:
                    if kind == "skip":
                        block.skip = arg or "marked skip"
                    else:
                        block.skip_commands.append(arg.split("(")[0].strip())
                blocks.append(block)
            pending = []
            i = end
        elif lines[i].strip():  # a marker belongs to the block right after it
            pending = []
        i += 1
    return blocks


def page_blocks(root: Path) -> list[tuple[str, Block]]:
    """Every bash block of every page, as (page, block), in reading order."""
    return [(page, block) for page in PAGES for block in readme_blocks((root / page).read_text())]


def test_every_markdown_page_is_read() -> None:
    """A new docs page whose commands the README test would silently leave out fails here."""
    pages = {"README.md", *(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md"))}
    assert pages == set(PAGES)


def script(block: Block) -> str:
    kept = [line for line in block.commands
            if not any(line.strip().startswith(cmd) for cmd in block.skip_commands)]
    return "set -euo pipefail\n" + "\n".join(kept) + "\n"


def test_markers_are_read() -> None:
    text = ("intro\n<!-- readme-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n"
            "<!-- readme-test: skip-command make test (slow) -->\n```bash\nmake demo\nmake test\n```\n"
            "```json\n{}\n```\n```bash\necho hi\n```\n")
    blocks = readme_blocks(text)
    assert [b.skip for b in blocks] == ["(needs a GPU)", None, None]
    assert script(blocks[1]).splitlines()[1:] == ["make demo"]
    assert blocks[2].commands == ["echo hi"]


def fresh_clone(dest: Path) -> Path:
    """The project as committed plus this checkout's uncommitted files, without ignored ones; the venv linked."""
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO_ROOT).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "readme@example.invalid"], dest)
    run(["git", "config", "user.name", "readme"], dest)
    apply_overrides_to_file(dest / "params.yaml", SMALL)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "fresh clone, small-data params"], dest)
    return dest


@pytest.mark.slow(seconds=240)
@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("fashion_mnist")   # make demo reads it: missing, the test fails and says how to install it
def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "clone")
    stamp = REPO_ROOT / ".venv" / ".installed-stamp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    env["HOME"] = str(tmp_path / "home")  # nothing from the developer's ~/.prefect or git config
    env.update(GIT_AUTHOR_NAME="readme", GIT_AUTHOR_EMAIL="readme@example.invalid",
               GIT_COMMITTER_NAME="readme", GIT_COMMITTER_EMAIL="readme@example.invalid")
    ran = []
    outputs: dict[tuple[str, int], str] = {}
    for page, block in page_blocks(clone):
        if block.skip:
            continue
        if stamp.exists():  # the linked venv is installed: the clone's newer files must not reinstall it
            os.utime(stamp)
        proc = subprocess.run(["bash", "-c", script(block)], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (f"{page} line {block.line} failed (exit {proc.returncode}):\n"
                                      f"{script(block)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n"
                                      f"{proc.stderr[-5000:]}")
        ran.append((page, block.line))
        outputs[page, block.line] = proc.stdout
    assert len(ran) >= 4
    check_what_the_pipeline_commands_said(clone, blocks_running(clone, "make demo", outputs),
                                          blocks_running(clone, "python -m flows.retrain", outputs))
    check_the_experiments(clone)


def check_the_experiments(clone: Path) -> None:
    """`make exp ARGS='-S train.head.epochs=10'` (the README's) ran in DVC's temporary copy: `dvc exp show`
    has its numbers and params, params.yaml is as committed; a failing experiment leaves it so too."""
    committed = run(["git", "show", "HEAD:params.yaml"], clone).stdout
    assert (clone / "params.yaml").read_text() == committed
    env = {"PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    shown = json.loads(run([".venv/bin/dvc", "exp", "show", "--json"], clone, env=env).stdout)
    revs = [rev for commit in shown for exp in commit.get("experiments") or [] for rev in exp.get("revs", [])]
    ours = [rev["data"] for rev in revs
            if dig(rev, "data", "params", "params.yaml", "data", "train", "head", "epochs") == 10]
    assert ours, shown
    metrics = ours[0]["metrics"]["metrics/evaluate.json"]["data"]
    assert isinstance(metrics["accuracy"], float) and isinstance(metrics["macro_f1"], float)

    failed = run([".venv/bin/dvc", "exp", "run", "--temp", "-S", "train.head.epochs=0"], clone, check=False, env=env)
    assert failed.returncode != 0 and "no epoch was trained" in failed.stdout + failed.stderr
    assert (clone / "params.yaml").read_text() == committed


def dig(obj: object, *keys: str) -> object:
    """obj[k1][k2]..., or None where a level is missing (`dvc exp show` leaves out what a rev lacks)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


SUMMARY_KEYS = {"stages", "stages_run", "stages_skipped", "data_md5", "n_images", "rejected", "wall_s", "arch",
                "weights_sha256", "val_accuracy", "epochs", "train_img_per_s", "test_accuracy", "test_accuracy_ci95",
                "macro_f1", "macro_f1_ci95", "ece", "ece_uncalibrated", "baseline_accuracy", "lift_over_baseline",
                "onnx", "onnx_max_abs_diff", "ort_latency_ms_p50", "registry_version", "promoted", "reason",
                "model_card", "flow_run_id", "flow_state", "shipped_weights", "label_issues_flagged",
                "label_issues_excluded"}


def blocks_running(clone: Path, command: str, outputs: dict[tuple[str, int], str]) -> list[dict]:
    """The JSON lines printed by the blocks that run `command` (each such command prints one)."""
    lines = []
    for page, block in page_blocks(clone):
        if (page, block.line) in outputs and any(line.lstrip().startswith((command, f".venv/bin/{command}"))
                                                 or f" {command}" in line for line in block.commands):
            lines += [json.loads(line) for line in outputs[page, block.line].splitlines() if line.startswith("{")]
    return lines


def check_what_the_pipeline_commands_said(clone: Path, demo: list[dict], retrains: list[dict]) -> None:
    """The first `make demo` runs every real stage and promotes the first model; the second finds
    nothing to do without the flow; the plain retrain after them skips every stage and promotes
    nothing (the same model); the override run goes through every stage in its own copy."""
    stages = list(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"])
    summary, again = demo
    assert set(summary) == SUMMARY_KEYS
    assert summary["shipped_weights"].startswith("The shipped weights are epoch ")
    assert summary["stages_run"] == stages and summary["flow_state"] == "Completed"
    assert summary["promoted"] is True and "bootstrap" in summary["reason"]
    assert Path(summary["model_card"]).exists() and (clone / summary["onnx"]).exists()
    assert summary["arch"] == "mobilenet_v3_small" and summary["rejected"] == 0
    assert summary["onnx_max_abs_diff"] <= 1e-4
    assert set(summary["label_issues_flagged"]) == {"train", "val"} and summary["label_issues_excluded"] == 0
    assert set(again) == SUMMARY_KEYS and again["flow_state"] == "Up to date" and again["flow_run_id"] is None
    assert again["stages_run"] == [] and again["stages_skipped"] == stages and again["promoted"] is False
    assert again["registry_version"] == summary["registry_version"]
    assert again["test_accuracy"] == summary["test_accuracy"] and again["model_card"] == summary["model_card"]
    unchanged, override = retrains
    assert unchanged["stages_run"] == [] and unchanged["promoted"] is False
    assert unchanged["reason"] == "no improvement"
    assert unchanged["registry_version"] == summary["registry_version"]
    # Its train had run before, as `make exp` with the same override: DVC's run cache may restore it.
    assert sorted(override["stages_run"] + override["stages_skipped"]) == sorted(stages)
    assert override["registry_version"]
