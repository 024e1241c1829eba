"""memory_inputs_embeds (training/scoring forward) and decode_from_memories (greedy decode from a given vector)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from lightmem_exp.errors import LmxError
from lightmem_exp.models.injection import decode_from_memories, memory_forward, memory_inputs_embeds
from lightmem_exp.models.memory_bank import MemoryBank, measure_embed_scale
from tests.conftest import random_qwen2
from tests.transformers_logs import transformers_warnings

RECALL, MEM_PAD = 298, 299


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return random_qwen2()


@pytest.fixture(scope="module")
def bank(model) -> MemoryBank:
    rows = [{"id": f"m{i}", "text": f"memory {i}"} for i in range(5)]
    return MemoryBank(torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), rows,
                      embed_scale=measure_embed_scale(model))


def test_vector_sits_exactly_at_the_memory_pad_position(model, bank):
    ids = torch.tensor([[5, 6, RECALL, MEM_PAD, 7, 8], [9, RECALL, MEM_PAD, 10, 0, 0]])
    vectors = bank.injection_vectors([3, 1])
    embeds = memory_inputs_embeds(model, ids, vectors, MEM_PAD)
    lookup = model.get_input_embeddings()(ids)
    assert torch.equal(embeds[0, 3], bank.injection_vectors([3])[0])   # row-major: row 0's pad gets vector 0
    assert torch.equal(embeds[1, 2], bank.injection_vectors([1])[0])
    keep = ids != MEM_PAD
    assert torch.equal(embeds[keep], lookup[keep])                       # every other position is the lookup


def test_count_mismatch_and_no_pad(model, bank):
    ids = torch.tensor([[5, RECALL, MEM_PAD]])
    with pytest.raises(LmxError, match="1 <|memory_pad|> positions"):
        memory_inputs_embeds(model, ids, bank.injection_vectors([0, 1]), MEM_PAD)
    plain = torch.tensor([[5, 6]])
    assert torch.equal(memory_inputs_embeds(model, plain, torch.empty(0, 32), MEM_PAD),
                       model.get_input_embeddings()(plain))


def test_gradient_reaches_the_embedding_but_not_through_the_pad_row(model, bank):
    emb = model.get_input_embeddings()
    emb.weight.grad = None
    ids = torch.tensor([[5, RECALL, MEM_PAD, 7]])
    memory_inputs_embeds(model, ids, bank.injection_vectors([2]), MEM_PAD).sum().backward()
    grad = emb.weight.grad
    assert grad[RECALL].abs().sum() > 0 and grad[MEM_PAD].abs().sum() == 0
    emb.weight.grad = None


def test_memory_forward_equals_a_plain_inputs_embeds_forward(model, bank):
    ids = torch.tensor([[5, 6, RECALL, MEM_PAD, 7]])
    v = bank.injection_vectors([4])
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[0, 3] = v[0]
    with torch.no_grad():
        a = memory_forward(model, ids, None, v, MEM_PAD).logits
        b = model(inputs_embeds=embeds).logits
    assert torch.allclose(a, b, atol=1e-6)


def _greedy_without_cache(model, prompt, vector, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = memory_forward(model, torch.tensor([ids]), None, vector[None], MEM_PAD).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def test_decode_matches_full_recompute_and_stops_at_the_marker(model, bank):
    prompt = [5, 6, 7, RECALL, MEM_PAD]
    vectors = bank.injection_vectors([0, 1, 2])
    outs = decode_from_memories(model, prompt, vectors, memory_pad_id=MEM_PAD, max_new_tokens=6)
    for b in range(3):
        assert outs[b] == _greedy_without_cache(model, prompt, vectors[b], 6)
    # a stop sequence equal to the first two generated ids of row 0 stops that row there
    stop = outs[0][:2]
    cut = decode_from_memories(model, prompt, vectors[:1], memory_pad_id=MEM_PAD, max_new_tokens=6, stop_ids=stop)
    assert cut[0] == stop
    eos = decode_from_memories(model, prompt, vectors[:1], memory_pad_id=MEM_PAD, max_new_tokens=6,
                               eos_ids=[outs[0][0]])
    assert eos[0] == outs[0][:1]
    with pytest.raises(LmxError, match="must end with"):
        decode_from_memories(model, [5, RECALL], vectors, memory_pad_id=MEM_PAD, max_new_tokens=2)


def test_decode_passes_the_kv_cache_under_the_name_transformers_wants(model, bank):
    with transformers_warnings() as seen:
        decode_from_memories(model, [5, RECALL, MEM_PAD], bank.injection_vectors([0]), memory_pad_id=MEM_PAD,
                             max_new_tokens=3)
    assert not [m for m in seen if "past_key_values" in m]
