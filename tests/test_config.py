import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightmem_exp.config import CONF_DIR, typed
from lightmem_exp.config.schema import STAGE_CONFIGS
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.stages import STAGES, stage_config, validate

MODELS = ["tiny", "qwen7b", "llama8b", "mistral7b", "qwen3_4b"]


def test_registry_matches_stage_configs(make_cfg):
    cfg = make_cfg()
    assert list(cfg.pipeline) == list(STAGES)  # the default pipeline runs every registered stage, in order
    assert set(STAGE_CONFIGS) == set(STAGES) - {"data"}  # the data stage's knobs are the dataset's (data.*)
    for name in STAGES:
        assert STAGES[name].recipe.name == name


def test_defaults_and_top_level_keys(make_cfg):
    cfg = make_cfg()
    assert cfg.stage == "pipeline" and cfg.model.name == "tiny" and cfg.data.name == "locomo"
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
        validate(make_cfg("pipeline=[data,nosuch]"))
    with pytest.raises(LmxError, match="do not exist"):
        validate(make_cfg("stage=nosuch"))


def test_one_address_per_knob_alone_or_in_the_pipeline(make_cfg):
    """`step2.lr` is the knob whether step2 runs alone or inside the pipeline, and a stage's saved view holds its own
    block only (so another stage's knob never makes a finished stage look changed)."""
    alone, piped = make_cfg("stage=step2", "step2.lr=2e-3"), make_cfg("step2.lr=2e-3")
    for cfg in (alone, piped):
        assert typed(cfg, "step2").lr == 2e-3
        view = stage_config(cfg, "step2")
        assert view.stage == "step2" and view.step2.lr == 2e-3
        assert not {"step1", "sft", "adrpo", "eval", "pipeline"} & set(view)
    assert OmegaConf.to_container(stage_config(alone, "step2").step2) == \
        OmegaConf.to_container(stage_config(piped, "step2").step2)
    with pytest.raises(Exception, match="stage"):  # the old address is gone: `stage` is the stage's name
        make_cfg("stage.lr=1e-3")


def test_typed_config_checks_name_the_nested_key(make_cfg):
    with pytest.raises(ConfigError, match=re.escape("config 'adrpo.reward.length_penalty.core_theta_max': ")):
        validate(make_cfg("adrpo.reward.length_penalty.core_theta_max=100"))
    with pytest.raises(Exception, match="step2.recall_test.no_such_knob"):  # a typo never composes
        make_cfg("step2.recall_test.no_such_knob=1")


PRESETS = sorted(f"{p.parent.name}={p.stem}" for group in ("experiment", "debug")
                 for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(make_cfg, preset):
    cfg = make_cfg(preset)
    OmegaConf.to_container(cfg, resolve=True)
    for name in STAGE_CONFIGS:
        typed(cfg, name)
    validate(stage_config(cfg, "data"))


def test_7b_presets_hold_the_7b_settings(make_cfg):
    cfg = make_cfg("experiment=sft_7b")  # inherits pipeline_7b, adds the 4-bit base
    assert cfg.model.name == "qwen7b" and cfg.quant.mode == "nf4" and cfg.exp == "sft_7b"
    assert (cfg.sft.lr, cfg.sft.max_seq_len, cfg.step1.lr, cfg.step2.lr) == (3e-5, 2048, 1e-4, 1e-4)
    assert make_cfg("experiment=pipeline_7b").quant.mode == "none"


def test_experiment_preset_holds_deltas(make_cfg):
    cfg = make_cfg("experiment=smoke")
    assert cfg.exp == "smoke" and cfg.logger.name == "csv" and cfg.model.name == "tiny"
