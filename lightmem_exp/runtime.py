"""Process-wide settings applied once before a stage runs: seeds, threads, offline hub access."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig


def setup_runtime(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    torch.set_flush_denormal(True)  # denormal floats made CPU epochs ~10x slower in the sft stage
    seed_everything(int(cfg.seed), workers=True, verbose=False)
