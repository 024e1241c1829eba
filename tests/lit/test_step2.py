"""Step2 training pieces: the adapter starts as step1's, the merged export equals base+adapter, the training step
injects at <|memory_pad|>, every epoch re-draws (and logs) its data, and the recall metrics."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch

from lightmem_exp.data.mixed_memory import MixedMemorySFTDataset
from lightmem_exp.data.recall_queries import user_query_ids
from lightmem_exp.errors import LmxError
from lightmem_exp.lit.losses import lm_losses, reduce_loss
from lightmem_exp.lit.recall_test import RecallTestCallback, recall_eval, recall_prompt_ids, verbatim_match
from lightmem_exp.lit.step2 import (
    MixedMemoryModule,
    QueryAnchor,
    memory_vocab_ids,
    sft_perplexity,
    start_from_step1,
)
from lightmem_exp.models.loading import (
    attach_lora,
    ensure_memory_tokens,
    load_adapter,
    load_model,
    load_tokenizer,
    save_adapter,
)
from lightmem_exp.models.memory_bank import MemoryBank

STEP1_LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
STEP2_LORA = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "up_proj"]}
MEMORIES = [{"id": f"m{i}", "text": f"Alice adopted dog number {i}."} for i in range(4)]


def _base(cfg, data_root):
    tok = load_tokenizer(cfg, data_root)
    model = load_model(cfg, data_root)
    return model, tok, ensure_memory_tokens(model, tok)


@pytest.fixture(scope="module")
def step1_adapter(small_model_cfg, data_root, tmp_path_factory):
    """A 'trained' step1 adapter: LoRA and token rows set to random non-zero values."""
    torch.manual_seed(0)
    model, _, ids = _base(small_model_cfg, data_root)
    model = attach_lora(model, STEP1_LORA, token_ids=[ids.recall, ids.memory_pad])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("step1") / "adapter"
    save_adapter(model, out)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_start_from_step1_is_the_step1_function_and_merge_round_trips(small_model_cfg, data_root, step1_adapter,
                                                                      tmp_path):
    model, tok, ids = _base(small_model_cfg, data_root)
    probe = tok("Alice adopted a dog", add_special_tokens=False)["input_ids"] + [ids.recall, ids.memory_pad]
    step1 = load_adapter(model, step1_adapter, small_model_cfg)
    want = _logits(step1, probe)

    base, _, _ = _base(small_model_cfg, data_root)
    extra = memory_vocab_ids(tok, [m["text"] for m in MEMORIES])
    rows = [ids.recall, ids.memory_pad] + [t for t in extra if t not in (ids.recall, ids.memory_pad)]
    step2 = start_from_step1(base, step1_adapter, small_model_cfg, STEP2_LORA, rows)
    assert torch.allclose(_logits(step2, probe), want, atol=1e-5)        # larger LoRA, same function at start
    trainable = {n for n, p in step2.named_parameters() if p.requires_grad}
    assert any("k_proj.lora_A" in n for n in trainable) and any("token_adapter" in n for n in trainable)

    with torch.no_grad():  # "train" it, then export adapter-only and merged
        for p in step2.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained = _logits(step2, probe)
    save_adapter(step2, tmp_path / "adapter")
    fresh, _, _ = _base(small_model_cfg, data_root)
    reloaded = load_adapter(fresh, tmp_path / "adapter", small_model_cfg)
    assert torch.allclose(_logits(reloaded, probe), trained, atol=1e-5)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert torch.allclose(_logits(exported, probe), trained, atol=1e-4)   # merged == base + adapter


def test_start_from_step1_refuses_a_smaller_lora(small_model_cfg, data_root, step1_adapter):
    model, _, ids = _base(small_model_cfg, data_root)
    with pytest.raises(LmxError, match="r=2 is below step1's r=4.*miss step1's \\['v_proj'\\]"):
        start_from_step1(model, step1_adapter, small_model_cfg,
                         {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]},
                         [ids.recall, ids.memory_pad])
    model, _, ids = _base(small_model_cfg, data_root)
    with pytest.raises(LmxError, match="trainable tokens"):
        start_from_step1(model, step1_adapter, small_model_cfg, STEP1_LORA, [ids.recall])


def test_loss_reductions():
    nll = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert reduce_loss(nll, mask, "token") == pytest.approx(7 / 4)
    assert reduce_loss(nll, mask, "sample") == pytest.approx((1 + 4) / 2)
    logits = torch.zeros(1, 3, 5)
    n, m = lm_losses(logits, torch.tensor([[-100, 2, -100]]))
    assert m.tolist() == [[1.0, 0.0]] and n[0, 0].item() == pytest.approx(torch.log(torch.tensor(5.0)).item())


def _pool():
    rows = [{"index": i, "has_think": False, "messages": [
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer number {i}."}]}
        for i in range(30)]
    return rows


def _module(cfg, data_root, tmp_path, step1_adapter):
    torch.manual_seed(0)
    model, tok, ids = _base(cfg, data_root)
    model = start_from_step1(model, step1_adapter, cfg, STEP1_LORA, [ids.recall, ids.memory_pad])
    ds = MixedMemorySFTDataset(tok, _pool(), MEMORIES, recall_id=ids.recall, memory_pad_id=ids.memory_pad,
                               end_marker="</memory>", sft_ratio=1.5, sft_max_tokens=64, seed=0)
    vectors = torch.randn(len(MEMORIES), model.config.hidden_size) * 0.1
    module = MixedMemoryModule(model, ds, vectors, pad_id=tok.pad_token_id, memory_pad_id=ids.memory_pad,
                               batch_size=3, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                               draws_path=tmp_path / "epoch_draws.jsonl")
    return module, tok, ids


def test_training_forward_injects_the_vector_at_memory_pad(small_model_cfg, data_root, tmp_path, step1_adapter):
    module, tok, ids = _module(small_model_cfg, data_root, tmp_path, step1_adapter)
    module.dataset.refresh_epoch_data(0)
    batch = module.collator([module.dataset[i] for i in range(len(module.dataset))])
    seen = {}

    def grab(module_, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    inner = module.model.get_base_model().model   # the decoder stack: what it receives is the model's input
    handle = inner.register_forward_pre_hook(grab, with_kwargs=True)
    module(batch)
    handle.remove()
    hidden = seen["embeds"]
    where = (batch["input_ids"] == ids.memory_pad).nonzero().tolist()
    assert len(where) == len(batch["memory_rows"]) > 0
    for (b, t), row in zip(where, batch["memory_rows"].tolist(), strict=True):
        assert torch.equal(hidden[b, t], module.memory_vectors[row])      # the exact injected vector


def test_each_epoch_redraws_and_logs_its_pool_indices(small_model_cfg, data_root, tmp_path, step1_adapter):
    module, tok, ids = _module(small_model_cfg, data_root, tmp_path, step1_adapter)
    prompt = recall_prompt_ids(tok, "What do you remember?", ids.recall, ids.memory_pad)
    cb = RecallTestCallback(tok, MEMORIES[:2], [0, 1], prompt_ids=prompt, memory_pad_id=ids.memory_pad,
                            marker_ids=tok("</memory>", add_special_tokens=False)["input_ids"], max_new_tokens=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module)
    draws = [json.loads(line) for line in (tmp_path / "epoch_draws.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in draws] == [0, 1]
    assert draws[0]["pool_indices"] != draws[1]["pool_indices"]
    assert module.dataset.epoch == 1
    assert [h["epoch"] for h in cb.history] == [0, 1] and 0 <= cb.history[-1]["token_f1"] <= 1
    plain = [x for x in module.dataset.samples if x.kind == "sft_only"]
    ppl = sft_perplexity(module.model, plain, tok.pad_token_id, ids.memory_pad)
    assert ppl > 1


def test_recall_eval_scores_verbatim(small_model_cfg, data_root):
    model, tok, ids = _base(small_model_cfg, data_root)
    prompt = recall_prompt_ids(tok, "q", ids.recall, ids.memory_pad)
    assert prompt[-2:] == [ids.recall, ids.memory_pad]
    scores, rows = recall_eval(model, tok, MEMORIES[:2], torch.zeros(2, model.config.hidden_size),
                               prompt_ids=prompt, memory_pad_id=ids.memory_pad, marker_ids=[5, 6],
                               max_new_tokens=3)
    assert set(scores) == {"exact_match", "token_f1"} and len(rows) == 2 and scores["exact_match"] == 0.0
    assert verbatim_match(" Alice  adopted. ", "Alice adopted.") == 1.0
    assert verbatim_match("alice adopted.", "Alice adopted.") == 0.0


def test_query_anchor_adds_step1_retrieval_loss_drawn_per_step(small_model_cfg, data_root, tmp_path, step1_adapter):
    module, tok, ids = _module(small_model_cfg, data_root, tmp_path, step1_adapter)
    bank = MemoryBank.build(module.model, tok, MEMORIES, progress=False, pooling="mean", standardise=True)
    rows = [{"input_ids": user_query_ids(tok, f"Which dog is number {i}?", ids.recall, 32), "targets": [i]}
            for i in range(len(MEMORIES))]
    anchor = QueryAnchor(rows, bank.vectors, bank.key_space, weight=0.5, batch_size=2, temperature=0.05,
                         pad_id=tok.pad_token_id, seed=0)
    with torch.no_grad():
        assert torch.equal(anchor.loss(module.model, 3), anchor.loss(module.model, 3))  # a resumed step draws the same
        assert not torch.equal(anchor.loss(module.model, 3), anchor.loss(module.model, 4))
        # step1 trained with negatives=conversation: the anchor scores only the query's own conversation's keys
        grouped = dataclasses.replace(anchor, key_groups=torch.arange(len(MEMORIES)) % 2)
        assert grouped.loss(module.model, 3) < anchor.loss(module.model, 3)
    module.dataset.refresh_epoch_data(0)
    batch = module.collator([module.dataset[i] for i in range(3)])
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value.detach()))
    decode = float(module.training_step(batch, 0))
    module.query_anchor = anchor
    total = module.training_step(batch, 0)
    assert logged["train/decode_loss"] == pytest.approx(decode, rel=1e-5)
    assert float(total) == pytest.approx(decode + 0.5 * logged["train/query_loss"], rel=1e-5)
    module.zero_grad()
    anchor.loss(module.model, 0).backward()  # the query's gradient reaches the LoRA and the <recall> row
    grads = [n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("lora_" in n for n in grads) and any("token_adapter" in n for n in grads)
