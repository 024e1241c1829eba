"""Experiment loggers chosen by `logger=`: wandb (offline by default), csv, or none; and Lightning's console lines.

The wandb run id is kept in the stage dir so a resumed stage continues the same run.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig
from transformers.utils import logging as hf_logging

from lightmem_exp.artifacts import write_text

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"
# On import `lightning` adds its own console handler, and `lightning.pytorch`/`.fabric` do when the root has none.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Known-harmless console lines, dropped at the logger that emits them: (logger, start of the message, why).
HARMLESS = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging",
     "an advert Lightning logs at every Trainer()"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes' optional hub kernel, unreachable offline; its built-in CPU 4-bit path is used instead"),
)

# Known-harmless warnings (`warnings.warn`), ignored by message: (category, start of the message, why).
HARMLESS_WARNINGS = (
    (FutureWarning, "`is_gradient_checkpointing` is deprecated",
     "PEFT's get_peft_model reads the property transformers 5 renamed; nothing of ours uses it"),
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated",
     "Lightning 2.6's batch-size inference builds torch 2.13's deprecated LeafSpec; nothing of ours uses it"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_console() -> None:
    """Where the root logger has handlers (Hydra's console and run log), Lightning's records go through them only:
    its own console handlers are removed (`lightning` keeps propagating too, so each line printed twice), and the
    `HARMLESS` lines are dropped at the loggers that emit them, the `HARMLESS_WARNINGS` ignored, transformers'
    progress bars off."""
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name, start, _why in HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    for category, start, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    # transformers 5 draws a "Loading weights" bar at every from_pretrained (several per stage, each under a second);
    # it is the only transformers bar this package would show.
    hf_logging.disable_progress_bar()


def make_logger(cfg: DictConfig, sdir: Path) -> Logger | None:
    """The Lightning logger for a stage run in `sdir` (None for logger=none or WANDB_MODE=disabled)."""
    name = cfg.logger.name
    stage = cfg.stage
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
