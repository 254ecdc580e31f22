"""params.yaml schema: every bad setting is named with its dotted key; dvc.yaml only uses known keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.config import Params, ParamsError, apply_overrides_to_file, load_params, main
from tasks.lib.config_support import schema_rows
from tasks.lib.models import check_arch
from tests.conftest import REPO_ROOT, run


def schema_keys(model: type = Params) -> set[str]:
    """Every dotted key the schema knows, sections included: train, train.head, train.head.lr, ..."""
    leaves = [row[0] for row in schema_rows(model)]
    return {".".join(key.split(".")[:n]) for key in leaves for n in range(1, key.count(".") + 2)}


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


def test_the_renamed_cache_dir_says_its_new_name_from_a_file_or_an_override(tmp_path: Path):
    renamed = r"cache\.dir is now called cache\.out_dir .*rename the key"
    with pytest.raises(ParamsError, match=renamed + r".*params\.yaml"):
        load_params(write(tmp_path, "cache:\n  dir: artifacts/decoded\n"))
    with pytest.raises(ParamsError, match=renamed + r".*-S cache\.dir=elsewhere"):
        load_params(REPO_ROOT / "params.yaml", ["cache.dir=elsewhere"])
    assert load_params(REPO_ROOT / "params.yaml").cache.out_dir == Path("artifacts/decoded")


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
    path = write(tmp_path, "{}\n")
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


@pytest.mark.parametrize("text", ["", "\n\n", "# every setting commented out\n# train:\n#   batch_size: 8\n", "---\n"])
def test_a_file_without_settings_is_refused_not_taken_for_the_defaults(tmp_path: Path, text: str):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, text))
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}: has no settings (it is empty or only comments)")
    assert "write {} in it" in str(err.value)
    assert load_params(write(tmp_path, "{}  # every default, on purpose\n")).train.head.epochs == 30


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  head:\n    epochs: 3\n    lr: 0.1\n    epochs: 5\n",
     "line 5: train.head.epochs is set twice (first on line 3)"),
    ("train:\n  batch_size: 8\nprepare:\n  seed: 1\ntrain:\n  seed: 2\n", "line 5: train is set twice (first on line 1)"),
    ("base: &b {a: 1, a: 2}\n", "line 1: base.a is set twice (first on line 1)"),
])
def test_a_key_set_twice_is_refused_naming_the_key_and_lines(tmp_path: Path, text: str, message: str):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, text))
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}, {message}; YAML would silently keep only the last")
    with pytest.raises(ParamsError, match=r"override -S train.head, line 1: train.head.epochs is set twice"):
        load_params(write(tmp_path, "{}\n"), ["train.head={epochs: 1, epochs: 2}"])
    merged = "train:\n  head: &h {epochs: 3, lr: 0.1}\n  finetune:\n    <<: *h\n    epochs: 4\n"
    assert load_params(write(tmp_path, merged)).train.finetune.epochs == 4   # overriding a merge key is meant


@pytest.mark.parametrize(("text", "override", "key", "value"), [
    ('train:\n  head:\n    epochs: "3"\n', [], "train.head.epochs", "'3'"),
    ("train:\n  head:\n    lr: '0.01'\n", [], "train.head.lr", "'0.01'"),
    ("{}\n", ['train.head.epochs="3"'], "train.head.epochs", "'3'"),
    ("{}\n", ["export.parity_batch_sizes=[1, '8']"], "export.parity_batch_sizes", "[1, '8']"),
])
def test_a_quoted_number_is_refused_naming_the_key(tmp_path: Path, text: str, override: list[str], key: str,
                                                    value: str):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, text), override)
    assert f"{key} = {value}: expected a number, got the string " in str(err.value)
    assert "; remove the quotes" in str(err.value)


def test_exponents_without_a_dot_are_numbers_as_dvc_reads_them(tmp_path: Path):
    """PyYAML reads 3e-4 as text; once quoted numbers are refused, it must read it as DVC does: a number."""
    params = load_params(write(tmp_path, "train:\n  weight_decay: 1e-4\n  head:\n    lr: 3E-4\n"),
                         ["train.finetune.lr=5e-5", "export.atol=1.0e-3"])
    assert (params.train.weight_decay, params.train.head.lr, params.train.finetune.lr, params.export.atol) == (
        1e-4, 3e-4, 5e-5, 1e-3)
    path = write(tmp_path, "{}\n")
    apply_overrides_to_file(path, ["train.head.lr=3e-4"])     # what a flow writes for DVC: a number, not '3e-4'
    assert yaml.safe_load(path.read_text()) == {"train": {"head": {"lr": 0.0003}}}


@pytest.mark.slow(seconds=20)
def test_dvc_exp_run_with_a_quoted_number_stops_at_the_first_stage(tmp_path: Path):
    from tests.conftest import init_dvc_repo, write_image_folder

    repo = init_dvc_repo(tmp_path / "repo")
    write_image_folder(repo / "data" / "raw", classes=2, per_class=3, size=12)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)
    proc = run(["dvc", "exp", "run", "--temp", "-S", 'train.head.epochs="3"', "prepare"], repo, check=False)
    assert proc.returncode != 0
    assert "train.head.epochs = '3': expected a number, got the string '3'; remove the quotes" in proc.stderr


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


# --------------------------------------------------------------------------- hardening: values the schema refuses


@pytest.mark.parametrize(("override", "message"), [
    ("train.head.epochs=true", "train.head.epochs = True: expected a number, got a boolean"),
    ("train.batch_size=false", "train.batch_size = False: expected a number, got a boolean"),
    ("train.head.lr=true", "train.head.lr = True: expected a number, got a boolean"),
    ("train.head.lr=.inf", "train.head.lr = inf: Input should be a finite number"),
    ("gate.min_delta=.nan", "gate.min_delta = nan: Input should be a finite number"),
    ("train.seed=-1", "train.seed = -1: Input should be greater than or equal to 0"),
    ("prepare.seed=4294967296", "prepare.seed = 4294967296: Input should be less than or equal to 4294967295"),
    ("export.parity_batch_sizes=[1, 0]", "export.parity_batch_sizes.1 = 0: Input should be greater than or equal to 1"),
    ("registry.uri=' '", "registry.uri = ' ': must name a directory or an fsspec URL"),
    ("schedule.cron=61 3 * * 1", "schedule.cron = '61 3 * * 1': not a cron expression"),
    ("schedule.cron=H 3 * * 1", "random (R) and hashed (H) fields are not supported"),
    ("schedule.timezone=Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
])
def test_bad_values_are_refused_naming_the_key_and_the_override(tmp_path: Path, override: str, message: str):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "{}\n"), [override])
    assert message in str(err.value)
    assert f"(from override -S {override.split('=')[0]}=" in str(err.value)
    assert "params.yaml" not in str(err.value)  # the file is not to blame


def test_seed_bounds_accept_the_full_unsigned_range(tmp_path: Path):
    params = load_params(write(tmp_path, "{}\n"), ["train.seed=4294967295", "prepare.seed=0"])
    assert params.train.seed == 2**32 - 1 and params.prepare.seed == 0


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path: Path):
    path = write(tmp_path, "train:\n  head:\n    epochs: true\n")
    with pytest.raises(ParamsError, match=rf"train.head.epochs = True: .*\(in {path}\)"):
        load_params(path)


def test_weights_none_with_a_pin_names_both_keys(tmp_path: Path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, f"model:\n  weights: none\n  sha256: {'a' * 64}\n"))
    assert "model.sha256 is set but model.weights is none" in str(err.value)


@pytest.mark.parametrize(("value", "message"), [
    ("[1", "the value of train.head.epochs is not valid YAML"),
    ("!!int 3", "YAML tags (!!type, !name) are not allowed"),
    ("!!python/object/apply:os.system ['true']", "YAML tags"),
])
def test_override_values_that_are_not_plain_yaml_name_the_key(tmp_path: Path, value: str, message: str):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "{}\n"), [f"train.head.epochs={value}"])
    assert str(err.value).startswith(f"override -S train.head.epochs={value}: ") and message in str(err.value)


def test_yaml_errors_name_the_file_and_line(tmp_path: Path):
    path = write(tmp_path, "train:\n  batch_size: 8\n  head: [unclosed\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}, line 4, column 1: not valid YAML")
    assert "started at line 3" in str(err.value) and "<unicode string>" not in str(err.value)


@pytest.mark.timeout(20)
def test_a_billion_laughs_document_is_refused_at_once(tmp_path: Path):
    # Inside a free-form option (storage_options is a dict of anything): 9**9 values once expanded,
    # which the lineage record (params.model_dump) would walk for ever.
    lines = ["registry:", "  storage_options:", '    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    with pytest.raises(ParamsError, match="expands to more than 10000 values"):
        load_params(write(tmp_path, "\n".join(lines) + "\n"))
    with pytest.raises(ParamsError, match="override -S train.head.epochs: nested more than 50 levels"):
        load_params(write(tmp_path, "{}\n"), ["train.head.epochs=" + "[" * 60 + "]" * 60])
    # Deep enough to exhaust the YAML parser's recursion: still the key and what to do, no RecursionError.
    with pytest.raises(ParamsError, match="override -S train.head.epochs: the value nests too deeply"):
        load_params(write(tmp_path, "{}\n"), ["train.head.epochs=" + "[" * 2000])


def test_model_arch_is_checked_when_asked_and_the_schema_import_stays_torch_free(tmp_path: Path):
    path = write(tmp_path, "model:\n  arch: resnet19\n")
    assert load_params(path).model.arch == "resnet19"  # readers that build no model do not pay for torchvision
    with pytest.raises(ValueError, match="model.arch 'resnet19' is not a torchvision"):
        check_arch(load_params(path).model.arch)   # what a command that builds a model, or a flow's check, calls
    check_arch(load_params(write(tmp_path, "model:\n  arch: resnet18\n")).model.arch)
    proc = run([sys.executable, "-c", "import sys, tasks.lib.config as c; c.load_params(sys.argv[1]); "
                "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))", str(path)], REPO_ROOT)
    assert proc.stdout.strip() == "[]"


def test_schema_prints_a_readable_table_and_json_on_request(capsys):
    assert main(["--schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["key", "type"]
    row = next(line for line in lines if line.startswith("train.head.epochs "))
    assert row.split()[:4] == ["train.head.epochs", "int,", ">=", "0"] and "Epochs of phase 1" in row
    assert any(line.startswith("prepare.bad_files") and "skip | fail" in line for line in lines)
    assert len(lines) < 150
    assert main(["--schema", "--json"]) == 0
    assert "properties" in json.loads(capsys.readouterr().out)
