"""Chat SFT module: assistant-only loss, early stopping and best-epoch restore wired, QLoRA on CPU, measurements."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightmem_exp.backends import LocalHFLoraBackend
from lightmem_exp.data.chat_sft import ChatSftDataset, encode_rows
from lightmem_exp.lit.sft import (
    MONITOR,
    ChatSftModule,
    fact_qa_scores,
    perplexity,
    restore_best,
    sft_callbacks,
    token_nll,
    update_scores,
)
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, prepare_for_kbit_training

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
GROUPS = ("fact_qa", "general")
SYSTEM = {"role": "system", "content": "You answer from memory."}


def _rows(n):
    return [{"id": f"r{i}", "messages": [SYSTEM, {"role": "user", "content": f"What does person {i} like?"},
                                         {"role": "assistant", "content": f"Person {i} likes tea number {i}."}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def tok(small_model_cfg, data_root):
    return load_tokenizer(small_model_cfg, data_root)


def _module(cfg, data_root, quant=None, lr=1e-2):
    torch.manual_seed(0)
    model = load_model(cfg, data_root, quant_cfg=quant)
    model = prepare_for_kbit_training(model, gradient_checkpointing=True)
    return ChatSftModule(attach_lora(model, LORA), lr=lr, weight_decay=0.0, warmup_ratio=0.05, groups=GROUPS)


def _loaders(tok, n_train=8, n_val=4):
    enc, _ = encode_rows(tok, _rows(n_train + n_val), max_seq_len=256, group="fact_qa")
    train, val = ChatSftDataset(enc[:n_train], GROUPS), ChatSftDataset(enc[n_train:], GROUPS)
    return (DataLoader(train, batch_size=4, collate_fn=lambda b: train.collate(b, tok.pad_token_id)),
            DataLoader(val, batch_size=4, collate_fn=lambda b: val.collate(b, tok.pad_token_id)))


def _trainer(tmp_path, callbacks, max_epochs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path))


def test_loss_is_the_mean_over_assistant_tokens_and_only_lora_trains(small_model_cfg, data_root, tok):
    module = _module(small_model_cfg, data_root)
    train, _ = _loaders(tok)
    batch = next(iter(train))
    sums, counts = token_nll(module.model, batch)
    hf_loss = module.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(sums.sum() / counts.sum(), hf_loss)
    # the labelled positions are the answer tokens plus <|im_end|>, nothing from the prompt
    answer = tok(" likes tea number 0.", add_special_tokens=False)["input_ids"]
    assert counts[0] >= len(answer) and counts[0] < batch["attention_mask"][0].sum() / 2
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_early_stopping_and_best_epoch_restore_are_wired(small_model_cfg, data_root, tok, tmp_path):
    class RisingValLoss(ChatSftModule):
        """Val loss that gets worse every epoch: the best epoch is the first, stopping comes after `patience`."""

        def validation_step(self, batch, batch_idx):
            self.log(MONITOR, torch.tensor(1.0 + self.current_epoch), batch_size=1)

    snapshots = {}

    class Snapshot(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()
                                                if p.requires_grad}

    module = _module(small_model_cfg, data_root)
    module.__class__ = RisingValLoss
    callbacks = sft_callbacks(tmp_path, patience=2, min_delta=0.0)
    early = [c for c in callbacks if isinstance(c, EarlyStopping)]
    assert len(early) == 1 and early[0].monitor == "val/loss" and early[0].mode == "min" and early[0].patience == 2
    trainer = _trainer(tmp_path, [*callbacks, Snapshot()], max_epochs=10)
    trainer.fit(module, *_loaders(tok))
    assert trainer.current_epoch == 3 and early[0].stopped_epoch == 2  # epochs 0 (best), 1, 2, then stop
    assert not torch.equal(snapshots[2][next(iter(snapshots[2]))], snapshots[0][next(iter(snapshots[0]))])

    best = restore_best(module, callbacks)
    assert best["val_loss"] == 1.0 and best["path"].endswith("best.ckpt")
    for n, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), snapshots[0][n])
    assert not any(isinstance(c, EarlyStopping) for c in sft_callbacks(tmp_path, patience=None, min_delta=0.0))
    assert any(isinstance(c, ModelCheckpoint) for c in sft_callbacks(tmp_path, patience=None, min_delta=0.0))


def test_qlora_nf4_trains_validates_and_generates_on_cpu(small_model_cfg, data_root, tok, tmp_path):
    import bitsandbytes as bnb

    quant = OmegaConf.create({"mode": "nf4", "compute_dtype": "bfloat16", "double_quant": True})
    module = _module(small_model_cfg, data_root, quant=quant, lr=5e-2)
    assert module.model.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    assert module.model.base_model.model.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    callbacks = sft_callbacks(tmp_path, patience=1, min_delta=0.0)
    trainer = _trainer(tmp_path, callbacks, max_epochs=2)
    module.train()
    trainer.fit(module, *_loaders(tok))
    assert trainer.global_step == 4 and math.isfinite(trainer.callback_metrics["val/loss"].item())
    restore_best(module, callbacks)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in module.named_parameters() if n in before)
    backend = LocalHFLoraBackend.from_model(module.model, tok, {"base_model": "x", "gen_kwargs": {"max_new_tokens": 4},
                                                               "max_retries": 0, "max_seq_len": 256})
    assert len(backend.generate_fn([[{"role": "user", "content": "hi"}]] * 2)) == 2


def test_val_loss_is_token_weighted_per_group(small_model_cfg, data_root, tok, tmp_path):
    module = _module(small_model_cfg, data_root)
    rows, _ = encode_rows(tok, _rows(3), max_seq_len=256, group="fact_qa")
    long, _ = encode_rows(tok, [{"id": "g", "messages": [{"role": "user", "content": "Tell me a story."},
                                                         {"role": "assistant", "content": "Once " * 40}]}],
                          max_seq_len=256, group="general")
    val = ChatSftDataset(rows + long, GROUPS)
    loader = DataLoader(val, batch_size=2, collate_fn=lambda b: val.collate(b, tok.pad_token_id))
    out = _trainer(tmp_path, [], 1).validate(module, loader, verbose=False)[0]
    sums, counts = zip(*(token_nll(module.model, val.collate([r], tok.pad_token_id)) for r in rows + long),
                       strict=True)
    s, c = torch.cat(sums), torch.cat(counts)
    assert out["val/loss"] == pytest.approx(float(s.sum() / c.sum()), rel=1e-5)
    assert out["val/loss_general"] == pytest.approx(float(s[3] / c[3]), rel=1e-5)
    assert out["val/loss_fact_qa"] == pytest.approx(float(s[:3].sum() / c[:3].sum()), rel=1e-5)
    ppl = perplexity(module.model, rows + long, pad_id=tok.pad_token_id, batch_size=3)
    assert ppl == pytest.approx(math.exp(float(s.sum() / c.sum())), rel=1e-5)


def test_last_val_loss_is_the_final_epochs_and_survives_a_checkpoint(small_model_cfg, data_root, tok, tmp_path):
    # adrpo's warm start reports it; a resumed run that finds the fit finished validates nothing, so it is checkpointed
    module = _module(small_model_cfg, data_root)
    trainer = _trainer(tmp_path, [], max_epochs=2)
    trainer.fit(module, *_loaders(tok))
    assert module.last_val_loss == pytest.approx(trainer.callback_metrics["val/loss"].item())
    ckpt: dict = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    fresh = _module(small_model_cfg, data_root)
    assert fresh.last_val_loss is None
    fresh.on_load_checkpoint(ckpt)
    assert fresh.last_val_loss == module.last_val_loss


def test_fact_qa_and_update_scores_with_stub_generators():
    rows = _rows(2)
    scores, preds = fact_qa_scores(lambda chats: ["Person 0 likes tea number 0", "tea"], rows)
    # row 0: exact after normalisation; row 1: "tea" vs "person 1 likes tea number 1" -> P 1, R 1/6, F1 2/7
    assert scores["em"] == 0.5 and scores["f1"] == pytest.approx((1 + 2 / 7) / 2) and preds[1] == "tea"

    upd = [{"action": a, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"#{i}"},
                                      {"role": "assistant", "content": "{}"}]}
           for i, a in enumerate(["update", "delete", "ignore", "ignore"])]
    replies = {"#0": '{"action": "update", "updated_text": "x"}',  # strict and right
               "#1": "```json\n{'action': 'remove', 'updated_text': null}\n```",  # repaired and right
               "#2": '{"action": "update", "updated_text": "y"}',  # strict but wrong
               "#3": "I would ignore it."}  # no JSON

    def gen(chats):
        assert all(c[0]["content"] == "S" for c in chats)
        return [replies[c[1]["content"]] for c in chats]

    backend = LocalHFLoraBackend({"base_model": "stub", "max_retries": 0}, generate_fn=gen)
    scores, records = update_scores(backend, upd)
    assert scores == {"acc": 0.5, "json_ok": 0.75, "json_strict": 0.5}
    assert records[3]["ok"] is False and records[3]["error"] and records[1]["action"] == "delete"
