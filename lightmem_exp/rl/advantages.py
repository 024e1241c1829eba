"""Group-relative advantages and the attribution weighting of ADRPO.

Advantages: the G rollouts of one prompt (one agent on one chunk) form a group; each rollout's advantage is its
reward minus the group mean, divided by the group's standard deviation (population, ddof 0) plus `eps`. A group
whose rewards are all equal carries no preference and gets zeros.

Attribution: for one chunk, every correct answer over every rollout's memory (all four agents' groups) is
credited to the memory type of the unit that served it. The type with the most credit is the chunk's dominant
type; the advantages of the rollouts of that type's agent are multiplied by `alpha`. No credit at all, or a tie
for the most, leaves every advantage as it is (no type stands out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`rewards` [n_groups, G] -> advantages of the same shape (see the module docstring)."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [n_groups, G], got {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    return torch.where(std > eps, adv, torch.zeros_like(adv))


def dominant_type(served_by: Iterable[str | None]) -> str | None:
    """The type credited with the most correct answers; None when nothing was credited or the top is tied."""
    counts = Counter(t for t in served_by if t is not None)
    if not counts:
        return None
    top = counts.most_common(2)
    if len(top) == 2 and top[0][1] == top[1][1]:
        return None
    return top[0][0]


def attribution_weights(group_agents: Sequence[str], dominant: str | None, alpha: float) -> torch.Tensor:
    """One multiplier per group: `alpha` for the groups of the dominant type's agent, 1 elsewhere."""
    return torch.tensor([alpha if dominant is not None and a == dominant else 1.0 for a in group_agents])
