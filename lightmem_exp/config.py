"""Config plumbing shared by the CLI and the tests: resolvers, validation before work starts, saving."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
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


def non_negative(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def int_at_least(n: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def is_bool(v: object) -> bool:
    return isinstance(v, bool)


# Row pieces for `require_all` tables: (check, what is expected[, null allowed]).
INT1: tuple[Callable[[object], bool], str] = (int_at_least(1), "an integer >= 1")
OPT_INT1: tuple[Callable[[object], bool], str, bool] = (int_at_least(1), "null or an integer >= 1", True)
OPT_POSITIVE: tuple[Callable[[object], bool], str, bool] = (positive, "null or a number > 0", True)


def require_all(cfg: DictConfig, prefix: str, table: Iterable[Sequence]) -> None:
    """`require` for every row `(key, check, expect[, allow_none])` of a table, keys relative to `prefix`."""
    for key, check, expect, *rest in table:
        require(cfg, prefix + key, check, expect, allow_none=bool(rest and rest[0]))


# ----------------------------------------------------------------------------------------------------- secrets
# Configs are saved (config.yaml, .hydra/, wandb), so a secret never goes in one: keys ending in `_env` name the
# environment variable holding it, and a key that looks like it holds a secret itself is refused.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# api_key, openai_api_key, secret, password, token, hf_token ... (not pad_token or max_new_tokens)
SECRET_KEY = re.compile(r"^(.*_)?(api_?key|secret(_key)?|password)$|^((access|auth|bearer|hf|api)_)?token$", re.I)


def secret_problem(key: str, value: object) -> str | None:
    """Why `key=value` must not be in a config, or None. The message never repeats the value."""
    leaf = key.rsplit(".", 1)[-1].lstrip("+~")
    if leaf.endswith("_env"):
        if value is None or (isinstance(value, str) and ENV_NAME.fullmatch(value)):
            return None
        return ("must be the NAME of an environment variable (letters, digits, '_'), not the secret itself; "
                "export the secret in that variable")
    if SECRET_KEY.search(leaf) and value not in (None, ""):
        return f"secrets are never read from configs; put it in an environment variable and set {leaf}_env"
    return None


def check_secrets(cfg: DictConfig) -> None:
    """Refuse any secret-looking value anywhere in the resolved config (the value is not echoed)."""
    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif problem := secret_problem(path, node):
            raise ConfigError(path, problem)

    for top in cfg:
        if top != "hydra":  # Hydra's own node holds job fields that resolve only inside a running job
            value = OmegaConf.select(cfg, str(top))
            walk(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value, str(top))


def check_argv_secrets(argv: Sequence[str]) -> str | None:
    """The same check on command-line overrides, before Hydra saves them under .hydra/ (an error message or None)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        value = value.strip("'\"")
        problem = secret_problem(key, None if value in ("null", "") else value)
        if problem:
            return f"config '{key.lstrip('+~')}': {problem}"
    return None


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
    from lightmem_exp.models.loading import DTYPES  # here: config.py itself stays free of torch

    require_all(cfg, "", [
        ("model.torch_dtype", lambda v: str(v).removeprefix("torch.") in DTYPES, f"null or one of {list(DTYPES)}",
         True),
        ("model.build", lambda v: v in ("tiny", "gguf", "none", ""), "null, 'tiny' or 'gguf'", True),
        ("model.max_seq_len", int_at_least(16), "null or an integer >= 16", True),
        ("trainer.accumulate_grad_batches", *INT1),
        ("trainer.threads", *OPT_INT1),
        ("trainer.gradient_checkpointing", is_bool, "true or false"),
    ])
    check_secrets(cfg)
    validate_scale_out(cfg)


MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def validate_scale_out(cfg: DictConfig) -> None:
    """Refuse multirun with a multi-process strategy, and a DeepSpeed strategy without its optional extra."""
    import importlib.util

    strategy = str(OmegaConf.select(cfg, "trainer.lightning.strategy", default="auto") or "auto")
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.lightning.strategy",
                          f"{strategy!r} needs DeepSpeed, an optional extra: pip install -e '.[deepspeed]'")
    if strategy.startswith(MULTI_PROCESS_STRATEGIES) and in_multirun():
        # Lightning starts ranks > 0 by re-running this command line: under -m every rank would re-run the sweep.
        raise ConfigError("trainer.lightning.strategy",
                          f"{strategy!r} starts one process per device and cannot run inside a multirun (-m) "
                          "sweep; sweep single-device jobs (trainer=gpu or cpu) and run DDP/FSDP/DeepSpeed as "
                          "single runs with an explicit exp=")


def in_multirun() -> bool:
    """True inside a Hydra multirun (-m) job (imported lazily: config.py stays free of Hydra's runtime)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_resolved(cfg: DictConfig, path: Path) -> None:
    """Save the fully resolved config. Secrets never live in configs: they hold env var names only."""
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
