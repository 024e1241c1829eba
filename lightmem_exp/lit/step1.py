"""Step1 training: the `<recall>` hidden state learns to retrieve its memory among the training keys.

Keys are the same representation a bank stores (the key text's last hidden states pooled and mapped by the bank's
`KeySpace`); queries, the `<recall>` token's last hidden state, go through the same map, as in `MemoryHead`.
- frozen keys (`refresh_keys=false`): the base model's key vectors, encoded once; negatives are the whole key
  set (`negatives=bank`), the batch's positives (`in_batch`) or the keys of the query's own conversation
  (`conversation`: the candidates eval's per-conversation `recall` ranks).
- refreshed keys (`refresh_keys=true`): the key side trains too, as a dual encoder: the batch's positive keys are
  re-encoded with gradients and only they are candidates. Mixing fresh keys with stale cached ones as negatives
  collapses (measured: the loss sticks at ln(batch size), the model only learns to tell fresh from stale).
"""

from __future__ import annotations

import torch

from lightmem_exp.data.recall_queries import collate_queries
from lightmem_exp.lit.trainer import TrainableOnlyCheckpoint, adamw_cosine
from lightmem_exp.models.memory_bank import KeySpace, last_token_hidden, pooled_hidden
from lightmem_exp.models.recall_loss import recall_contrastive_loss


class RecallQueryModule(TrainableOnlyCheckpoint):
    def __init__(self, model: torch.nn.Module, key_token_ids: list[list[int]], *, pad_id: int, temperature: float,
                 negatives: str, refresh_keys: bool, lr: float, weight_decay: float, warmup_ratio: float,
                 encode_batch_size: int = 64, key_space: KeySpace | None = None,
                 key_groups: list[int] | None = None):
        super().__init__()
        self.model = model
        self.key_token_ids, self.pad_id, self.encode_batch_size = key_token_ids, pad_id, encode_batch_size
        self.temperature, self.negatives, self.refresh_keys = temperature, negatives, refresh_keys
        self.key_space = key_space or KeySpace()
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.register_buffer("key_cache", torch.empty(0), persistent=False)
        self.key_groups = None if key_groups is None else torch.tensor(key_groups, dtype=torch.long)
        self.save_hyperparameters(ignore=["model", "key_token_ids", "key_space", "key_groups"])

    def query_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last token's (`<recall>`) last-layer hidden state [B, H], as generation reads it (`MemoryBank.topk`
        maps it into the key space)."""
        return last_token_hidden(self.model, input_ids, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query unit vectors [B, H]: `query_hidden` in the key space."""
        return self.key_space(self.query_hidden(input_ids, attention_mask))

    def _encode_keys(self, key_idx: list[int]) -> torch.Tensor:
        b = collate_queries([{"input_ids": self.key_token_ids[i], "targets": []} for i in key_idx], self.pad_id)
        ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
        return self.key_space(pooled_hidden(self.model, ids, mask, self.key_space.pooling))

    @torch.no_grad()
    def refresh_key_cache(self) -> None:
        was_training = self.training
        self.eval()
        n, bs = len(self.key_token_ids), self.encode_batch_size
        self.key_cache = torch.cat([self._encode_keys(list(range(i, min(i + bs, n)))) for i in range(0, n, bs)])
        self.train(was_training)

    def on_train_epoch_start(self) -> None:
        if not self.refresh_keys and self.key_cache.numel() == 0:
            self.refresh_key_cache()

    # Frozen keys are the base model's: a resumed run must not re-encode them with the partly trained model.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.key_cache.numel():
            checkpoint["key_cache"] = self.key_cache.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "key_cache" in checkpoint:
            self.key_cache = checkpoint["key_cache"].to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.encode(batch["input_ids"], batch["attention_mask"])
        if self.refresh_keys:
            pos = torch.unique(batch["targets"][batch["targets"] >= 0])
            fresh = self._encode_keys(pos.tolist())
            keys = fresh.new_zeros(len(self.key_token_ids), fresh.shape[-1]).index_copy(0, pos, fresh)
            negatives = "in_batch"
        else:
            keys, negatives = self.key_cache, self.negatives
        loss = recall_contrastive_loss(q, keys, batch["targets"], temperature=self.temperature, negatives=negatives,
                                       key_groups=self.key_groups)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(q))
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio)
