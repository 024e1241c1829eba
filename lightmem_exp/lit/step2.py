"""Step 2 training (seed 001 §4.3): decode memory text from memory vectors injected at `<|memory_pad|>`, mixed with
plain SFT so that ordinary chat survives.

- `start_from_step1`: the step2 LoRA, initialised to be exactly the step1 adapter (function-preserving), possibly
  larger: step1's rank-r1 LoRA is embedded into the first r1 ranks of the new rank-r2 LoRA (B scaled for the new
  alpha/r, the extra ranks start at B=0), targets may be a superset, and the trainable token rows may add tokens
  (e.g. the written memories' vocabulary, see `memory_vocab_ids`). The result is ONE adapter over the plain base,
  so `export/adapter` loads with `load_adapter` on the base like step1's.
- `MixedMemoryModule`: the training step (vectors injected with `memory_inputs_embeds`, the same function every
  non-generate forward uses), per-epoch re-draw of the dataset, the draw log, the optimizer.
- `QueryAnchor`: step1's retrieval loss, kept in every step2 step. step2 trains the LoRA that also forms the
  `<recall>` query, and with the decoding loss alone the query collapses: the Memory Head then sends every question
  to one memory (README, step2).
- `sft_perplexity`: the general-ability guard (assistant-token perplexity on held-out conversations).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightmem_exp.artifacts import read_jsonl, write_jsonl
from lightmem_exp.data.mixed_memory import MixedMemoryCollator, MixedMemorySFTDataset, Sample
from lightmem_exp.data.recall_queries import collate_queries
from lightmem_exp.errors import LmxError
from lightmem_exp.lit.losses import lm_losses, perplexity, reduce_loss
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.trainer import TrainableOnlyCheckpoint, adamw_cosine
from lightmem_exp.models.chat import text_token_ids
from lightmem_exp.models.injection import memory_inputs_embeds
from lightmem_exp.models.loading import attach_lora, check_adapter_base, check_adapter_shapes
from lightmem_exp.models.memory_bank import KeySpace, last_token_hidden
from lightmem_exp.models.recall_loss import recall_contrastive_loss

log = logging.getLogger(__name__)
DRAWS_FILE = "epoch_draws.jsonl"


# ----------------------------------------------------------------------------------------------- the adapter


def memory_vocab_ids(tokenizer, texts: Sequence[str], extra: Sequence[int] = ()) -> list[int]:
    """Sorted ids of every token the memory texts (and `extra`, e.g. the end marker) are made of."""
    ids = {t for text in texts for t in text_token_ids(tokenizer, text)}
    return sorted(ids | {int(t) for t in extra})


def _adapter_state_key(saved_key: str) -> str:
    """A saved PEFT key -> the live parameter name of adapter 'default'."""
    if saved_key.endswith(".weight") and (".lora_A." in saved_key or ".lora_B." in saved_key):
        return saved_key[: -len(".weight")] + ".default.weight"
    if saved_key.endswith("trainable_tokens_delta"):
        return saved_key + ".default"
    raise LmxError(f"unexpected tensor {saved_key!r} in the step1 adapter (only LoRA and trainable tokens are "
                   "supported)")


@torch.no_grad()
def start_from_step1(model: torch.nn.Module, adapter_dir: str | Path, model_cfg: Mapping[str, Any],
                     lora_cfg: Mapping[str, Any], token_ids: Sequence[int]):
    """Attach the step2 LoRA (`lora_cfg`, trainable rows `token_ids`) initialised to the step1 adapter's function.

    Requires `lora_cfg` to cover step1's adapter: same or larger rank, a superset of its target modules, and every
    step1 trainable token. Call after `ensure_memory_tokens` / `prepare_for_kbit_training`.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    check_adapter_base(adapter_dir, model_cfg)
    check_adapter_shapes(adapter_dir, model, model_cfg)
    src = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    r1, a1 = int(src["r"]), float(src["lora_alpha"])
    r2, a2 = int(lora_cfg["r"]), float(lora_cfg["alpha"])
    targets = lora_cfg["target_modules"]
    targets = targets if isinstance(targets, str) else [str(t) for t in targets]
    src_targets = src["target_modules"]
    problems = []
    if r2 < r1:
        problems.append(f"lora.r={r2} is below step1's r={r1}")
    if targets != "all-linear" and src_targets != "all-linear" and not set(src_targets) <= set(targets):
        problems.append(f"lora.target_modules {sorted(targets)} miss step1's {sorted(set(src_targets) - set(targets))}")
    src_tokens = {m: list(v) for m, v in (src.get("trainable_token_indices") or {}).items()}
    missing_tokens = sorted({t for v in src_tokens.values() for t in v} - set(token_ids))
    if missing_tokens:
        problems.append(f"trainable tokens {missing_tokens} of step1 are not trainable here")
    if problems:
        raise LmxError(f"step2 starts from the step1 adapter {adapter_dir}, which the step2 LoRA must cover: "
                       + "; ".join(problems))

    peft_model = attach_lora(model, lora_cfg, token_ids=list(token_ids))
    params = dict(peft_model.named_parameters())
    new_tokens = {m: list(v) for m, v in peft_model.peft_config["default"].trainable_token_indices.items()}
    scale = (a1 / r1) / (a2 / r2)
    for key, value in tensors.items():
        name = _adapter_state_key(key)
        if name not in params:
            raise LmxError(f"step1 adapter tensor {key!r} has no counterpart {name!r} in the step2 model")
        p = params[name]
        value = value.to(device=p.device, dtype=p.dtype)
        if ".lora_A." in name:
            p[:r1] = value
        elif ".lora_B." in name:
            p[:, :r1] = value * scale
            p[:, r1:] = 0
        else:  # trainable token rows hold the rows' values: copy step1's rows into their places
            module = next((m for m in src_tokens if f".{m}.token_adapter." in name), None)
            if module is None or module not in new_tokens:
                raise LmxError(f"cannot place step1 token rows {key!r}")
            where = {t: i for i, t in enumerate(new_tokens[module])}
            for j, t in enumerate(src_tokens[module]):
                p[where[t]] = value[j]
    return peft_model


