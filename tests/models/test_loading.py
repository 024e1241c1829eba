"""The single model-loading path: tiny and hub-style models, memory tokens, trainable rows, LoRA, 4-bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.models import loading as L

DATA_ROOT = Path(os.environ.get("LMX_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
TINY = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "seed": 0,
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def model_cfg(**overrides: object):
    base = {
        "name": "tiny",
        "name_or_path": "unset",
        "build": "tiny",
        "init": "pretrained",
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "tiny": TINY,
    }
    return OmegaConf.create({**base, **overrides})


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory):
    return model_cfg(name_or_path=str(tmp_path_factory.mktemp("cache") / "tiny-qwen2"))


@pytest.fixture(scope="module")
def plain_dir(tiny_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub-style checkpoint whose tokenizer lacks the memory tokens and whose lm_head is untied."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(L.resolve_model_path(tiny_cfg, DATA_ROOT))
    out = tmp_path_factory.mktemp("plain")
    tok_json = json.loads((src / "tokenizer.json").read_text())
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if t["content"] not in L.MEMORY_TOKENS]
    (out / "tokenizer.json").write_text(json.dumps(tok_json))
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["extra_special_tokens"] = ["<|im_start|>"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == TINY["vocab_size"] - len(L.MEMORY_TOKENS)

    config = AutoConfig.from_pretrained(src)
    config.vocab_size, config.tie_word_embeddings = len(tok), False
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def plain_cfg(path: Path, **overrides: object):
    return model_cfg(name_or_path=str(path), build=None, tiny=None, **overrides)


# ----------------------------------------------------------------------------------------------------- loading


def test_tiny_goes_through_from_pretrained(tiny_cfg) -> None:
    path = L.resolve_model_path(tiny_cfg, DATA_ROOT)
    assert path == tiny_cfg.name_or_path and (Path(path) / "config.json").is_file()
    model, tok = L.load_model(tiny_cfg, DATA_ROOT), L.load_tokenizer(tiny_cfg, DATA_ROOT)
    assert model.name_or_path == path and model.dtype == torch.float32
    L.check_tokenizer_matches(model, tok)


def test_hub_id_passes_through() -> None:
    assert L.resolve_model_path(model_cfg(name_or_path="Qwen/Qwen2.5-7B-Instruct", build=None), DATA_ROOT) == (
        "Qwen/Qwen2.5-7B-Instruct"
    )


def test_uncached_hub_id_offline_is_an_lmx_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = model_cfg(name_or_path="lightmem-test/not-a-cached-model", build=None)
    with pytest.raises(LmxError, match="cannot be downloaded offline.*model.name_or_path"):
        L.load_tokenizer(cfg, DATA_ROOT)
    with pytest.raises(LmxError, match="cannot be downloaded offline"):
        L.load_model(cfg, DATA_ROOT)


def test_missing_local_dir_is_an_lmx_error(tmp_path: Path) -> None:
    with pytest.raises(LmxError, match="no such directory"):
        L.load_tokenizer(plain_cfg(tmp_path / "nope"), DATA_ROOT)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"torch_dtype": "float8"}, "model.torch_dtype"),
        ({"init": "zeros"}, "model.init"),
        ({"build": "huge"}, "model.build"),
    ],
)
def test_bad_model_config_names_the_key(tiny_cfg, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        L.load_model(OmegaConf.merge(tiny_cfg, overrides), DATA_ROOT)


def test_random_init_from_arch_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    arch = {
        "model_type": "qwen2",
        "vocab_size": 640,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }
    cfg = model_cfg(
        name_or_path="Qwen/Qwen2.5-7B-Instruct", build=None, init="random", torch_dtype="bfloat16", arch=arch
    )
    model = L.load_model(cfg, DATA_ROOT)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 48
    assert model.get_input_embeddings().weight.shape == (640, 48) and model.dtype == torch.bfloat16
    assert model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"  # adapters record the real base
    with pytest.raises(ConfigError, match="quant.mode"):
        L.load_model(cfg, DATA_ROOT, quant_cfg={"mode": "nf4", "compute_dtype": "bfloat16", "double_quant": True})
    with pytest.raises(LmxError, match="model.arch"):
        L.load_model(OmegaConf.merge(cfg, {"arch": None}), DATA_ROOT)


def test_random_init_of_a_local_checkpoint_uses_its_config(tiny_cfg) -> None:
    pretrained = L.load_model(tiny_cfg, DATA_ROOT)
    torch.manual_seed(123)
    random = L.load_model(OmegaConf.merge(tiny_cfg, {"init": "random"}), DATA_ROOT)
    assert random.config.hidden_size == pretrained.config.hidden_size
    assert not torch.equal(random.get_input_embeddings().weight, pretrained.get_input_embeddings().weight)


# ------------------------------------------------------------------------------------------------ memory tokens


def test_tiny_already_has_memory_tokens(tiny_cfg) -> None:
    model, tok = L.load_model(tiny_cfg, DATA_ROOT), L.load_tokenizer(tiny_cfg, DATA_ROOT)
    before = model.get_input_embeddings().weight.clone()
    ids = L.ensure_memory_tokens(model, tok)
    assert ids.added == [] and len(tok) == TINY["vocab_size"]
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert tok.convert_ids_to_tokens([ids.recall, ids.memory_pad, ids.think, ids.think_end]) == list(L.MEMORY_TOKENS)
    assert L.require_memory_tokens(tok, tiny_cfg.name_or_path).recall == ids.recall


@pytest.mark.parametrize("rows", [None, 576], ids=["resize", "spare-rows"])
def test_ensure_memory_tokens_adds_and_mean_inits(plain_dir: Path, rows: int | None) -> None:
    model, tok = L.load_model(plain_cfg(plain_dir), DATA_ROOT), L.load_tokenizer(plain_cfg(plain_dir), DATA_ROOT)
    if rows:  # a checkpoint with unused padding rows (like Qwen2.5's 152064 vs 151665): no resize needed
        model.resize_token_embeddings(rows, mean_resizing=False)
    n_old = len(tok)
    with pytest.raises(LmxError, match="lacks <recall>"):
        L.require_memory_tokens(tok, plain_dir)
    in_old = model.get_input_embeddings().weight[:n_old].clone()
    out_old = model.get_output_embeddings().weight[:n_old].clone()

    ids = L.ensure_memory_tokens(model, tok)
    assert ids.added == list(L.MEMORY_TOKENS) and len(tok) == n_old + 4
    new = [ids.recall, ids.memory_pad, ids.think, ids.think_end]
    assert new == list(range(n_old, n_old + 4))
    assert model.get_input_embeddings().num_embeddings == (rows or 512)  # 508 + 4 padded to a multiple of 64
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(inp[:n_old], in_old) and torch.equal(out[:n_old], out_old)
    torch.testing.assert_close(inp[new], in_old.mean(0).expand(4, -1))
    torch.testing.assert_close(out[new], out_old.mean(0).expand(4, -1))
    assert tok.encode("a<recall>b<|memory_pad|>", add_special_tokens=False).count(ids.recall) == 1
    assert L.ensure_memory_tokens(model, tok).added == []  # idempotent


def test_tokenizer_model_mismatch(plain_dir: Path, tiny_cfg) -> None:
    small = L.load_model(plain_cfg(plain_dir), DATA_ROOT)
    with pytest.raises(LmxError, match="512 tokens but the model's embedding has 508 rows"):
        L.check_tokenizer_matches(small, L.load_tokenizer(tiny_cfg, DATA_ROOT))


# ---------------------------------------------------------------------------------------------------------- LoRA


def test_attach_lora(tiny_cfg, tmp_path: Path) -> None:
    model = L.load_model(tiny_cfg, DATA_ROOT)
    peft_model = L.attach_lora(model, OmegaConf.create(LORA))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)

    peft_model.save_pretrained(tmp_path / "adapter")
    L.check_adapter_base(tmp_path / "adapter", tiny_cfg)
    with pytest.raises(LmxError, match="trained on base"):
        L.check_adapter_base(tmp_path / "adapter", model_cfg(name_or_path="Qwen/Qwen2.5-7B-Instruct", build=None))
    with pytest.raises(LmxError, match="not a PEFT adapter"):
        L.check_adapter_base(tmp_path, tiny_cfg)


def test_lora_with_token_rows_saves_only_those_rows(plain_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = plain_cfg(plain_dir)
    model, tok = L.load_model(cfg, DATA_ROOT), L.load_tokenizer(cfg, DATA_ROOT)
    ids = L.ensure_memory_tokens(model, tok)  # resizes 508 -> 512 rows
    peft_model = L.attach_lora(model, LORA, token_ids=[ids.recall, ids.memory_pad])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    batch = torch.tensor([[ids.recall, ids.memory_pad, 5, 6, 7, 8]])
    peft_model(batch, labels=batch).loss.backward()
    opt.step()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(batch).logits

    L.save_adapter(peft_model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k or "trainable_tokens" in k for k in saved)  # no full embedding matrices
    deltas = {k: v.shape for k, v in saved.items() if "trainable_tokens" in k}
    assert len(deltas) == 2 and all(shape == (2, 32) for shape in deltas.values())  # embed_tokens and lm_head rows

    fresh, fresh_tok = L.load_model(cfg, DATA_ROOT), L.load_tokenizer(cfg, DATA_ROOT)
    L.ensure_memory_tokens(fresh, fresh_tok)
    with torch.no_grad():
        assert not torch.allclose(fresh(batch).logits, expected)  # the step changed something worth restoring
    reloaded = L.load_adapter(fresh, tmp_path / "adapter", cfg)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, expected)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"r": 0}, "lora.r"),
        ({"r": 2.5}, "lora.r"),
        ({"alpha": 0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"dropout": -0.1}, "lora.dropout"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": ["q_proj", "qkv_proj"]}, "lora.target_modules"),
    ],
)
def test_lora_config_errors_name_the_key(tiny_cfg, overrides: dict, key: str) -> None:
    model = L.load_model(tiny_cfg, DATA_ROOT)
    with pytest.raises(ConfigError, match=key):
        L.attach_lora(model, {**LORA, **overrides})
    assert not hasattr(model, "peft_config")  # rejected before any work


# ------------------------------------------------------------------------------------------------------- 4-bit


def test_nf4_qlora_on_cpu(tiny_cfg) -> None:
    import bitsandbytes as bnb

    quant = OmegaConf.create({"mode": "nf4", "compute_dtype": "bfloat16", "double_quant": True})
    model = L.load_model(tiny_cfg, DATA_ROOT, quant_cfg=quant)
    assert model.is_loaded_in_4bit and isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = L.prepare_for_kbit_training(model)
    peft_model = L.attach_lora(model, LORA)
    ids = torch.randint(0, 500, (2, 32))
    for _ in range(2):  # eval then train, as Lightning's validate-then-train loop does
        peft_model.eval()
        with torch.no_grad():
            assert torch.isfinite(peft_model(ids, labels=ids).loss)
        peft_model.train()
        peft_model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_prepare_for_kbit_is_a_noop_without_quantisation(tiny_cfg) -> None:
    model = L.load_model(tiny_cfg, DATA_ROOT)
    assert L.prepare_for_kbit_training(model) is model and all(p.requires_grad for p in model.parameters())
