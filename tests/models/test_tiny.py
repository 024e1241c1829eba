"""The tiny offline model: deterministic, atomic, loadable with the Auto classes like any hub model."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from lightmem_exp.errors import ConfigError, DataError, LmxError
from lightmem_exp.models.tiny import BUILD_RECORD, SPECIAL_TOKENS, ensure_tiny_model, normalize_spec

DATA_ROOT = Path(os.environ.get("LMX_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
SPEC = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "seed": 0,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model", DATA_ROOT, SPEC)


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = ensure_tiny_model(tmp_path / "again", DATA_ROOT, SPEC)
    assert (tiny_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_complete_build_is_reused_and_stale_one_rebuilt(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    ensure_tiny_model(out, DATA_ROOT, SPEC)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(out, DATA_ROOT, dict(SPEC)) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    ensure_tiny_model(out, DATA_ROOT, {**SPEC, "seed": 1})  # another spec: rebuilt in place
    assert (out / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]  # no temp or old build dirs left behind


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_text("precious")
    with pytest.raises(LmxError, match="refusing to overwrite"):
        ensure_tiny_model(tmp_path / "mine", DATA_ROOT, SPEC)


def test_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    out, results, errors = tmp_path / "shared", [], []

    def call() -> None:
        try:
            results.append(ensure_tiny_model(out, DATA_ROOT, SPEC))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [out] * 3
    assert (out / BUILD_RECORD).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]


def test_loads_with_auto_classes(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert len(tok) == SPEC["vocab_size"]
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == SPEC["hidden_size"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    for token in SPECIAL_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == token
    text = "Caroline went to the LGBTQ support group on 8 May 2023."
    assert tok.decode(tok.encode(text)) == text

    with torch.no_grad():
        logits = model(torch.randint(0, len(tok), (1, 512))).logits
    assert logits.shape == (1, 512, model.config.vocab_size) and torch.isfinite(logits).all()


def test_chat_template(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where did I go? <recall>"},
        {"role": "assistant", "content": "To the lake.", "reasoning_content": "Check memory."},
        {"role": "tool", "content": '{"ok": true}'},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere did I go? <recall><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nCheck memory.\n</think>\n\nTo the lake.<|im_end|>\n"
        '<|im_start|>tool\n{"ok": true}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text, add_special_tokens=False)
    for token in ("<|im_start|>", "<|im_end|>", "<recall>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(token) in ids

    out = tok.apply_chat_template(messages[:3], return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == "<think>\nCheck memory.\n</think>\n\nTo the lake.<|im_end|>"


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="model.tiny.hidden_sise"):
        normalize_spec({**SPEC, "hidden_sise": 3})
    with pytest.raises(ConfigError, match="model.tiny.num_attention_heads"):
        normalize_spec({**SPEC, "num_attention_heads": 5})
    with pytest.raises(ConfigError, match="model.tiny.vocab_size"):
        normalize_spec({**SPEC, "vocab_size": 100})
    with pytest.raises(ConfigError, match="model.tiny.tie_word_embeddings"):
        normalize_spec({**SPEC, "tie_word_embeddings": 1})


def test_missing_corpus_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="corpus"):
        ensure_tiny_model(tmp_path / "m", tmp_path / "no-data", SPEC)
