"""Stage train: both phases, outputs, resume after SIGKILL, NaN stop, DDP, dvc repro, pretrained vs random."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tasks.lib.errors import StageError
from tasks.lib.config import Params, PrepareParams, apply_overrides_to_file, load_params
from tasks.lib.io import sha256_file, write_json
from tasks.lib.models import build_backbone, build_model, find_head, load_checkpoint
from tasks.lib.split_files import SPLITS, SplitRow, read_split, split_path, write_split
from tasks.decode_cache import build_cache, cache_preprocessings
from tasks.prepare import prepare
from tasks.train import Hooks, NonFiniteLoss, train
from tasks.training.freezing import backbone_blocks, set_trainable
from tasks.training import loop
from tasks.training.runtime import pick_precision
from tests.conftest import REPO_ROOT, init_dvc_repo, run, write_image_folder
from tests.realistic import oracle_input, write_realistic_folder

ARCH = "mobilenet_v3_small"   # 2.5 M parameters; at 32 px a step takes milliseconds


def write_project(root: Path, classes: int = 3, per_class: int = 8, arch: str = ARCH) -> None:
    """Raw images, train/val split files (no test split: train must not need it) and 'pretrained' weights."""
    raw = write_image_folder(root / "data" / "raw", classes=classes, per_class=per_class, size=36)
    rows: dict[str, list[SplitRow]] = {"train": [], "val": []}
    for path in sorted(raw.rglob("*.png")):
        row = SplitRow(str(path.relative_to(raw)), int(path.parent.name.split("_")[1]), sha256_file(path))
        rows["val" if int(path.stem[-3:]) % 4 == 0 else "train"].append(row)
    prepared = root / "data" / "prepared"
    for split, split_rows in rows.items():
        write_split(prepared / f"{split}.csv", split_rows)
    write_json(prepared / "classes.json", [f"class_{c}" for c in range(classes)])
    write_weights(root / "artifacts" / "weights", arch)


def write_weights(out_dir: Path, arch: str, seed: int = 0) -> None:
    """A weights.json + backbone.pt pair as fetch_weights writes it; a seeded random backbone stands in.

    Its BatchNorm statistics are calibrated on noise first: with the init
    statistics (mean 0, var 1) a random MobileNet's eval-mode features shrink
    to ~1e-10, which makes them useless and the CPU slow (denormals).
    """
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(arch)
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None   # a plain average over the calibration batch
    with torch.no_grad():
        backbone.train()(torch.randn(16, 3, 32, 32))   # roughly what normalised images look like
    torch.save(backbone.state_dict(), out_dir / "backbone.pt")
    write_json(out_dir / "weights.json", {
        "arch": arch, "weights": "test", "source": "tests", "sha256": sha256_file(out_dir / "backbone.pt"),
        "file": "backbone.pt", "file_sha256": sha256_file(out_dir / "backbone.pt"),
        "preprocessing": {"crop_size": 224, "resize_size": 256, "interpolation": "bilinear",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})


def tiny_overrides(root: Path, **extra: Any) -> dict[str, Any]:
    return {
        "data.raw_dir": str(root / "data" / "raw"), "data.prepared_dir": str(root / "data" / "prepared"),
        "model.arch": ARCH, "model.out_dir": str(root / "artifacts" / "weights"),
        "train.out_dir": str(root / "artifacts" / "train"), "train.image_size": 32, "train.batch_size": 8,
        "train.head.epochs": 2, "train.head.lr": 0.01, "train.finetune.epochs": 2, "train.finetune.last_n": 1,
        "train.finetune.lr": 0.001, "train.device": "cpu", "train.num_workers": 1, "train.early_stopping_patience": 0,
        "train.channels_last": False,
        # The label check costs a couple of seconds of imports (cleanlab, pandas, scikit-learn) in every training
        # run; tests/tasks/training/test_label_issues.py turns it on, the whole-pipeline tests keep the default.
        "prepare.label_issues": "off", **cache_overrides(root), **extra,
    }


def cache_overrides(root: Path) -> dict[str, str]:
    """Every cache under the test's own folder: a shared one would hand a later test features it did not compute."""
    return {"cache.out_dir": str(root / "artifacts" / "decoded"), "cache.store_dir": str(root / "cache" / "decoded"),
            "cache.features_dir": str(root / "cache" / "features"), "prepare.cache_dir": str(root / "cache" / "prepare"),
            "reports.dir": str(root / "metrics")}


