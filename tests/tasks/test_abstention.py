"""Abstention end to end: evaluate chooses the threshold on the validation split only, export takes it only for
the checkpoint it was computed for, predict --abstain and the card's snippet apply the rule in the ONNX metadata,
and the card states the numbers evaluate.json holds."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from tasks import evaluate, export
from tasks.handoff import predict
from tasks.handoff.card import build_card, render_readme
from tasks.lib import abstention
from tasks.lib.config import Params, ParamsError, load_params
from tasks.lib.errors import StageError
from tasks.lib.io import read_json, write_json
from tasks.lib.models import load_checkpoint
from tasks.lib.onnx_classifier import load_classifier
from tasks.lib.split_files import SplitRow, read_split, write_split
from tests.realistic import oracle_input
from tests.tasks.handoff.test_card_snippet import RUNNER, consumer_images, dense_model, snippet_from_card
from tests.tasks.test_evaluate import make_project


def with_export(params: Params, **abstain: float | None) -> Params:
    return params.model_copy(update={"export": params.export.model_copy(update=abstain)})


def relabel(path: Path, labels: list[int]) -> None:
    write_split(path, [SplitRow(row.path, label, row.sha256) for row, label in zip(read_split(path), labels)])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project whose validation split is the test images labelled as the model predicts them (so 100% accuracy
    is reachable there), evaluated twice: with the test labels as written, then with the model always right on test."""
    root = tmp_path_factory.mktemp("abstention")
    params = with_export(make_project(root, per_class=6), abstain_at_accuracy=0.9)
    prepared = Path(params.data.prepared_dir)
    model, meta = load_checkpoint(Path(params.train.out_dir) / "model.pt")
    rows = read_split(prepared / "test.csv")
    probs = evaluate.predict_probs(model, rows, Path(params.data.raw_dir), meta["preprocessing"],
                                   params.evaluate.batch_size)   # batches as evaluate makes them: the same floats
    predicted = [int(p) for p in probs.argmax(axis=1)]
    write_split(prepared / "val.csv", rows)
    relabel(prepared / "val.csv", [p if i % 6 else (p + 1) % 3 for i, p in enumerate(predicted)])  # 1 in 6 wrong
    first = evaluate.run(params)
    relabel(prepared / "test.csv", predicted)
    second = evaluate.run(params)
    with tempfile.TemporaryDirectory() as folder:   # the strangers, scored as evaluate scores any split
        ood = abstention.write_ood_images(Path(folder), len(rows))
        ood_probs = evaluate.predict_probs(model, ood, Path(folder), meta["preprocessing"], params.evaluate.batch_size)
        with np.load(Path(params.evaluate.out_dir) / "feature_distance.npz") as stats:
            fitted = torch.from_numpy(stats["whiten"]), torch.from_numpy(stats["centres"])
        ood_distance = evaluate.predict_scores(model, ood, Path(folder), meta["preprocessing"],
                                               params.evaluate.batch_size, torch.device("cpu"), fitted)[1]
    return {"params": params, "first": first, "second": second, "val_probs": probs, "ood_probs": ood_probs,
            "ood_distance": ood_distance,
            "val_labels": [row.label for row in read_split(prepared / "val.csv")],
            "test_labels": np.array([row.label for row in rows])}


@pytest.mark.slow(seconds=10)   # the module's fixture: two evaluations
def test_the_threshold_is_chosen_on_the_validation_split_only(evaluated: dict[str, Any]) -> None:
    first, second = evaluated["first"]["abstention"], evaluated["second"]["abstention"]
    assert first["threshold"] is not None and first["threshold"] == second["threshold"]
    assert first["test"]["accuracy"] < second["test"]["accuracy"] == 1.0    # the test labels did change
    # The same threshold from the validation probabilities alone, and it is the lowest that reaches 90% there.
    confidence = evaluated["val_probs"].max(axis=1)
    correct = evaluated["val_probs"].argmax(axis=1) == np.array(evaluated["val_labels"])
    assert first["threshold"] == pytest.approx(abstention.choose_threshold(
        evaluated["val_probs"], np.array(evaluated["val_labels"]), 0.9, None)[0], abs=1e-9)
    assert correct[confidence >= first["threshold"]].mean() >= 0.9
    lower = confidence[confidence < first["threshold"] - 1e-9]
    assert all(correct[confidence >= t].mean() < 0.9 for t in lower)


