"""`PackedMixedMemoryModule`: step2's training step on packed batches (`lightmem_exp.data.packing`).

Same samples per optimizer step, same per-sample losses (the packed token losses are unpacked to the padded
layout before `reduce_loss`), same logging; only the rows the model runs on change. Everything else (data re-draw,
optimizer, checkpoints) is `MixedMemoryModule`'s.
"""

from __future__ import annotations

import torch

from lightmem_exp.data.packing import PackedMixedMemoryCollator, packed_forward, unpack_token_losses
from lightmem_exp.lit.losses import lm_losses
from lightmem_exp.lit.step2 import MixedMemoryModule


class PackedMixedMemoryModule(MixedMemoryModule):
    """`MixedMemoryModule` whose batches are packed rows: `pack_max_tokens` is the row width (None: the batch's
    longest sample); `pack_flatten=True` puts the whole batch in one row (flash_attention_2)."""

    def __init__(self, *args, pack_max_tokens: int | None = None, pack_flatten: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.collator = PackedMixedMemoryCollator(self.collator.pad_token_id, self.memory_pad_id,
                                                  max_tokens=pack_max_tokens, flatten=pack_flatten)

    def forward(self, batch: dict) -> torch.Tensor:
        if "position_ids" not in batch:  # a padded batch (e.g. from sft_perplexity's collator)
            return super().forward(batch)
        return packed_forward(self.model, batch, self.memory_vectors[batch["memory_rows"]], self.memory_pad_id)

    def sample_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL and mask in the padded per-sample layout `[samples, longest-1]`."""
        return unpack_token_losses(*lm_losses(self(batch), batch["labels"]), batch)
