import math

import pytest
import torch
import torch.nn.functional as F

from lightmem_exp.models.recall_loss import recall_contrastive_loss


def test_single_positive_equals_cross_entropy():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    targets = torch.tensor([[1], [4], [0]])
    expected = F.cross_entropy(q @ k.T / 0.1, targets[:, 0])
    assert recall_contrastive_loss(q, k, targets, temperature=0.1) == pytest.approx(expected.item(), rel=1e-6)


def test_multi_positive_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = recall_contrastive_loss(q, k, torch.tensor([[0, 1]]), temperature=1.0)
    e = [math.e, 1.0, 1 / math.e]
    assert loss.item() == pytest.approx(-math.log((e[0] + e[1]) / sum(e)), rel=1e-6)


def test_in_batch_negatives_only_score_batch_positives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # key 2 would be a hard bank negative for query 0
    t = torch.tensor([[0], [1]])
    in_batch = recall_contrastive_loss(q, k, t, temperature=1.0, negatives="in_batch")
    bank = recall_contrastive_loss(q, k, t, temperature=1.0, negatives="bank")
    assert in_batch < bank
    expected = -math.log(math.e / (math.e + 1))
    assert in_batch.item() == pytest.approx(expected, rel=1e-6)


def test_conversation_negatives_score_only_the_querys_own_conversation():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    groups = torch.tensor([0, 0, 1, 1, 1, -1])      # two conversations and a <think> key
    t = torch.tensor([[1, -1], [2, 4], [5, -1]])
    got = recall_contrastive_loss(q, k, t, temperature=0.1, negatives="conversation", key_groups=groups)
    own = [[0, 1], [2, 3, 4], [5]]                   # each query against its own group's keys only
    expected = torch.stack([recall_contrastive_loss(q[i:i + 1], k[own[i]], torch.tensor([[own[i].index(j)
                            for j in t[i].tolist() if j >= 0]]), temperature=0.1) for i in range(3)]).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got < recall_contrastive_loss(q, k, t, temperature=0.1)
    with pytest.raises(ValueError, match="key_groups"):
        recall_contrastive_loss(q, k, t, temperature=0.1, negatives="conversation")
