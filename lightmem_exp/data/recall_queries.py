"""Token sequences that end in `<recall>`, for training and evaluating the recall query (step1; step2 keeps it).

A query is what the model has read when it emits `<recall>`: a question or dialogue window as a user turn
followed by the assistant prompt, or an SFT conversation cut right after a `<think>` segment.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightmem_exp.models.chat import chat_token_ids, text_token_ids


def user_query_ids(tokenizer: PreTrainedTokenizerBase, text: str, recall_id: int, max_tokens: int) -> list[int]:
    ids = chat_token_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return [*ids, recall_id][-max_tokens:]


def think_query_ids(tokenizer: PreTrainedTokenizerBase, context: list[dict], recall_id: int,
                    max_tokens: int) -> list[int]:
    """`context` ends with a partial assistant turn (up to `</think>`), which is appended unterminated."""
    ids = chat_token_ids(tokenizer, context[:-1], add_generation_prompt=True)
    ids += text_token_ids(tokenizer, context[-1]["content"])
    return [*ids, recall_id][-max_tokens:]


def answer_memories(memories: Sequence[dict], pairs: Sequence[dict], convs: set[str]) -> list[dict]:
    """The memories of `convs` that answer at least one of their recall pairs (step1's training keys), in order."""
    wanted = {mid for p in pairs if p["conv_id"] in convs for mid in p["memory_ids"]}
    return [m for m in memories if m["conv_id"] in convs and m["id"] in wanted]


def pair_query_rows(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict], keys: Sequence[dict], convs: set[str],
                    recall_id: int, max_tokens: int, cap: int | None, seed: int) -> list[dict]:
    """`<recall>` query rows of the recall pairs of `convs` (questions and dialogue windows) whose memories are among
    `keys`, targets = their indices in `keys`; a seeded sample of `cap` (None: all)."""
    key_of = {m["id"]: k for k, m in enumerate(keys)}
    rows = [{"input_ids": user_query_ids(tokenizer, p["query"], recall_id, max_tokens), "kind": p["query_kind"],
             "targets": [key_of[m] for m in p["memory_ids"] if m in key_of]}
            for p in pairs if p["conv_id"] in convs]
    rows = [r for r in rows if r["targets"]]
    if cap is not None and len(rows) > cap:
        rows = random.Random(seed).sample(rows, cap)
    return rows


def conversation_groups(keys: Sequence[dict]) -> list[int]:
    """Per key: the index of its conversation among the keys' sorted conversation ids (step1's
    `negatives=conversation` groups)."""
    index = {c: i for i, c in enumerate(sorted({m["conv_id"] for m in keys}))}
    return [index[m["conv_id"]] for m in keys]


class RecallQueryDataset(Dataset):
    """Rows of {input_ids: list[int], targets: list[int] (key indices), kind: str}."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate_queries(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding (causal attention keeps real tokens exact); targets padded with -1."""
    width = max(len(r["input_ids"]) for r in rows)
    n_pos = max(len(r["targets"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), n_pos), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
        targets[i, : len(r["targets"])] = torch.tensor(r["targets"])
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}
