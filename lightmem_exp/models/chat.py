"""Chat-template helpers that behave the same across tokenizer versions and model families."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# verbose=False below: the tokenizer's warning about sequences over its `model_max_length` is no limit of this project,
# whose callers count tokens to check or cut them against their own limits (max_seq_len, the context length).


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *,
                   add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's own chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        tokenizer_kwargs={"verbose": False})
    if hasattr(out, "keys"):  # newer transformers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def text_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of plain `text`, no special tokens added: for counting, or for pieces the caller cuts itself."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """How many tokens each plain text is (one batched call, no special tokens)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
