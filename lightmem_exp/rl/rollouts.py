"""Rollouts: batched sampling of G replies per prompt, and the per-token log-probabilities the loss needs.

`generate(...)` samples G rows per prompt. With `group_size > 1` (and `share_prefix`) each prompt is run once
through the model (batch 1) and its KV cache is repeated G times, then one `model.generate` call decodes the G
rows together: the prompt's prefill is paid once instead of G times, and every decoding step serves G rows (bench
G7). Otherwise rows are batched `batch_size` at a time, left-padded so that every row's last prompt token sits in
the same column (as `HFChatGenerator` does). A row ends at its first end-of-turn token (kept, so the policy
learns to stop) or at `max_new_tokens`.

`completion_logprobs(...)` scores completions under the current weights: each row is [left pads, prompt,
completion, right pads], positions follow the attention mask, and only the logits of the completion positions
are computed (`logits_to_keep`), which keeps memory at N x C x vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.inputs import pad_batch


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]      # one per row
    completion_ids: list[list[int]]  # generated ids, the end token included when produced
    texts: list[str]                 # decoded completions (special tokens skipped)
    group: list[int]                 # prompt index of each row
    group_size: int


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    return chat_token_ids(tokenizer, messages, add_generation_prompt=True)


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], *, group_size: int = 1,
             max_new_tokens: int, do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 64, min_new_tokens: int | None = None, share_prefix: bool = True) -> Rollouts:
    """`group_size` completions of each prompt (token ids), batched; see the module docstring. `min_new_tokens`
    suppresses the end token until then (the bench uses it to give both sides the same work)."""
    rows = [list(p) for p in prompts for _ in range(group_size)]
    group = [i for i in range(len(prompts)) for _ in range(group_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(model, tokenizer)
    kwargs: dict = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad,
                    "use_cache": True}
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if getattr(model.generation_config, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    try:
        if group_size > 1 and share_prefix:
            for p in prompts:
                completions += _shared_prefix(model, list(p), group_size, device, eos, kwargs)
        else:
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                ids, mask = pad_batch(batch, pad, device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                completions += [_until_end(row, eos) for row in out[:, ids.shape[1]:].tolist()]
    finally:
        model.train(was_training)
    texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    return Rollouts(rows, completions, texts, group, group_size)


def _shared_prefix(model, prompt: list[int], group_size: int, device, eos: set[int], kwargs: dict
                   ) -> list[list[int]]:
    """G rows of one prompt: prefill once, repeat the KV cache G times, decode the G rows together."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = model(input_ids=ids[:, :-1], use_cache=True).cache if len(prompt) > 1 else None
    if cache is not None:
        cache.batch_repeat_interleave(group_size)
    full = ids.expand(group_size, -1)
    out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), cache=cache, **kwargs)
    return [_until_end(row, eos) for row in out[:, len(prompt) :].tolist()]


def _until_end(row: list[int], eos: set[int]) -> list[int]:
    end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
    return row[:end]


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`(input_ids, attention_mask, completion_mask, C)`: [pads, prompt, completion, pads] rows, C = the longest
    completion; completion_mask [N, C] marks real completion tokens."""
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    n = len(prompts)
    ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((n, width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(list(p), dtype=torch.long)
        ids[i, width_p : width_p + len(c)] = torch.tensor(list(c), dtype=torch.long)
        attn[i, width_p - len(p) : width_p + len(c)] = 1
        cmask[i, : len(c)] = 1
    return ids, attn, cmask, width_c


def completion_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                        completions: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logp [N, C], mask [N, C])`: log-probability of each completion token given everything before it."""
    device = next(model.parameters()).device
    ids, attn, cmask, width_c = pack(prompts, completions, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                logits_to_keep=width_c + 1)
    logits = out.logits[:, :width_c].float()  # the logits at position t score the token at t + 1
    targets = ids[:, -width_c:]
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets[:, :, None]).squeeze(2)
    return logp, cmask.to(device)
