"""`make demo`'s fast path against every kind of change: each one alone must send the run through the flow.

The fast path (flows.demo.up_to_date_result) answers "Up to date" without a flow run when
`dvc status` over the project's own dvc.yaml finds nothing stale and production already is
the workspace's ONNX file. A wrong "Up to date" is the costly answer: the user changed a
param, a stage's code or the data, or production moved, and is told there is nothing to do.

The project here is this repository's dvc.yaml, params.yaml and tasks/ code in a real git +
DVC repo with real images and a real registry, in which one completed run is recorded: the
stages' outputs are stand-ins committed with `dvc commit` (which writes the dvc.lock a `dvc
repro` writes: every dep's hash, every param's value, every output's hash), and the exported
model is a real ONNX classifier published through the gate over an older production version.
The stage commands never run: the fast path reads dvc.lock and the registry, not what a stage
computed, and the real stages would cost minutes per case. The run is made once per module
and copied per case; each case changes exactly one thing. What `dvc status` then names as
stale is checked against the stages that read what changed (the flow runs from the first of
them), so a param or code dep missing from dvc.yaml fails here too.

A damaged production (its model.onnx edited or deleted) is covered in test_demo.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from prefect import flow

from flows.demo import main, up_to_date_result
from flows.dvc_runner import read_stages
from flows.retrain import stale_stages
from tasks.handoff.registry import open_registry
from tasks.lib.config import load_params
from tasks.lib.io import sha256_file, write_json
from tasks.lib.split_files import SplitRow, write_split
from tests.conftest import init_dvc_repo, run, write_image_folder
from tests.flows.conftest import git_commit
from tests.flows.helpers import run_logs, state_of

STAGES = ("prepare", "decode_cache", "fetch_weights", "train", "evaluate", "export")
PER_CLASS = 20
Change = Callable[[Path], None]


# --------------------------------------------------------------------------- one completed run


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The project after a completed run: dvc.lock current and committed, the exported model production
    (promoted over an older version, so a rollback has somewhere to go); {root, production}."""
    from tasks.handoff.publish import publish_candidate
    from tests.tasks.handoff.test_publish import CONFUSED, GOOD, set_candidate

    root = init_dvc_repo(tmp_path_factory.mktemp("fast-path") / "project")
    (root / ".gitignore").write_text("/artifacts/\n/registry/\n")
    write_image_folder(root / "data/raw", classes=3, per_class=PER_CLASS, size=32)
    run(["dvc", "add", "-q", "data/raw"], root)
    params = load_params(root / "params.yaml")
    write_upstream_outputs(root)
    versions = []
    for weight, tag in ((CONFUSED, "older"), (GOOD, "current")):   # production, then a better model over it
        set_candidate(root, weight=weight, tag=tag)
        write_stand_in_outputs(root)
        run(["dvc", "commit", "-f", "-q"], root)
        git_commit(root, f"the pipeline's run with the {tag} model")
        result = publish_candidate(params, root, f"run-{tag}")
        assert result["promoted"], result
        versions.append(result["registry_version"])
    return {"root": root, "production": versions[-1]}


def write_upstream_outputs(root: Path) -> None:
    """What prepare, fetch_weights and train write that publish and the summary read (the stage's contract)."""
    import torch

    rows = [SplitRow(f"class_{c}/img_{i:03d}.png", c, sha256_file(root / f"data/raw/class_{c}/img_{i:03d}.png"))
            for c in range(3) for i in range(PER_CLASS)]
    prepared = root / "data/prepared"
    write_split(prepared / "train.csv", rows[0::3])
    write_split(prepared / "val.csv", rows[1::3])
    write_split(prepared / "test.csv", rows)       # every image: the toy models are scored on all of them
    write_json(prepared / "classes.json", ["class_0", "class_1", "class_2"])
    write_json(prepared / "report.json", {"n_images": {"train": 20, "val": 20, "test": len(rows)}, "rejected": []})
    record = {"arch": "efficientnet_lite0", "weights": "packaged", "source": "package", "sha256": "ab" * 32,
              "file": "backbone.pt"}
    write_json(root / "artifacts/weights/weights.json", record)
    (root / "artifacts/train").mkdir(parents=True)
    torch.save({"weights": record}, root / "artifacts/train/model.pt")
    write_json(root / "metrics/train.json", {"val_accuracy": 1.0, "epochs": 1})


