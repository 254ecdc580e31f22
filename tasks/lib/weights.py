"""Reading what the fetch_weights stage wrote: `<model.out_dir>/backbone.pt`, a state dict keyed for
`tasks.lib.models.build_backbone(arch)`, and `weights.json`, its record (arch, weights, source, sha256, preprocessing).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.lib.errors import StageError
from tasks.lib.io import read_json, sha256_file

RECORD_NAME = "weights.json"
STATE_NAME = "backbone.pt"

if TYPE_CHECKING:
    import torch


def load_backbone_state(out_dir: Path | str) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The verified backbone state dict (None for weights none) and the weights.json record."""
    out_dir = Path(out_dir)
    record = read_json(out_dir / RECORD_NAME)
    if record.get("file") is None:
        return None, record
    path = out_dir / record["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path}: named by {out_dir / RECORD_NAME} but missing; "
                                "re-run fetch_weights (dvc repro fetch_weights)")
    if record.get("file_sha256") and sha256_file(path) != record["file_sha256"]:
        raise StageError(f"{path}: sha256 differs from {out_dir / RECORD_NAME}; the file changed, re-run fetch_weights")
    import torch   # here, not at the top: publish reads weights_sha256 and needs no torch for it

    return torch.load(path, map_location="cpu", weights_only=True), record


def weights_sha256(record: dict[str, Any]) -> str | None:
    """The pretrained weights' hash; the literal "none" for a model trained from random init."""
    return "none" if record.get("weights") == "none" else record.get("sha256")
