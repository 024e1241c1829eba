"""Chat SFT samples: token ids under the tokenizer's own chat template, labels on assistant tokens only.

Which tokens are "assistant tokens" comes from the template itself when it marks them with
`{% generation %}` (`apply_chat_template(..., return_assistant_tokens_mask=True)`): the assistant content and the
end-of-turn token, not the role header. A template without those markers (many hub templates) falls back to the
prefix method: for assistant turn i, the tokens between the rendering of turns [:i] with the generation prompt and
the rendering of turns [:i+1], cut after the last end-of-turn (eos) token. On the tiny tokenizer both methods give
the same mask (tests/data/test_chat_sft.py).

Every other position has label -100, so the loss is the assistant turns' next-token cross entropy.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightmem_exp.config.schema import MASK_METHODS
from lightmem_exp.errors import LmxError
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.inputs import pad_batch

IGNORE_INDEX = -100
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template marks assistant tokens with `{% generation %}`."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and bool(_GENERATION_RE.search(template))


def assistant_token_mask(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], *,
                         method: str = "auto") -> tuple[list[int], list[int]]:
    """`(input_ids, mask)` of the whole chat; mask[t] = 1 where token t belongs to an assistant turn.

    method: "template" (needs `{% generation %}`), "prefix", or "auto" (template when it has the markers).
    """
    if method not in MASK_METHODS:
        raise LmxError(f"unknown assistant-mask method {method!r}; expected one of {MASK_METHODS}")
    if method == "template" or (method == "auto" and has_generation_markers(tokenizer)):
        if not has_generation_markers(tokenizer):
            raise LmxError("the tokenizer's chat template has no {% generation %} markers; use the prefix method")
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
    return _prefix_mask(tokenizer, messages)


def _prefix_mask(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    messages = list(messages)
    ids = chat_token_ids(tokenizer, messages)
    mask = [0] * len(ids)
    eos = tokenizer.eos_token_id
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(chat_token_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = chat_token_ids(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto or start > len(upto):
            raise LmxError("the chat template does not render a conversation's prefix as a prefix of its tokens; "
                           "assistant-only labels need a template with {% generation %} markers")
        end = len(upto)
        span = ids[start:end]
        if eos is not None and eos in span:  # the turn ends at its end-of-turn token; trailing newlines are not
            end = start + len(span) - span[::-1].index(eos)
        mask[start:end] = [1] * (end - start)
    return ids, mask


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], *, method: str = "auto") -> dict:
    """`{"input_ids", "labels"}`: labels are the ids on assistant tokens, IGNORE_INDEX elsewhere."""
    ids, mask = assistant_token_mask(tokenizer, messages, method=method)
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]}


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], *, max_seq_len: int, group: str,
                method: str = "auto") -> tuple[list[dict], Counter]:
    """Encode rows with `messages`; rows longer than `max_seq_len` tokens or with no assistant token are skipped
    (never truncated: a cut assistant turn teaches the model to stop mid-answer). Returns (encoded, skipped)."""
    out, skipped = [], Counter()
    for row in rows:
        enc = encode_chat(tokenizer, row["messages"], method=method)
        if len(enc["input_ids"]) > max_seq_len:
            skipped[f"{group}_too_long"] += 1
        elif all(lab == IGNORE_INDEX for lab in enc["labels"]):
            skipped[f"{group}_no_assistant_tokens"] += 1
        else:
            out.append({**enc, "group": group, "id": row.get("id")})
    return out, skipped


def split_last_turn(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """`(prompt messages, reference answer)`: everything before the last assistant turn, and its content."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return list(messages[:i]), messages[i]["content"]
    raise LmxError("the conversation has no assistant turn")


class ChatSftDataset(Dataset):
    """Encoded rows `{"input_ids", "labels", "group", ...}` (see `encode_rows`)."""

    def __init__(self, rows: Sequence[dict], groups: Sequence[str]):
        self.rows, self.group_ids = list(rows), {g: i for i, g in enumerate(groups)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def collate(self, rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_sft(rows, pad_id, self.group_ids)


def pad_labelled(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding of rows holding `input_ids` and `labels`: `input_ids` (pad_id), `attention_mask` (0 on pads),
    `labels` (IGNORE_INDEX on pads). Pads are found by the mask, never by the id."""
    ids, mask = pad_batch([r["input_ids"] for r in rows], pad_id, "right")
    labels, _ = pad_batch([r["labels"] for r in rows], IGNORE_INDEX, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_sft(rows: Sequence[dict], pad_id: int, group_ids: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """`pad_labelled` and, when `group_ids` is given, `group` (the row's group index)."""
    batch = pad_labelled(rows, pad_id)
    if group_ids is not None:
        batch["group"] = torch.tensor([group_ids[r["group"]] for r in rows], dtype=torch.long)
    return batch
