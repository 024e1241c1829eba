"""Packed step2 batches: the row layout, and the proof that samples never attend to each other (per-sample losses,
logits and gradients equal to the padded batch's)."""

from __future__ import annotations

import random

import pytest
import torch

from lightmem_exp.data.chat_sft import IGNORE_INDEX
from lightmem_exp.data.mixed_memory import MixedMemoryCollator, MixedMemorySFTDataset
from lightmem_exp.data.packing import (
    PackedMixedMemoryCollator,
    check_packed_attention,
    pack_rows,
    packed_forward,
    unpack_token_losses,
)
from lightmem_exp.errors import LmxError
from lightmem_exp.lit.losses import lm_losses, reduce_loss
from lightmem_exp.lit.step2 import MixedMemoryModule
from lightmem_exp.lit.step2_packed import PackedMixedMemoryModule
from lightmem_exp.models.loading import attach_lora, ensure_memory_tokens, load_model, load_tokenizer

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
MEMORIES = [{"id": f"m{i}", "text": f"Alice adopted dog number {i} in {1990 + i}."} for i in range(6)]


def test_pack_rows_first_fit_decreasing():
    lengths = [5, 9, 2, 7, 3, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))       # every sample exactly once
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[1, 5], [3, 4], [0, 2]]                             # 9+1, 7+3, 5+2; input order inside a row
    assert pack_rows([4, 4], 4) == [[0], [1]]
    with pytest.raises(LmxError):
        pack_rows([11], 10)


def _items():
    mk = lambda kind, ids, mem=None: {"input_ids": ids, "labels": [t if t % 2 else IGNORE_INDEX for t in ids],  # noqa: E731
                                      "memory": mem, "kind": kind}
    return [mk("sft_only", [11, 13, 15, 17, 19, 21]), mk("memory_front", [31, 99, 33, 35], mem=4),
            mk("memory_full", [41, 43, 99], mem=2), mk("sft_only", [51, 53])]


def test_collator_layout_positions_labels_memory_order():
    items = _items()
    b = PackedMixedMemoryCollator(pad_token_id=0, memory_pad_id=99)(items)
    assert "attention_mask" not in b           # a padded-path forward fails instead of attending across samples
    # width = the longest sample (6); first-fit decreasing: [6], [4, 2], [3 + padding]
    assert b["input_ids"].tolist() == [[11, 13, 15, 17, 19, 21], [31, 99, 33, 35, 51, 53], [41, 43, 99, 0, 0, 0]]
    rows = b["input_ids"].tolist()
    # every sample appears once, contiguous, with positions restarting at 0 and its first label ignored
    for it in items:
        n = len(it["input_ids"])
        found = [(r, s) for r in range(len(rows)) for s in range(len(rows[r]) - n + 1)
                 if rows[r][s:s + n] == it["input_ids"]]
        assert len(found) == 1
        r, s = found[0]
        assert b["position_ids"][r, s:s + n].tolist() == list(range(n))
        assert b["labels"][r, s].item() == IGNORE_INDEX
        assert b["labels"][r, s + 1:s + n].tolist() == it["labels"][1:]
    # memory rows follow the <|memory_pad|> positions in row-major order
    assert b["memory_rows"].tolist() == [4, 2]      # row 1 holds memory 4's pad, row 2 memory 2's
    assert b["kinds"] == [it["kind"] for it in items] and b["lengths"].tolist() == [6, 4, 3, 2]


def test_padding_tail_is_its_own_block_and_flatten_has_one_row():
    items = _items()
    b = PackedMixedMemoryCollator(0, 99, max_tokens=16)(items)
    assert b["input_ids"].shape == (1, 16)
    assert b["position_ids"][0, 15:].tolist() == [0]      # 15 tokens of samples, then a 1-token padding block
    flat = PackedMixedMemoryCollator(0, 99, flatten=True)(items)
    assert flat["input_ids"].shape == (1, 15) and (flat["labels"] != IGNORE_INDEX).sum() > 0


def test_unpack_token_losses_returns_the_padded_layout():
    items = _items()
    packed = PackedMixedMemoryCollator(0, 99)(items)
    padded = MixedMemoryCollator(0, 99)(items)
    # a fake per-token "loss" that encodes the target token id: unpacked it must equal the padded batch's targets
    p_nll = packed["labels"][:, 1:].clamp_min(0).float()
    p_mask = (packed["labels"][:, 1:] != IGNORE_INDEX).float()
    nll, mask = unpack_token_losses(p_nll, p_mask, packed)
    want_mask = (padded["labels"][:, 1:] != IGNORE_INDEX).float()
    assert torch.equal(mask, want_mask)
    assert torch.equal(nll * mask, padded["labels"][:, 1:].clamp_min(0).float() * want_mask)


