"""Step1 training: the `<recall>` hidden state learns to retrieve its memory from frozen keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from lightmem_exp.lit.trainer import TrainableOnlyCheckpoint
from lightmem_exp.models.memory_bank import last_token_hidden
from lightmem_exp.models.recall_loss import recall_contrastive_loss


class RecallQueryModule(TrainableOnlyCheckpoint):
    def __init__(self, model: torch.nn.Module, keys: torch.Tensor, *, temperature: float, negatives: str,
                 lr: float, weight_decay: float, warmup_ratio: float, embedding_param: torch.nn.Parameter):
        super().__init__()
        self.model = model
        self.register_buffer("keys", F.normalize(keys.float(), dim=-1), persistent=False)
        self.temperature, self.negatives = temperature, negatives
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.embedding_param = embedding_param
        self.save_hyperparameters(ignore=["model", "keys", "embedding_param"])

    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit query vectors [B, H]: the last-layer hidden state at each row's last real token (`<recall>`)."""
        return F.normalize(last_token_hidden(self.model, input_ids, attention_mask).float(), dim=-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.query(batch["input_ids"], batch["attention_mask"])
        loss = recall_contrastive_loss(q, self.keys, batch["targets"], temperature=self.temperature,
                                       negatives=self.negatives)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(q))
        return loss

    def configure_optimizers(self):
        # The embedding matrix is trainable only through a row mask; weight decay would still shrink the
        # masked rows, so it sits in its own group with no decay.
        emb = [self.embedding_param] if self.embedding_param.requires_grad else []
        others = [p for p in self.parameters() if p.requires_grad and p is not self.embedding_param]
        opt = torch.optim.AdamW([{"params": others, "weight_decay": self.weight_decay},
                                 {"params": emb, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_schedule_with_warmup(opt, int(self.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
