"""Chat SFT of a LoRA adapter (stage sft): assistant-only next-token loss, early stopping on the val loss,
the best epoch's adapter kept; and the before/after measurements the stage reports.

Loss: mean cross entropy over assistant tokens (labels != -100) of the batch. `val/loss` is the same mean over
all assistant tokens of the val set (token-weighted across batches); `val/loss_<group>` splits it by source
(fact_qa, update_decisions, general).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightmem_exp.backends.local_hf_lora import HFChatGenerator, LocalHFLoraBackend
from lightmem_exp.data.chat_sft import IGNORE_INDEX, collate_sft, split_last_turn
from lightmem_exp.data.schema import parse_update_decision
from lightmem_exp.errors import LmxError
from lightmem_exp.eval.metrics import mean_scores
from lightmem_exp.lit import losses
from lightmem_exp.lit.trainer import CKPT_DIR, TrainableOnlyCheckpoint, adamw_cosine

MONITOR = "val/loss"
BEST_CKPT = "best"


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of next-token NLL over labelled positions, number of labelled positions)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, mask = losses.lm_losses(logits, batch["labels"])
    return (nll * mask).sum(1), mask.sum(1)


class ChatSftModule(TrainableOnlyCheckpoint):
    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_ratio: float,
                 groups: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.groups = list(groups)
        # kept in checkpoints: a resumed, finished fit logs nothing
        self.last_train_loss: torch.Tensor | None = None
        self.last_val_loss: float | None = None
        self.save_hyperparameters(ignore=["model"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=max(n, 1))
        self.last_train_loss = out.loss.detach()
        return out.loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.last_train_loss is not None:
            checkpoint["last_train_loss"] = float(self.last_train_loss)
        if self.last_val_loss is not None:
            checkpoint["last_val_loss"] = self.last_val_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "last_train_loss" in checkpoint:
            self.last_train_loss = torch.tensor(checkpoint["last_train_loss"])
        self.last_val_loss = checkpoint.get("last_val_loss")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and MONITOR in self.trainer.callback_metrics:
            self.last_val_loss = float(self.trainer.callback_metrics[MONITOR])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        sums, counts = token_nll(self.model, batch)
        total = int(counts.sum())
        if total == 0:
            return
        self.log(MONITOR, sums.sum() / total, prog_bar=True, batch_size=total, sync_dist=True)
        if "group" in batch:
            for g, name in enumerate(self.groups):
                sel = batch["group"] == g
                n = int(counts[sel].sum())
                if n:
                    self.log(f"val/loss_{name}", sums[sel].sum() / n, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        return adamw_cosine(self, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio)


def sft_callbacks(sdir: Path, *, patience: int | None, min_delta: float) -> list[L.Callback]:
    """Early stopping on `val/loss` (disabled when patience is None) and a checkpoint of the best epoch
    (`checkpoints/best.ckpt`, trainable tensors only) that `restore_best` puts back after fitting."""
    best = ModelCheckpoint(dirpath=Path(sdir) / CKPT_DIR, filename=BEST_CKPT, monitor=MONITOR, mode="min",
                           save_top_k=1, save_last=False, auto_insert_metric_name=False,
                           enable_version_counter=False, save_on_train_epoch_end=False)
    callbacks: list[L.Callback] = [best]
    if patience is not None:
        callbacks.insert(0, EarlyStopping(monitor=MONITOR, mode="min", patience=patience, min_delta=min_delta,
                                          check_finite=True, strict=True))
    return callbacks


def restore_best(module: ChatSftModule, callbacks: Sequence[L.Callback]) -> dict:
    """Load the best checkpoint's trainable tensors into `module`; returns {"best_epoch_val_loss", "path"}."""
    best = next(c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == MONITOR)
    if not best.best_model_path:
        raise LmxError("no validation loss was recorded, so there is no best checkpoint to restore "
                       "(is the val set empty?)")
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    if missing:
        raise LmxError(f"{best.best_model_path} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
    module.load_state_dict(state, strict=False)
    return {"path": best.best_model_path, "val_loss": float(best.best_model_score)}


# ------------------------------------------------------------------------------------------------- measurements


def fact_qa_scores(generate: HFChatGenerator, rows: Sequence[dict]) -> tuple[dict[str, float], list[str]]:
    """Closed-book fact QA: greedy answers to each row's prompt turns, EM and token F1 against its reference."""
    prompts, refs = zip(*(split_last_turn(r["messages"]) for r in rows), strict=True)
    preds = generate(list(prompts))
    return mean_scores(preds, list(refs)), preds


def update_scores(backend: LocalHFLoraBackend, rows: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    """Update decisions through the backend: `acc` (parsed action == gold; a failure counts as wrong),
    `json_ok` (the backend returned a valid decision: repair and retries as configured) and `json_strict`
    (the first raw reply is already exactly a valid decision, no repair)."""
    prompts = []
    for r in rows:
        turns, _ = split_last_turn(r["messages"])
        system = next((m["content"] for m in turns if m["role"] == "system"), "")
        user = next(m["content"] for m in reversed(turns) if m["role"] == "user")
        prompts.append((system, user))
    results = backend.call_update_llm_batch(prompts)
    acc = ok = strict = 0
    records = []
    for r, res in zip(rows, results, strict=True):
        ok += res.ok
        acc += res.ok and res.value["action"] == r["action"]
        strict += res.ok and res.attempts == 1 and _strictly_valid(res.raw_text)
        records.append({"ok": res.ok, "action": res.value["action"] if res.ok else None, "gold": r["action"],
                        "raw_text": res.raw_text, "attempts": res.attempts,
                        "error": None if res.ok else res.error})
    n = len(rows)
    return {"acc": acc / n, "json_ok": ok / n, "json_strict": strict / n}, records


def _strictly_valid(text: str) -> bool:
    try:
        parse_update_decision(text.strip())
        return True
    except ValueError:
        return False


def perplexity(model: torch.nn.Module, rows: Sequence[dict], *, pad_id: int, batch_size: int) -> float:
    """`lit.losses.perplexity` over the assistant tokens of encoded rows (`encode_rows` output)."""
    return losses.perplexity(model, (collate_sft(rows[i : i + batch_size], pad_id)
                                     for i in range(0, len(rows), batch_size)))
