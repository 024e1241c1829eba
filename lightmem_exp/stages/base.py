"""The stage contract: directories, upstream manifests, and the result a stage hands back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import Manifest, load_manifest
from lightmem_exp.config import in_multirun


@dataclass
class StageResult:
    stage: str
    dir: Path
    manifest: Manifest | None   # None on non-zero DDP ranks, which write nothing
    metrics: dict = field(default_factory=dict)
    headline: float = math.nan   # the float a sweeper optimises


def stage_dir(cfg: DictConfig, name: str) -> Path:
    """Deterministic home of stage `name` for this run.

    Single runs: <paths.outputs>/<exp>/<name>. Sweeps: Hydra's job dir, with pipeline sub-stages
    nested under it, so every job of a sweep is self-contained.
    """
    if in_multirun():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        return job_dir if cfg.stage.name == name else job_dir / name
    return Path(cfg.paths.outputs) / cfg.exp / name


def upstream_dir(cfg: DictConfig, name: str) -> Path:
    """Where this stage reads upstream `name` from: `stage.inputs.<name>` if set, else the same exp's dir.

    Inside a swept pipeline the upstream is the sibling in the same job dir; a swept single stage reads
    the exp's single-run upstream.
    """
    explicit = OmegaConf.select(cfg, f"stage.inputs.{name}", default=None)
    if explicit:
        return Path(explicit)
    if in_multirun() and OmegaConf.select(cfg, "runtime.in_pipeline", default=False):
        return Path(HydraConfig.get().runtime.output_dir) / name
    return Path(cfg.paths.outputs) / cfg.exp / name


def load_upstream(cfg: DictConfig, name: str) -> Manifest:
    """Load and validate upstream `name`'s manifest; errors name the stage, the path and what is missing."""
    return load_manifest(upstream_dir(cfg, name), expect_stage=name)
