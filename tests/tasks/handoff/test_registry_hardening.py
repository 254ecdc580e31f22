"""The registry under attack: a deleted production file, an unreadable log, damaged records, tampered versions,
concurrent promotions, and the command line's output (compact list, closed pipes, control characters).

The promotion log itself (kills after a move, migration, races on S3) is tested in test_registry_log."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.handoff import registry_cli
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import Registry, RegistryError, new_version_id, open_registry
from tasks.lib.io import sha256_bytes
from tests.conftest import REPO_ROOT, VENV_BIN, run
from tests.tasks.handoff.test_publish import CLASSES, make_params, make_project, set_candidate

REQUIRED_LINEAGE = {"data_hash": "d" * 32, "git_commit": "c" * 40, "git_dirty": False, "params": {"x": 1},
                    "params_sha256": "p" * 64, "packages": {"onnx": "1"}, "weights_sha256": "w" * 64,
                    "test_split_sha256": "t" * 64, "flow_run_id": None}


def fake_version(reg: Registry, n: int, *, classes: list[str] = CLASSES, promoted: bool = False,
                 decision: bytes | None = None) -> str:
    """A complete, verifiable version written straight into the registry (no model behind it)."""
    onnx = f"model {n}".encode()
    version = new_version_id(sha256_bytes(onnx), dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=n))
    lineage = {**REQUIRED_LINEAGE, "onnx_sha256": sha256_bytes(onnx)}
    reg.write_version(version, {
        "model.onnx": onnx, "README.md": f"# m {version}\n".encode(),
        "card.json": json.dumps({"classes": classes, "version": version}).encode(),
        "metrics.json": json.dumps({"accuracy": 0.5 + n / 100, "macro_f1": 0.5 + n / 100, "ece": 0.1}).encode(),
        "export_report.json": b"{}", "lineage.json": json.dumps(lineage).encode(),
        "decision.json": decision or json.dumps({"passed": promoted, "promoted": promoted,
                                                 "reason": "bootstrap" if promoted else "no improvement"}).encode(),
    })
    return version


def local_registry(tmp_path: Path) -> list[str]:
    """Command-line arguments for the registry `m` under tmp_path/reg (the repo's params.yaml for the rest)."""
    return ["--params", str(REPO_ROOT / "params.yaml"), "-S", f"registry.uri={tmp_path / 'reg'}",
            "-S", "project.name=m"]


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "registry"), *args], root, check=False)


@pytest.fixture
def project(tmp_path: Path):
    params = make_params()
    return make_project(tmp_path / "proj", params), params


def publish(root: Path, params, tag: str, macro_f1: float) -> dict:
    set_candidate(root, tag=tag, macro_f1=macro_f1)
    return publish_candidate(params, root, f"run-{tag}")


def pointer_file(root: Path, params) -> Path:
    return root / "registry" / params.project.name / "production"


# --------------------------------------------------------------------------- 1: no bootstrap while production is unknown