@pytest.mark.slow(seconds=10)   # as the first user of the fixture: run together, it is made once
def test_the_test_split_and_out_of_domain_numbers_match_an_independent_count(evaluated: dict[str, Any]) -> None:
    record = evaluated["first"]["abstention"]
    threshold, probs = record["threshold"], evaluated["val_probs"]   # the test images are the validation images
    answered = probs.max(axis=1) >= threshold
    right = (probs.argmax(axis=1) == evaluated["test_labels"])[answered]
    assert record["test"]["coverage"] == pytest.approx(answered.mean(), abs=1e-6)
    assert record["test"]["accuracy"] == pytest.approx(right.mean(), abs=1e-6)
    low, high = binomtest(int(right.sum()), len(right)).proportion_ci(method="wilson")
    assert [record["test"]["accuracy_ci_low"], record["test"]["accuracy_ci_high"]] == pytest.approx([low, high], abs=1e-6)
    ood, far = evaluated["ood_probs"].max(axis=1), evaluated["ood_distance"] > record["distance"]["threshold"]
    assert record["out_of_domain"]["rejected"] == pytest.approx(((ood < threshold) | far).mean(), abs=1e-6)
    in_and_out = np.concatenate([probs.max(axis=1), ood])
    auroc = roc_auc_score(np.r_[np.ones(len(probs)), np.zeros(len(ood))], in_and_out)
    assert record["out_of_domain"]["auroc"] == pytest.approx(auroc, abs=1e-6)


@pytest.mark.slow(seconds=10)   # as the first user of the fixture: run together, it is made once
def test_export_takes_the_threshold_only_for_the_checkpoint_and_target_evaluate_used(
        evaluated: dict[str, Any], tmp_path: Path) -> None:
    params = evaluated["params"]
    meta, distance = abstention.onnx_metadata(params)
    record = read_json(Path(params.reports.dir) / "evaluate.json")["abstention"]
    assert float(meta["abstain_threshold"]) == record["threshold"]
    assert json.loads(meta["abstention"])["on_test"] == record["test"]
    assert float(meta["feature_distance_threshold"]) == record["distance"]["threshold"] and len(distance) == 2
    assert abstention.onnx_metadata(with_export(params, abstain_at_accuracy=None)) == ({}, None)
    with pytest.raises(StageError, match="evaluate.json holds no abstention threshold.*dvc repro evaluate"):
        abstention.onnx_metadata(with_export(params, abstain_at_accuracy=0.8))
    # A model too weak for the target: evaluate recorded why, and the ONNX file gets no threshold (predict
    # --abstain then refuses it) rather than a made-up one.
    reports = tmp_path / "metrics"
    assert abstention.onnx_metadata(params.model_copy(update={"reports": params.reports.model_copy(
        update={"dir": tmp_path / "not-evaluated"})})) == ({}, None)   # export by hand before evaluate: no threshold
    elsewhere = params.model_copy(update={"reports": params.reports.model_copy(update={"dir": reports})})
    write_json(reports / "evaluate.json", {"abstention": {**record, "threshold": None, "note": "too weak"}})
    assert abstention.onnx_metadata(elsewhere) == ({}, None)
    # The distance file must be the one evaluate.json records: another one is refused, not embedded.
    write_json(reports / "evaluate.json", {"abstention": {**record, "distance": {**record["distance"], "sha256": "0" * 64}}})
    with pytest.raises(StageError, match="feature_distance.npz is missing or not the file .*dvc repro evaluate"):
        abstention.onnx_metadata(elsewhere)
    other = params.model_copy(update={"train": params.train.model_copy(update={"out_dir": Path(params.data.raw_dir)})})
    (Path(params.data.raw_dir) / "model.pt").write_bytes(b"another checkpoint")
    with pytest.raises(StageError, match="computed for another checkpoint"):
        abstention.onnx_metadata(other)


