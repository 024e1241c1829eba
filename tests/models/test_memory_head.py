"""MemoryHead: cosine logits, exact top-k, no copy of the bank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightmem_exp.models import memory_head
from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.models.memory_head import MemoryHead


def unit(n: int, h: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, h, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_logits_are_cosine_similarity():
    vectors = unit(50, 32)
    hidden = torch.randn(3, 32) * 7.0
    logits = MemoryHead(vectors)(hidden)
    ref = F.cosine_similarity(hidden[:, None, :], vectors[None, :, :], dim=-1)
    assert logits.shape == (3, 50) and logits.dtype == torch.float32
    assert torch.allclose(logits, ref, atol=1e-6)


def test_low_precision_hidden_is_scored_in_float32():
    vectors = unit(20, 16)
    hidden = torch.randn(2, 16)
    logits = MemoryHead(vectors)(hidden.to(torch.bfloat16))
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, MemoryHead(vectors)(hidden), atol=2e-2)


def test_topk_equals_brute_force():
    head = MemoryHead(unit(2000, 24))
    hidden = torch.randn(5, 24)
    scores, idx = head.topk(hidden, 7)
    ref = (F.normalize(hidden, dim=-1) @ head.vectors.T).sort(dim=-1, descending=True)
    assert torch.equal(idx, ref.indices[:, :7])
    assert torch.allclose(scores, ref.values[:, :7], atol=1e-6)
    assert head.topk(hidden[0], 10_000)[0].shape == (2000,)  # unbatched query, k clamped


def test_head_shares_bank_storage_and_is_not_saved():
    bank = MemoryBank(unit(10, 8), [{"id": str(i), "text": "t"} for i in range(10)], embed_scale=1.0)
    head = bank.head()
    assert head.vectors.data_ptr() == bank.vectors.data_ptr()
    assert bank.head() is head  # cached
    assert head.state_dict() == {}  # the bank is its own artifact, never a checkpoint entry


def test_gradient_reaches_the_query():
    head = MemoryHead(unit(10, 8))
    hidden = torch.randn(2, 8, requires_grad=True)
    logits = head(hidden)  # the torch path; inference (no grad) of a large bank takes the numpy-BLAS path on CPU
    assert torch.allclose(logits, head(hidden.detach()), atol=1e-6)
    logits.max(dim=-1).values.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert head.vectors.grad is None


@pytest.mark.parametrize(("small", "large"), [(0, 1 << 62), (1 << 62, 1 << 62), (0, 0)],
                         ids=["torch", "numpy_small", "numpy_all_threads"])
def test_every_cpu_scoring_path_gives_exact_topk(monkeypatch, small, large):
    """Single and batched no-grad queries take a size-dependent CPU path; each must rank exactly like float64
    brute force (a regression in correctness, not in time)."""
    monkeypatch.setattr(memory_head, "SMALL_PRODUCT", small)
    monkeypatch.setattr(memory_head, "NUMPY_BLAS_MIN_ELEMENTS", large)
    vectors = unit(3000, 48, seed=1)
    head = MemoryHead(vectors)
    g = torch.Generator().manual_seed(2)
    for hidden in (torch.randn(48, generator=g), torch.randn(1, 48, generator=g), torch.randn(4, 1, 48, generator=g)):
        scores, idx = head.topk(hidden, 10)
        ref = F.normalize(hidden.double(), dim=-1) @ vectors.double().T
        ref_scores, ref_idx = ref.sort(dim=-1, descending=True)
        assert idx.shape == hidden.shape[:-1] + (10,) and scores.dtype == torch.float32
        assert torch.equal(idx, ref_idx[..., :10])
        assert torch.allclose(scores.double(), ref_scores[..., :10], atol=1e-6)
        assert torch.allclose(head(hidden).double(), ref, atol=1e-6)
