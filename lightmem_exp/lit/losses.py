"""Next-token losses over labelled positions (labels are `IGNORE_INDEX` elsewhere) and the perplexity built on them:
one definition for the sft and step2 training steps and their before/after measurements."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from lightmem_exp.data.chat_sft import IGNORE_INDEX


def lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL `[B, T-1]` of next-token prediction and its mask (labels != IGNORE_INDEX), float32."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(target.shape)
    return nll, (target != IGNORE_INDEX).float()


def reduce_loss(nll: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """`token`: mean over every labelled token of the batch (long SFT replies weigh most);
    `sample`: mean over samples of each sample's mean (each sample weighs the same)."""
    if reduction == "token":
        return (nll * mask).sum() / mask.sum().clamp_min(1)
    per_sample = (nll * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_sample[mask.sum(1) > 0].mean() if bool((mask.sum(1) > 0).any()) else per_sample.sum() * 0


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(mean NLL over every labelled token) of padded `batches` (`input_ids`, `attention_mask`, `labels`), with
    the model in eval mode meanwhile; NaN when nothing is labelled."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for b in batches:
            out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                        use_cache=False)
            nll, mask = lm_losses(out.logits, b["labels"].to(device))
            total += float((nll * mask).sum())
            count += float(mask.sum())
    finally:
        model.train(was_training)
    return math.exp(total / count) if count else float("nan")
