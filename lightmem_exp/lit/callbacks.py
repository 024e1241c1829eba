"""Callbacks shared by every training stage."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L

from lightmem_exp.errors import LmxError


class FiniteLossGuard(L.Callback):
    """Stop at the first NaN/inf loss, naming the step; the last good checkpoint is left untouched."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            last = self.ckpt_dir / "last.ckpt"
            kept = f"last good checkpoint kept at {last}" if last.exists() else "no checkpoint was written yet"
            raise LmxError(f"training loss became {float(loss)} at step {trainer.global_step} "
                           f"(epoch {trainer.current_epoch}, batch {batch_idx}); {kept}")
