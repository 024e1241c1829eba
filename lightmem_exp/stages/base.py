"""The stage contract: directories, upstream manifests, the `Recipe` every stage is, and the result it hands back."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import Manifest, load_manifest, write_manifest
from lightmem_exp.config import in_multirun, typed
from lightmem_exp.config.schema import STAGE_CONFIGS

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    dir: Path
    manifest: Manifest | None   # None on non-zero DDP ranks, which write nothing
    metrics: dict = field(default_factory=dict)
    headline: float = math.nan   # the float a sweeper optimises
    reused: bool = False         # a finished pipeline stage taken as it was


def stage_dir(cfg: DictConfig, name: str) -> Path:
    """Deterministic home of stage `name` for this run.

    Single runs: <paths.outputs>/<exp>/<name>. Sweeps: Hydra's job dir, with pipeline sub-stages
    nested under it, so every job of a sweep is self-contained.
    """
    if in_multirun():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        return job_dir if cfg.stage == name else job_dir / name
    return Path(cfg.paths.outputs) / cfg.exp / name


def upstream_dir(cfg: DictConfig, name: str) -> Path:
    """Where this stage reads upstream `name` from: `<stage>.inputs.<name>` if set, else the same exp's dir.

    Inside a swept pipeline the upstream is the sibling in the same job dir; a swept single stage reads
    the exp's single-run upstream.
    """
    explicit = OmegaConf.select(cfg, f"{cfg.stage}.inputs.{name}", default=None)
    if explicit:
        return Path(explicit)
    if in_multirun() and OmegaConf.select(cfg, "runtime.in_pipeline", default=False):
        return Path(HydraConfig.get().runtime.output_dir) / name
    return Path(cfg.paths.outputs) / cfg.exp / name


def load_upstream(cfg: DictConfig, name: str) -> Manifest:
    """Load and validate upstream `name`'s manifest; errors name the stage, the path and what is missing."""
    return load_manifest(upstream_dir(cfg, name), expect_stage=name)


class Recipe:
    """A stage as named phases (torchtune-style): a subclass's `run` calls its phases in the order they run, each a
    public method other code (bench, tests) can call on its own, and ends with the shared `finish`.

    `cfg` is the stage's view of the config (`stage` = its name, other stages' blocks dropped); `args` is the typed
    block at the stage's name (`lightmem_exp.config.schema`). Phases record what the manifest needs on `self`:
    metrics, outputs, stats, and every upstream manifest they read (through `upstream`)."""

    name: ClassVar[str]

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.dir = Path(OmegaConf.select(cfg, "runtime.stage_dir", default=None) or stage_dir(cfg, self.name))
        self.args: Any = typed(cfg, self.name) if self.name in STAGE_CONFIGS else None
        self.metrics: dict[str, Any] = {}
        self.outputs: dict[str, str] = {}
        self.stats: dict[str, Any] = {}
        self.inputs: dict[str, Manifest] = {}
        self.logger = None

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        """Checks across config groups (the stage's own fields are checked by its typed config); run before any
        stage of the request starts."""

    def upstream(self, name: str, manifest: Manifest | None = None) -> Manifest:
        """Upstream `name`'s manifest (loaded unless given), recorded as an input of this run."""
        self.inputs[name] = manifest if manifest is not None else load_upstream(self.cfg, name)
        return self.inputs[name]

    def run(self) -> StageResult:
        raise NotImplementedError

    def finish(self, headline: float = math.nan) -> StageResult:
        """The shared closing step: metrics to the experiment logger, the manifest (written last, atomically, naming
        every upstream read) and the result the runner prints in its summary."""
        from lightmem_exp.logging_utils import run_id  # lazily: the data stage never imports Lightning

        if self.logger is not None:
            self.logger.log_metrics({k: v for k, v in self.metrics.items()  # NaN: a metric with nothing to measure
                                     if k != "headline" and isinstance(v, int | float) and math.isfinite(v)})
            self.logger.save()
        manifest = Manifest(stage=self.name, seed=self.cfg.seed, metrics=self.metrics, outputs=self.outputs,
                            inputs={k: m.ref() for k, m in self.inputs.items()}, stats=self.stats,
                            run_id=run_id(self.logger))
        write_manifest(self.dir, manifest)
        return StageResult(stage=self.name, dir=self.dir, manifest=manifest, metrics=self.metrics, headline=headline)

    def result_without_manifest(self) -> StageResult:
        """Non-zero DDP ranks: they train, then write nothing."""
        return StageResult(stage=self.name, dir=self.dir, manifest=None, metrics=self.metrics)
