"""Config plumbing shared by the CLI and the tests: resolvers, validation before work starts, saving."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import write_text
from lightmem_exp.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lmx.project_root"):
        OmegaConf.register_new_resolver("lmx.project_root", lambda: str(PROJECT_ROOT))
        # The bundled data sits in shared/ beside the checkout; it is never committed into the project.
        OmegaConf.register_new_resolver("lmx.shared_data", lambda: str(PROJECT_ROOT.parent / "shared" / "data"))


register_resolvers()


def require(cfg: DictConfig, key: str, check: Callable[[object], bool], expect: str, *,
            allow_none: bool = False) -> None:
    """Raise ConfigError naming `key` unless `check(value)` holds (or the value is null and `allow_none`)."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and allow_none:
        return
    try:
        ok = value is not None and bool(check(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(key, f"got {value!r}, expected {expect}")


def positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def validate_common(cfg: DictConfig) -> None:
    """Checks that apply to every stage; each stage adds its own in its `validate`."""
    require(cfg, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
    require(cfg, "exp", lambda v: isinstance(v, str) and v and "/" not in v, "a non-empty name without '/'")
    require(cfg, "resume", lambda v: v in ("auto", "never"), "'auto' or 'never'")
    require(cfg, "quant.mode", lambda v: v in ("none", "nf4"), "'none' or 'nf4'")
    require(cfg, "lora.r", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, "lora.alpha", positive, "a number > 0")
    require(cfg, "lora.dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    require(cfg, "lora.target_modules", lambda v: len(v) > 0, "a non-empty list of module names")
    require(cfg, "model.init", lambda v: v in ("pretrained", "random"), "'pretrained' or 'random'")
    require(cfg, "logger.name", lambda v: v in ("wandb", "csv", "none"), "'wandb', 'csv' or 'none'")
    require(cfg, "data.split_fractions", lambda v: len(v) == 3 and all(x >= 0 for x in v) and abs(sum(v) - 1) < 1e-6,
            "three non-negative fractions summing to 1")
    validate_scale_out(cfg)


MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def validate_scale_out(cfg: DictConfig) -> None:
    """Refuse multirun with a multi-process strategy, and a DeepSpeed strategy without its optional extra."""
    import importlib.util

    strategy = str(OmegaConf.select(cfg, "trainer.lightning.strategy", default="auto") or "auto")
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.lightning.strategy",
                          f"{strategy!r} needs DeepSpeed, an optional extra: pip install -e '.[deepspeed]'")
    if strategy.startswith(MULTI_PROCESS_STRATEGIES) and _in_multirun():
        # Lightning starts ranks > 0 by re-running this command line: under -m every rank would re-run the sweep.
        raise ConfigError("trainer.lightning.strategy",
                          f"{strategy!r} starts one process per device and cannot run inside a multirun (-m) "
                          "sweep; sweep single-device jobs (trainer=gpu or cpu) and run DDP/FSDP/DeepSpeed as "
                          "single runs with an explicit exp=")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_resolved(cfg: DictConfig, path: Path) -> None:
    """Save the fully resolved config. Secrets never live in configs: they hold env var names only."""
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
