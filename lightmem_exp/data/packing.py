"""Packed step2 batches: several samples share a row, and no sample ever attends to another.

A padded batch (`MixedMemoryCollator`) spends compute on padding: with step2's wide length mix (short memory_front
samples next to 256-token conversations) most of a batch can be padding. `PackedMixedMemoryCollator` takes the
same samples and places them into as few rows as possible (first-fit decreasing), each sample's position ids
restarting at 0. The model is then called with `position_ids` and NO `attention_mask`: transformers (>= 4.57 /
5.x, `masking_utils.find_packed_sequence_indices`) reads the restarts as sequence boundaries and builds a
block-diagonal causal mask for sdpa / eager / flex attention, and RoPE sees each sample's own positions, so every
sample's logits equal its unpacked logits. flash_attention_2 detects packing only in one flattened row
(`batch_size == 1`, varlen kernels): use `flatten=True` there (`check_packed_attention` refuses anything else).

The tail of a row that no sample fills is padding with its own position run (0, 1, ...), i.e. its own block:
nothing attends to it, and its labels are -100. The packed batch has no `attention_mask` key on purpose, so a
forward that would use one (the padded path) fails loudly instead of attending across samples.

Losses are per sample again after `unpack_token_losses`: the per-token NLL `[rows, width-1]` of the packed rows is
gathered into the padded per-sample layout `[samples, longest-1]`, so `reduce_loss("sample")`, per-kind logging
and every gradient are those of the padded batch (up to float summation order). A sample's first label is set to
-100 as well: in a packed row it would otherwise be "predicted" from the previous sample's last token.
"""

from __future__ import annotations

import torch

from lightmem_exp.data.chat_sft import IGNORE_INDEX
from lightmem_exp.errors import LmxError


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, every row's total length <= `width` (ties keep input order;
    samples inside a row keep input order)."""
    if any(n > width for n in lengths):
        raise LmxError(f"pack_rows: a sample of {max(lengths)} tokens does not fit a row of {width}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return [sorted(r) for r in rows]


class PackedMixedMemoryCollator:
    """`MixedMemorySFTDataset` items -> packed rows.

    `max_tokens`: row width (None: the batch's longest sample, so packing never makes a row longer than the padded
    batch's). `flatten=True`: one row holding every sample, no padding at all (for flash_attention_2).

    Returns `input_ids`, `labels`, `position_ids` `[rows, width]`, `memory_rows` (vector-table row of every
    `<|memory_pad|>` in row-major order of the packed layout, what `memory_inputs_embeds` expects), `kinds` (per
    SAMPLE, in input order), `lengths`, and the unpacking map `sample_index` / `sample_valid` `[samples, longest-1]`
    into the flattened shifted token losses `[rows * (width-1)]`.
    """

    def __init__(self, pad_token_id: int, memory_pad_id: int, max_tokens: int | None = None, flatten: bool = False):
        if max_tokens is not None and max_tokens < 2:
            raise LmxError(f"PackedMixedMemoryCollator: max_tokens must be >= 2 or None, got {max_tokens}")
        self.pad_token_id, self.memory_pad_id = pad_token_id, memory_pad_id
        self.max_tokens, self.flatten = max_tokens, flatten

    def __call__(self, items: list[dict]) -> dict:
        lengths = [len(r["input_ids"]) for r in items]
        if min(lengths) < 1:
            raise LmxError("PackedMixedMemoryCollator: an empty sample")
        if self.flatten:
            width, layout = sum(lengths), [list(range(len(items)))]
        else:
            width = max(max(lengths), self.max_tokens or 0)
            layout = pack_rows(lengths, width)
        n_rows = len(layout)
        ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        where: list[tuple[int, int]] = [(0, 0)] * len(items)  # sample -> (row, start)
        memory_rows = []
        for r, members in enumerate(layout):
            start = 0
            for i in members:
                item, n = items[i], lengths[i]
                pads = sum(1 for t in item["input_ids"] if t == self.memory_pad_id)
                if pads != (item["memory"] is not None):
                    raise LmxError(f"a {item['kind']} sample has {pads} <|memory_pad|> tokens for memory "
                                   f"{item['memory']}")
                ids[r, start:start + n] = torch.tensor(item["input_ids"])
                labels[r, start:start + n] = torch.tensor(item["labels"])
                labels[r, start] = IGNORE_INDEX  # never a target: its predecessor belongs to another sample
                positions[r, start:start + n] = torch.arange(n)
                if item["memory"] is not None:
                    memory_rows.append(item["memory"])
                where[i] = (r, start)
                start += n
            positions[r, start:] = torch.arange(width - start)  # padding tail: a block of its own
        longest = max(lengths)
        j = torch.arange(max(longest - 1, 1))
        index = torch.zeros((len(items), j.numel()), dtype=torch.long)
        valid = torch.zeros((len(items), j.numel()), dtype=torch.bool)
        for i, (r, start) in enumerate(where):
            ok = j < lengths[i] - 1
            index[i] = torch.where(ok, r * (width - 1) + start + j, 0)
            valid[i] = ok
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "memory_rows": torch.tensor(memory_rows, dtype=torch.long), "kinds": [r["kind"] for r in items],
                "lengths": torch.tensor(lengths, dtype=torch.long), "sample_index": index, "sample_valid": valid}


def unpack_token_losses(nll: torch.Tensor, mask: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed per-token `(nll, mask)` `[rows, width-1]` (from `lm_losses`) -> per-sample `[samples, longest-1]`,
    the layout `lm_losses` gives for the padded batch of the same samples."""
    index, valid = batch["sample_index"].to(nll.device), batch["sample_valid"].to(nll.device)
    flat_nll, flat_mask = nll.reshape(-1), mask.reshape(-1)
    return flat_nll[index] * valid, flat_mask[index] * valid


def check_packed_attention(model: torch.nn.Module, n_rows: int) -> None:
    """Refuse layouts the model's attention would not keep apart (flash attention: one flattened row only)."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "")
    if "flash" in impl and n_rows > 1:
        raise LmxError(f"packed batches with attn_implementation={impl} need one flattened row (flatten=true): "
                       f"flash attention only detects packed samples when batch size is 1, got {n_rows} rows")
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as e:  # older transformers: position-id restarts would not block attention
        raise LmxError("packed batches need transformers with masking_utils.find_packed_sequence_indices "
                       "(>= 4.57)") from e


def packed_forward(model: torch.nn.Module, batch: dict, vectors: torch.Tensor, memory_pad_id: int) -> torch.Tensor:
    """Logits `[rows, width, V]` of a packed batch, the memory vectors injected at `<|memory_pad|>` exactly as
    `memory_inputs_embeds` does for padded batches."""
    from lightmem_exp.models.injection import memory_inputs_embeds

    check_packed_attention(model, batch["input_ids"].shape[0])
    embeds = memory_inputs_embeds(model, batch["input_ids"], vectors, memory_pad_id)
    # attention_mask=None is what makes transformers derive the block-diagonal mask from the position restarts.
    return model(inputs_embeds=embeds, position_ids=batch["position_ids"], attention_mask=None,
                 use_cache=False).logits