def tiny_params(root: Path, **extra: Any) -> Params:
    """Params for the tiny project under root, its decoded cache built once its split files exist."""
    return decoded(load_params(REPO_ROOT / "params.yaml", tiny_overrides(root, **extra)))


def decoded(params: Params) -> Params:
    """params, with the decode_cache stage's arrays built for the splits there are (as `dvc repro` builds them
    before train, which reads nothing else)."""
    prepared = params.data.prepared_dir
    if split_path(prepared, "train").exists():
        build_cache(prepared, params.data.raw_dir, params.cache.out_dir, cache_preprocessings(params),
                    splits=[s for s in SPLITS if split_path(prepared, s).exists()], limits=params.prepare.limits(),
                    workers=1, store_dir=params.cache.store_dir, draft=params.cache.jpeg_draft)
    return params


def write_params_file(root: Path, name: str = "params.yaml", **extra: Any) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(tiny_params(root, **extra).model_dump(mode="json"), sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning against other jobs make
    a millisecond step take seconds. Subprocesses get the same through OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_project(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- pieces


@pytest.mark.slow
def test_backbone_blocks_follow_the_documented_rule() -> None:
    assert backbone_blocks(build_backbone("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]
    assert backbone_blocks(build_backbone("mobilenet_v3_small")) == [f"features.{i}" for i in range(13)]
    assert backbone_blocks(build_backbone("efficientnet_lite0")) == [f"blocks.{i}" for i in range(7)]


@pytest.mark.parametrize(("unfreeze", "trainable", "frozen"), [
    ("last_n", ["layer4.1.conv2.weight", "fc.weight"], ["layer3.1.conv2.weight", "conv1.weight"]),
    ("all", ["conv1.weight", "layer3.1.conv2.weight", "fc.bias"], []),
    ("none", ["fc.weight", "fc.bias"], ["layer4.1.conv2.weight", "conv1.weight"]),
])
def test_set_trainable(unfreeze: str, trainable: list[str], frozen: list[str]) -> None:
    model = build_model("resnet18", 3)
    set_trainable(model, unfreeze, last_n=1)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(grads[n] for n in trainable) and not any(grads[n] for n in frozen)


def test_last_n_also_unfreezes_what_follows_the_blocks() -> None:
    model = build_model("efficientnet_lite0", 3)
    set_trainable(model, "last_n", last_n=2)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads["blocks.5.0.conv_pw.weight"] and grads["conv_head.weight"] and grads["bn2.weight"]
    assert not grads["blocks.4.0.conv_pw.weight"] and not grads["conv_stem.weight"]


def test_precision_choice_and_bad_devices() -> None:
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) is None
    assert pick_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(StageError, match="fp16 needs CUDA"):
        pick_precision("fp16", cpu)


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_train_writes_the_documented_outputs(project: Path) -> None:
    metrics = train(tiny_params(project))
    out = project / "artifacts" / "train"
    on_disk = json.loads((project / "metrics" / "train.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("val_accuracy", "epochs", "best_epoch", "train_img_per_s", "device"):
        assert key in on_disk
    assert on_disk["epochs"] == 4 and on_disk["device"] == "cpu" and 1 <= on_disk["best_epoch"] <= 4
    assert on_disk["val_accuracy"] > 0.6   # colour classes: far above chance (1/3) after 4 epochs
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert meta["weights"]["file_sha256"] == sha256_file(project / "artifacts" / "weights" / "backbone.pt")
    assert meta["preprocessing"].crop_size == 32 and meta["epoch"] == on_disk["best_epoch"]
    steps = (project / "metrics" / "train" / "plots" / "metrics" / "val_accuracy.tsv").read_text().splitlines()
    assert steps[0].split("\t") == ["step", "val_accuracy"] and len(steps) == 1 + 4
    assert not (out / "dvc.yaml").exists() and not (project / "dvc.yaml").exists()   # the curves touched no DVC file
    assert not (project / "data" / "prepared" / "test.csv").exists()   # never needed


@pytest.mark.slow
def test_cached_features_give_the_same_head_as_the_no_grad_path(project: Path) -> None:
    heads = []
    for cache in (True, False):
        params = tiny_params(project, **{"train.out_dir": str(project / f"out_{cache}"), "train.head.epochs": 3,
                                         "train.head.lr": 0.003, "train.finetune.unfreeze": "none"})
        train(params, cache_features=cache)
        state = torch.load(project / f"out_{cache}" / "resume" / "last.pt", weights_only=True)["model"]
        heads.append({k: v for k, v in state.items() if k.startswith("classifier.3")})
    assert heads[0].keys() == {"classifier.3.weight", "classifier.3.bias"}
    for key in heads[0]:
        # Features computed in one batch vs per training batch differ in the last float bits only.
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-4, rtol=1e-3)
    trained = heads[0]["classifier.3.weight"] - build_model(ARCH, 3).classifier[3].weight
    assert trained.abs().max() > 1e-2   # the heads did move: the comparison means something


@pytest.mark.slow
@pytest.mark.parametrize(("value", "phase"), [("nan", "finetune"), ("inf", "head")])
def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(project: Path, value: str,
                                                                                  phase: str) -> None:
    last, best = (project / "artifacts" / "train" / "resume" / name for name in ("last.pt", "best.pt"))
    saved: dict[str, bytes] = {}

    def remember(phase: str, epochs_done: int) -> None:
        saved["last"], saved["best"] = last.read_bytes(), best.read_bytes()

    def poison(loss: torch.Tensor, in_phase: str, epoch: int, step: int) -> torch.Tensor:
        return loss * float(value) if (in_phase, epoch) == (phase, 1) else loss

    # An inf loss turns the weights into NaNs on its backward pass, so the report may say either.
    with pytest.raises(NonFiniteLoss, match=rf"loss became (nan|inf) in phase {phase}, epoch 2.*last good checkpoint"):
        train(tiny_params(project), Hooks(on_loss=poison, on_epoch_end=remember))
    assert last.read_bytes() == saved["last"] and best.read_bytes() == saved["best"]
    assert not (project / "artifacts" / "train" / "model.pt").exists()   # the output of a finished run only
    assert not (project / "metrics" / "train.json").exists()
    state = torch.load(last, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_resume_ignores_a_state_from_other_params(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    train(tiny_params(project, **{"train.finetune.unfreeze": "none"}))
    caplog.set_level("INFO", logger="tasks.training")
    train(tiny_params(project, **{"train.finetune.unfreeze": "none", "train.head.epochs": 1}))
    assert "other params or data; starting fresh" in caplog.text
    caplog.clear()
    train(tiny_params(project, **{"train.finetune.unfreeze": "none", "train.head.epochs": 1}))
    assert "from a finished run; starting fresh" in caplog.text


KILLER = """
import os, signal, sys
from tasks.lib.progress import setup_logging
from tasks.lib.config import load_params
from tasks.train import Hooks, train

setup_logging()

kill_at = int(sys.argv[2])   # SIGKILL this process in the middle of that global epoch (1-based); 0: never
done = {"head": 0}
def on_loss(loss, phase, epoch, step):
    if kill_at and step == 1 and done["head"] + epoch + 1 == kill_at and phase == "finetune":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss
def on_epoch_end(phase, epochs_done):
    if phase == "head":
        done["head"] = epochs_done
train(load_params(sys.argv[1]), Hooks(on_loss=on_loss, on_epoch_end=on_epoch_end))
"""


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")])


@pytest.mark.slow(seconds=35)
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_resume_after_sigkill_gives_the_same_parameters_as_a_straight_run(project: Path, device: str) -> None:
    # 6 epochs: 2 head (cached features), 4 fine-tuning with augmentation and dropout (RNG state matters).
    # On CUDA also: batches made on a side stream, the head step replayed from a CUDA graph, bf16.
    script = project / "killer.py"
    script.write_text(KILLER)
    extra = {"train.head.epochs": 2, "train.finetune.epochs": 4, "train.device": device,
             "train.channels_last": device == "cuda"}
    straight = write_params_file(project, "straight.yaml", **{"train.out_dir": str(project / "straight"),
                                                               "reports.dir": str(project / "straight"), **extra})
    killed = write_params_file(project, "killed.yaml", **{"train.out_dir": str(project / "killed"),
                                                           "reports.dir": str(project / "killed"), **extra})
    run([sys.executable, str(script), str(straight), "0"], cwd=REPO_ROOT)
    proc = run([sys.executable, str(script), str(killed), "4"], cwd=REPO_ROOT, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    half = torch.load(project / "killed" / "resume" / "last.pt", weights_only=True)
    assert half["progress"]["global_epoch"] == 3 and not half["finished"]
    proc = run([sys.executable, str(script), str(killed), "0"], cwd=REPO_ROOT)
    assert "resuming from" in proc.stderr
    a = torch.load(project / "straight" / "resume" / "last.pt", weights_only=True)
    b = torch.load(project / "killed" / "resume" / "last.pt", weights_only=True)
    assert a["progress"]["global_epoch"] == b["progress"]["global_epoch"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    best_a = torch.load(project / "straight" / "model.pt", weights_only=True)["state_dict"]
    best_b = torch.load(project / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert json.loads((project / "straight" / "train.json").read_text())["val_accuracy"] == \
        json.loads((project / "killed" / "train.json").read_text())["val_accuracy"]


@pytest.mark.slow(seconds=30)
def test_ddp_with_two_gloo_processes(project: Path) -> None:
    params_file = write_params_file(project, **{"train.nproc_per_node": 2})
    proc = run([sys.executable, "-m", "tasks.train", "--params", str(params_file)], cwd=REPO_ROOT)
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 4
    assert metrics["val_accuracy"] > 0.6, proc.stderr
    load_checkpoint(project / "artifacts" / "train" / "model.pt")
    # No rank repeats another's work: each extracts half the features, half the activations of the frozen
    # bottom (phase 2 trains the top on them) and half the validation logits the temperature is fitted on.
    shares = {(m[0], int(m[1])): (int(m[3]), int(m[4])) for m in re.findall(
        r"(features train|features val|activations train|activations val|calibration): rank (\d) of (2) "
        r"computes (\d+) of (\d+) images", proc.stderr)}
    assert shares == {(what, rank): (9, 18) if what.endswith("train") else (3, 6)
                      for what in ("features train", "features val", "activations train", "activations val",
                                   "calibration") for rank in (0, 1)}, proc.stderr


@pytest.mark.slow
def test_dvc_repro_train(tmp_path: Path) -> None:
    repo = init_dvc_repo(tmp_path / "repo")
    write_project(repo)
    overrides = {k: v for k, v in tiny_overrides(repo).items() if not k.endswith(("_dir", ".out_dir"))}
    apply_overrides_to_file(repo / "params.yaml", overrides)
    write_split(repo / "data" / "prepared" / "test.csv", [])  # decode_cache wants all three splits
    run(["dvc", "repro", "-s", "decode_cache"], repo)
    run(["dvc", "repro", "-s", "train"], repo)
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["epochs"] == 4
    assert (repo / "metrics" / "train" / "plots" / "metrics" / "val_accuracy.tsv").exists()
    assert (repo / "metrics" / "train" / "curves.png").stat().st_size > 1000
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "train" in lock["stages"]
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "val_accuracy" in shown
    assert "Stage 'train' didn't change" in run(["dvc", "repro", "-s", "train"], repo).stdout


def test_training_reads_only_the_decoded_cache_and_says_how_to_build_it(project: Path) -> None:
    """No decoding of its own: without the decode_cache stage's arrays, or with arrays of another geometry,
    the stage stops with the command that builds them, and trains nothing."""
    unbuilt = load_params(REPO_ROOT / "params.yaml", tiny_overrides(project))
    with pytest.raises(FileNotFoundError, match="decoded cache not found; build it with `dvc repro decode_cache`"):
        train(unbuilt)
    tiny_params(project)      # built for 32 px
    with pytest.raises(StageError, match="train.image_size or cache.margin changed since the build: rebuild"):
        train(unbuilt.model_copy(update={"train": unbuilt.train.model_copy(update={"image_size": 40})}))
    assert not (project / "artifacts" / "train" / "resume").exists()


def test_wrong_arch_in_weights_is_a_clear_error(project: Path) -> None:
    write_weights(project / "artifacts" / "weights", "resnet18")
    with pytest.raises(StageError, match="weights.json is for 'resnet18' but model.arch is 'mobilenet_v3_small'"):
        train(tiny_params(project))


def test_head_is_what_find_head_says() -> None:
    assert find_head(build_model(ARCH, 3)) == "classifier.3"




@pytest.mark.slow
def test_pretrained_weights_beat_random_init_with_few_labels(tmp_path: Path, fashion_mnist: Path) -> None:
    # 20 Fashion-MNIST images per class (14 train / 3 val / 3 test), same budget for both:
    # 15 cached-feature head epochs + 2 epochs with the last 2 blocks unfrozen, at the demo's 96 px.
    # Measured (val + test, 68 images): packaged ImageNet weights 0.824, random init 0.544,
    # a margin of 0.28; at 64 px it shrinks to 0.69 vs 0.57, at 128 px 0.81 vs 0.46.
    from tasks.fetch_weights import fetch_weights
    from tasks.lib.config import ModelParams, PrepareParams
    from tasks.lib.demo_data import materialise
    from tasks.prepare import prepare

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    materialise(raw, per_class=20, seed=0, source_dir=fashion_mnist, download_dir=tmp_path / "dl")
    prepare(raw, prepared, PrepareParams(cache_dir=tmp_path / "cache" / "prepare"))
    accuracy = {}
    for weights in ("packaged", "none"):
        out = tmp_path / f"weights_{weights}"
        fetch_weights(ModelParams(arch="efficientnet_lite0", weights=weights, out_dir=out, offline=True))
        params = decoded(load_params(REPO_ROOT / "params.yaml", {
            "data.raw_dir": str(raw), "data.prepared_dir": str(prepared), "model.out_dir": str(out),
            "train.out_dir": str(tmp_path / f"train_{weights}"), "train.image_size": 96, "train.batch_size": 32,
            "train.head.epochs": 15, "train.finetune.epochs": 2, "train.finetune.unfreeze": "last_n",
            "train.early_stopping_patience": 0, "train.device": "cpu", **cache_overrides(tmp_path)}))
        train(params)
        accuracy[weights] = held_out_accuracy(tmp_path / f"train_{weights}" / "model.pt", raw, prepared)
    print(f"held-out accuracy with 20 labels per class: {accuracy}")
    assert accuracy["packaged"] - accuracy["none"] >= 0.15, accuracy


def held_out_accuracy(checkpoint: Path, raw: Path, prepared: Path) -> float:
    """Accuracy on val + test through the eval preprocessing (val alone, ~30 images, is too few to compare)."""
    from tasks.lib.data import EvalDataset
    from tasks.lib.split_files import read_split, split_path

    model, meta = load_checkpoint(checkpoint)
    rows = read_split(split_path(prepared, "val")) + read_split(split_path(prepared, "test"))
    x, y = zip(*EvalDataset(rows, raw, meta["preprocessing"]))
    with torch.no_grad():
        pred = model(torch.stack(x)).argmax(1)
    return float((pred == torch.tensor(y)).float().mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_mixed_precision_and_channels_last(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tasks.training")
    params = tiny_params(project, **{"train.device": "auto", "train.channels_last": True, "train.precision": "auto",
                                     "train.head.epochs": 3})
    train(params)
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["device"] == "cuda"
    assert metrics["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert metrics["val_accuracy"] > 0.6
    if metrics["precision"] == "bfloat16":   # fp16's loss scaling keeps the head step eager
        assert "training step captured in a CUDA graph" in caplog.text
    model, _ = load_checkpoint(project / "artifacts" / "train" / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_change_nothing_but_rounding(project: Path) -> None:
    heads = []
    for graphs in (True, False):
        out = project / f"graphs_{graphs}"
        train(tiny_params(project, **{"train.device": "cuda", "train.precision": "bf16", "train.head.epochs": 4,
                                      "train.finetune.unfreeze": "none", "train.cuda_graphs": graphs,
                                      "train.out_dir": str(out)}))
        state = torch.load(out / "resume" / "last.pt", weights_only=True)["model"]
        heads.append({k: v for k, v in state.items() if k.startswith("classifier.3")})
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- phase 2 and BatchNorm


@pytest.mark.slow
def test_phase_2_on_cached_activations_trains_the_same_model_as_running_the_whole_network(project: Path) -> None:
    runs = {}
    for cache in (None, False):
        out = project / f"out_{cache}"
        train(tiny_params(project, **{"train.out_dir": str(out), "train.head.epochs": 1, "train.finetune.epochs": 1,
                                      "train.finetune.last_n": 2, "train.finetune.augment": False,
                                      # SGD: AdamW's first steps move a weight by +-lr whatever the size of its
                                      # gradient, so float noise in near-zero gradients would flip signs.
                                      "train.optimizer": "sgd", "train.finetune.lr": 0.05}),
              cache_features=cache)
        runs[cache] = torch.load(out / "resume" / "last.pt", weights_only=True)
    cached, whole = runs[None], runs[False]
    assert [r["phase"] for r in cached["progress"]["history"]] == ["head", "finetune"]
    # The bottom computed in one batch vs per step differs in the last float bits, which the
    # (over-confident, tiny) model's validation loss amplifies a little; its predictions do not change.
    for a, b in zip(cached["progress"]["history"], whole["progress"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3) and a["val_accuracy"] == b["val_accuracy"]
    top = [k for k in cached["model"] if k.startswith(("features.11.", "features.12.", "classifier."))]
    worst = max((cached["model"][k].float() - whole["model"][k].float()).abs().max().item() for k in top)
    moved = (cached["model"]["features.12.0.weight"] - whole_initial(project)["features.12.0.weight"]).abs().max()
    assert top and worst < moved / 50, (worst, moved)    # the top did train, and both ways alike


def whole_initial(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "artifacts" / "weights" / "backbone.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_batchnorm_statistics_stay_pretrained_while_fine_tuning_unless_asked(project: Path, batchnorm: str) -> None:
    out = project / "artifacts" / "train"
    train(tiny_params(project, **{"train.head.epochs": 1, "train.finetune.epochs": 2, "train.finetune.unfreeze": "all",
                                  "train.finetune.augment": True, "train.finetune.batchnorm": batchnorm}))
    trained = torch.load(out / "resume" / "last.pt", weights_only=True)["model"]
    pretrained = whole_initial(project)
    stats = [k for k in pretrained if k.endswith(("running_mean", "running_var"))]
    changed = [k for k in stats if not torch.equal(trained[k], pretrained[k])]
    weights_moved = not torch.equal(trained["features.0.0.weight"], pretrained["features.0.0.weight"])
    assert weights_moved                                   # the whole network did fine-tune
    assert (changed == []) if batchnorm == "frozen" else (len(changed) == len(stats))


# --------------------------------------------------------------------------- early stopping and the best epoch

# Random resnet18 features tell the realistic colours apart (val macro-F1 ~0.9 in a few epochs);
# a random mobilenet_v3_small's barely do (~0.6, noisy), so its curve has no clear plateau.
REALISTIC_ARCH = "resnet18"


def write_realistic_project(root: Path, arch: str = ARCH, per_class: int = 10) -> list[str]:
    """A realistic folder (tests.realistic) through the real prepare stage, 30% of it held out for validation so
    the score has room to plateau, and stand-in weights; returns classes.json."""
    raw = root / "data" / "raw"
    write_realistic_folder(raw, per_class=per_class)
    report = prepare(raw, root / "data" / "prepared", PrepareParams(num_workers=1, train=0.5, val=0.3, test=0.2,
                                                                   cache_dir=root / "cache" / "prepare"))
    write_weights(root / "artifacts" / "weights", arch)
    return report["classes"]


def epoch_snapshots(out: Path) -> tuple[dict[int, dict[str, torch.Tensor]], Hooks]:
    """The weights after every epoch (from resume/last.pt, as each epoch leaves it), by global epoch."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(phase: str, epochs_done: int) -> None:
        state = torch.load(out / "resume" / "last.pt", weights_only=True)
        snapshots[state["progress"]["global_epoch"]] = state["model"]

    return snapshots, Hooks(on_epoch_end=keep)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def oracle_val_scores(checkpoint: Path, raw: Path, prepared: Path) -> tuple[float, float]:
    """Macro-F1 and accuracy of a checkpoint on the val split, by torchvision, Pillow and scikit-learn alone."""
    import torchvision
    from sklearn.metrics import accuracy_score, f1_score

    payload = torch.load(checkpoint, weights_only=True)
    network = torchvision.models.get_model(payload["arch"], weights=None, num_classes=len(payload["class_names"]))
    network.load_state_dict(payload["state_dict"])
    rows = read_split(prepared / "val.csv")
    x = torch.from_numpy(np.stack([oracle_input(raw / row.path, payload["preprocessing"]) for row in rows]))
    with torch.no_grad():
        predicted = network.eval()(x).argmax(1).numpy()
    labels = [row.label for row in rows]
    return float(f1_score(labels, predicted, average="macro")), float(accuracy_score(labels, predicted))


@pytest.mark.slow(seconds=15)
def test_a_plateau_stops_training_after_patience_epochs_and_model_pt_is_the_first_best_epoch(tmp_path: Path) -> None:
    """Realistic images, a real curve: validation macro-F1 climbs, then stays level (ties) or falls.
    Training stops after exactly `patience` epochs that did not beat the best; a tie does not beat it,
    so the best is the first epoch to reach the top score, and model.pt holds that epoch's weights
    (not the last epoch's, which reach the same score with other weights or a lower one)."""
    classes = write_realistic_project(tmp_path, REALISTIC_ARCH)
    out, patience, most = tmp_path / "artifacts" / "train", 3, 20
    snapshots, hooks = epoch_snapshots(out)
    metrics = train(tiny_params(tmp_path, **{
        "model.arch": REALISTIC_ARCH, "train.head.lr": 0.01, "train.head.epochs": most,
        "train.finetune.unfreeze": "none", "train.early_stopping_patience": patience}), hooks)
    f1 = [row["val_macro_f1"] for row in torch.load(out / "resume" / "last.pt", weights_only=True)["progress"]["history"]]
    best = f1.index(max(f1)) + 1
    assert max(f1) in f1[best:], f"no tie after the best epoch: the fixture lost its plateau ({f1})"
    assert len(f1) == best + patience < most, f1
    assert (metrics["best_epoch"], metrics["epochs"], metrics["val_macro_f1"]) == (best, len(f1), max(f1))
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["best_epoch"] == best

    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["epoch"] == best and payload["class_names"] == classes
    assert same_weights(payload["state_dict"], snapshots[best])
    assert not same_weights(payload["state_dict"], snapshots[len(f1)])          # best is not last
    oracle_f1, oracle_accuracy = oracle_val_scores(out / "model.pt", tmp_path / "data" / "raw",
                                                   tmp_path / "data" / "prepared")
    assert oracle_f1 == pytest.approx(max(f1), abs=1e-6) and oracle_accuracy == pytest.approx(metrics["val_accuracy"])


# Validation macro-F1 by global epoch, scripted so every rule meets its edge case. Head, patience 2:
# best at 2, a tie at 3 and a drop at 4 stop it after epoch 4. Fine-tuning counts afresh but must beat
# the head's 0.70: 5 does not, 6 does (the count restarts), 7 ties and 8 drops: stop after epoch 8.
SCRIPTED_F1 = [0.50, 0.70, 0.70, 0.65, 0.69, 0.80, 0.80, 0.79, 0.60, 0.60, 0.60, 0.60]


@pytest.mark.slow(seconds=10)
def test_early_stopping_counts_ties_as_no_better_restarts_on_a_better_epoch_and_spans_both_phases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only the validation score is scripted (so ties and plateaus fall on known epochs); the training,
    checkpoints and model.pt are real. model.pt is the best epoch across both phases, in its weights."""
    classes = write_realistic_project(tmp_path)
    real_scores, epochs = loop.validate, iter(SCRIPTED_F1)

    def scripted(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {**real_scores(logits, y), "val_macro_f1": next(epochs)}

    monkeypatch.setattr(loop, "validate", scripted)
    caplog.set_level("INFO", logger="tasks.training")
    out = tmp_path / "artifacts" / "train"
    snapshots, hooks = epoch_snapshots(out)
    metrics = train(tiny_params(tmp_path, **{
        "train.early_stopping_patience": 2, "train.head.epochs": 6, "train.finetune.epochs": 6,
        "train.finetune.unfreeze": "last_n", "train.finetune.last_n": 1}), hooks)

    history = torch.load(out / "resume" / "last.pt", weights_only=True)["progress"]["history"]
    assert [(row["epoch"], row["phase"]) for row in history] == [
        (1, "head"), (2, "head"), (3, "head"), (4, "head"),
        (5, "finetune"), (6, "finetune"), (7, "finetune"), (8, "finetune")]
    assert "early stopping in phase head" in caplog.text and "early stopping in phase finetune" in caplog.text
    assert (metrics["best_epoch"], metrics["best_phase"], metrics["epochs"]) == (6, "finetune", 8)
    assert metrics["val_macro_f1"] == 0.80 and metrics["val_accuracy"] == history[5]["val_accuracy"]
    payload = torch.load(out / "model.pt", weights_only=True)
    assert (payload["epoch"], payload["phase"], payload["class_names"]) == (6, "finetune", classes)
    assert same_weights(payload["state_dict"], snapshots[6])
    assert not same_weights(snapshots[6], snapshots[7]) and not same_weights(snapshots[6], snapshots[8])