def write_stand_in_outputs(root: Path) -> None:
    """Every other output dvc.yaml declares (decoded arrays, plots), so that `dvc commit` records the run."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        paths = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    for path in paths:
        if path.exists():
            continue
        if path.suffix == ".png":
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(path)
        elif path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        else:                                       # a folder output (decoded arrays, plot data)
            path.mkdir(parents=True)
            (path / "part-0").write_text("stand-in\n")


@pytest.fixture
def project(completed_run: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the completed run for one case (git, DVC and the registry keep relative paths inside)."""
    return Path(shutil.copytree(completed_run["root"], tmp_path / "project", symlinks=True))


# --------------------------------------------------------------------------- the changes


def set_param(key: str, value: Any) -> Change:
    def change(root: Path) -> None:
        path = root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        *parents, last = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        assert section[last] != value, f"{key} is already {value!r}: the case would change nothing"
        section[last] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))
    return change


def recorded_then(first: Change, then: Change) -> Change:
    """`first` recorded as the last run's (dvc.lock rewritten by `dvc commit`, as a run would), then `then` alone."""
    def change(root: Path) -> None:
        first(root)
        run(["dvc", "commit", "-f", "-q"], root)
        assert stale(root) == set(), "the first change was not recorded"
        then(root)
    return change


def abstain_at_coverage(value: float) -> Change:
    """The threshold chosen by coverage instead of accuracy (the two are exclusive: one is null)."""
    def change(root: Path) -> None:
        set_param("export.abstain_at_accuracy", None)(root)
        set_param("export.abstain_at_coverage", value)(root)
    return change


def edit_code(module: str) -> Change:
    """A comment appended: the code's behaviour is the same, its bytes (and so DVC's hash) are not."""
    def change(root: Path) -> None:
        with (root / module).open("a") as f:
            f.write("# edited after the last run\n")
    return change


def image(root: Path, name: str = "class_0/img_000.png") -> Path:
    return root / "data/raw" / name


def add_image(root: Path) -> None:
    Image.fromarray(np.full((32, 32, 3), (210, 20, 20), np.uint8)).save(image(root, "class_0/img_new.png"))


def change_image_bytes(root: Path) -> None:
    pixels = np.asarray(Image.open(image(root))).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(image(root))


def delete_image(root: Path) -> None:
    image(root).unlink()


def record_new_data_version(root: Path) -> None:
    """The way a user brings new data: images added, `dvc add`, committed."""
    add_image(root)
    run(["dvc", "add", "-q", "data/raw"], root)
    git_commit(root, "data v2")


def roll_back(root: Path) -> None:
    open_registry(load_params(root / "params.yaml"), root).rollback("a test moved production back")


def promote_the_older_version(root: Path) -> None:
    registry = open_registry(load_params(root / "params.yaml"), root)
    previous = registry.pointer()["previous"][-1]
    registry.promote(previous, "a test promoted another version")


def replace_exported_model(root: Path) -> None:
    """Another model in the export stage's place, by hand: not what dvc.lock recorded, not production."""
    from tests.tasks.handoff.test_publish import CONFUSED, make_onnx

    make_onnx(load_params(root / "params.yaml").report_paths(root)["onnx"], CONFUSED, tag="by hand")


ALL = set(STAGES)
UNRECORDED_DATA = {"data/raw.dvc", "prepare"}   # the flow then stops and says to `dvc add` or `dvc checkout`

