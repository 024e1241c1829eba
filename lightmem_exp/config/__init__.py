"""Config plumbing shared by the CLI and the tests: resolvers, the typed configs' registration, validation before
work starts, saving. The stage configs themselves (fields, docs, checks) are in `lightmem_exp.config.schema`."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import write_text
from lightmem_exp.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lmx.project_root"):
        OmegaConf.register_new_resolver("lmx.project_root", lambda: str(PROJECT_ROOT))
        # The bundled data sits in shared/ beside the checkout; it is never committed into the project.
        OmegaConf.register_new_resolver("lmx.shared_data", lambda: str(PROJECT_ROOT.parent / "shared" / "data"))


def register_configs() -> None:
    """The typed configs as Hydra schemas: each stage's block (`<stage>: default` in conf/config.yaml) and the
    schemas conf/data/*.yaml and conf/lora/*.yaml extend (`defaults: [_schema, _self_]`)."""
    from hydra.core.config_store import ConfigStore

    from lightmem_exp.config.schema import STAGE_CONFIGS, DataConfig, LoraConfig

    cs = ConfigStore.instance()
    for name, node in STAGE_CONFIGS.items():
        cs.store(group=name, name="default", node=node)
    cs.store(group="data", name="_schema", node=DataConfig)
    cs.store(group="lora", name="_schema", node=LoraConfig)


register_resolvers()
register_configs()


def typed(cfg: DictConfig, key: str) -> Any:
    """The dataclass of block `key` (a stage name, 'data' or 'lora') built from `cfg`, interpolations resolved: its
    checks run here and a failure names the full address (`step2.recall_test.every_n_epochs`)."""
    from lightmem_exp.config.schema import STAGE_CONFIGS, DataConfig, LoraConfig

    cls = {**STAGE_CONFIGS, "data": DataConfig, "lora": LoraConfig}[key]
    return _build(cls, OmegaConf.select(cfg, key), key + ".")


def _build(cls: type, node: DictConfig, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = node[f.name]
        sub = next((t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if dataclasses.is_dataclass(t)),
                   None)
        if sub is not None and value is not None:
            kwargs[f.name] = _build(sub, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(prefix + e.key, e.detail) from None


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
    """Checks that apply to every stage: the run's own keys, the model, trainer and the typed data and lora blocks;
    each stage's block is checked by `typed(cfg, <stage>)` and its recipe's `validate`."""
    from lightmem_exp.models.loading import DTYPES  # here: the config package itself stays free of torch

    def count(lo: int) -> Callable[[object], bool]:
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key, check, expect, allow_none in [
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", False),
        ("exp", lambda v: isinstance(v, str) and v and "/" not in v, "a non-empty name without '/'", False),
        ("resume", lambda v: v in ("auto", "never"), "'auto' or 'never'", False),
        ("quant.mode", lambda v: v in ("none", "nf4"), "'none' or 'nf4'", False),
        ("model.init", lambda v: v in ("pretrained", "random"), "'pretrained' or 'random'", False),
        ("logger.name", lambda v: v in ("wandb", "csv", "none"), "'wandb', 'csv' or 'none'", False),
        ("model.torch_dtype", lambda v: str(v).removeprefix("torch.") in DTYPES, f"null or one of {list(DTYPES)}",
         True),
        ("model.build", lambda v: v in ("tiny", "gguf", "none", ""), "null, 'tiny' or 'gguf'", True),
        ("model.max_seq_len", count(16), "null or an integer >= 16", True),
        ("trainer.accumulate_grad_batches", count(1), "an integer >= 1", False),
        ("trainer.threads", count(1), "null or an integer >= 1", True),
        ("trainer.gradient_checkpointing", lambda v: isinstance(v, bool), "true or false", False),
    ]:
        require(cfg, key, check, expect, allow_none=allow_none)
    typed(cfg, "data")
    typed(cfg, "lora")
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