@pytest.mark.slow(seconds=10)   # as the first user of the fixture: run together, it is made once
def test_the_cards_numbers_are_those_of_evaluate_json(evaluated: dict[str, Any]) -> None:
    params = evaluated["params"]
    metrics = read_json(Path(params.reports.dir) / "evaluate.json")
    record = metrics["abstention"]
    card = build_card(params=params, version="v1", url="registry/m/v1", class_names=["a", "b", "c"], lineage={},
                      metrics=metrics, export_report={}, decision={"passed": True, "reason": "first"},
                      train_metrics=None, data_report=None)
    readme = render_readme(card)
    assert card["abstention"] == record
    point, ood = record["test"], record["out_of_domain"]
    assert (f"at {100 * point['coverage']:.1f}% coverage, {100 * point['accuracy']:.1f}% accurate "
            f"[{100 * point['accuracy_ci_low']:.1f}%, {100 * point['accuracy_ci_high']:.1f}%]") in readme
    for row in record["risk_coverage"]:
        assert f"| {100 * row['coverage']:.1f}% | {row['threshold']:.4f} | {100 * row['accuracy']:.1f}% |" in readme
    noise = record["noise"]
    for strangers in (ood, noise):
        assert (f"AUROC {strangers['auroc']:.4f}" in readme and f"AUROC {strangers['auroc_distance']:.4f}" in readme
                and f"rejects {strangers['rejected_count']} of them ({100 * strangers['rejected']:.1f}%)" in readme)
    assert f"farther than {record['distance']['threshold']:.4f}" in readme and "keeps 95.0% of the validation" in readme
    assert ood["n_images"] == 18 and "scikit-learn digits" in ood["source"]   # as many as the test images
    assert noise["n_images"] == 50 and "uniform noise" in noise["source"]
    # A model of the digits themselves: the card says the check does not apply instead of "never saw".
    own = abstention_lines({**record, "out_of_domain": {**ood, "not_applicable": "the model's classes are the digits"}})
    assert "does not apply to this model: the model's classes are the digits" in "\n".join(own)
    assert sum("never saw" in line for line in own) == 1   # the noise only


@pytest.mark.slow(seconds=10)   # as the first user of the fixture: run together, it is made once
def test_the_card_says_plainly_when_confidence_does_not_tell_strangers_apart(evaluated: dict[str, Any]) -> None:
    record = {**evaluated["first"]["abstention"], "test": None, "threshold": None}
    for auroc, words in ((0.95, "which is good"), (0.6, "which is poor"), (0.3, "higher confidence than real ones")):
        card = {"out_of_domain": {**record["out_of_domain"], "auroc": auroc}}
        text = "\n".join(abstention_lines({**record, **card}))
        assert words in text and "No abstention threshold" in text


def abstention_lines(record: dict[str, Any]) -> list[str]:
    from tasks.handoff.card import abstention_lines as lines
    return lines(record)


# --------------------------------------------------------------------------- the rule in the ONNX metadata


def with_threshold(model: Path, threshold: float) -> Path:
    proto = onnx.load(str(model))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        "abstain_threshold": repr(threshold)})
    onnx.save(proto, str(model))
    return model


