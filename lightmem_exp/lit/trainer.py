"""One way to build a Lightning Trainer from `trainer=` and to resume a stage from its own checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from transformers import get_cosine_schedule_with_warmup

from lightmem_exp.lit.callbacks import FiniteLossGuard
from lightmem_exp.lit.resume import AtomicCheckpointIO, LastCheckpoint, LoaderPosition, load_rng, save_rng
from lightmem_exp.lit.throughput import TrainThroughput

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


def make_trainer(cfg: DictConfig, sdir: Path, *, max_epochs: int, logger: Logger | None,
                 callbacks: list[L.Callback] = (), ckpt_every_n_steps: int | None = None,
                 gradient_clip_val: float | None = None) -> L.Trainer:
    ckpt_dir = sdir / CKPT_DIR
    checkpoint = LastCheckpoint(ckpt_dir / "last.ckpt", every_n_steps=ckpt_every_n_steps)
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer.lightning, resolve=True),
        max_epochs=max_epochs,
        logger=logger if logger is not None else False,
        callbacks=[FiniteLossGuard(ckpt_dir), LoaderPosition(), TrainThroughput(), *callbacks, checkpoint],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(sdir),
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        enable_progress_bar=bool(cfg.progress),
        num_sanity_val_steps=0,
    )


def throughput_stats(trainer: L.Trainer, model: torch.nn.Module) -> dict:
    """Throughput of the batches this process trained (`TrainThroughput`, added by `make_trainer`), MFU at the
    compute dtype of `trainer.precision`."""
    cb = next(c for c in trainer.callbacks if isinstance(c, TrainThroughput))
    precision = str(trainer.precision)
    dtype = (torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16")
             else next(model.parameters()).dtype)
    return cb.summary(model, trainer.strategy.root_device, dtype)


def resume_path(cfg: DictConfig, sdir: Path) -> str | None:
    """The stage's own last checkpoint when resume=auto and one exists (never an upstream's weights: `init_from`
    loads those from the upstream's exported files). The runner has already refused a checkpoint written under
    another config, and cleared it for overwrite=true / resume=never."""
    last = sdir / CKPT_DIR / "last.ckpt"
    if cfg.resume == "auto" and last.exists():
        log.info("resuming from own checkpoint %s", last)
        return str(last)
    return None


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on PEFT trainable-token rows (they hold the token embeddings themselves, so decay
    would shrink rows that never got a gradient), biases and norms."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if "trainable_tokens" in name or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_cosine(module: L.LightningModule, *, lr: float, weight_decay: float, warmup_ratio: float) -> dict:
    """AdamW over `decay_groups` with linear warmup then cosine decay to 0, stepped per optimizer step."""
    opt = torch.optim.AdamW(decay_groups(module, weight_decay), lr=lr)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    sched = get_cosine_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TrainableOnlyCheckpoint(L.LightningModule):
    """Checkpoints hold only trainable tensors (LoRA, new token rows), never a frozen 7B base."""

    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng"] = save_rng()  # dropout after a resume draws what the uninterrupted run drew

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_rng(checkpoint.get("rng"))
