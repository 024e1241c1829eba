"""The stage registry and runner. Only stages that really exist are registered; `stage=pipeline` runs the stages of
`pipeline` in order and ends with a table of what each produced."""

from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import MANIFEST, load_manifest
from lightmem_exp.config import save_resolved, typed, validate_common
from lightmem_exp.config.schema import STAGE_CONFIGS
from lightmem_exp.errors import LmxError
from lightmem_exp.logging_utils import finish_loggers
from lightmem_exp.stages.base import Recipe, StageResult, stage_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A stage's `Recipe` class, imported on first use so that `stage=data` does not pay for the training stack."""

    name: str
    module: str
    recipe_class: str

    @property
    def recipe(self) -> type[Recipe]:
        return getattr(importlib.import_module(self.module), self.recipe_class)


STAGES: dict[str, Stage] = {
    "data": Stage("data", "lightmem_exp.stages.data", "DataRecipe"),
    "step1": Stage("step1", "lightmem_exp.stages.step1", "Step1Recipe"),
    "step2": Stage("step2", "lightmem_exp.stages.step2", "Step2Recipe"),
    "sft": Stage("sft", "lightmem_exp.stages.sft", "SftRecipe"),
    "adrpo": Stage("adrpo", "lightmem_exp.stages.adrpo", "AdrpoRecipe"),
    "eval": Stage("eval", "lightmem_exp.stages.eval", "EvalRecipe"),
}

# Keys that do not change what a stage computes, ignored when deciding if a finished stage can be reused.
_VOLATILE = ("overwrite", "progress", "runtime", "logger", "resume")


def stage_config(cfg: DictConfig, name: str, in_pipeline: bool = False) -> DictConfig:
    """Stage `name`'s view of the request: `stage` set to it, the other stages' blocks and the pipeline order
    dropped, so its saved config (and whether a finished run can be reused) depends on its own knobs only."""
    others = {*STAGE_CONFIGS, "pipeline"} - {name}
    sub = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in others})
    sub.stage = name
    sub.runtime = {"in_pipeline": in_pipeline}
    return sub


def _comparable(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in _VOLATILE}


def _run_files(sdir: Path) -> list[Path]:
    """What earlier runs left in a stage dir: everything but Hydra's own run files (.hydra/, *.log)."""
    if not sdir.is_dir():
        return []
    return [p for p in sdir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]


def _clear_stage_dir(sdir: Path) -> None:
    """overwrite=true / resume=never: drop everything but Hydra's own run files, so nothing stale is trusted or
    resumed."""
    for p in _run_files(sdir):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (added and removed keys included)."""
    keys = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _prepare_unfinished(sub: DictConfig, name: str, sdir: Path) -> None:
    """A stage dir without a manifest holds a killed or failed run. overwrite=true and resume=never start clean;
    resume=auto keeps it so the stage continues from its own checkpoint, but never under another config: a
    checkpoint of other shapes or data would fail deep inside Lightning's restore, or worse, load silently."""
    if sub.overwrite or sub.resume == "never":
        log.info("stage %s: discarding the unfinished run in %s (%s)", name, sdir,
                 "overwrite=true" if sub.overwrite else "resume=never")
        _clear_stage_dir(sdir)
        return
    saved = sdir / "config.yaml"
    diff = _config_diff(_comparable(OmegaConf.load(saved)), _comparable(sub)) if saved.exists() else ["config.yaml"]
    if not diff:
        for tmp in sorted(sdir.rglob(".*.tmp"), reverse=True):  # writes the kill interrupted, never under final names
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        return
    checkpoints = sorted(sdir.rglob("*.ckpt"))
    if not checkpoints:
        log.info("stage %s: the unfinished run in %s has no checkpoint and another config: starting afresh", name, sdir)
        _clear_stage_dir(sdir)
        return
    shown = ", ".join(diff[:12]) + (f" and {len(diff) - 12} more" if len(diff) > 12 else "")
    raise LmxError(
        f"stage {name}: {sdir} holds an unfinished run whose checkpoints ({checkpoints[0]}"
        f"{' ...' if len(checkpoints) > 1 else ''}) were written under a different config (differs in: {shown}), "
        "so it cannot be resumed; pass overwrite=true or resume=never to start the stage afresh, or choose "
        "another exp="
    )


def run_stage(cfg: DictConfig, name: str, *, in_pipeline: bool = False) -> StageResult:
    """Run one registered stage in its own directory; the stage writes its manifest last."""
    sub = stage_config(cfg, name, in_pipeline)
    sdir = stage_dir(sub, name)
    sub.runtime.stage_dir = str(sdir)
    manifest = sdir / MANIFEST
    if manifest.exists():
        if cfg.overwrite:
            _clear_stage_dir(sdir)
        else:
            saved = sdir / "config.yaml"
            same = saved.exists() and _comparable(OmegaConf.load(saved)) == _comparable(sub)
            if in_pipeline and same:
                log.info("stage %s already complete in %s with the same config: reusing it", name, sdir)
                return _reuse(name, sdir)
            raise LmxError(
                f"stage {name} is already complete in {sdir} ({manifest} exists)"
                + ("" if same else " with a different config")
                + "; pass overwrite=true to run it again, or choose another exp="
            )
    elif _run_files(sdir):
        _prepare_unfinished(sub, name, sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    save_resolved(sub, sdir / "config.yaml")
    log.info("stage %s -> %s", name, sdir)
    # Every stage starts from the same seeded process state, so its result does not depend on which stages ran
    # before it in this process (a resumed pipeline skips finished ones; LoRA init draws from the global RNG).
    from lightmem_exp.runtime import setup_runtime

    setup_runtime(sub)
    try:
        return STAGES[name].recipe(sub).run()
    finally:
        finish_loggers()


def _reuse(name: str, sdir: Path) -> StageResult:
    m = load_manifest(sdir, expect_stage=name)
    return StageResult(stage=name, dir=sdir, manifest=m, metrics=m.metrics,
                       headline=float(m.metrics.get("headline", float("nan"))), reused=True)


def validate(cfg: DictConfig) -> list[str]:
    """Validate the whole request before any work starts; returns the stages that will run."""
    validate_common(cfg)
    name = cfg.stage
    order = list(cfg.pipeline) if name == "pipeline" else [name]
    unknown = [s for s in order if s not in STAGES]
    if unknown:
        where = "pipeline" if name == "pipeline" else "stage"
        raise LmxError(f"{where} names stages that do not exist: {unknown} (registered: {list(STAGES)}, or "
                       "stage=pipeline)")
    for s in order:
        sub = stage_config(cfg, s, name == "pipeline")
        if s in STAGE_CONFIGS:
            typed(sub, s)
        STAGES[s].recipe.validate(sub)
    return order


def run(cfg: DictConfig) -> StageResult:
    """Entry used by __main__: validate, run the chosen stage or the whole pipeline, print what each produced."""
    order = validate(cfg)
    results = [run_stage(cfg, s, in_pipeline=cfg.stage == "pipeline") for s in order]
    log.info("%s", summary_table(results))
    return results[-1]


def summary_table(results: list[StageResult]) -> str:
    """What each stage produced: its headline metric and where its outputs (and the eval report) are."""
    rows = [("stage", "status", "headline", "outputs")]
    for r in results:
        status = "reused" if r.reused else "ran"
        where = str(r.dir)
        if r.manifest is not None and "report" in r.manifest.outputs:
            where = str(r.manifest.path("report"))
        rows.append((r.stage, status, "-" if r.headline != r.headline else f"{r.headline:.4g}", where))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows]
    return "run summary\n" + "\n".join(lines)
