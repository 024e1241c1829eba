from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightmem_exp.config import CONF_DIR
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.stages import STAGES, validate

MODELS = ["tiny", "qwen7b", "llama8b", "mistral7b", "qwen3_4b"]


def test_registry_matches_stage_configs():
    files = {p.stem for p in (CONF_DIR / "stage").glob("*.yaml")}
    assert files == set(STAGES) | {"pipeline"}
    pipeline = OmegaConf.load(CONF_DIR / "stage" / "pipeline.yaml")
    assert list(pipeline.order) == [s for s in pipeline.order if s in STAGES]
    assert set(pipeline.order) == set(STAGES)


def test_defaults_and_top_level_keys(make_cfg):
    cfg = make_cfg()
    assert cfg.stage.name == "pipeline" and cfg.model.name == "tiny" and cfg.data.name == "locomo"
    assert cfg.trainer.name == "cpu" and cfg.logger.name == "wandb" and cfg.exp == "default"
    for key in ("seed", "overwrite", "paths", "lora", "quant"):
        assert key in cfg
    assert Path(cfg.paths.data).name == "data"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(make_cfg, model):
    cfg = make_cfg(f"model={model}", "stage=data")
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.model.name_or_path
    validate(cfg)


@pytest.mark.parametrize(
    "override,key",
    [("lora.r=0", "lora.r"), ("lora.dropout=1.5", "lora.dropout"), ("seed=abc", "seed"),
     ("data.split_fractions=[0.5,0.5,0.5]", "data.split_fractions"), ("resume=maybe", "resume")],
)
def test_bad_values_rejected_before_work(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg("stage=data", override))


def test_unknown_stage_in_order_rejected(make_cfg):
    with pytest.raises(LmxError, match="do not exist"):
        validate(make_cfg("stage.order=[data,nosuch]"))


def test_experiment_preset_holds_deltas(make_cfg):
    cfg = make_cfg("experiment=smoke")
    assert cfg.exp == "smoke" and cfg.logger.name == "csv" and cfg.model.name == "tiny"