# ------------------------------------------------------------------------------------------------- guard


def sft_perplexity(model: torch.nn.Module, samples: Sequence[Sample], pad_id: int, memory_pad_id: int,
                   batch_size: int = 8) -> float:
    """`perplexity` over all assistant tokens of plain conversations (no memory)."""
    collate = MixedMemoryCollator(pad_id, memory_pad_id)
    return perplexity(model, (collate([{"input_ids": s.input_ids, "labels": s.labels, "memory": None, "kind": s.kind}
                                       for s in samples[i : i + batch_size]])
                              for i in range(0, len(samples), batch_size)))


# -------------------------------------------------------------------------------------------------- module


@dataclass
class QueryAnchor:
    """step1's contrastive objective on its training questions (`rows`: `<recall>` queries with key indices) against
    its frozen training keys (`keys [K, H]`, unit vectors in `key_space`), `batch_size` queries per step drawn from
    (seed, step) alone, so a resumed run draws the same."""

    rows: list[dict]
    keys: torch.Tensor
    key_space: KeySpace
    weight: float
    batch_size: int
    temperature: float
    pad_id: int
    seed: int
    key_groups: torch.Tensor | None = None
    """[K]: per key its conversation when step1 trained with `negatives=conversation` (the anchor then does too)."""

    def loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pick = torch.randperm(len(self.rows), generator=g)[: self.batch_size].tolist()
        b = collate_queries([self.rows[i] for i in pick], self.pad_id)
        device = next(model.parameters()).device
        hidden = last_token_hidden(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        return recall_contrastive_loss(self.key_space(hidden), self.keys.to(device), b["targets"].to(device),
                                       temperature=self.temperature, key_groups=self.key_groups,
                                       negatives="bank" if self.key_groups is None else "conversation")



class MixedMemoryModule(TrainableOnlyCheckpoint):
    """LoRA training on MixedMemorySFTDataset; `memory_vectors [N, H]` are the injection vectors of the written
    memories (`bank.injection_vectors`), indexed by the dataset's memory rows."""

    def __init__(self, model: torch.nn.Module, dataset: MixedMemorySFTDataset, vectors: torch.Tensor, *,
                 pad_id: int, memory_pad_id: int, batch_size: int, lr: float, weight_decay: float,
                 warmup_ratio: float, loss_reduction: str = "sample", draws_path: str | Path | None = None,
                 num_workers: int = 0, query_anchor: QueryAnchor | None = None):
        super().__init__()
        if loss_reduction not in ("token", "sample"):
            raise LmxError(f"loss_reduction must be 'token' or 'sample', got {loss_reduction!r}")
        self.model, self.dataset = model, dataset
        self.collator = MixedMemoryCollator(pad_id, memory_pad_id)
        self.memory_pad_id, self.batch_size, self.num_workers = memory_pad_id, batch_size, num_workers
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.loss_reduction = loss_reduction
        self.draws_path = Path(draws_path) if draws_path is not None else None
        self.query_anchor = query_anchor
        self.register_buffer("memory_vectors", vectors.detach().float().clone(), persistent=False)
        # draws_path: a Path is not weights_only-loadable; query_anchor holds tensors and token rows
        self.save_hyperparameters(ignore=["model", "dataset", "vectors", "draws_path", "query_anchor"])

    # ---- data: re-drawn at every epoch start (idempotent per epoch, so a resumed run re-draws the same) -----

    def _refresh(self) -> None:
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        if self.dataset.epoch == epoch:
            return
        record = self.dataset.refresh_epoch_data(epoch)
        log.info("step2 epoch %d draw: pool indices memory_front %s | memory_full %s | sft_only %s "
                 "(%d skipped as too long, %d memory_full with <think>)", epoch,
                 record["pool_indices"]["memory_front"], record["pool_indices"]["memory_full"],
                 record["pool_indices"]["sft_only"], record["skipped_too_long"], record["memory_full_with_think"])
        if self.draws_path is not None and (self._trainer is None or self.trainer.is_global_zero):
            rows = {r["epoch"]: r for r in (read_jsonl(self.draws_path) if self.draws_path.exists() else [])}
            rows[epoch] = record
            write_jsonl(self.draws_path, (rows[k] for k in sorted(rows)))

    def train_dataloader(self) -> ResumableLoader:
        self._refresh()
        # The epoch's samples are already in drawn order; the loader only remembers where a resumed epoch continues.
        return ResumableLoader(self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collator,
                               num_workers=self.num_workers)

    def on_train_epoch_start(self) -> None:
        self._refresh()  # epoch > 0: before the epoch's iterator is created (epoch 0: train_dataloader did it)

    def on_train_start(self) -> None:
        # Resumed mid-epoch, Lightning skips on_train_epoch_start and built the loader before restoring the epoch
        # counter: draw the restored epoch's samples here, before its first batch.
        self._refresh()

    # ---- step ---------------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        vectors = self.memory_vectors[batch["memory_rows"]]
        embeds = memory_inputs_embeds(self.model, batch["input_ids"], vectors, self.memory_pad_id)
        return self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits

    def sample_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL and label mask, one row per sample (the packed subclass unpacks its rows here)."""
        return lm_losses(self(batch), batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, mask = self.sample_losses(batch)
        loss = reduce_loss(nll, mask, self.loss_reduction)
        n = len(batch["kinds"])
        if self.query_anchor is not None and self.query_anchor.weight > 0:
            query_loss = self.query_anchor.loss(self.model, self.global_step)
            self.log("train/query_loss", query_loss, batch_size=self.query_anchor.batch_size)
            self.log("train/decode_loss", loss, batch_size=n)
            loss = loss + self.query_anchor.weight * query_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        with torch.no_grad():
            for kind in ("memory_front", "memory_full", "sft_only"):
                rows = torch.tensor([k == kind for k in batch["kinds"]], device=nll.device)
                if bool(rows.any()):
                    m = mask[rows]
                    self.log(f"train/loss_{kind}", (nll[rows] * m).sum() / m.sum().clamp_min(1),
                             batch_size=int(rows.sum()), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio)