def test_predict_abstains_exactly_where_the_metadata_rule_says(tmp_path: Path, capsys) -> None:
    images = consumer_images(tmp_path / "images")
    model = dense_model(tmp_path / "model.onnx")
    # The threshold is exactly one image's top probability, as predict computes it: that image is answered.
    top = dict(zip(images, load_classifier(model).score_files(list(images.values())).max(axis=1)))
    threshold = float(sorted(top.values())[len(top) // 2])
    with_threshold(model, threshold)
    assert predict.main([str(model), *map(str, images.values()), "--json", "--abstain"]) == 0
    results = {Path(r["file"]).stem: r for r in json.loads(capsys.readouterr().out)}
    assert {k: r["unknown"] for k, r in results.items()} == {k: bool(p < threshold) for k, p in top.items()}
    assert 0 < sum(r["unknown"] for r in results.values()) < len(results)   # both answers are exercised
    assert predict.main([str(model), *map(str, images.values()), "--abstain"]) == 0
    table = capsys.readouterr().out.splitlines()
    for line, p in zip(table, top.values(), strict=True):
        assert (f"unknown (p={p:.4f})" in line) == (p < threshold), line

    # The card's onnxruntime-only snippet applies the same rule: the least sure image and the surest.
    script = tmp_path / "snippet.py"
    script.write_text(snippet_from_card(tmp_path))
    (tmp_path / "runner.py").write_text(RUNNER)
    unsure, sure = min(top, key=top.get), max(top, key=top.get)
    for name in (unsure, sure):
        proc = subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), str(script), str(model),
                               str(images[name])], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        first_line = proc.stdout.splitlines()[0]
        assert first_line.startswith("unknown (p=") == (name == unsure), first_line


def test_predict_abstain_names_the_model_and_the_setting_when_the_model_has_no_threshold(tmp_path: Path,
                                                                                          capsys) -> None:
    from tests.conftest import write_image_folder
    image = next(write_image_folder(tmp_path / "raw", classes=1, per_class=1).rglob("*.png"))
    model = dense_model(tmp_path / "model.onnx")
    assert predict.main([str(model), str(image), "--abstain"]) == predict.EXIT_BAD_MODEL
    err = capsys.readouterr().err
    assert str(model) in err and "export.abstain_at_accuracy" in err
    with_threshold(model, 1.5)
    assert predict.main([str(model), str(image)]) == predict.EXIT_BAD_MODEL
    assert "abstain_threshold '1.5' is not a probability" in capsys.readouterr().err
    with_threshold(model, 0.5)
    for value, problem in (("nan", "'nan' is not a finite distance"), ("7", "has no 'feature_distance' output")):
        proto = onnx.load(str(model))
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                            "feature_distance_threshold": value})
        onnx.save(proto, str(model))
        assert predict.main([str(model), str(image)]) == predict.EXIT_BAD_MODEL
        assert problem in capsys.readouterr().err


# --------------------------------------------------------------------------- the choice itself


def test_threshold_for_accuracy_is_the_lowest_cut_that_reaches_the_target() -> None:
    # Confidences high to low with right/wrong: .9 R, .8 R, .8 W, .7 R, .6 W, .5 W
    confidence = np.array([0.5, 0.9, 0.8, 0.7, 0.8, 0.6])
    correct = np.array([False, True, True, True, False, False])
    assert abstention.threshold_for_accuracy(confidence, correct, 0.75) == 0.7     # 3 of 4 answered right
    assert abstention.threshold_for_accuracy(confidence, correct, 0.7) == 0.7
    assert abstention.threshold_for_accuracy(confidence, correct, 0.8) == 0.9      # the tie at .8 goes together
    assert abstention.threshold_for_coverage(confidence, 0.5) == 0.8
    assert abstention.threshold_for_accuracy(confidence, ~np.ones(6, bool), 0.5) is None
    probs = np.stack([confidence, 1 - confidence], axis=1)
    threshold, note = abstention.choose_threshold(probs, np.ones(6, int), 0.5, None)   # class 0 is always wrong
    assert threshold is None and "lower export.abstain_at_accuracy" in note


