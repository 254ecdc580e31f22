"""params.yaml schema: every bad setting is named with its dotted key; dvc.yaml only uses known keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import ParamsError, apply_overrides_to_file, load_params, main, schema_keys
from tests.conftest import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.model.arch == "efficientnet_lite0" and params.prepare.bad_files == "skip"


def test_unknown_key_names_path_and_allowed_keys(tmp_path: Path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "train:\n  head:\n    epoch: 3\n"))
    assert "train.head.epoch: unknown key" in str(err.value)
    assert "epochs" in str(err.value) and "lr" in str(err.value)


def test_wrong_type_and_range_name_key_value_and_rule(tmp_path: Path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "train:\n  batch_size: many\n  head:\n    lr: -1\nprepare:\n  bad_files: ignore\n"))
    text = str(err.value)
    assert "train.batch_size = 'many'" in text and "valid integer" in text
    assert "train.head.lr = -1" in text and "greater than 0" in text
    assert "prepare.bad_files = 'ignore'" in text and "'skip' or 'fail'" in text


def test_split_fractions_must_sum_to_one(tmp_path: Path):
    with pytest.raises(ParamsError, match="must be 1.0, got 1.1"):
        load_params(write(tmp_path, "prepare:\n  train: 0.8\n"))


def test_overrides_are_validated_and_typed(tmp_path: Path):
    path = write(tmp_path, "")
    assert load_params(path, ["train.head.epochs=3"]).train.head.epochs == 3
    with pytest.raises(ParamsError, match="train.head.epochs = -3"):
        load_params(path, ["train.head.epochs=-3"])
    with pytest.raises(ParamsError, match="not key=value"):
        load_params(path, ["train.head.epochs"])


def test_apply_overrides_writes_only_valid_values(tmp_path: Path):
    path = write(tmp_path, "train:\n  batch_size: 8\n")
    with pytest.raises(ParamsError):
        apply_overrides_to_file(path, ["train.batch_size=0"])
    assert path.read_text() == "train:\n  batch_size: 8\n"  # untouched
    apply_overrides_to_file(path, ["train.batch_size=16"])
    assert yaml.safe_load(path.read_text()) == {"train": {"batch_size": 16}}


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [unclosed\n"))


def test_cli_exit_code_and_message(tmp_path: Path, capsys):
    assert main([str(write(tmp_path, "model:\n  offline: maybe\n"))]) == 2
    assert "model.offline = 'maybe'" in capsys.readouterr().err


def _dvc_params_entries(dvc_yaml: dict) -> list[str]:
    entries = []
    for stage in dvc_yaml["stages"].values():
        for item in stage.get("params", []):
            entries += list(item) if isinstance(item, dict) else [item]
    return entries


def test_every_dvc_params_entry_exists_in_schema():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    entries = _dvc_params_entries(dvc_yaml)
    assert entries, "dvc.yaml declares no params"
    unknown = [e for e in entries if e not in schema_keys()]
    assert not unknown, f"dvc.yaml params not in the schema: {unknown}"


def test_every_dvc_template_variable_exists_in_schema():
    import re

    text = (REPO_ROOT / "dvc.yaml").read_text()
    variables = set(re.findall(r"\$\{\s*(\w[\w.]*)\s*\}", text))
    assert variables and variables <= schema_keys()
