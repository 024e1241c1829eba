"""Process-wide settings applied once before a stage runs (seeds, threads, offline hub access, console logging), and
where this process puts its model."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf


def setup_runtime(cfg: DictConfig) -> None:
    # Imported here: Lightning takes seconds to import, and `model_device` users (eval methods, serve) need none of it.
    from lightning.pytorch import seed_everything

    from lightmem_exp.logging_utils import quiet_console

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    torch.set_flush_denormal(True)  # denormal floats made CPU epochs ~10x slower in the sft stage
    seed_everything(int(cfg.seed), workers=True, verbose=False)
    quiet_console()


def model_device(cfg: DictConfig) -> str | None:
    """Where this process loads (and quantises) its model: this rank's CUDA device (`LOCAL_RANK`, set by DDP
    launchers; 0 otherwise) when `trainer.lightning.accelerator` may use a GPU and one is present, else None (CPU)."""
    accel = str(OmegaConf.select(cfg, "trainer.lightning.accelerator", default="cpu"))
    if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None
