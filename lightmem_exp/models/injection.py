"""Memory vectors at `<|memory_pad|>` positions: the one way a non-generate forward feeds them (training, scoring,
the recall test), and a small greedy decoder that starts from a GIVEN memory vector.

`memory_inputs_embeds` is the training-time twin of step N+2 in `generation.generate_with_recall`: the input
embedding at every `<|memory_pad|>` is replaced by the memory's injection vector (`MemoryBank.injection_vectors`:
unit vector x embed_scale), every other position is the model's own embedding lookup (PEFT trainable-token rows
included, so `<recall>` keeps learning). Training and inference therefore see identical inputs.

`decode_from_memories` answers "which text does this vector decode to?" without choosing a memory: the prompt
already ends with `<|memory_pad|>`, the vector is injected at that last position, and greedy decoding continues
with the KV cache until the end marker, EOS, or `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from lightmem_exp.errors import LmxError
from lightmem_exp.models.inputs import logits_to_keep_kwargs


def memory_inputs_embeds(model: torch.nn.Module, input_ids: torch.Tensor, vectors: torch.Tensor,
                         memory_pad_id: int) -> torch.Tensor:
    """`inputs_embeds [B, T, H]` for `input_ids` with `vectors [K, H]` placed at the K `<|memory_pad|>` positions.

    Vectors fill the pad positions in row-major order (row 0 left to right, then row 1, ...), which is the order
    a collator lists them in. Differentiable w.r.t. the embedding (not the vectors' source, which is data).
    """
    embeds = model.get_input_embeddings()(input_ids)
    where = input_ids == memory_pad_id
    n = int(where.sum())
    if vectors.ndim != 2 or vectors.shape[0] != n or vectors.shape[1] != embeds.shape[-1]:
        raise LmxError(f"memory_inputs_embeds: {n} <|memory_pad|> positions of width {embeds.shape[-1]} but "
                       f"vectors of shape {tuple(vectors.shape)}")
    if n == 0:
        return embeds
    return embeds.masked_scatter(where.unsqueeze(-1), vectors.to(device=embeds.device, dtype=embeds.dtype))


def memory_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   vectors: torch.Tensor, memory_pad_id: int, **kwargs):
    """`model(inputs_embeds=memory_inputs_embeds(...), ...)`: a forward with the memory vectors injected."""
    embeds = memory_inputs_embeds(model, input_ids, vectors, memory_pad_id)
    return model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@torch.no_grad()
def decode_from_memories(model: torch.nn.Module, prompt_ids: Sequence[int], vectors: torch.Tensor, *,
                         memory_pad_id: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
                         eos_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuation of `prompt_ids` (ending with `<|memory_pad|>`) once per vector `[B, H]`.

    Every row shares the prompt, so no padding is needed; row b gets `vectors[b]` at the last prompt position.
    A row stops after emitting an id in `eos_ids` or once its output ends with the sequence `stop_ids`
    (the end marker); the returned ids include that stop (callers strip it).
    """
    prompt = list(prompt_ids)
    if not prompt or prompt[-1] != memory_pad_id:
        raise LmxError("decode_from_memories: the prompt must end with <|memory_pad|> (the injected position)")
    batch = vectors.shape[0]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        embeds = memory_inputs_embeds(model, ids, vectors.to(device), memory_pad_id)
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        positions = torch.arange(len(prompt), device=device)[None].expand(batch, -1)
        out = model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, return_dict=True,
                    **logits_to_keep_kwargs(model))
        outputs: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        stop, eos = list(stop_ids), set(eos_ids)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(dim=-1)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                outputs[b].append(t)
                if t in eos or (stop and outputs[b][-len(stop):] == stop):
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None], position_ids=positions, cache=out.cache, use_cache=True,
                        return_dict=True, **logits_to_keep_kwargs(model))
        return outputs
    finally:
        model.train(was_training)
