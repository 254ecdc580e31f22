"""Per-epoch training curves, written through dvclive as DVC plots (`dvc plots show/diff`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("train")


class Plots:
    """Per-epoch metrics through dvclive into <out_dir>/plots/metrics/<name>.tsv, x = step (as dvc.yaml declares).

    dvclive's running summary goes to <out_dir>/plots/summary.json: the stage's own
    metrics file (reports.dir/train.json) is written only once a run has finished.
    """

    KEYS = ("train_loss", "train_img_per_s", "val_loss", "val_accuracy", "val_macro_f1", "lr")

    def __init__(self, out_dir: Path, history: list[dict[str, Any]]) -> None:
        self.live = None
        try:
            from dvclive import Live
        except ImportError:   # a bare GPU box may lack it; training must not depend on plots
            log.warning("dvclive is not installed: no per-epoch plots in %s/plots", out_dir)
            return

        class _Live(Live):
            """Live that only writes files: no git/DVC repo is opened (or created!), no Studio is called."""

            def _init_dvc(self) -> None:   # it would run Repo() or Repo.init() and read git state
                pass

            def _init_studio(self) -> None:   # offline: skip every Studio event
                self._studio_events_to_skip.update({"start", "data", "done"})

            @property
            def metrics_file(self) -> str:   # dvclive would write <dir>/metrics.json; keep the folder to the plots
                return os.path.join(self.plots_dir, "summary.json")

        # No git/DVC experiment side effects; a resumed run rewrites the log from its saved history.
        self.live = _Live(dir=str(out_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
        for row in history:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        if self.live is None:
            return
        for key in self.KEYS:
            self.live.log_metric(key, row[key])
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
