"""Chat SFT encoding: labels on assistant tokens only, with the template's mask or the prefix fallback."""

import copy
import re

import pytest
import torch

from lightmem_exp.data.chat_sft import (
    IGNORE_INDEX,
    ChatSftDataset,
    assistant_token_mask,
    collate_sft,
    encode_chat,
    encode_rows,
    has_generation_markers,
    split_last_turn,
)
from lightmem_exp.errors import LmxError
from lightmem_exp.models.loading import load_tokenizer

CHAT = [
    {"role": "system", "content": "You maintain a memory store."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "Alice lives in Paris."},
    {"role": "user", "content": "And Bob?"},
    {"role": "assistant", "content": '{"action": "ignore", "updated_text": null}'},
]


@pytest.fixture(scope="module")
def tok(small_model_cfg, data_root):
    return load_tokenizer(small_model_cfg, data_root)


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer with the {% generation %} markers removed from its template (like many hub models)."""
    t = copy.deepcopy(tok)
    t.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tok.chat_template)
    return t


def _spans(mask):
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_cover_exactly_the_assistant_turns(tok):
    enc = encode_chat(tok, CHAT)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    mask = [lab != IGNORE_INDEX for lab in labels]
    assert all(lab == t for lab, t in zip(labels, ids, strict=True) if lab != IGNORE_INDEX)
    spans = _spans(mask)
    assert len(spans) == 2  # two assistant turns, the user turn between them unlabelled
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for (a, b), msg in zip(spans, (CHAT[2], CHAT[4]), strict=True):
        assert ids[b - 1] == end  # the end-of-turn token is learnt, so the model learns to stop
        assert tok.decode(ids[a : b - 1]) == msg["content"]
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")  # the role header is context, not a target
    text = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Where does Alice live?" in text and "Alice lives" not in text and "ignore" not in text


def test_template_and_prefix_methods_agree(tok, plain_tok):
    assert has_generation_markers(tok) and not has_generation_markers(plain_tok)
    template = assistant_token_mask(tok, CHAT, method="template")
    assert assistant_token_mask(tok, CHAT, method="prefix") == template
    assert assistant_token_mask(plain_tok, CHAT) == template  # auto falls back to the prefix method
    with pytest.raises(LmxError, match="generation"):
        assistant_token_mask(plain_tok, CHAT, method="template")
    with pytest.raises(LmxError, match="unknown"):
        assistant_token_mask(tok, CHAT, method="nope")


def test_encode_rows_skips_too_long_and_label_free_rows(tok):
    rows = [{"id": "a", "messages": CHAT}, {"id": "b", "messages": CHAT[:2]},
            {"id": "c", "messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]}]
    enc, skipped = encode_rows(tok, rows, max_seq_len=128, group="fact_qa")
    assert [e["id"] for e in enc] == ["a"] and enc[0]["group"] == "fact_qa"
    assert skipped == {"fact_qa_no_assistant_tokens": 1, "fact_qa_too_long": 1}


def test_collate_right_pads_with_ignored_labels(tok):
    rows, _ = encode_rows(tok, [{"id": "a", "messages": CHAT}, {"id": "b", "messages": CHAT[:3]}],
                          max_seq_len=512, group="general")
    ds = ChatSftDataset(rows, ["fact_qa", "general"])
    batch = ds.collate([ds[0], ds[1]], pad_id=tok.pad_token_id)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n0) and n1 < n0
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert batch["labels"][0].tolist() == rows[0]["labels"] and batch["group"].tolist() == [1, 1]
    assert "group" not in collate_sft(rows, pad_id=0)
    assert torch.equal(batch["input_ids"][1, :n1], torch.tensor(rows[1]["input_ids"]))


def test_split_last_turn():
    prompt, answer = split_last_turn(CHAT)
    assert prompt == CHAT[:4] and answer == CHAT[4]["content"]
    with pytest.raises(LmxError):
        split_last_turn(CHAT[:2])
