"""MixedMemorySFTDataset: exact token/label layouts of the three sample types, the per-epoch re-draw, the collator."""

from __future__ import annotations

import pytest
import torch

from lightmem_exp.data.chat_sft import IGNORE_INDEX
from lightmem_exp.data.mixed_memory import (
    MixedMemoryCollator,
    MixedMemorySFTDataset,
    build_memory_front,
    build_memory_full,
    build_sft_only,
    chat_segments,
    tokenize_conversation,
)
from lightmem_exp.errors import LmxError
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.loading import load_tokenizer

THINK_ROW = {"index": 7, "has_think": True, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the dog?"},
    {"role": "assistant", "content": "<think>\nThe dog was in the park.\n</think>\n\nIn the park."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]}
PLAIN_ROW = {"index": 3, "has_think": False, "messages": [
    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
MEMORIES = [{"id": f"m{i}", "text": f"Alice adopted dog number {i}."} for i in range(4)]


@pytest.fixture(scope="module")
def tok(small_model_cfg, data_root):
    return load_tokenizer(small_model_cfg, data_root)


@pytest.fixture(scope="module")
def ids(tok):
    return tok.convert_tokens_to_ids("<recall>"), tok.convert_tokens_to_ids("<|memory_pad|>")


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _labelled_text(tok, sample):
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_piecewise_tokenisation_equals_the_chat_template(tok):
    for row in (THINK_ROW, PLAIN_ROW):
        conv = tokenize_conversation(tok, row)
        assert conv.ids == chat_token_ids(tok, row["messages"])
    segs = chat_segments(tok, PLAIN_ROW["messages"])
    assert [t for t, lab in segs if lab] == ["Blue.<|im_end|>"]   # the newline after <|im_end|> is not labelled


def test_sft_only_labels_assistant_content_only(tok):
    s = build_sft_only(tokenize_conversation(tok, THINK_ROW))
    assert s.input_ids == chat_token_ids(tok, THINK_ROW["messages"]) and s.memory is None
    assert _labelled_text(tok, s) == (
        "<think>\nThe dog was in the park.\n</think>\n\nIn the park.<|im_end|>You are welcome.<|im_end|>")
    # system and user tokens are never labelled
    first_reply = s.input_ids.index(tok.convert_tokens_to_ids("<think>"))
    assert all(lab == IGNORE_INDEX for lab in s.labels[:first_reply])


def test_memory_front_layout(tok, ids):
    recall, pad = ids
    conv = tokenize_conversation(tok, PLAIN_ROW)
    mem, marker = _enc(tok, MEMORIES[1]["text"]), _enc(tok, "</memory>")
    cut = conv.reply_start + 1
    s = build_memory_front(conv, cut, 1, mem, marker, recall_id=recall, pad_id=pad)
    assert s.input_ids == conv.ids[:cut] + [recall, pad] + mem + marker
    assert s.labels == [IGNORE_INDEX] * cut + [recall, IGNORE_INDEX] + mem + marker
    assert s.memory == 1 and s.kind == "memory_front"
    short = build_memory_front(conv, cut, 1, mem, marker, recall_id=recall, pad_id=pad, context_max_tokens=2)
    assert short.input_ids == conv.ids[cut - 2 : cut] + [recall, pad] + mem + marker
    with pytest.raises(LmxError, match="outside"):
        build_memory_front(conv, conv.reply_start - 1, 1, mem, marker, recall_id=recall, pad_id=pad)


def test_memory_full_layout_splits_after_think(tok, ids):
    recall, pad = ids
    conv = tokenize_conversation(tok, THINK_ROW)
    mem, marker = _enc(tok, MEMORIES[2]["text"]), _enc(tok, "</memory>")
    s = build_memory_full(conv, 2, mem, marker, recall_id=recall, pad_id=pad)
    cut = conv.think_cut
    assert conv.ids[cut - 1] == tok.convert_tokens_to_ids("</think>")
    assert s.input_ids == conv.ids[:cut] + [recall, pad] + mem + marker + conv.ids[cut:]
    assert s.labels[:cut] == [IGNORE_INDEX] * cut                          # the prefix (think included) is context
    assert s.labels[cut : cut + 2] == [recall, IGNORE_INDEX]
    block = len(mem) + len(marker)
    assert s.labels[cut + 2 : cut + 2 + block] == mem + marker
    suffix = [t for t in s.labels[cut + 2 + block :] if t != IGNORE_INDEX]
    assert tok.decode(suffix) == "\n\nIn the park.<|im_end|>You are welcome.<|im_end|>"   # user turn unlabelled
    assert s.extra["think"] is True
    # without <think> the recall opens the first reply
    plain = tokenize_conversation(tok, PLAIN_ROW)
    p = build_memory_full(plain, 0, mem, marker, recall_id=recall, pad_id=pad)
    assert p.input_ids[: plain.reply_start + 2] == plain.ids[: plain.reply_start] + [recall, pad]
    assert tok.decode([t for t in p.labels[plain.reply_start + 2 + block :] if t != IGNORE_INDEX]) == "Blue.<|im_end|>"


def _pool(n_plain=40, n_think=6):
    rows = []
    for i in range(n_plain):
        words = " ".join(["word"] * (1 + (i % 5) * 15))   # lengths vary: one in five exceeds the limit below
        rows.append({"index": i, "has_think": False, "messages": [
            {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}. {words}"}]})
    for j in range(n_think):
        rows.append({"index": 100 + j, "has_think": True, "messages": [
            {"role": "user", "content": f"Think {j}?"},
            {"role": "assistant", "content": f"<think>\nThought {j}.\n</think>\n\nReply {j}."}]})
    return rows


def _dataset(tok, ids, pool, memories=MEMORIES, **kw):
    recall, pad = ids
    args = {"end_marker": "</memory>", "sft_ratio": 1.5, "sft_max_tokens": 64, "seed": 0} | kw
    return MixedMemorySFTDataset(tok, pool, memories, recall_id=recall, memory_pad_id=pad, **args)


def test_epoch_draw_thirds_memories_and_length_filter(tok, ids):
    memories = [{"id": f"m{i}", "text": f"Memory {i}."} for i in range(8)]
    ds = _dataset(tok, ids, _pool(), memories=memories)
    rec = ds.refresh_epoch_data(0)
    assert len(ds) == 12 and rec["samples"] == 12
    idx = rec["pool_indices"]
    assert [len(idx[k]) for k in ("memory_front", "memory_full", "sft_only")] == [4, 4, 4]
    assert all(i >= 100 for i in idx["memory_full"]) and rec["memory_full_with_think"] == 4   # <think> first
    drawn = [r for r in _pool() if r["index"] in {i for v in idx.values() for i in v}]
    assert all(len(chat_token_ids(tok, r["messages"])) <= 64 for r in drawn)
    assert rec["skipped_too_long"] > 0
    mem = rec["memory_ids"]["memory_front"] + rec["memory_ids"]["memory_full"]
    assert sorted(mem) == sorted(m["id"] for m in memories)   # ratio 1.5: every memory exactly once
    kinds = [ds[i]["kind"] for i in range(len(ds))]
    assert sorted(kinds) == sorted(["memory_front"] * 4 + ["memory_full"] * 4 + ["sft_only"] * 4)


def test_redraw_differs_per_epoch_and_repeats_per_seed(tok, ids):
    ds = _dataset(tok, ids, _pool())
    a0 = ds.refresh_epoch_data(0)
    a1 = ds.refresh_epoch_data(1)
    assert a0["pool_indices"] != a1["pool_indices"]
    again = _dataset(tok, ids, _pool())
    assert again.refresh_epoch_data(1) == a1                   # a resumed run re-draws the same epoch
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in ds.samples]
    assert ds.refresh_epoch_data(1) is a1                      # idempotent within an epoch
    other = _dataset(tok, ids, _pool(), seed=1).refresh_epoch_data(1)
    assert other["pool_indices"] != a1["pool_indices"]


def test_too_few_think_conversations_fall_back_or_error(tok, ids):
    memories = [{"id": f"m{i}", "text": f"Memory {i}."} for i in range(12)]   # memory_full third: 6 slots
    ds = _dataset(tok, ids, _pool(n_think=2), memories=memories)
    rec = ds.refresh_epoch_data(0)
    assert rec["memory_full_with_think"] == 2 and len(rec["pool_indices"]["memory_full"]) == 6
    strict = _dataset(tok, ids, _pool(n_think=2), memories=memories, full_think_only=True)
    with pytest.raises(LmxError, match="memory_full needs 6 <think> conversations"):
        strict.refresh_epoch_data(0)


def test_short_pool_and_excluded_rows_error(tok, ids):
    with pytest.raises(LmxError, match="needed"):
        _dataset(tok, ids, _pool(n_plain=3, n_think=0)).refresh_epoch_data(0)
    ds = _dataset(tok, ids, _pool(), exclude=range(40))
    rec = ds.refresh_epoch_data(0)
    assert all(i >= 100 for v in rec["pool_indices"].values() for i in v)
    with pytest.raises(LmxError, match="refresh_epoch_data"):
        _dataset(tok, ids, _pool())[0]


def test_collator_right_pads_and_lists_memory_rows(tok, ids):
    recall, pad = ids
    rows = [
        {"input_ids": [5, recall, pad, 9, 10], "labels": [IGNORE_INDEX, recall, IGNORE_INDEX, 9, 10], "memory": 3,
         "kind": "memory_front"},
        {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6], "memory": None, "kind": "sft_only"},
        {"input_ids": [recall, pad, 11], "labels": [recall, IGNORE_INDEX, 11], "memory": 1, "kind": "memory_full"},
    ]
    b = MixedMemoryCollator(tok.pad_token_id, pad)(rows)
    assert b["input_ids"].shape == (3, 5)
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert b["labels"][1].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert b["input_ids"][1, 2:].tolist() == [tok.pad_token_id] * 3
    assert torch.equal(b["memory_rows"], torch.tensor([3, 1])) and b["kinds"][1] == "sft_only"
    bad = [{"input_ids": [5, 6], "labels": [5, 6], "memory": 0, "kind": "memory_front"}]
    with pytest.raises(LmxError, match="0 <|memory_pad|>"):
        MixedMemoryCollator(tok.pad_token_id, pad)(bad)
