"""Shared fixtures: real configs composed with Hydra into tmp_path, the real bundled data, the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightmem_exp.config import CONF_DIR, PROJECT_ROOT

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_ROOT = Path(os.environ.get("LMX_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def compose_config(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose the real conf/ tree as the CLI would, with outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"paths.outputs={tmp_path / 'outputs'}", f"paths.multirun={tmp_path / 'multirun'}",
                       *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path, list(overrides))

    return _make


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "locomo" / "locomo10.json").exists():
        pytest.skip(f"bundled data not found at {DATA_ROOT} (set LMX_DATA)")
    return DATA_ROOT


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m lightmem_exp` as a user would, from `cwd`."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightmem_exp", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
