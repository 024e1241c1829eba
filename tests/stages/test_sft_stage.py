"""Stage sft: config validation, and end to end through the CLI on five real LoCoMo conversations cut short."""

import json
import math

import pytest

from lightmem_exp.backends import LocalHFLoraBackend
from lightmem_exp.errors import ConfigError
from lightmem_exp.stages import run, validate
from tests.conftest import SMALL_TINY_SPEC, run_cli

METRICS = [f"{g}_{t}" for g in ("factqa/em", "factqa/f1", "factqa_train/em", "factqa_train/f1", "factqa_asked/em",
                                "factqa_asked/f1", "update/acc", "update/json_ok", "update/json_strict")
           for t in ("before", "after")]


@pytest.mark.parametrize(
    ("override", "key"),
    [("sft.lr=0", "sft.lr"), ("sft.lr=-1e-4", "sft.lr"), ("sft.max_epochs=0", "sft.max_epochs"),
     ("sft.batch_size=0", "sft.batch_size"), ("sft.warmup_ratio=1", "sft.warmup_ratio"),
     ("sft.general_fraction=1.0", "sft.general_fraction"), ("sft.max_seq_len=8", "sft.max_seq_len"),
     ("sft.max_train_samples.fact_qa=0", "sft.max_train_samples.fact_qa"),
     ("sft.early_stopping.patience=0", "sft.early_stopping.patience"),
     ("sft.mask_method=last", "sft.mask_method"), ("sft.eval.max_update=-1", "sft.eval.max_update"),
     ("sft.eval.max_new_tokens=512", "sft.eval.max_new_tokens"), ("lora.r=0", "lora.r")],
)
def test_bad_config_is_rejected_naming_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg("stage=sft", override))


def test_defaults_validate_alone_in_the_pipeline_and_in_the_7b_preset(make_cfg):
    assert validate(make_cfg("stage=sft")) == ["sft"]
    pipeline = make_cfg()
    assert validate(pipeline) == list(pipeline.pipeline) and "sft" in pipeline.pipeline
    with pytest.raises(ConfigError, match="'sft.lr'"):  # the same address in the pipeline
        validate(make_cfg("sft.lr=0"))
    preset = make_cfg("stage=sft", "experiment=sft_7b")
    assert preset.model.name == "qwen7b" and preset.quant.mode == "nf4" and preset.lora.r == 16
    assert preset.trainer.name == "gpu" and 2e-5 <= preset.sft.lr <= 5e-5 and preset.sft.max_seq_len == 2048
    validate(preset)
    with pytest.raises(ConfigError, match="'quant.mode'"):
        validate(make_cfg("stage=sft", "quant=nf4", "model.init=random"))


# small_locomo has few update decisions (4 train, 2 test); the default tiny model's tokenizer fits them in 512 tokens.
CAPS = ["sft.max_train_samples.fact_qa=24", "sft.max_train_samples.update_decisions=16",
        "sft.max_val_samples.fact_qa=8", "sft.max_val_samples.update_decisions=4", "sft.max_epochs=2",
        "sft.eval.max_fact_qa=6", "sft.eval.max_fact_qa_train=6", "sft.eval.max_fact_qa_asked=6",
        "sft.eval.max_update=6",
        "sft.eval.max_general=4", "sft.eval.max_new_tokens=32", "sft.eval.batch_size=6"]


@pytest.mark.slow
def test_sft_trains_reports_and_exports_a_reloadable_adapter(tmp_path, small_locomo):
    common = ["logger=csv", "progress=false", f"data.path={small_locomo}", "data.max_sft=120"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=sft", *common, *CAPS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    sdir = tmp_path / "outputs" / "default" / "sft"
    m = json.loads((sdir / "manifest.json").read_text())
    for key in METRICS:
        assert 0.0 <= m["metrics"][key] <= 1.0, key
    assert m["metrics"]["general/ppl_before"] > 1 and m["metrics"]["general/ppl_after"] > 1
    assert math.isfinite(m["metrics"]["val/loss"]) and m["metrics"]["headline"] == m["metrics"]["val/loss"]
    assert m["inputs"]["data"]["stage"] == "data"
    st = m["stats"]
    n_task = st["train_samples"]["fact_qa"] + st["train_samples"]["update_decisions"]
    assert st["train_samples"]["fact_qa"] == 24 and st["train_samples"]["update_decisions"] >= 1
    assert st["train_samples"]["general"] == math.ceil(n_task * 0.1 / 0.9)
    assert st["test_samples"]["factqa"] == st["test_samples"]["factqa_train"] == 6 and st["test_samples"]["update"] >= 1
    pools = st["general_pool_indices"]
    assert not (set(pools["test"]) & set(pools["val"])) and not (set(pools["test"]) & set(pools["train"]))
    assert st["epochs_run"] >= 1 and (sdir / "checkpoints" / "best.ckpt").exists()
    assert "val/loss" in (sdir / "csv" / "metrics.csv").read_text().splitlines()[0]

    adapter = sdir / "export" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    preds = [json.loads(line) for line in (sdir / "eval_predictions.jsonl").read_text().splitlines()]
    assert {p["set"] for p in preds} == {"factqa", "factqa_train", "factqa_asked", "update"}
    # knowledge injection in the benchmark's own wording: questions whose every evidence memory was trained on
    data = tmp_path / "outputs" / "default" / "data"
    qa = {q["id"]: q for q in map(json.loads, (data / "qa.jsonl").read_text().splitlines())}
    facts = {f["id"]: f for f in map(json.loads, (data / "fact_qa.jsonl").read_text().splitlines())}
    trained = {f["memory_id"] for f in facts.values()}
    asked = [p["id"] for p in preds if p["set"] == "factqa_asked"]
    assert asked and all(set(qa[i]["evidence_memory_ids"]) <= trained and qa[i]["category"] != 5 for i in asked)
    assert all("before" in p and "after" in p for p in preds)

    # The exported adapter on a freshly loaded base replays the trained model's update replies exactly.
    cfg = json.loads((sdir / "export" / "backend_config.json").read_text())
    backend = LocalHFLoraBackend({**cfg, "max_retries": 0, "torch_dtype": "float32"}, data_root=tmp_path)
    update_ids = [p["id"] for p in preds if p["set"] == "update"]
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "outputs" / "default" / "data" /
                                                 "update_decisions.jsonl").read_text().splitlines())}
    prompts = [(rows[i]["messages"][0]["content"], rows[i]["messages"][1]["content"]) for i in update_ids]
    got = backend.call_update_llm_batch(prompts)
    assert [g.raw_text for g in got] == [p["after"]["raw_text"] for p in preds if p["set"] == "update"]


@pytest.mark.slow
def test_sft_qlora_nf4_stage_on_cpu(make_cfg, tmp_path, small_locomo):
    small = ["model.name_or_path=" + str(tmp_path / "cache" / "tiny-small"),
             *(f"model.tiny.{k}={v}" for k, v in SMALL_TINY_SPEC.items())]
    base = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_sft=120", *small]
    run(make_cfg("stage=data", *base))
    result = run(make_cfg("stage=sft", *base, *CAPS, "sft.max_epochs=1", "sft.max_seq_len=512", "quant=nf4",
                          "trainer.gradient_checkpointing=true"))
    m = result.manifest
    assert m.stats["quantised_4bit"] is True and m.stats["global_steps"] >= 1
    assert all(math.isfinite(m.metrics[k]) for k in ("val/loss", "general/ppl_before", "general/ppl_after"))
    assert (result.dir / "export" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((result.dir / "export" / "backend_config.json").read_text())["quant"]["mode"] == "nf4"
