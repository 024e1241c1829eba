"""What a causal-LM forward is fed, shared by training, generation, eval and serving: padded batches, the pad id
and device of a loaded model, and the `logits_to_keep` argument that skips unneeded logits."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left",
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[B, longest]` (long) of `seqs` padded with `pad_id` on `side` ("left": every
    row's last token in the last column, what generation needs; "right"), on `device` (CPU when None)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)


def logits_to_keep_kwargs(model: torch.nn.Module, n: int = 1) -> dict:
    """`logits_to_keep=n` where the forward accepts it (as `generate` does): only the last `n` positions' logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


class ModelHandle:
    """Mixin for a loaded `model` with its `tokenizer` (attributes of the class using it): where the weights are
    and which id pads a batch."""

    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
