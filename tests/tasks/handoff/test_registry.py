"""The registry: all-or-nothing versions, production always readable, promote/rollback/verify, the CLI, and S3."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tasks.handoff.registry as registry_module
import tasks.handoff.registry_files as registry_files
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import Registry, RegistryError, new_version_id, open_registry
from tests.conftest import VENV_BIN, run
from tests.tasks.handoff.test_publish import make_params, make_project, set_candidate

FILES = {name: f"{name} bytes".encode() for name in registry_module.VERSION_FILES} | {
    "decision.json": b'{"passed": false, "promoted": false}'}


def publish(root: Path, params, tag: str, macro_f1: float) -> str:
    set_candidate(root, tag=tag, macro_f1=macro_f1)
    return publish_candidate(params, root, f"run-{tag}")["registry_version"]


@pytest.fixture
def project(tmp_path: Path):
    params = make_params()
    return make_project(tmp_path / "proj", params), params


def test_version_ids_sort_by_time_and_are_unique():
    import datetime as dt

    early = dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt.UTC)
    assert new_version_id("ab" * 32, early) == "20260102T030405.006Z-abababab"
    later = new_version_id("00" * 32, early + dt.timedelta(milliseconds=1))
    assert sorted([later, new_version_id("ff" * 32, early)]) == [new_version_id("ff" * 32, early), later]


def test_versions_are_immutable_and_half_written_ones_invisible(tmp_path: Path, monkeypatch):
    reg = Registry(str(tmp_path / "reg"), "m")
    version = new_version_id("12" * 32)
    reg.write_version(version, FILES)
    assert reg.versions() == [version]
    with pytest.raises(RegistryError, match="already exists; versions are immutable"):
        reg.write_version(version, FILES)

    def explode(stage: str) -> None:
        if stage == "version_files_written":
            raise OSError("disk full")

    monkeypatch.setattr(registry_files, "CRASH_HOOK", explode)
    with pytest.raises(OSError, match="disk full"):
        reg.write_version(new_version_id("34" * 32), FILES)
    assert reg.versions() == [version]
    assert sorted(p.name for p in (tmp_path / "reg/m").iterdir()) == [version]  # the temp folder is gone too


def test_promote_rollback_and_their_history(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)
    v2 = publish(root, params, "v2", 0.85)
    v3 = publish(root, params, "v3", 0.84)  # not promoted by the gate
    reg = open_registry(params, root)
    assert reg.production() == v2

    reg.promote(v3, "hotfix approved by a person")
    assert reg.production() == v3 and reg.pointer()["previous"] == [v1, v2]
    reg.rollback()
    assert reg.production() == v2
    reg.rollback("bad week")
    assert reg.production() == v1
    with pytest.raises(RegistryError, match="no earlier production version"):
        reg.rollback()
    events = reg.pointer()["events"]
    assert [(e["action"], e["from"], e["version"]) for e in events] == [
        ("promote", None, v1), ("promote", v1, v2), ("promote", v2, v3), ("rollback", v3, v2), ("rollback", v2, v1)]
    assert events[-1]["reason"] == "bad week"
    assert reg.promote(v1, "again")["seq"] == events[-1]["seq"]  # already production: nothing changes
    assert reg.pointer()["events"] == events
    with pytest.raises(RegistryError, match="no such complete version"):
        reg.promote("20990101T000000.000Z-deadbeef", "typo")


def test_promote_refuses_a_stale_gate_decision(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)
    v2 = publish(root, params, "v2", 0.70)
    reg = open_registry(params, root)
    with pytest.raises(RegistryError, match=f"production moved from None to {v1}"):
        reg.promote(v2, "gate passed earlier", expected=None)
    assert reg.production() == v1


def test_verify_detects_a_tampered_onnx_file_and_promote_refuses_it(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)
    v2 = publish(root, params, "v2", 0.70)
    reg = open_registry(params, root)
    assert reg.verify(v2) == []
    onnx_file = root / "registry" / params.project.name / v2 / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\0")
    problems = reg.verify(v2)
    assert any(p.startswith("model.onnx sha256") for p in problems)
    assert "model.onnx sha256 does not match lineage.onnx_sha256" in problems
    with pytest.raises(RegistryError, match=f"cannot promote {v2}: model.onnx sha256"):
        reg.promote(v2, "manual")
    assert reg.production() == v1


def test_a_version_without_complete_lineage_cannot_be_promoted(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    version = new_version_id("56" * 32)
    reg.write_version(version, {**FILES, "lineage.json": json.dumps({"git_commit": "abc"}).encode()})
    with pytest.raises(RegistryError, match="lineage incomplete: missing data_hash, git_dirty"):
        reg.promote(version, "manual")
    assert reg.pointer() is None


def test_production_and_its_file_are_always_readable_while_it_moves(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)
    v2 = publish(root, params, "v2", 0.90)
    reg, watcher = open_registry(params, root), open_registry(params, root)
    pointer_file = root / "registry" / params.project.name / "production"
    seen: set[str | None] = set()
    stop = threading.Event()

    def read_forever() -> None:
        while not stop.is_set():
            seen.add(json.loads(pointer_file.read_text())["version"])  # raises on a torn or missing file
            seen.add(watcher.production())

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for _ in range(20):
            reg.rollback()
            reg.promote(v2, "again")
    finally:
        stop.set()
        reader.join()
    assert seen <= {v1, v2} and reg.production() == v2


@pytest.mark.slow
def test_command_line_list_show_promote_rollback_verify(project):
    root, params = project
    v1 = publish(root, params, "v1", 0.80)
    v2 = publish(root, params, "v2", 0.79)
    registry_cli = [str(VENV_BIN / "registry")]

    listing = run(registry_cli + ["list"], root).stdout
    assert listing.splitlines()[0].split()[:4] == ["version", "data", "accuracy", "macro_f1"]
    assert "PROD" in listing.splitlines()[1] and "0.7900" in listing and "no improvement" in listing
    rows = json.loads(run(registry_cli + ["list", "--json"], root).stdout)
    assert [(r["version"], r["production"]) for r in rows] == [(v1, True), (v2, False)]
    assert run(registry_cli + ["show"], root).stdout.startswith(f"# {params.project.name} {v1}")
    shown = json.loads(run([sys.executable, "-m", "tasks.handoff.registry_cli", "show", v2, "--json"], root).stdout)
    assert shown["decision"]["reason"] == "no improvement" and shown["card"]["version"] == v2

    assert f"production is now {v2} (was {v1})" in run(registry_cli + ["promote", v2], root).stdout
    assert f"rolled back production to {v1}" in run(registry_cli + ["rollback"], root).stdout
    assert "ok (every file matches" in run(registry_cli + ["verify", v2], root).stdout

    (root / "registry" / params.project.name / v2 / "lineage.json").write_text("{}")
    failed = run(registry_cli + ["verify", v2], root, check=False)
    assert failed.returncode == 1 and "lineage.json sha256" in failed.stdout
    bad = run(registry_cli + ["promote", "nope"], root, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "registry list" in bad.stderr

    set_candidate(root, tag="v3", macro_f1=0.95)
    published = json.loads(run(registry_cli + ["publish", "--flow-run-id", "by-hand"], root).stdout)
    assert published["promoted"] is True and published["model_card"].endswith("/README.md")
    reg = open_registry(params, root)
    assert reg.read_json(published["registry_version"], "lineage.json")["flow_run_id"] == "by-hand"


# --------------------------------------------------------------------------- S3 (moto_server)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_endpoint(tmp_path: Path, monkeypatch):
    """A real S3 API: moto_server on 127.0.0.1, stopped by PID afterwards."""
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()}") from None
                time.sleep(0.2)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        endpoint = f"http://127.0.0.1:{port}"
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("models-bucket")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_the_same_registry_on_s3(tmp_path: Path, s3_endpoint: str, monkeypatch):
    params = make_params(uri="s3://models-bucket/registry", storage_options={"endpoint_url": s3_endpoint})
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="v1", macro_f1=0.8)
    first = publish_candidate(params, root, "run-1")
    v1 = first["registry_version"]
    assert first["promoted"] is True
    assert first["model_card"] == f"s3://models-bucket/registry/{params.project.name}/{v1}/README.md"
    v2 = publish(root, params, "v2", 0.9)
    reg = open_registry(params, root)
    assert reg.versions() == [v1, v2] and reg.production() == v2
    assert reg.verify(v2) == [] and reg.read_json(v2, "decision.json")["production_version"] == v1

    # A crash before COMPLETE leaves the objects there but the version invisible.
    set_candidate(root, tag="v3", macro_f1=0.95)
    monkeypatch.setattr(registry_files, "CRASH_HOOK",
                        lambda stage: (_ for _ in ()).throw(OSError("lost connection"))
                        if stage == "version_files_written" else None)
    with pytest.raises(OSError, match="lost connection"):
        publish_candidate(params, root, "run-3")
    monkeypatch.setattr(registry_files, "CRASH_HOOK", None)
    assert reg.versions() == [v1, v2] and reg.production() == v2

    reg.rollback()
    assert open_registry(params, root).production() == v1
    reg.fs.pipe_file(f"{reg.root}/{v2}/model.onnx", b"tampered")
    assert any("model.onnx sha256" in p for p in reg.verify(v2))

    # The command line reaches the same store through params overrides.
    listed = run([str(VENV_BIN / "registry"), "-S", "registry.uri=s3://models-bucket/registry",
                  "-S", f"registry.storage_options={{endpoint_url: {s3_endpoint}}}", "list", "--json"], root).stdout
    assert [(r["version"], r["production"]) for r in json.loads(listed)] == [(v1, True), (v2, False)]
