"""The demo's data: a deterministic, stratified Fashion-MNIST subset written as an ImageFolder of PNGs (Debian's
`dataset-fashion-mnist`, else downloaded by torchvision); the same bytes every time, so the same DVC hash.

    python -m tasks.lib.demo_data [--out data/raw] [-S data.demo.per_class=100]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.lib.config import DEFAULT_PARAMS, ParamsError, load_params
from tasks.lib.errors import StageError
from tasks.lib.progress import progress, setup_logging

log = logging.getLogger("demo_data")

# Index order of Fashion-MNIST labels; folder names avoid '/' and spaces.
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
IMAGES_FILE = "train-images-idx3-ubyte.gz"
LABELS_FILE = "train-labels-idx1-ubyte.gz"


def find_source(source_dir: Path, download_dir: Path) -> Path:
    """The folder holding the Fashion-MNIST training .gz files, downloading them if needed."""
    for folder in (source_dir, download_dir / "FashionMNIST" / "raw"):
        if (folder / IMAGES_FILE).exists() and (folder / LABELS_FILE).exists():
            return folder
    log.info("Fashion-MNIST not found in %s; downloading with torchvision to %s", source_dir, download_dir)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(download_dir), train=True, download=True)
    except Exception as err:  # network errors come in many types; the message below is what matters
        raise StageError(
            f"Fashion-MNIST is neither in {source_dir} nor downloadable ({err}). "
            f"Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            f"or put {IMAGES_FILE} and {LABELS_FILE} in {source_dir}"
        ) from None
    return download_dir / "FashionMNIST" / "raw"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise StageError(f"{path}: truncated IDX file ({array.size} values, header says {dims}); reinstall it")
    return array.reshape(dims)


def choose_subset(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Per class, `per_class` source indices drawn without replacement, sorted."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for label in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if per_class > len(candidates):
            raise StageError(f"data.demo.per_class={per_class} but Fashion-MNIST has {len(candidates)} images per class")
        chosen[label] = np.sort(rng.choice(candidates, size=per_class, replace=False))
    return chosen


def materialise(out_dir: Path, per_class: int, seed: int, source_dir: Path, download_dir: Path) -> int:
    """Write the subset to out_dir/<class>/<index>.png through a temporary folder; the number of images.
    Refuses a non-empty out_dir: that would be someone's data."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StageError(f"{out_dir} is not empty; the demo writes only into an empty or missing folder")
    source = find_source(source_dir, download_dir)
    images, labels = read_idx(source / IMAGES_FILE), read_idx(source / LABELS_FILE)
    subset = choose_subset(labels, per_class, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        total = sum(len(v) for v in subset.values())
        todo = ((label, index) for label, indices in subset.items() for index in indices)
        for label, index in progress(todo, desc="writing demo images", total=total, unit="img"):
            folder = staging / CLASS_NAMES[label]
            folder.mkdir(exist_ok=True)
            # No metadata, fixed compression: identical bytes on every run.
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png", optimize=False, compress_level=6)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo's Fashion-MNIST subset as an ImageFolder.")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="target folder (default: data.raw_dir)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, args.set)
        demo = params.data.demo
        out = args.out or params.data.raw_dir
        count = materialise(out, demo.per_class, demo.seed, demo.source_dir, demo.download_dir)
    except (StageError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} images ({len(CLASS_NAMES)} classes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