def test_bootstrap_still_works_when_no_version_was_ever_promoted(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    fake_version(reg, 1, promoted=False)
    assert reg.pointer() is None and reg.production() is None


def test_every_move_is_in_the_log_and_the_production_file_is_not_needed(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)["registry_version"]
    v2 = publish(root, params, "v2", 0.70)["registry_version"]       # refused by the gate ...
    reg = open_registry(params, root)
    reg.promote(v2, "a person chose it")                               # ... and promoted by hand
    reg.rollback("back to v1")
    assert [(e["action"], e["version"]) for e in reg.pointer()["events"]] == [
        ("promote", v1), ("promote", v2), ("rollback", v1)]
    pointer_file(root, params).unlink()
    assert reg.production() == v1                                      # the last move, not the newest version
    worse = publish(root, params, "worse", 0.10)
    assert worse["promoted"] is False and reg.production() == v1      # never a bootstrap


# --------------------------------------------------------------------------- 5: one damaged file


@pytest.mark.slow
def test_an_unreadable_log_is_reported_by_every_command_and_the_rest_keeps_working(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)["registry_version"]
    v2 = publish(root, params, "v2", 0.70)["registry_version"]
    entries = sorted((root / "registry" / params.project.name / "promotion-log").glob("*.json"))
    for entry in entries:
        entry.write_text("{not json")
    named = f"registry/{params.project.name}/promotion-log"  # as the command names it: registry.uri is relative

    listing = cli(root, "list")
    assert listing.returncode == 1 and v1 in listing.stdout and v2 in listing.stdout
    assert named in listing.stderr and "restore" in listing.stderr
    assert "JSONDecodeError" not in listing.stderr + listing.stdout
    shown = cli(root, "show", v1)
    assert shown.returncode == 0 and shown.stdout.startswith(f"# {params.project.name} {v1}")
    assert cli(root, "verify", v2).returncode == 0
    for args in (["rollback"], ["promote", v2], ["verify"], ["show"], ["repair"]):
        failed = cli(root, *args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, args
        assert named in failed.stderr and "restore the entries" in failed.stderr, args
    set_candidate(root, tag="v3", macro_f1=0.95)
    published = cli(root, "publish")
    assert published.returncode == 1 and named in published.stderr   # never a first model
    assert sorted(entries[0].parent.glob("*.json")) == entries and entries[-1].read_text() == "{not json"


def test_one_damaged_version_does_not_break_list_or_show(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    good = fake_version(reg, 1, promoted=True)
    bad = fake_version(reg, 2)
    reg.promote(good, "first")
    (tmp_path / "reg/m" / bad / "metrics.json").write_text("{oops")
    (tmp_path / "reg/m" / bad / "card.json").write_text("[")
    rows, problems = registry_cli.summaries(reg)
    assert problems == []
    assert [r["version"] for r in rows] == [good, bad]
    assert rows[0]["damaged"] == [] and rows[0]["production"] is True
    assert any("metrics.json" in d for d in rows[1]["damaged"])

    code = registry_cli.main([*local_registry(tmp_path), "list"])
    out, err = capsys.readouterr()
    assert code == 1 and good in out and "DAMAGED" in out.splitlines()[2]
    assert f"{tmp_path}/reg/m/{bad}/metrics.json" in err and "not valid JSON" in err
    code = registry_cli.main([*local_registry(tmp_path), "show", bad, "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["card"] is None and f"{bad}/card.json" in err


# --------------------------------------------------------------------------- 6: a tampered target


def test_rollback_refuses_a_tampered_version(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1, v2 = fake_version(reg, 1, promoted=True), fake_version(reg, 2)
    reg.promote(v1, "first")
    reg.promote(v2, "second")
    (tmp_path / "reg/m" / v1 / "model.onnx").write_bytes(b"evil")
    with pytest.raises(RegistryError, match=f"cannot roll back to {v1}: model.onnx sha256"):
        reg.rollback()
    assert reg.production() == v2


# --------------------------------------------------------------------------- promote: no-op, classes, concurrency


def test_promoting_production_again_is_a_no_op(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1 = fake_version(reg, 1, promoted=True)
    reg.promote(v1, "first")
    events = reg.pointer()["events"]
    args = [*local_registry(tmp_path), "promote", v1]
    assert registry_cli.main(args) == 0
    assert f"{v1} is already production; nothing changed" in capsys.readouterr().out
    assert reg.pointer()["events"] == events


def test_promote_refuses_other_class_names_unless_forced(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1 = fake_version(reg, 1, promoted=True)
    other = fake_version(reg, 2, classes=["cat", "dog"])
    reg.promote(v1, "first")
    args = [*local_registry(tmp_path), "promote", other]
    assert registry_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "class names differ from production" in err and "--force" in err and "project.name" in err
    assert reg.production() == v1
    assert registry_cli.main([*args, "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: class names differ" in captured.err and reg.production() == other


CONCURRENT = """
import sys, time
from pathlib import Path
from tasks.handoff.registry_cli import main
while not Path(sys.argv[1]).exists():
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_ten_concurrent_promotes_are_all_recorded(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    versions = [fake_version(reg, n) for n in range(10)]
    go = tmp_path / "go"
    (tmp_path / "params.yaml").write_text("{}\n")  # every default
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(go), "-S", f"registry.uri={tmp_path / 'reg'}",
                               "-S", "project.name=m", "promote", v, "--force"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    time.sleep(3)  # every process has imported and waits on the start line
    go.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    pointer = reg.pointer()
    assert sorted(e["version"] for e in pointer["events"]) == versions
    assert len(pointer["previous"]) == 9 and set([*pointer["previous"], pointer["version"]]) == set(versions)


# --------------------------------------------------------------------------- the command line's output


def test_list_is_a_compact_table_and_json_has_everything(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    versions = [fake_version(reg, n) for n in range(3)]
    reg.promote(versions[0], "first")
    reg.promote(versions[1], "second")
    args = [*local_registry(tmp_path), "list"]
    assert registry_cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[:3] == ["version", "data", "accuracy"]
    assert "PROD" in lines[2] and "prev" in lines[1]
    assert registry_cli.main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["production"] is True and rows[1]["data_hash"] == "d" * 32 and rows[0]["on_rollback_stack"]


def test_show_into_a_closed_pipe_exits_quietly(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1 = fake_version(reg, 1, promoted=True)
    reg.promote(v1, "first")
    (tmp_path / "reg/m" / v1 / "README.md").write_text("line\n" * 200_000)  # more than a pipe holds
    (tmp_path / "params.yaml").write_text("{}\n")  # every default
    proc = subprocess.Popen([str(VENV_BIN / "registry"), "-S", f"registry.uri={tmp_path / 'reg'}",
                             "-S", "project.name=m", "show", v1], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    assert proc.wait(timeout=60) == 141
    assert b"Traceback" not in proc.stderr.read()


def test_show_escapes_control_characters(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1 = fake_version(reg, 1, classes=["\x1b[31mred", "ok"], promoted=True)
    (tmp_path / "reg/m" / v1 / "README.md").write_text("# card\nclass \x1b[2J\u202etxt.exe\n")
    args = [*local_registry(tmp_path), "show", v1]
    registry_cli.main(args)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[2J" in out and "\\u202e" in out


def test_registry_writes_on_a_full_disk_name_the_path(tmp_path: Path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        reg = Registry(str(mount_point / "reg"), "m")
        with pytest.raises(RegistryError) as err:
            reg.write_version(new_version_id("ab" * 32), {"model.onnx": b"x" * 200_000})
        assert str(mount_point / "reg" / "m") in str(err.value) and "the disk is full" in str(err.value)
        assert reg.versions() == [] and not list((mount_point / "reg" / "m").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
