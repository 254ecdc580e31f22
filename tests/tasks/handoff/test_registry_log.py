"""Production is the newest complete entry of the promotion log: one atomic step moves it and records it.

Kills right after a move, a failed log write, a first publish that crashed, decision records that say
"promoted", a damaged or stale `production` file, and registries written before the log (migration).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tasks.handoff.registry_files as registry_files
from tasks.handoff import registry_cli
from tasks.handoff.publish import publish_candidate
from tasks.handoff.registry import Registry, RegistryError, open_registry
from tests.conftest import REPO_ROOT
from tests.tasks.handoff.test_publish import CRASH_SCRIPT, make_params, make_project, set_candidate
from tests.tasks.handoff.test_registry import s3_endpoint  # noqa: F401 - the moto_server fixture
from tests.tasks.handoff.test_registry_hardening import cli, fake_version, local_registry


def moved_to(reg: Registry) -> list[str]:
    return [entry["version"] for entry in reg.pointer()["events"]]


# --------------------------------------------------------------------------- one record


def test_a_decision_record_that_says_promoted_does_not_make_production(tmp_path: Path):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1, v2 = fake_version(reg, 1, promoted=True), fake_version(reg, 2, promoted=True)
    assert reg.production() is None and reg.pointer() is None   # no move was ever made: a first model
    reg.promote(v1, "first")
    assert reg.production() == v1 and moved_to(reg) == [v1]
    assert v2 not in moved_to(reg)


@pytest.mark.slow(seconds=8)
def test_a_crash_in_the_very_first_publish_does_not_block_later_publishes(tmp_path: Path):
    params = make_params()
    root = make_project(tmp_path / "proj", params)
    set_candidate(root, tag="v1", macro_f1=0.8)
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, "version_committed"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reg = open_registry(params, root)
    [crashed] = reg.versions()
    assert reg.production() is None   # its decision says promoted, but production never moved

    result = publish_candidate(params, root, None)
    assert result["promoted"] is True and result["registry_version"] == crashed == reg.production()


@pytest.mark.slow(seconds=25)
@pytest.mark.parametrize("stage", ["production_log_write", "production_logged"])
def test_sigkill_as_a_publish_moves_production_leaves_a_consistent_registry(tmp_path: Path, stage: str):
    params = make_params()
    root = make_project(tmp_path / "proj", params)
    v1 = publish_candidate_tagged(root, params, "v1", 0.80)["registry_version"]
    set_candidate(root, tag="v2", macro_f1=0.90)
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, stage], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reg = open_registry(params, root)
    v2 = reg.versions()[-1]
    if stage == "production_log_write":   # killed before the move: nothing moved, nothing to repair
        assert reg.production() == v1 and moved_to(reg) == [v1] and reg.production_problems() == []
    else:   # killed right after the move: it is recorded; only the cache for outside readers is behind
        assert reg.production() == v2 and moved_to(reg) == [v1, v2]
        [stale] = reg.production_problems()
        assert "/production: does not say what the promotion log says" in stale and "registry repair" in stale
        assert reg.repair()["version"] == v2 and reg.production_problems() == []
    again = publish_candidate(params, root, None)   # a rerun finishes the job, if any, without a new version
    assert again["registry_version"] == v2 == reg.production() and moved_to(reg) == [v1, v2]
    assert reg.versions() == [v1, v2] and reg.production_problems() == []


KILL_AFTER_THE_MOVE = """
import os, signal, sys
from tasks.handoff.registry import Registry

uri, action, version = sys.argv[1:4]
before = Registry(uri, "m").production()
checking = False


def kill_once_production_moved(real):
    def call(*args, **kwargs):
        global checking
        result = real(*args, **kwargs)
        if not checking:   # the check below reads the registry; it must not recurse into itself
            checking = True
            if Registry(uri, "m").production() != before:
                os.kill(os.getpid(), signal.SIGKILL)
            checking = False
        return result
    return call


