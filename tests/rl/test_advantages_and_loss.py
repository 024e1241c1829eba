"""Group-relative advantages, attribution weighting and the clipped policy loss with KL, by hand."""

import math

import pytest
import torch

from lightmem_exp.rl.advantages import attribution_weights, dominant_type, group_advantages
from lightmem_exp.rl.loss import clipped_pg_loss


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.2, 0.2, 0.2]])
    a = group_advantages(r, eps=0.0 + 1e-9)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-6)  # mean 0.5, std 0.5
    assert torch.equal(a[1], torch.zeros(4))  # no preference inside the group
    mean, std = (-1 + 0.6) / 4, math.sqrt(((-1 + 0.1) ** 2 + 3 * (0.2 + 0.1) ** 2) / 4)
    assert torch.allclose(a[2], (r[2] - mean) / std, atol=1e-5)
    assert torch.allclose(a.sum(1), torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))


def test_dominant_type_and_attribution_weights():
    assert dominant_type(["episodic", "semantic", "episodic", None]) == "episodic"
    assert dominant_type(["episodic", "semantic"]) is None  # a tie: nobody stands out
    assert dominant_type([None, None]) is None and dominant_type([]) is None
    agents = ["core", "episodic", "semantic", "procedural"]
    assert attribution_weights(agents, "semantic", 4.0).tolist() == [1.0, 1.0, 4.0, 1.0]
    assert attribution_weights(agents, None, 4.0).tolist() == [1.0] * 4


def test_attribution_multiplies_the_dominant_agents_advantages():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # groups: core, semantic
    adv = group_advantages(rewards) * attribution_weights(["core", "semantic"], "semantic", 4.0)[:, None]
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0], [-4.0, 4.0]]), atol=1e-5)


def test_loss_with_ratio_one_is_the_policy_gradient_plus_kl():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = clipped_pg_loss(logp, logp.detach(), ref, adv, mask, clip_eps=0.2, kl_coef=0.02)
    # row 0: pg = -2 per token; kl tokens: 0 and e^1 - 1 - 1; row 1: pg = +1, kl 0
    kl0 = (0.0 + (math.e - 2.0)) / 2
    expected = ((-2.0 + 0.02 * kl0) + 1.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_frac"].item() == 0.0
    assert stats["kl"].item() == pytest.approx((math.e - 2.0) / 5, rel=1e-5)
    loss.backward()
    # d/dlogp of -A * exp(logp - sg(logp)) / len = -A / len; the masked token gets nothing
    g = logp.grad
    assert g[0, 2] == 0 and g[1].tolist() == pytest.approx([1 / 6] * 3)
    assert g[0, 0].item() == pytest.approx(-2 / 4 + 0.02 * (1 - 1) / 4)
    assert g[0, 1].item() == pytest.approx(-2 / 4 + 0.02 * (1 - math.e) / 4, rel=1e-5)


def test_ratio_is_clipped_in_the_pessimistic_direction():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    up = torch.log(torch.tensor([[1.5]]))  # ratio 1.5
    # positive advantage: the gain stops at 1 + eps
    loss, stats = clipped_pg_loss(up.clone().requires_grad_(), old, None, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_frac"].item() == 1.0
    # negative advantage: the unclipped (worse) value is kept
    loss, _ = clipped_pg_loss(up.clone(), old, None, torch.tensor([-1.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(1.5)
    x = up.clone().requires_grad_()
    clipped_pg_loss(x, old, None, torch.tensor([1.0]), mask, clip_eps=0.2)[0].backward()
    assert x.grad.item() == 0.0  # clipped: no gradient pushes the ratio further


def test_sequences_weigh_the_same_whatever_their_length():
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    loss, _ = clipped_pg_loss(logp, logp.detach(), None, torch.tensor([1.0, 1.0]), mask, kl_coef=0.0)
    assert loss.item() == pytest.approx(-1.0)