def test_one_abstention_target_at_most(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("export:\n  abstain_at_accuracy: 0.95\n  abstain_at_coverage: 0.9\n")
    with pytest.raises(ParamsError, match="export.abstain_at_accuracy and export.abstain_at_coverage are both set"):
        load_params(path)
    path.write_text("export:\n  abstain_at_accuracy: 0\n")
    with pytest.raises(ParamsError, match="export.abstain_at_accuracy"):
        load_params(path)


# --------------------------------------------------------------------------- the feature distance


@pytest.fixture(scope="module")
def distant(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """make_project's 18 images split 4 / 1 / 1 per class (train / val / test, so the distance threshold can only
    come from validation), evaluated and exported as the pipeline does. Its resnet18 is untrained: a pretrained
    efficientnet_lite0 without fine-tuning, on 40 to 200 Fashion-MNIST images, did not tell noise from them (AUROC
    0.45 to 0.67), while these features tell the noise from the drawn shapes; the demo measures the real model."""
    root = tmp_path_factory.mktemp("distance")
    params = with_export(make_project(root, per_class=6), abstain_at_accuracy=None, abstain_at_coverage=0.5)
    prepared = Path(params.data.prepared_dir)
    rows = read_split(prepared / "test.csv")   # six per class, class after class
    for split, keep in (("train", lambda i: i % 6 < 4), ("val", lambda i: i % 6 == 4), ("test", lambda i: i % 6 == 5)):
        write_split(prepared / f"{split}.csv", [row for i, row in enumerate(rows) if keep(i)])
    params.export.parity_batch_sizes = [1, 3]
    metrics = evaluate.run(params)
    report = export.run(params)
    noise = root / "noise"
    noise.mkdir()
    raw = Path(params.data.raw_dir)
    return {"params": params, "record": metrics["abstention"], "export": report, "onnx": Path(report["onnx"]),
            "noise": [noise / row.path for row in abstention.write_noise_images(noise)],
            "test": [raw / row.path for row in read_split(prepared / "test.csv")]}


def onnx_outputs(model: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Plain onnxruntime: the top probability and the feature distance of each file, and the metadata."""
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    classifier = load_classifier(model)
    batch = np.stack([classifier.load(f) for f in files])   # predict's pixels: a cut at an image's exact value
    probs, distance = session.run(["probabilities", "feature_distance"], {"input": batch})
    return probs.max(axis=1), distance, meta


def oracle_distance(model: torch.nn.Module, prep: dict, train: list[Path], labels: list[int]):
    """Lee et al.'s distance written out: class means and the pooled covariance of the training features, shrunk
    by 0.01 toward its mean variance; (f - mean)^T inverse (f - mean), nearest class."""
    def features(files: list[Path]) -> np.ndarray:
        kept = []
        hook = model.fc.register_forward_pre_hook(lambda _m, args: kept.append(args[0]))
        with torch.no_grad():
            model(torch.from_numpy(np.stack([oracle_input(f, prep) for f in files])))
        hook.remove()
        return kept[0].double().numpy()
    f, y = features(train), np.array(labels)
    means = np.stack([f[y == c].mean(axis=0) for c in sorted(set(labels))])
    cov = np.cov((f - means[y]).T, bias=True)
    inverse = np.linalg.inv(0.99 * cov + 0.01 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    return lambda files: np.min([np.einsum("nd,de,ne->n", g - m, inverse, g - m)
                                 for g in [features(files)] for m in means], axis=0)


@pytest.mark.slow(seconds=15)   # the module's fixture: evaluate and export
def test_the_onnx_distance_is_fitted_on_train_and_cut_on_validation(distant: dict[str, Any]) -> None:
    params, record = distant["params"], distant["record"]
    model, meta = load_checkpoint(Path(params.train.out_dir) / "model.pt")
    prep = meta["preprocessing"].to_dict()
    split = {s: read_split(Path(params.data.prepared_dir) / f"{s}.csv") for s in ("train", "val")}
    raw = Path(params.data.raw_dir)
    distance = oracle_distance(model, prep, [raw / r.path for r in split["train"]], [r.label for r in split["train"]])
    val = np.sort(distance([raw / r.path for r in split["val"]]))
    # 95% of the 3 validation images kept: the 3rd (ceil(2.85)) smallest distance, the validation split's alone.
    assert record["distance"]["threshold"] == pytest.approx(val[2], rel=1e-4)
    _, onnx_distance, onnx_meta = onnx_outputs(distant["onnx"], distant["test"])
    np.testing.assert_allclose(onnx_distance, distance(distant["test"]), rtol=1e-4)   # the ONNX output is torch's
    assert float(onnx_meta["feature_distance_threshold"]) == record["distance"]["threshold"]
    assert 0 <= distant["export"]["distance_rel_diff"] <= export.DISTANCE_RTOL   # export's own parity check


@pytest.mark.slow(seconds=15)   # the same fixture: the three run together, so it is made once in a serial run
def test_noise_is_rejected_by_its_feature_distance(distant: dict[str, Any], capsys) -> None:
    noise = distant["record"]["noise"]
    assert noise["rejected_count"] == noise["n_images"] == 50 and noise["auroc_distance"] == 1.0
    _, distance, meta = onnx_outputs(distant["onnx"], distant["noise"])
    assert (distance > float(meta["feature_distance_threshold"])).all()   # the distance alone turns each away
    assert predict.main([str(distant["onnx"]), *map(str, distant["noise"]), "--json", "--abstain"]) == 0
    assert all(r["unknown"] for r in json.loads(capsys.readouterr().out))


@pytest.mark.slow(seconds=15)
def test_predict_and_the_snippet_apply_both_thresholds_of_the_metadata(distant: dict[str, Any], tmp_path: Path,
                                                                        capsys) -> None:
    files = distant["test"] + distant["noise"][:10]
    p, d, _ = onnx_outputs(distant["onnx"], files)
    model = tmp_path / "model.onnx"
    model.write_bytes(distant["onnx"].read_bytes())
    # Cut both at an image's own value (that image is answered on that count), so every combination occurs.
    t, dt = float(np.sort(p)[len(p) // 2]), float(np.sort(d)[len(d) // 2])
    proto = onnx.load(str(model))
    onnx.helper.set_model_props(proto, {**{m.key: m.value for m in proto.metadata_props},
                                        "abstain_threshold": repr(t), "feature_distance_threshold": repr(dt)})
    onnx.save(proto, str(model))
    sure, near = p >= t, d <= dt
    assert (sure & ~near).any() and (~sure & near).any() and (sure & near).any()
    assert predict.main([str(model), *map(str, files), "--json", "--abstain"]) == 0
    assert [r["unknown"] for r in json.loads(capsys.readouterr().out)] == list(~(sure & near))
    # The card's onnxruntime-only snippet: an image the distance alone turns away, and one answered.
    script = tmp_path / "snippet.py"
    script.write_text(snippet_from_card(tmp_path))
    (tmp_path / "runner.py").write_text(RUNNER)
    for i, expected in ((int(np.flatnonzero(sure & ~near)[0]), True), (int(np.flatnonzero(sure & near)[0]), False)):
        proc = subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), str(script), str(model),
                               str(files[i])], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("unknown (p=") == expected, proc.stdout


def test_the_digits_check_does_not_apply_to_a_model_of_the_digits(tmp_path: Path) -> None:
    rows = abstention.write_ood_images(tmp_path, 3)
    assert abstention.digits_not_applicable(["t-shirt", "bag"], set(), rows) is None
    assert "ten digits" in abstention.digits_not_applicable([f"digit_{i}" for i in range(10)], set(), rows)
    assert "very digit images" in abstention.digits_not_applicable(["a", "b"], {rows[1].sha256}, rows)
