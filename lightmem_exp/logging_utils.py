"""Experiment loggers chosen by `logger=`: wandb (offline by default), csv, or none.

The wandb run id is kept in the stage dir so a resumed stage continues the same run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from lightmem_exp.artifacts import write_text

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"


def make_logger(cfg: DictConfig, sdir: Path) -> Logger | None:
    """The Lightning logger for a stage run in `sdir` (None for logger=none or WANDB_MODE=disabled)."""
    name = cfg.logger.name
    stage = cfg.stage.name
    if name == "csv":
        return CSVLogger(save_dir=str(sdir), name="csv", version="")
    if name == "wandb" and cfg.logger.mode != "disabled":
        id_file = sdir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        os.environ.setdefault("WANDB_SILENT", "true")
        wl = WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.exp, job_type=stage,
            name=f"{cfg.exp}-{stage}", save_dir=str(sdir), offline=cfg.logger.mode == "offline",
            id=run_id, resume="allow" if run_id else None,
        )
        if run_id is None:
            write_text(id_file, wl.experiment.id)
        return wl
    return None


def run_id(logger: Logger | None) -> str | None:
    if isinstance(logger, WandbLogger):
        return logger.experiment.id
    return None


def finish_loggers() -> None:
    """Finish any wandb run, even after a failure, so sweeps in one process never share a run."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
