"""Step 2 training data (seed 001 §4.3, §5.2): MixedMemorySFTDataset, its per-epoch re-draw, and the collator.

Three sample types, token by token (`M` = the memory text's tokens, `E` = the end marker's tokens):

  memory_front   context + <recall> <|memory_pad|> M E
                 context = an SFT conversation (chat template) cut at a random token inside or after its first
                 assistant reply (so recall fires mid-answer, as at inference); labels: <recall>, M, E.
  memory_full    prefix + <recall> <|memory_pad|> M E + suffix
                 one SFT conversation split at the end of its first `</think>`: prefix = everything up to and
                 including `</think>`, suffix = the rest of the SAME conversation; labels: <recall>, M, E and the
                 suffix's assistant tokens (its user/system turns stay -100).
                 A conversation without `<think>` is split at the start of its first assistant reply instead
                 (the recall opens the reply, the suffix is the reply and what follows) — see "thirds" below.
  sft_only       the plain conversation; labels: assistant tokens only.

Label rules everywhere: `<recall>` is labelled with its own id (the trigger is kept), `<|memory_pad|>` is -100
(its input is overwritten by the memory vector), system/user/template tokens are -100, an assistant turn is
labelled through its end-of-turn token (`tokenizer.eos_token`, e.g. `<|im_end|>`); the newline after it is not.

End marker: the plain text `end_marker` (default "</memory>", tokenised without special tokens), appended after
every recalled memory. It is ordinary text, so no vocabulary change is needed, it is visible in generated text,
and it tells a decoder (the recall test, eval) where the recalled memory stops and normal text resumes.

Per-epoch draw (`refresh_epoch_data(epoch)`, seeded by (seed, epoch), so a resumed run re-draws the same):
  n = ceil(#memories x sft_ratio) conversations are drawn from the pool (minus the held-out guard set); each
  draw's true length is `apply_chat_template(..., tokenize=True)`; one over `sft_max_tokens` is skipped and the
  draw refills; a pool that runs short is an error. The draw is split into thirds: prefix (memory_front),
  full (memory_full), pure (sft_only). The full third is filled with `<think>` conversations first; when too few
  of them fit the length limit, the rest of the third uses conversations without `<think>` split at their first
  reply (or, with `full_think_only=true`, the draw is an error). Memories are shuffled and dealt to the
  memory_front and memory_full slots in turn (cycling when there are more slots than memories), so with the
  design's ratio 1.5 every memory appears exactly once per epoch. The epoch's record (pool indices per third,
  memory ids per type, skips) is returned for logging.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from lightmem_exp.data.chat_sft import IGNORE_INDEX, pad_labelled
from lightmem_exp.data.sft_sampling import draw_within_limit
from lightmem_exp.errors import LmxError
from lightmem_exp.models.chat import chat_text, chat_token_ids, text_token_ids

THINK_END = "</think>"
KINDS = ("memory_front", "memory_full", "sft_only")


@dataclass
class Conversation:
    """One pool conversation tokenised once: ids, which ids are assistant-labelled, and two cut points.

    `reply_start`: token index where the first assistant reply's content starts.
    `think_cut`: token index right after the first assistant reply's `</think>` (None without one).
    """

    index: int
    ids: list[int]
    assistant: list[bool]
    reply_start: int
    think_cut: int | None


@dataclass
class Sample:
    kind: str
    input_ids: list[int]
    labels: list[int]
    memory: int | None = None       # row into the dataset's memory list (and the module's vector table)
    pool_index: int | None = None
    extra: dict = field(default_factory=dict)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat-template text of `messages` as (text, labelled) pieces: assistant content through the end-of-turn
    token is labelled, everything else (system, user, role headers, separators) is not.

    Assistant spans are found by rendering the conversation up to each reply with and without it, which needs a
    template whose renderings are prefixes of each other (true of ChatML/Qwen2.5, Llama 3, Mistral).
    """
    full = chat_text(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], add_generation_prompt=True)
        through = chat_text(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise LmxError("the chat template does not render conversations as prefixes of each other; "
                           "assistant spans cannot be located for labelling")
        reply = through[len(before):]
        k = reply.find(eos) if eos else -1
        labelled = reply[: k + len(eos)] if k >= 0 else reply
        pieces += [(full[pos:len(before)], False), (labelled, True)]
        pos = len(before) + len(labelled)
    pieces.append((full[pos:], False))
    return [(t, lab) for t, lab in pieces if t]


def tokenize_conversation(tokenizer, row: dict) -> Conversation:
    """Tokenise a pool row piece by piece (pieces end at special tokens, so the ids equal the whole rendering's)."""
    ids: list[int] = []
    assistant: list[bool] = []
    reply_start = think_cut = None
    for text, labelled in chat_segments(tokenizer, row["messages"]):
        parts = [text]
        if labelled and think_cut is None and THINK_END in text:
            k = text.index(THINK_END) + len(THINK_END)
            parts = [text[:k], text[k:]]
        for j, part in enumerate(parts):
            if labelled and reply_start is None:
                reply_start = len(ids)
            toks = text_token_ids(tokenizer, part) if part else []
            ids += toks
            assistant += [labelled] * len(toks)
            if len(parts) == 2 and j == 0:
                think_cut = len(ids)
    if reply_start is None:
        raise LmxError(f"SFT pool row {row.get('index')}: no assistant reply to train on")
    return Conversation(int(row["index"]), ids, assistant, reply_start, think_cut)


def _labels(conv: Conversation, start: int = 0, end: int | None = None) -> list[int]:
    end = len(conv.ids) if end is None else end
    return [t if a else IGNORE_INDEX for t, a in zip(conv.ids[start:end], conv.assistant[start:end], strict=True)]


def build_sft_only(conv: Conversation) -> Sample:
    return Sample("sft_only", list(conv.ids), _labels(conv), pool_index=conv.index)


def _memory_block(recall_id: int, pad_id: int, memory_ids: list[int], marker_ids: list[int]) -> tuple[list, list]:
    body = [*memory_ids, *marker_ids]
    return [recall_id, pad_id, *body], [recall_id, IGNORE_INDEX, *body]


def build_memory_front(conv: Conversation, cut: int, memory: int, memory_ids: list[int], marker_ids: list[int], *,
                       recall_id: int, pad_id: int, context_max_tokens: int | None = None) -> Sample:
    """context = conv.ids[:cut] (left-truncated to `context_max_tokens`), unlabelled, then the memory block."""
    if not conv.reply_start <= cut <= len(conv.ids):
        raise LmxError(f"memory_front cut {cut} outside [{conv.reply_start}, {len(conv.ids)}]")
    start = 0 if context_max_tokens is None else max(0, cut - context_max_tokens)
    ids, labels = _memory_block(recall_id, pad_id, memory_ids, marker_ids)
    context = conv.ids[start:cut]
    return Sample("memory_front", context + ids, [IGNORE_INDEX] * len(context) + labels, memory=memory,
                  pool_index=conv.index, extra={"cut": cut})


def build_memory_full(conv: Conversation, memory: int, memory_ids: list[int], marker_ids: list[int], *,
                      recall_id: int, pad_id: int) -> Sample:
    """prefix (through `</think>`, or up to the first reply without one), memory block, then the suffix."""
    cut = conv.think_cut if conv.think_cut is not None else conv.reply_start
    ids, labels = _memory_block(recall_id, pad_id, memory_ids, marker_ids)
    return Sample("memory_full", conv.ids[:cut] + ids + conv.ids[cut:],
                  [IGNORE_INDEX] * cut + labels + _labels(conv, cut), memory=memory, pool_index=conv.index,
                  extra={"cut": cut, "think": conv.think_cut is not None})


def _thirds(n: int) -> tuple[int, int, int]:
    base, rest = divmod(n, 3)
    return base + (rest > 0), base + (rest > 1), base


class MixedMemorySFTDataset(Dataset):
    """memory_front / memory_full / sft_only samples, re-drawn from the SFT pool at every epoch.

    `memories`: [{id, text}] in the order of the vector table the trainer injects from (sample `memory` = row).
    `pool`: the data stage's sft_pool rows ({index, messages, has_think, ...}); `exclude` pool indices are never
    drawn (the held-out guard set).
    """

    def __init__(self, tokenizer, pool: Sequence[dict], memories: Sequence[dict], *, recall_id: int,
                 memory_pad_id: int, end_marker: str, sft_ratio: float, sft_max_tokens: int, seed: int,
                 full_think_only: bool = False, context_max_tokens: int | None = None,
                 exclude: Sequence[int] = ()):
        if not memories:
            raise LmxError("MixedMemorySFTDataset: no memories to write")
        self.tokenizer = tokenizer
        self.recall_id, self.pad_id = recall_id, memory_pad_id
        self.marker_ids = text_token_ids(tokenizer, end_marker) if end_marker else []
        self.memories = list(memories)
        self.memory_ids = [text_token_ids(tokenizer, m["text"]) for m in self.memories]
        self.sft_ratio, self.sft_max_tokens, self.seed = sft_ratio, sft_max_tokens, seed
        self.full_think_only, self.context_max_tokens = full_think_only, context_max_tokens
        excluded = {int(i) for i in exclude}
        self.pool = [r for r in pool if int(r["index"]) not in excluded]
        self._n_tokens: dict[int, int] = {}
        self._convs: dict[int, Conversation] = {}
        self.samples: list[Sample] = []
        self.epoch: int | None = None
        self.record: dict = {}

    # ---- tokenisation caches ------------------------------------------------------------------------------

    def chat_length(self, row: dict) -> int:
        """True token length of a pool conversation under the tokenizer's chat template (cached)."""
        i = int(row["index"])
        if i not in self._n_tokens:
            self._n_tokens[i] = len(chat_token_ids(self.tokenizer, row["messages"]))
        return self._n_tokens[i]

    def conversation(self, row: dict) -> Conversation:
        i = int(row["index"])
        if i not in self._convs:
            self._convs[i] = tokenize_conversation(self.tokenizer, row)
        return self._convs[i]

    @property
    def total_target(self) -> int:
        return math.ceil(len(self.memories) * self.sft_ratio)

    # ---- the per-epoch draw -------------------------------------------------------------------------------

    def refresh_epoch_data(self, epoch: int) -> dict:
        """Re-draw this epoch's samples (idempotent per epoch); returns the epoch record (pool indices, memory ids)."""
        if self.epoch == epoch:
            return self.record
        rng = random.Random(f"step2-mixed-memory/{self.seed}/{epoch}")
        n = self.total_target
        n_front, n_full, n_pure = _thirds(n)
        within: Callable[[dict], int] = self.chat_length
        think = [r for r in self.pool if self.conversation_has_think(r)]
        fitting_think = [r for r in think if within(r) <= self.sft_max_tokens]
        n_think = min(n_full, len(fitting_think))
        if self.full_think_only and n_think < n_full:
            raise LmxError(
                f"step2 draw: memory_full needs {n_full} <think> conversations within {self.sft_max_tokens} tokens "
                f"but the pool has {len(fitting_think)} (of {len(think)} with <think>); raise step2.sft_max_tokens, "
                "lower data.max_memories, or set step2.full_think_only=false")
        think_draw = draw_within_limit(think, n_think, n_tokens=within, max_tokens=self.sft_max_tokens, rng=rng,
                                       what="step2 <think> draw for memory_full")
        taken = {int(r["index"]) for r in think_draw.items}
        rest_pool = [r for r in self.pool if int(r["index"]) not in taken]
        rest = draw_within_limit(rest_pool, n - n_think, n_tokens=within, max_tokens=self.sft_max_tokens, rng=rng,
                                 what="step2 SFT draw (memory_front / memory_full / sft_only)")
        full_rows = think_draw.items + rest.items[: n_full - n_think]
        others = rest.items[n_full - n_think:]
        front_rows, pure_rows = others[:n_front], others[n_front:]

        order = list(range(len(self.memories)))
        rng.shuffle(order)
        slots = [order[k % len(order)] for k in range(n_front + n_full)]
        front_mem, full_mem = slots[:n_front], slots[n_front:]

        samples = []
        for row, mem in zip(front_rows, front_mem, strict=True):
            conv = self.conversation(row)
            cut = rng.randint(conv.reply_start, len(conv.ids))
            samples.append(build_memory_front(conv, cut, mem, self.memory_ids[mem], self.marker_ids,
                                              recall_id=self.recall_id, pad_id=self.pad_id,
                                              context_max_tokens=self.context_max_tokens))
        for row, mem in zip(full_rows, full_mem, strict=True):
            samples.append(build_memory_full(self.conversation(row), mem, self.memory_ids[mem], self.marker_ids,
                                             recall_id=self.recall_id, pad_id=self.pad_id))
        samples += [build_sft_only(self.conversation(row)) for row in pure_rows]
        rng.shuffle(samples)  # the three types stay mixed within every batch

        self.samples, self.epoch = samples, epoch
        self.record = {
            "epoch": epoch,
            "seed": self.seed,
            "pool_indices": {
                "memory_front": [int(r["index"]) for r in front_rows],
                "memory_full": [int(r["index"]) for r in full_rows],
                "sft_only": [int(r["index"]) for r in pure_rows],
            },
            "memory_ids": {
                "memory_front": [self.memories[m]["id"] for m in front_mem],
                "memory_full": [self.memories[m]["id"] for m in full_mem],
            },
            "memory_full_with_think": n_think,
            "skipped_too_long": think_draw.skipped_too_long + rest.skipped_too_long,
            "samples": len(samples),
        }
        return self.record

    def conversation_has_think(self, row: dict) -> bool:
        if "has_think" in row:
            return bool(row["has_think"])
        return any(m["role"] == "assistant" and THINK_END in m["content"] for m in row["messages"])

    # ---- Dataset ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.total_target

    def __getitem__(self, i: int) -> dict:
        if self.epoch is None:
            raise LmxError("MixedMemorySFTDataset: call refresh_epoch_data(epoch) before reading samples")
        s = self.samples[i]
        return {"input_ids": s.input_ids, "labels": s.labels, "memory": s.memory, "kind": s.kind}


class MixedMemoryCollator:
    """Right padding with an attention mask (rows never attend to each other or to padding), labels -100 on padding,
    and `memory_rows`: the vector-table row of every `<|memory_pad|>` in row-major order (what
    `memory_inputs_embeds` expects)."""

    def __init__(self, pad_token_id: int, memory_pad_id: int):
        self.pad_token_id, self.memory_pad_id = pad_token_id, memory_pad_id

    def __call__(self, rows: list[dict]) -> dict:
        memory_rows = []
        for r in rows:
            pads = sum(1 for t in r["input_ids"] if t == self.memory_pad_id)
            if pads != (r["memory"] is not None):
                raise LmxError(f"a {r['kind']} sample has {pads} <|memory_pad|> tokens for memory {r['memory']}")
            if r["memory"] is not None:
                memory_rows.append(r["memory"])
        return {**pad_labelled(rows, self.pad_token_id), "memory_rows": torch.tensor(memory_rows, dtype=torch.long),
                "kinds": [r["kind"] for r in rows]}
