"""The tiny offline default model: a byte-level BPE tokenizer trained on the bundled corpus plus a random-init Qwen2.

The build is deterministic (same spec and corpus give a byte-identical tokenizer.json and identical weights) and is
written atomically, so every later step loads it with `from_pretrained` exactly like a hub model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from lightmem_exp.errors import ConfigError, DataError
from lightmem_exp.models.build_cache import ensure_build

log = logging.getLogger(__name__)

# Bump when the build recipe changes so existing builds are rebuilt instead of silently reused.
BUILDER_VERSION = 1
BUILD_RECORD = "lmx_tiny_build.json"  # written last: a directory without it is not a complete build

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
RECALL_TOKEN = "<recall>"
MEMORY_PAD_TOKEN = "<|memory_pad|>"
THINK_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
EXTRA_SPECIAL_TOKENS = (RECALL_TOKEN, MEMORY_PAD_TOKEN, THINK_TOKEN, THINK_END_TOKEN)
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN, *EXTRA_SPECIAL_TOKENS)

# Qwen2's pre-tokenisation split (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# ChatML layout: <|im_start|>{role}\n{content}<|im_end|>\n. Assistant turns are wrapped in {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can mask the loss to assistant tokens.
# Optional message fields: `reasoning_content` (rendered as <think>...</think>) and OpenAI-style `tool_calls`.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nFunction signatures, one JSON object per line:\\n<tools>\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson + '\\n' -}}{%- endfor -%}"
    '{{- \'</tools>\\n\\nTo call a function, reply with <tool_call>\\n{"name": <name>, "arguments": <args>}'
    "\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('unknown chat role: ' + message.role) -}}"
    "{%- endif -%}"
    "{%- if not (tools and loop.first and message.role == 'system') -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.role == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message.reasoning_content -%}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- message.content or '' -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is string else fn.arguments | tojson -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' + args + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPEC_KEYS: dict[str, type] = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "max_position_embeddings": int,
    "tie_word_embeddings": bool,
    "seed": int,
}
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the special tokens and at least one merge
CORPUS_SKIP_KEYS = frozenset({"img_url", "dia_id", "evidence", "sample_id"})  # ids and URLs, not language


def ensure_tiny_model(out_dir: str | Path, data_root: str | Path, spec: Mapping[str, Any]) -> Path:
    """Return `out_dir` holding a complete tiny build for `spec`, building it first when missing or stale
    (under a file lock, atomically: see `build_cache`)."""
    clean = normalize_spec(spec)

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        record = build_tiny_model(tmp, Path(data_root), clean)
        log.info("built tiny model at %s: %d parameters, vocab %d, %.1fs", out_dir, record["num_parameters"],
                 record["tokenizer_size"], time.perf_counter() - t0)
        return record

    return ensure_build(out_dir, spec_hash(clean), BUILD_RECORD, build)


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `model.tiny` and return it as a plain dict (works for DictConfig too)."""
    items = {str(k): spec[k] for k in spec}
    unknown = sorted(set(items) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"model.tiny.{unknown[0]}", f"unknown key; expected one of {sorted(SPEC_KEYS)}")
    out: dict[str, Any] = {}
    for name, kind in SPEC_KEYS.items():
        if name not in items:
            raise ConfigError(f"model.tiny.{name}", "missing")
        value = items[name]
        # bool is an int subclass: reject it for int fields and accept only real bools for bool fields
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"model.tiny.{name}", f"expected {kind.__name__}, got {value!r}")
        if kind is int and name != "seed" and value < 1:
            raise ConfigError(f"model.tiny.{name}", f"must be >= 1, got {value}")
        out[name] = value
    if out["vocab_size"] < MIN_VOCAB:
        raise ConfigError(
            "model.tiny.vocab_size", f"must be >= {MIN_VOCAB} (bytes + special tokens), got {out['vocab_size']}"
        )
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ConfigError("model.tiny.num_attention_heads", "must divide hidden_size")
    if out["num_attention_heads"] % out["num_key_value_heads"]:
        raise ConfigError("model.tiny.num_key_value_heads", "must divide num_attention_heads")
    return out


def spec_hash(clean_spec: Mapping[str, Any]) -> str:
    """Key of a build: the validated spec plus the builder version (the bundled corpus is fixed and recorded)."""
    blob = json.dumps({"builder": BUILDER_VERSION, "spec": dict(clean_spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def corpus_files(data_root: Path) -> list[Path]:
    """The bundled texts the tokenizer is trained on, in a fixed order."""
    locomo = data_root / "locomo" / "locomo10.json"
    sft = sorted(p for p in (data_root / "sft").glob("*.json*") if p.suffix in (".json", ".jsonl"))
    missing = [p for p in (locomo,) if not p.is_file()]
    if missing or not sft:
        where = missing[0] if missing else data_root / "sft"
        raise DataError(where, "bundled corpus for the tiny tokenizer not found; point the data root at shared/data")
    return [locomo, *sft]


def corpus_texts(files: list[Path]) -> Iterator[str]:
    """Every non-empty string value in the corpus files, in document order (dict order is file order)."""
    for path in files:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            docs = [json.loads(line) for line in lines if line.strip()]
        else:
            docs = [json.loads(path.read_text(encoding="utf-8"))]
        for doc in docs:
            yield from _strings(doc)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        if node.strip():
            yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in CORPUS_SKIP_KEYS:
                yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen2's normaliser and pre-tokeniser; special tokens take the last ids, as in Qwen."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])  # fixed id order
    return tok


def build_tiny_model(out_dir: Path, data_root: Path, clean_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write tokenizer + random-init Qwen2 into `out_dir` and return the build record (use `ensure_tiny_model`)."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = dict(clean_spec)
    files = corpus_files(data_root)
    backend = train_tokenizer(list(corpus_texts(files)), spec["vocab_size"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, *EXTRA_SPECIAL_TOKENS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # round up to a multiple of 64 for matmul-friendly shapes
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        max_window_layers=spec["num_hidden_layers"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [ids[EOS_TOKEN], ids[PAD_TOKEN]]  # as Qwen: stop at either
    model.generation_config.pad_token_id = ids[PAD_TOKEN]
    model.save_pretrained(out_dir)

    return {
        "builder_version": BUILDER_VERSION,
        "spec": spec,
        "num_parameters": sum(p.numel() for p in model.parameters()),  # tied weights counted once
        "tokenizer_size": len(tokenizer),
        "special_token_ids": ids,
        "corpus": [
            {"file": str(p.relative_to(data_root)), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files
        ],
    }