# ---- the model: no cross-sample attention ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(small_model_cfg, data_root):
    torch.manual_seed(0)
    tok = load_tokenizer(small_model_cfg, data_root)
    model = load_model(small_model_cfg, data_root)
    ids = ensure_memory_tokens(model, tok)
    model = attach_lora(model, LORA, token_ids=[ids.recall, ids.memory_pad])
    with torch.no_grad():  # a non-trivial adapter, so LoRA paths matter too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    rng = random.Random(0)
    pool = [{"index": i, "has_think": False, "messages": [
        {"role": "user", "content": " ".join(["question"] * rng.randint(1, 30)) + f" {i}?"},
        {"role": "assistant", "content": " ".join(["answer"] * rng.randint(1, 40)) + f" {i}."}]}
        for i in range(40)]
    ds = MixedMemorySFTDataset(tok, pool, MEMORIES, recall_id=ids.recall, memory_pad_id=ids.memory_pad,
                               end_marker="</memory>", sft_ratio=2.0, sft_max_tokens=200, seed=0)
    ds.refresh_epoch_data(0)
    vectors = torch.randn(len(MEMORIES), model.config.hidden_size) * 0.5
    return tok, ids, model, ds, vectors


def _modules(setup):
    tok, ids, model, ds, vectors = setup
    kw = {"pad_id": tok.pad_token_id, "memory_pad_id": ids.memory_pad, "batch_size": 8, "lr": 1e-3,
          "weight_decay": 0.0, "warmup_ratio": 0.0}
    return MixedMemoryModule(model, ds, vectors, **kw), PackedMixedMemoryModule(model, ds, vectors, **kw)


def test_packed_per_sample_losses_equal_the_padded_batch(setup):
    padded_m, packed_m = _modules(setup)
    items = [padded_m.dataset[i] for i in range(len(padded_m.dataset))]
    lengths = [len(it["input_ids"]) for it in items]
    assert max(lengths) > 1.5 * min(lengths)        # a length mix, memory samples among them
    padded, packed = padded_m.collator(items), packed_m.collator(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        nll_a, mask_a = lm_losses(padded_m(padded), padded["labels"])
        nll_b, mask_b = packed_m.sample_losses(packed)
    assert torch.equal(mask_a, mask_b)
    per_a = (nll_a * mask_a).sum(1) / mask_a.sum(1).clamp_min(1)
    per_b = (nll_b * mask_b).sum(1) / mask_b.sum(1).clamp_min(1)
    assert (per_a - per_b).abs().max().item() <= 1e-5
    assert ((nll_a - nll_b) * mask_a).abs().max().item() <= 1e-4      # every token, not only the means


def test_changing_one_sample_leaves_the_others_untouched(setup):
    tok, ids, model, ds, vectors = setup
    _, packed_m = _modules(setup)
    items = [ds[i] for i in range(8)]
    b = packed_m.collator(items)
    victim = max(range(len(items)), key=lambda i: len(items[i]["input_ids"]) if items[i]["memory"] is None else 0)
    altered = [dict(it) for it in items]
    altered[victim] = {**items[victim], "input_ids": [7] * len(items[victim]["input_ids"])}
    b2 = packed_m.collator(altered)
    assert torch.equal(b["position_ids"], b2["position_ids"])          # same layout
    with torch.no_grad():
        la = packed_forward(model, b, vectors[b["memory_rows"]], ids.memory_pad)
        lb = packed_forward(model, b2, vectors[b2["memory_rows"]], ids.memory_pad)
    changed = (b["input_ids"] != b2["input_ids"])
    assert changed.any()
    same_row = changed.any(dim=1)
    for r in range(la.shape[0]):
        keep = ~changed[r]
        if same_row[r]:   # other samples sharing the victim's row: their logits must not move
            victim_span = changed[r].nonzero().flatten()
            keep[victim_span.min():victim_span.max() + 1] = False
        assert torch.allclose(la[r][keep], lb[r][keep], atol=1e-5)


def test_packed_gradients_equal_padded_gradients(setup):
    padded_m, packed_m = _modules(setup)
    items = [padded_m.dataset[i] for i in range(8)]
    grads = []
    for module, collate in ((padded_m, padded_m.collator), (packed_m, packed_m.collator)):
        module.model.zero_grad(set_to_none=True)
        batch = collate(items)
        if module is padded_m:
            nll, mask = lm_losses(module(batch), batch["labels"])
        else:
            nll, mask = module.sample_losses(batch)
        reduce_loss(nll, mask, "sample").backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_flash_attention_needs_one_flattened_row(setup):
    model = setup[2]
    impl = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(LmxError, match="flatten"):
            check_packed_attention(model, 2)
        check_packed_attention(model, 1)
    finally:
        model.config._attn_implementation = impl


def test_packed_module_trains_under_lightning(setup):
    import lightning as L

    _, packed_m = _modules(setup)
    losses = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert "position_ids" in batch and "attention_mask" not in batch   # the packed collator fed it
            losses.append(float(outputs["loss"]))

    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Grab()]).fit(packed_m)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
