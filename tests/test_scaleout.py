"""Scale-out configs: trainer=deepspeed and the SLURM launcher compose, a missing optional extra or a multirun with a
multi-process strategy stops before any work, and a real sweep through submitit's launcher (its local executor)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from lightmem_exp.config import CONF_DIR, validate_common
from lightmem_exp.errors import ConfigError
from tests.conftest import on_tiny, run_cli

# find_spec on a dotted name raises when the parent namespace is absent (no Hydra plugin installed at all).
HAS_SUBMITIT = (importlib.util.find_spec("hydra_plugins") is not None
                and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None)


@pytest.fixture(autouse=True)
def _reset_hydra_config():
    yield
    HydraConfig.instance().cfg = None  # no MULTIRUN mode leaks into later tests
    GlobalHydra.instance().clear()


def _compose(tmp_path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=on_tiny([f"paths.outputs={tmp_path}", *overrides]),
                      return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp", "deepspeed"])
def test_trainer_configs_compose(tmp_path, trainer):
    cfg = _compose(tmp_path, f"trainer={trainer}")
    assert cfg.trainer.name == trainer and "strategy" in cfg.trainer.lightning


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_extra_stops_before_work(tmp_path):
    cfg = _compose(tmp_path, "trainer=deepspeed")
    with pytest.raises(ConfigError, match=r"trainer.lightning.strategy.*\.\[deepspeed\]"):
        validate_common(cfg)


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_multirun_with_a_multi_process_strategy_is_refused(tmp_path, trainer):
    cfg = _compose(tmp_path, f"trainer={trainer}", "hydra.mode=MULTIRUN")
    with pytest.raises(ConfigError, match="multirun"):
        validate_common(cfg)
    validate_common(_compose(tmp_path, f"trainer={trainer}"))             # a single run is fine
    validate_common(_compose(tmp_path, "trainer=cpu", "hydra.mode=MULTIRUN"))  # so is a single-device sweep


@pytest.mark.skipif(not HAS_SUBMITIT, reason="hydra-submitit-launcher (extra 'slurm') not installed")
def test_slurm_launcher_preset_composes(tmp_path):
    cfg = _compose(tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert _compose(tmp_path, "hydra/launcher=submitit_slurm").hydra.launcher._target_.endswith("SlurmLauncher")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SUBMITIT, reason="hydra-submitit-launcher (extra 'slurm') not installed")
def test_a_sweep_through_submitit_writes_one_stage_dir_per_job(tmp_path, small_locomo):
    r = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "stage=data", "seed=1,2",
                "logger=none", "progress=false", f"data.path={small_locomo}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = sorted((tmp_path / "multirun" / "default" / "data").glob("*/*/manifest.json"))
    assert len(manifests) == 2
    assert sorted(json.loads(m.read_text())["seed"] for m in manifests) == [1, 2]