# (change, the stages that read what it changes): one case per params section, stage, kind of data change
# and move of production. A key read by several stages stales each of them.
CHANGES: dict[str, tuple[Change, set[str]]] = {
    "params prepare.seed": (set_param("prepare.seed", 7), {"prepare"}),
    "params prepare.max_pixels": (set_param("prepare.max_pixels", 1_000_000), {"prepare", "decode_cache"}),
    "params cache.jpeg_draft": (set_param("cache.jpeg_draft", False), {"decode_cache"}),
    "params cache.margin": (set_param("cache.margin", 1.3), {"decode_cache", "train"}),
    "params model.arch": (set_param("model.arch", "resnet18"), {"fetch_weights", "train"}),
    "params model.weights": (set_param("model.weights", "none"), {"fetch_weights"}),
    "params train.head.lr": (set_param("train.head.lr", 0.001), {"train"}),
    "params train.image_size": (set_param("train.image_size", 64), {"prepare", "decode_cache", "train"}),
    "params evaluate.calibration_bins": (set_param("evaluate.calibration_bins", 10), {"evaluate"}),
    "params export.atol": (set_param("export.atol", 0.001), {"export"}),
    # Evaluate chooses the abstention threshold on the validation split; export writes it into the ONNX file.
    "params export.abstain_at_accuracy": (set_param("export.abstain_at_accuracy", 0.9), {"evaluate", "export"}),
    "params export.abstain_at_coverage": (recorded_then(abstain_at_coverage(0.8), set_param(
        "export.abstain_at_coverage", 0.9)), {"evaluate", "export"}),
    "params registry.uri": (set_param("registry.uri", "another-registry"), set()),
    "params project.name": (set_param("project.name", "another-model"), set()),
    "code tasks/prepare.py": (edit_code("tasks/prepare.py"), {"prepare"}),
    "code tasks/decode_cache.py": (edit_code("tasks/decode_cache.py"), {"decode_cache"}),
    "code tasks/fetch_weights.py": (edit_code("tasks/fetch_weights.py"), {"fetch_weights"}),
    "code tasks/train.py": (edit_code("tasks/train.py"), {"train"}),
    "code tasks/training/calibration.py": (edit_code("tasks/training/calibration.py"), {"train"}),
    "code tasks/evaluate.py": (edit_code("tasks/evaluate.py"), {"evaluate"}),
    "code tasks/export.py": (edit_code("tasks/export.py"), {"export"}),
    "code tasks/lib/config.py": (edit_code("tasks/lib/config.py"), ALL),   # every stage reads params through it
    # A library module re-runs only the stages that import it: the gate's statistics are evaluate's alone.
    "code tasks/lib/uncertainty.py": (edit_code("tasks/lib/uncertainty.py"), {"evaluate"}),
    "data image added": (add_image, UNRECORDED_DATA),
    "data image bytes changed": (change_image_bytes, UNRECORDED_DATA),
    "data image deleted": (delete_image, UNRECORDED_DATA),
    "data new version recorded": (record_new_data_version, {"prepare"}),
    "exported model.onnx replaced": (replace_exported_model, {"export"}),
    "production rolled back": (roll_back, set()),
    "production moved to another version": (promote_the_older_version, set()),
}


# --------------------------------------------------------------------------- the tests


def stale(root: Path) -> set[str]:
    """What `dvc status` finds stale (DVC's Python API: a second of CLI start-up less per case)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:   # DVC names stages relative to the working directory
        return set(repo.status())


@pytest.mark.slow(seconds=4)
@pytest.mark.parametrize("case", list(CHANGES))
def test_one_change_alone_is_never_answered_up_to_date(project: Path, case: str) -> None:
    change, readers = CHANGES[case]
    change(project)
    assert stale(project) == readers     # what the run reproduces: the stages that read what changed
    assert up_to_date_result(project, load_params(project / "params.yaml")) is None


@flow(name="plan a retrain")
def plan(workdir: str) -> list[str]:
    """The retrain flow's first steps on the project: the stages a run would reproduce, in order."""
    root = Path(workdir)
    return stale_stages(root, read_stages(root), load_params(root / "params.yaml").data.raw_dir)


@pytest.mark.slow(seconds=15)
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("case", ["params cache.margin", "params evaluate.calibration_bins"])
def test_the_flow_reproduces_from_the_first_stage_a_change_reaches_and_says_which(project: Path,
                                                                                  case: str) -> None:
    """The flow's own no-op path (its `dvc status` step) on a change in the middle of the pipeline."""
    change, readers = CHANGES[case]
    change(project)
    state = plan(str(project), return_state=True)
    name, message, to_run = state_of(state)
    assert name == "Completed", message
    first = min(STAGES.index(stage) for stage in readers)
    assert to_run == list(STAGES[first:])     # --single-item then skips the ones in between that did not change
    stale_in_order = ", ".join(stage for stage in STAGES if stage in readers)
    assert f"Stale stages: {stale_in_order}" in run_logs(str(state.state_details.flow_run_id))


def rewrite_params(root: Path) -> None:
    """params.yaml as a YAML dump of itself: its comments and layout gone, every value the same."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False))


# Changes that alter nothing a run computes: comments and layout of params.yaml, and a param that
# dvc.yaml documents as changing how weights are fetched, not what they are.
UNCHANGED: dict[str, Change] = {
    "nothing changed": lambda root: None,
    "params.yaml rewritten with the same values": rewrite_params,
    "params model.download_retries": set_param("model.download_retries", 5),
}


@pytest.mark.slow(seconds=5)
@pytest.mark.parametrize("case", list(UNCHANGED))
def test_a_run_that_changes_nothing_is_answered_up_to_date(project: Path, completed_run: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], case: str) -> None:
    UNCHANGED[case](project)
    assert stale(project) == set()
    monkeypatch.chdir(project)
    assert main() == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["flow_state"] == "Up to date" and summary["flow_run_id"] is None
    assert summary["registry_version"] == completed_run["production"] and summary["promoted"] is False
    assert summary["stages_run"] == [] and summary["stages_skipped"] == list(STAGES)