os.replace, os.rename, os.link = (kill_once_production_moved(f) for f in (os.replace, os.rename, os.link))
reg = Registry(uri, "m")
reg.promote(version, "killed right after", force=True) if action == "promote" else reg.rollback("killed right after")
sys.exit(3)   # not reached: the move kills the process
"""


@pytest.mark.slow(seconds=10)
def test_a_kill_right_after_each_move_leaves_it_recorded_and_repair_keeps_it(tmp_path: Path):
    uri = str(tmp_path / "reg")
    reg = Registry(uri, "m")
    v1, v2, v3 = (fake_version(reg, n) for n in (1, 2, 3))
    reg.promote(v1, "first")
    for action, version in (("promote", v2), ("promote", v3), ("rollback", "")):
        proc = subprocess.run([sys.executable, "-c", KILL_AFTER_THE_MOVE, uri, action, version], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert reg.production() == v2 and moved_to(reg) == [v1, v2, v3, v2]   # every move is on record
    assert reg.pointer()["previous"] == [v1]

    (tmp_path / "params.yaml").write_text("{}\n")  # every default
    (tmp_path / "reg/m/production").unlink(missing_ok=True)   # the file outside readers use: lost
    repaired = cli(tmp_path, *local_registry(tmp_path)[2:], "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert reg.production() == v2 and moved_to(reg) == [v1, v2, v3, v2]   # never an older version
    assert json.loads((tmp_path / "reg/m/production").read_text())["version"] == v2


def test_a_failed_log_write_does_not_move_production_and_says_so(tmp_path: Path, monkeypatch, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1, v2 = fake_version(reg, 1), fake_version(reg, 2)
    reg.promote(v1, "first")

    def full_disk(stage: str) -> None:
        if stage == "production_log_write":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_files, "CRASH_HOOK", full_disk)
    assert registry_cli.main([*local_registry(tmp_path), "promote", v2]) == 1
    err = capsys.readouterr().err
    assert "production was not moved" in err and "disk is full" in err and f"{tmp_path}/reg/m" in err
    monkeypatch.setattr(registry_files, "CRASH_HOOK", None)
    assert reg.production() == v1 and moved_to(reg) == [v1]


# --------------------------------------------------------------------------- the production file is a cache


@pytest.mark.slow(seconds=12)
def test_the_production_file_is_only_a_cache_of_the_log(project_registry):
    root, params, v1, v2 = project_registry
    cache = root / "registry" / params.project.name / "production"
    reg = open_registry(params, root)
    assert json.loads(cache.read_text())["version"] == v2

    cache.unlink()   # deleting it changes nothing: a worse model is not a first model
    worse = publish_candidate_tagged(root, params, "worse", 0.10)
    assert worse["promoted"] is False and worse["reason"] == "no improvement" and reg.production() == v2

    cache.write_text('{"version": "20')   # neither does damaging it, nor pointing it elsewhere
    assert reg.production() == v2 and reg.pointer()["previous"] == [v1]
    listing = cli(root, "list")
    assert listing.returncode == 1 and "PROD" in listing.stdout
    assert "production" in listing.stderr and "registry repair" in listing.stderr
    assert cli(root, "rollback").returncode == 0 and reg.production() == v1
    assert json.loads(cache.read_text())["version"] == v1   # every move rewrites it

    cache.write_text(json.dumps({"version": v2}))
    assert reg.production() == v1
    repaired = cli(root, "repair")
    assert repaired.returncode == 0 and f"production is {v1}" in repaired.stdout
    assert json.loads(cache.read_text())["version"] == v1
    again = cli(root, "repair")
    assert again.returncode == 0 and "nothing to repair" in again.stdout
    assert cli(root, "list").returncode == 0


@pytest.fixture
def project_registry(tmp_path: Path):
    params = make_params()
    root = make_project(tmp_path / "proj", params)
    v1 = publish_candidate_tagged(root, params, "v1", 0.80)["registry_version"]
    v2 = publish_candidate_tagged(root, params, "v2", 0.90)["registry_version"]
    return root, params, v1, v2


def publish_candidate_tagged(root: Path, params, tag: str, macro_f1: float) -> dict:
    set_candidate(root, tag=tag, macro_f1=macro_f1)
    return publish_candidate(params, root, f"run-{tag}")


def test_a_damaged_newest_entry_is_not_production_and_list_names_it(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1, v2 = fake_version(reg, 1), fake_version(reg, 2)
    reg.promote(v1, "first")
    reg.promote(v2, "second")
    newest = sorted((tmp_path / "reg/m/promotion-log").glob("*.json"))[-1]
    newest.write_text('{"version": "' + v2)   # e.g. edited by hand
    assert reg.production() == v1 and moved_to(reg) == [v1]
    assert registry_cli.main([*local_registry(tmp_path), "list"]) == 1
    assert str(newest) in capsys.readouterr().err
    reg.promote(v2, "again")   # the next move goes after it, never over it
    assert reg.production() == v2 and moved_to(reg) == [v1, v2]


def test_list_reports_a_production_version_that_is_missing(tmp_path: Path, capsys):
    reg = Registry(str(tmp_path / "reg"), "m")
    v1, v2 = fake_version(reg, 1), fake_version(reg, 2)
    reg.promote(v1, "first")
    reg.promote(v2, "second")
    for path in sorted((tmp_path / "reg/m" / v2).iterdir()):
        path.unlink()
    (tmp_path / "reg/m" / v2).rmdir()
    assert registry_cli.main([*local_registry(tmp_path), "list"]) == 1
    out, err = capsys.readouterr()
    assert v1 in out and "PROD" not in out
    assert f"production is {v2}" in err and "not a complete version" in err and "registry rollback" in err
    assert registry_cli.main([*local_registry(tmp_path), "rollback"]) == 0 and reg.production() == v1


def test_a_writer_that_loses_the_race_for_an_entry_decides_again(tmp_path: Path):
    reg, other = Registry(str(tmp_path / "reg"), "m"), Registry(str(tmp_path / "reg"), "m")
    v1, v2, v3 = (fake_version(reg, n) for n in (1, 2, 3))
    reg.promote(v1, "first")
    interfere_once(reg, lambda: other.promote(v2, "other writer"))
    reg.promote(v3, "this writer")
    assert [(e["from"], e["version"]) for e in reg.pointer()["events"]] == [(None, v1), (v1, v2), (v2, v3)]
    assert reg.pointer()["previous"] == [v1, v2]

    interfere_once(reg, lambda: other.promote(v1, "other writer"))
    with pytest.raises(RegistryError, match=f"production moved from {v3} to {v1}"):
        reg.promote(v2, "gated against v3", expected=v3)   # a gate decision made against v3 is stale now
    assert reg.production() == v1


def interfere_once(reg: Registry, other_move) -> None:
    """Another writer moves production after `reg` read the log and before it writes its entry."""
    create = reg.log.create

    def create_after_the_other(seq: int, entry: dict) -> bool:
        reg.log.create = create
        other_move()
        return create(seq, entry)

    reg.log.create = create_after_the_other


# --------------------------------------------------------------------------- registries written before the log


def write_old_format(reg: Registry, production: str | None, previous: list[str], records: list[str],
                     pointer: bytes | None = None) -> None:
    """A registry as the code before the promotion log left it: a `production` pointer and `promotions/` records."""
    events = [{"at": "2026-01-01T00:00:00+00:00", "action": "promote", "from": None, "to": v, "reason": "old"}
              for v in [*previous, production] if v]
    if pointer is None and production is not None:
        pointer = json.dumps({"model": "m", "version": production, "updated_at": "2026-01-01T00:00:00+00:00",
                              "reason": "old", "previous": previous, "events": events}).encode()
    reg.fs.makedirs(f"{reg.root}/promotions", exist_ok=True)
    if pointer is not None:
        reg.fs.pipe_file(f"{reg.root}/production", pointer)
    for n, version in enumerate(records):
        record = {"at": "2026-01-01T00:00:00+00:00", "action": "promote", "version": version, "reason": "old"}
        reg.fs.pipe_file(f"{reg.root}/promotions/{n:020d}-{n:08x}.json", json.dumps(record).encode())


def test_an_old_registry_is_migrated_once_on_first_open(tmp_path: Path):
    writer = Registry(str(tmp_path / "reg"), "m")
    v1, v2, v3 = (fake_version(writer, n, promoted=True) for n in (1, 2, 3))
    write_old_format(writer, v2, [v1], records=[v1])   # the move to v2 was killed before its record
    readers = [Registry(str(tmp_path / "reg"), "m") for _ in range(6)]
    start, seen = threading.Barrier(len(readers)), []

    def open_it(reader: Registry) -> None:
        start.wait()
        seen.append(reader.production())

    threads = [threading.Thread(target=open_it, args=(reader,)) for reader in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [v2] * len(readers)
    [entry] = writer.pointer()["events"]   # one migration entry, whoever opened it first
    assert entry["action"] == "migrate" and entry["version"] == v2 and entry["previous"] == [v1]
    assert [e["to"] for e in entry["history"]] == [v1, v2]   # the old event log is kept
    (tmp_path / "reg/m/production").unlink()
    assert writer.production() == v2
    writer.rollback("after the migration")
    assert writer.production() == v1 and moved_to(writer) == [v2, v1]


def test_old_registries_without_a_readable_pointer(tmp_path: Path):
    lost = Registry(str(tmp_path / "lost"), "m")
    v1, v2 = fake_version(lost, 1, promoted=True), fake_version(lost, 2, promoted=True)
    write_old_format(lost, None, [], records=[v2, v1])   # the pointer was lost; its records say where it was
    assert lost.production() == v1 and lost.pointer()["previous"] == [v2]

    damaged = Registry(str(tmp_path / "damaged"), "m")
    fake_version(damaged, 1, promoted=True)
    write_old_format(damaged, None, [], records=[], pointer=b"{not json")
    with pytest.raises(RegistryError, match="production.*not valid JSON.*registry promote"):
        damaged.production()   # never a first model
    assert not (tmp_path / "damaged/m/promotion-log").exists()


# --------------------------------------------------------------------------- S3 (moto_server)


@pytest.mark.slow(seconds=10)
def test_on_s3_the_log_migrates_once_and_a_lost_race_decides_again(s3_endpoint: str):  # noqa: F811
    def s3() -> Registry:
        return Registry("s3://models-bucket/registry", "m", {"endpoint_url": s3_endpoint})

    reg = s3()
    v1, v2, v3, *more = (fake_version(reg, n) for n in range(1, 9))
    write_old_format(reg, v1, [], records=[v1])
    assert s3().production() == v1 and s3().production() == v1
    interfere_once(reg, lambda: s3().promote(v2, "other writer"))
    reg.promote(v3, "this writer")
    events = s3().pointer()["events"]
    assert [(e["action"], e["from"], e["version"]) for e in events] == [
        ("migrate", None, v1), ("promote", v1, v2), ("promote", v2, v3)]
    assert s3().pointer()["previous"] == [v1, v2]
    assert json.loads(reg.fs.cat_file(f"{reg.root}/production"))["version"] == v3

    threads = [threading.Thread(target=lambda v=v: s3().promote(v, "concurrent", force=True)) for v in more]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = s3().pointer()["events"]
    assert len(events) == 3 + len(more) and sorted(e["version"] for e in events[3:]) == more
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert json.loads(reg.fs.cat_file(f"{reg.root}/production"))["version"] == events[-1]["version"]
