"""Bad inputs stop a run with an error that names the file, line or field, never a traceback from deep inside:
malformed JSON / JSONL, datasets of the wrong shape, a memory bank or adapter from another model, a tokenizer
without the memory tokens, a NaN loss, and out-of-range config values (rejected before any work starts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lightmem_exp.artifacts import Manifest, write_jsonl, write_manifest
from lightmem_exp.data.locomo import read_locomo
from lightmem_exp.data.longmemeval import read_longmemeval
from lightmem_exp.data.sft_pool import read_sft_pool
from lightmem_exp.errors import ConfigError, DataError, LmxError
from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.stages import run, validate
from tests.conftest import random_qwen2, run_cli

QUIET = ["logger=none", "progress=false"]


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def _stage_dir(root: Path, stage: str, files: dict[str, object], **manifest) -> Path:
    """A finished upstream stage dir made by hand: JSONL files from row lists, other values written as given."""
    sdir = root / stage
    outputs = {}
    for name, content in files.items():
        path = sdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            write_jsonl(path, content)
        elif isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, dict):
            _json(path, content)
        outputs[name.split(".")[0].split("/")[-1]] = name
    write_manifest(sdir, Manifest(stage=stage, seed=0, outputs={**outputs, **manifest.pop("outputs", {})},
                                  **manifest))
    return sdir


# ------------------------------------------------------------------------------------------- malformed JSON(L)


@pytest.mark.slow
def test_malformed_dataset_json_stops_the_cli_naming_file_and_line(tmp_path):
    bad = tmp_path / "locomo_bad.json"
    bad.write_text('[\n {"sample_id": "c1",\n  "conversation": {,}\n }\n]\n')
    r = run_cli("stage=data", f"data.path={bad}", *QUIET, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: {bad}:3: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "outputs/default/data/manifest.json").exists()


def test_malformed_inter_stage_jsonl_stops_the_next_stage_naming_file_and_line(make_cfg, tmp_path):
    memory = {"id": "m1", "conv_id": "c", "text": "Alice has a dog.", "speaker": "Alice", "timestamp": None,
              "session": 1, "kind": "observation", "source_dia_ids": ["D1:1"], "merged_ids": []}
    data = _stage_dir(tmp_path / "up", "data", {
        "memories.jsonl": json.dumps(memory) + '\n{"id": "m2", "text": oops}\n',
        "recall_pairs.jsonl": [], "sft_pool.jsonl": [], "splits.json": {"train": ["c"], "val": [], "test": []}})
    with pytest.raises(DataError) as e:  # an LmxError: the CLI prints it and exits 2 (the CLI tests here show that)
        run(make_cfg("stage=step1", f"step1.inputs.data={data}", *QUIET))
    assert str(e.value).startswith(f"{data / 'memories.jsonl'}:2: malformed JSON line") and e.value.line == 2


def test_an_inter_stage_row_missing_a_schema_key_names_file_line_and_key(make_cfg, tmp_path, small_locomo):
    run(make_cfg("stage=data", f"data.path={small_locomo}", *QUIET))
    data = tmp_path / "outputs" / "default" / "data"
    lines = (data / "memories.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    del row["kind"]
    (data / "memories.jsonl").write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(DataError) as e:
        run(make_cfg("stage=step1", *QUIET))
    assert str(e.value).startswith(f"{data / 'memories.jsonl'}:2: field 'kind': a MemoryEntry row lacks ['kind']")


def test_sft_jsonl_errors_name_the_line_and_field(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "pool.jsonl").write_text(json.dumps(good) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(DataError, match=r"pool\.jsonl:3: malformed JSON line") as e:
        read_sft_pool(sft)
    assert e.value.line == 3
    bad_role = {"messages": [good["messages"][0], {"role": "bot", "content": "x"}]}
    (sft / "pool.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad_role) + "\n")
    with pytest.raises(DataError, match=r"pool\.jsonl:2: field 'messages\[1\]\.role'"):
        read_sft_pool(sft)


# --------------------------------------------------------------------------------------------- wrong schema


def _cut_locomo(small_locomo: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(small_locomo.read_text())[:2]
    edit(data)
    return _json(tmp_path / "locomo.json", data)


LOCOMO_EDITS = {
    "[0].conversation.session_3[4].text": lambda d: d[0]["conversation"]["session_3"][4].update(text=5),
    "[0].conversation.session_1[0].speaker": lambda d: d[0]["conversation"]["session_1"][0].pop("speaker"),
    "[1].qa[0].category": lambda d: d[1]["qa"][0].update(category="single-hop"),
    "[1].qa[2].question": lambda d: d[1]["qa"][2].pop("question"),
    "[0].conversation": lambda d: d[0].update(conversation=[]),
    "[1].observation.session_1_observation": lambda d: d[1]["observation"].update(session_1_observation=[]),
}


@pytest.mark.parametrize("field", list(LOCOMO_EDITS))
def test_locomo_schema_errors_name_the_field_path(tmp_path, small_locomo, field):
    path = _cut_locomo(small_locomo, tmp_path, LOCOMO_EDITS[field])
    with pytest.raises(DataError) as e:
        read_locomo(path)
    assert e.value.field == field and str(e.value).startswith(f"{path}: field '{field}':")


def test_longmemeval_schema_errors_name_the_field_path(tmp_path, data_root):
    items = json.loads((data_root / "longmemeval" / "longmemeval_single.json").read_text())[:1]
    items[0]["haystack_sessions"][0][1]["content"] = ["not", "text"]
    with pytest.raises(DataError, match=r"field '\[0\]\.haystack_sessions\[0\]\[1\]\.content': expected str, got list"):
        read_longmemeval(_json(tmp_path / "a.json", items))
    del items[0]["haystack_dates"]
    with pytest.raises(DataError, match=r"field '\[0\]\.haystack_dates': item lacks"):
        read_longmemeval(_json(tmp_path / "b.json", items))


@pytest.mark.slow
def test_wrong_schema_stops_the_data_stage_before_any_output(make_cfg, tmp_path, small_locomo):
    path = _cut_locomo(small_locomo, tmp_path, LOCOMO_EDITS["[0].conversation.session_3[4].text"])
    with pytest.raises(DataError, match=r"session_3\[4\]\.text"):
        run(make_cfg("stage=data", f"data.path={path}", *QUIET))
    assert not list((tmp_path / "outputs/default/data").glob("*.jsonl"))


@pytest.mark.parametrize(("reader", "content", "message"), [
    (read_locomo, [], "no usable LoCoMo sample"),
    (read_locomo, [{"sample_id": "c", "conversation": {"speaker_a": "A"}}], "no usable LoCoMo sample"),
    (read_locomo, {"conv-1": {}}, "expected a JSON list"),
    (read_longmemeval, [], "no usable LongMemEval item"),
])
def test_datasets_without_usable_items_are_refused(tmp_path, reader, content, message):
    with pytest.raises(DataError, match=message):
        reader(_json(tmp_path / "d.json", content))


def test_sft_pool_without_usable_items_is_refused(tmp_path):
    _json(tmp_path / "sft" / "only_users.json", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"only_users\.json: no usable SFT sample"):
        read_sft_pool(tmp_path / "sft")


# ------------------------------------------------------------------------------ banks, tokenizers, adapters


def _tokenizer_without_memory_tokens(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(out))
    return out


def _bank(out: Path, dim: int, ids=("c:m1", "c:m2")) -> Path:
    vectors = torch.randn(len(ids), dim, generator=torch.Generator().manual_seed(0))
    MemoryBank(vectors, [{"id": i, "text": f"memory {i}"} for i in ids], embed_scale=1.0).save(out)
    return out


def _tiny(make_cfg):
    from lightmem_exp.models.loading import load_tokenizer, resolve_model_path

    cfg = make_cfg()
    return resolve_model_path(cfg.model, cfg.paths.data), load_tokenizer(cfg.model, cfg.paths.data)


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["bank", "tokenizer"])
def test_step2_refuses_a_step1_bank_or_tokenizer_from_another_model(make_cfg, tmp_path, broken):
    tiny_dir, tokenizer = _tiny(make_cfg)
    up = tmp_path / "up"
    tokenizer.save_pretrained(str(up / "tok_ok"))
    tok_dir = _tokenizer_without_memory_tokens(up / "tok_bad") if broken == "tokenizer" else up / "tok_ok"
    bank = _bank(up / "bank", 16 if broken == "bank" else 128)
    (up / "adapter").mkdir()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data = _stage_dir(up, "data", {"sft_pool.jsonl": [{"index": 0, "source": "pool.jsonl", "messages": chat,
                                                        "has_think": False, "n_tokens": 8}]})
    step1 = _stage_dir(up, "step1", {"written_memories.jsonl": [{"id": "c:m1", "text": "memory c:m1"}]},
                       outputs={"bank": str(bank), "tokenizer": str(tok_dir), "adapter": str(up / "adapter")})
    with pytest.raises(LmxError) as e:
        run(make_cfg("stage=step2", f"step2.inputs.step1={step1}", f"step2.inputs.data={data}", *QUIET))
    if broken == "bank":
        assert isinstance(e.value, DataError) and e.value.field == "hidden_size"
        assert str(e.value).startswith(f"{bank / 'bank.json'}:") and "size 16" in str(e.value)
        assert f"({tiny_dir}) has hidden size 128" in str(e.value)
    else:
        assert str(e.value).startswith(f"{tok_dir}: the tokenizer lacks <recall>, <|memory_pad|>")


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["bank", "tokenizer"])
def test_eval_refuses_a_step2_bank_or_tokenizer_from_another_model(make_cfg, tmp_path, broken):
    from tests.eval.fakes import conversation

    tiny_dir, _ = _tiny(make_cfg)
    conv = conversation()
    up = tmp_path / "up"
    data = _stage_dir(up, "data", {"qa.jsonl": conv.questions, "memories.jsonl": conv.memories,
                                   "sessions.jsonl": conv.sessions,
                                   "splits.json": {"train": [], "val": [], "test": [conv.conv_id]}})
    (up / "step2" / "export").mkdir(parents=True)
    (up / "step2" / "export" / "model").symlink_to(tiny_dir)
    # The step1 bank: eval slices it per conversation (the slices have no file), so it is checked on load.
    bank = _bank(up / "step1" / "bank", 16 if broken == "bank" else 128, [m["id"] for m in conv.memories])
    step1 = _stage_dir(up, "step1", {}, outputs={"bank": "bank"})
    tok_dir = (_tokenizer_without_memory_tokens(up / "step2" / "export" / "tokenizer") if broken == "tokenizer"
               else up / "step2" / "export" / "model")
    step2 = _stage_dir(up, "step2", {}, outputs={"model": "export/model",
                                                  "tokenizer": str(tok_dir.relative_to(up / "step2"))},
                       stats={"end_marker": "</memory>"})
    with pytest.raises(LmxError) as e:
        run(make_cfg("stage=eval", f"eval.inputs.data={data}", f"eval.inputs.step2={step2}",
                     f"eval.inputs.step1={step1}", *QUIET, "eval.methods=[recall]", "eval.recall.bank=step1",
                     "eval.max_new_tokens=4"))
    if broken == "bank":
        assert str(e.value).startswith(f"{bank / 'bank.json'}: field 'hidden_size': memory vectors have size 16")
        assert "hidden size 128" in str(e.value)
    else:
        assert str(e.value).startswith(f"{tok_dir}: the tokenizer lacks <recall>, <|memory_pad|>")


def _adapter_for(model, out: Path, base_name: str) -> Path:
    from lightmem_exp.models.loading import attach_lora, save_adapter

    model.config._name_or_path = model.name_or_path = base_name  # what PEFT records as the adapter's base
    save_adapter(attach_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                             token_ids=[5, 6]), out)
    return out


def test_adapter_for_another_base_is_refused_naming_both(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightmem_exp.lit.step2 import start_from_step1
    from lightmem_exp.models.loading import load_adapter

    adapter = _adapter_for(random_qwen2(), tmp_path / "adapter", str(tmp_path / "base-a"))
    # Another base name: refused before PEFT reads a tensor.
    with pytest.raises(LmxError, match=re.escape(f"trained on base '{tmp_path / 'base-a'}' but model.name_or_path is "
                                                 f"'{tmp_path / 'base-b'}'")):
        load_adapter(random_qwen2(), adapter, {"name_or_path": str(tmp_path / "base-b")})
    # Same recorded name, other weights (a base rebuilt wider at the same path): the shapes say so.
    wider = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64))
    cfg = {"name_or_path": str(tmp_path / "base-a")}
    for load in (lambda: load_adapter(wider, adapter, cfg),
                 lambda: start_from_step1(wider, adapter, cfg, {"r": 4, "alpha": 8, "dropout": 0.0,
                                                                "target_modules": ["q_proj", "v_proj"]}, [5, 6])):
        with pytest.raises(LmxError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{adapter}: the adapter (trained on base '{tmp_path / 'base-a'}') does not fit the "
                              f"model '{tmp_path / 'base-a'}'")
        assert "q_proj.lora_A.weight has shape [2, 32] but model.layers.0.self_attn.q_proj.in_features is 48" in msg


# ------------------------------------------------------------------------------------------------ NaN loss


@pytest.mark.slow
def test_nan_loss_stops_step1_naming_the_step_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, small_locomo,
                                                                                  small_model_cfg, monkeypatch):
    import lightmem_exp.lit.step1 as lit_step1
    from tests.eval.fakes import small_model_overrides

    common = [*QUIET, f"data.path={small_locomo}", "data.max_sft=60", "data.max_memories=8",
              *small_model_overrides(small_model_cfg)]
    run(make_cfg("stage=data", *common))
    real, calls = lit_step1.recall_contrastive_loss, []

    def loss_nan_at_third_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lit_step1, "recall_contrastive_loss", loss_nan_at_third_step)
    with pytest.raises(LmxError) as e:
        run(make_cfg("stage=step1", *common, "step1.max_epochs=1", "step1.batch_size=4", "step1.ckpt_every_n_steps=1",
                     "step1.sft_ratio=0.5"))
    sdir = tmp_path / "outputs/default/step1"
    last = sdir / "checkpoints" / "last.ckpt"
    assert str(e.value).startswith("training loss became nan at step 3 ")
    assert f"last good checkpoint kept at {last}" in str(e.value)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # written after step 2; the NaN step never overwrote it
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (sdir / "manifest.json").exists()


# ------------------------------------------------------------------------------------ config range checks

BAD_CONFIG = [  # (stage, override, the key the error names)
    ("step1", "step1.lr=0", "step1.lr"),
    ("step1", "step1.temperature=-0.1", "step1.temperature"),
    ("step1", "step1.bank_batch_size=0", "step1.bank_batch_size"),
    ("step1", "step1.eval_ks=[0]", "step1.eval_ks"),
    ("step1", "step1.gradient_clip_val=-1", "step1.gradient_clip_val"),
    ("step2", "step2.batch_size=-8", "step2.batch_size"),
    ("step2", "step2.max_epochs=0", "step2.max_epochs"),
    ("step2", "step2.ckpt_every_n_steps=0", "step2.ckpt_every_n_steps"),
    ("step2", "step2.packing.max_tokens=1", "step2.packing.max_tokens"),
    ("step2", "step2.sft_ratio=0", "step2.sft_ratio"),
    ("step2", "step2.sft_ratio=0.2", None),  # an epoch writes a subset of the memories (the capacity bench)
    ("step2", "step2.recall_test.max_new_tokens=0", "step2.recall_test.max_new_tokens"),
    ("step2", "step2.lora.r=0", "step2.lora.r"),
    ("sft", "sft.lr=-1e-3", "sft.lr"),
    ("sft", "sft.eval.batch_size=0", "sft.eval.batch_size"),
    ("adrpo", "adrpo.rl.top_p=1.5", "adrpo.rl.top_p"),
    ("adrpo", "adrpo.rl.top_p=0", "adrpo.rl.top_p"),
    ("adrpo", "adrpo.rl.temperature=-1", "adrpo.rl.temperature"),
    ("adrpo", "adrpo.expert.api.temperature=-0.5", "adrpo.expert.api.temperature"),
    ("adrpo", "adrpo.reward.api.timeout_s=0", "adrpo.reward.api.timeout_s"),
    ("adrpo", "adrpo.sft.max_epochs=-1", "adrpo.sft.max_epochs"),
    ("eval", "eval.batch_size=-1", "eval.batch_size"),
    ("eval", "eval.judge.timeout_s=0", None),  # judge off: its settings are not used, so not checked
    ("data", "lora.r=0", "lora.r"),
    ("data", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("data", "trainer.threads=-2", "trainer.threads"),
    ("data", "model.max_seq_len=0", "model.max_seq_len"),
    ("data", "model.torch_dtype=float64", "model.torch_dtype"),
]


@pytest.mark.parametrize(("stage", "override", "key"), BAD_CONFIG)
def test_out_of_range_config_is_rejected_naming_the_key(make_cfg, stage, override, key):
    if key is None:
        validate(make_cfg(f"stage={stage}", override))
        return
    with pytest.raises(ConfigError, match=re.escape(f"config '{key}': ")):
        validate(make_cfg(f"stage={stage}", override))
    with pytest.raises(ConfigError, match=re.escape(f"config '{key}': ")):  # the same address in the pipeline
        validate(make_cfg(override))


def test_step2_packing_under_flash_attention_needs_one_flattened_row(make_cfg):
    flash = ["stage=step2", "step2.packing.enabled=true", "model.attn_implementation=flash_attention_2"]
    with pytest.raises(ConfigError, match=re.escape("config 'step2.packing.flatten': ")):
        validate(make_cfg(*flash))
    validate(make_cfg(*flash, "step2.packing.flatten=true"))


def test_rejected_config_loads_no_model_and_creates_no_stage_dir(make_cfg, tmp_path, monkeypatch):
    import lightmem_exp.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(loading, "load_model", forbidden)
    monkeypatch.setattr(loading, "load_tokenizer", forbidden)
    with pytest.raises(ConfigError, match="'step1.lr'"):
        run(make_cfg("stage=step1", "step1.lr=-0.1"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_rejected_config_exits_non_zero_from_the_cli_before_any_stage_output(tmp_path):
    r = run_cli("stage=step1", "step1.lr=0", *QUIET, cwd=tmp_path)
    assert r.returncode == 2 and "error: config 'step1.lr': got 0.0, expected a number > 0" in r.stderr, r.stderr[-2000:]
    sdir = tmp_path / "outputs/default/step1"
    # Hydra makes its run dir (the stage dir) for .hydra/ and the log before the app starts; nothing else is there.
    assert {p.name for p in sdir.iterdir()} <= {".hydra", "__main__.log"}
