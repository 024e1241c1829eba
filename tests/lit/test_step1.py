"""Step1 training step: what trains (LoRA + the two memory-token rows) and how the keys behave."""

import pytest
import torch

from lightmem_exp.data.recall_queries import collate_queries, user_query_ids
from lightmem_exp.lit.step1 import RecallQueryModule
from lightmem_exp.lit.trainer import decay_groups
from lightmem_exp.models.loading import attach_lora, ensure_memory_tokens, load_model, load_tokenizer
from lightmem_exp.models.memory_bank import MemoryBank, bank_token_ids

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TEXTS = ["Caroline went to a support group.", "Melanie painted a sunrise.", "Jon lost his job as a banker."]
QUESTIONS = ["Where did Caroline go?", "What did Melanie paint?", "What job did Jon lose?"]


def _setup(cfg, data_root, refresh_keys):
    torch.manual_seed(0)
    tok = load_tokenizer(cfg, data_root)
    model = load_model(cfg, data_root)
    ids = ensure_memory_tokens(model, tok)
    model = attach_lora(model, LORA, token_ids=[ids.recall, ids.memory_pad])
    module = RecallQueryModule(model, bank_token_ids(tok, TEXTS), pad_id=tok.pad_token_id, temperature=0.1,
                               negatives="bank", refresh_keys=refresh_keys, lr=1e-2, weight_decay=0.1,
                               warmup_ratio=0.0)
    rows = [{"input_ids": user_query_ids(tok, q, ids.recall, 64), "targets": [i]} for i, q in enumerate(QUESTIONS)]
    return module, ids, collate_queries(rows, tok.pad_token_id)


def _step(module, batch):
    opt = torch.optim.AdamW(decay_groups(module, 0.1), lr=1e-2)
    module.train()
    module.refresh_key_cache()
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    return loss


def test_only_memory_token_rows_of_the_embedding_train(small_model_cfg, data_root):
    module, ids, batch = _setup(small_model_cfg, data_root, refresh_keys=True)
    emb = module.model.get_input_embeddings()
    vocab = torch.arange(module.model.config.vocab_size)
    before = emb(vocab).detach().clone()
    _step(module, batch)
    changed = (emb(vocab).detach() - before).abs().sum(-1) > 0
    assert set(torch.nonzero(changed).flatten().tolist()) == {ids.recall}  # <|memory_pad|> gets no gradient in step1
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "token_adapter" in n for n in trainable)


def test_frozen_keys_never_move_refreshed_keys_do(small_model_cfg, data_root):
    frozen, _, batch = _setup(small_model_cfg, data_root, refresh_keys=False)
    frozen.on_train_epoch_start()  # a frozen cache is encoded once by the base model
    k0 = frozen.key_cache.clone()
    _step_no_refresh(frozen, batch)
    frozen.on_train_epoch_start()
    assert torch.equal(frozen.key_cache, k0)

    fresh, _, batch = _setup(small_model_cfg, data_root, refresh_keys=True)
    fresh.refresh_key_cache()
    k0 = fresh.key_cache.clone()
    _step(fresh, batch)
    fresh.refresh_key_cache()
    assert not torch.allclose(fresh.key_cache, k0)  # the key side trained with the query side
    assert torch.allclose(fresh.key_cache.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_refreshed_keys_never_use_stale_cached_negatives(small_model_cfg, data_root):
    module, _, batch = _setup(small_model_cfg, data_root, refresh_keys=True)
    module.eval()
    module.key_cache = torch.empty(0)
    loss_a = module.training_step(batch, 0)
    module.key_cache = torch.randn(len(TEXTS), 32)
    assert torch.equal(loss_a, module.training_step(batch, 0))


def _step_no_refresh(module, batch):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    module.training_step(batch, 0).backward()
    opt.step()


def test_keys_and_queries_live_in_the_bank_key_space(small_model_cfg, data_root):
    tok = load_tokenizer(small_model_cfg, data_root)
    model = load_model(small_model_cfg, data_root)
    ids = ensure_memory_tokens(model, tok)
    bank = MemoryBank.build(model, tok, [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)], progress=False,
                            pooling="mean", standardise=True)
    module = RecallQueryModule(model, bank_token_ids(tok, TEXTS), pad_id=tok.pad_token_id, temperature=0.1,
                               negatives="bank", refresh_keys=False, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                               key_space=bank.key_space)
    module.refresh_key_cache()
    assert torch.allclose(module.key_cache, bank.vectors, atol=1e-5)  # training keys = the exported bank's
    rows = [{"input_ids": user_query_ids(tok, q, ids.recall, 64), "targets": []} for q in QUESTIONS]
    b = collate_queries(rows, tok.pad_token_id)
    with torch.no_grad():
        q = module.encode(b["input_ids"], b["attention_mask"])
        scores = bank.head()(module.query_hidden(b["input_ids"], b["attention_mask"]))
    assert torch.allclose(q @ bank.vectors.T, scores, atol=1e-5)  # the loss scores what generation's head scores


def test_conversation_negatives_reach_the_training_step(small_model_cfg, data_root):
    module, _, batch = _setup(small_model_cfg, data_root, refresh_keys=False)
    module.eval()
    module.refresh_key_cache()
    bank = module.training_step(batch, 0)
    module.negatives, module.key_groups = "conversation", torch.arange(len(TEXTS))  # every key its own conversation
    assert module.training_step(batch, 0).item() == pytest.approx(0.0, abs=1e-6)  # no negative left to score
    assert bank.item() > 0.01
