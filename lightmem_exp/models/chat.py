"""Chat-template helpers that behave the same across tokenizer versions and model families."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *,
                   add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's own chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # newer transformers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
