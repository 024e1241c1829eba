"""The ADRPO policy loss: a PPO-style clipped policy gradient on per-token ratios, plus a KL penalty towards the
reference policy, averaged per sequence and then over sequences (every rollout weighs the same, whatever its
length).

Per completion token t of rollout i, with ratio = exp(logp - old_logp):

    pg   = max(-A_i * ratio, -A_i * clip(ratio, 1 - eps, 1 + eps))
    kl   = exp(ref_logp - logp) - (ref_logp - logp) - 1        (the k3 estimator: >= 0, unbiased for KL(pi||ref))
    loss = mean_i [ sum_t mask * (pg + kl_coef * kl) / sum_t mask ]

With one update per batch of rollouts `old_logp` is `logp` detached: the ratio is 1 and its gradient is the plain
policy gradient; clipping matters from the second update on the same rollouts.
"""

from __future__ import annotations

import torch


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
                    kl_coef: float = 0.02) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`(loss, stats)`; log-probs and mask are [N, T], advantages [N]. Stats are detached means over tokens."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = pg + kl_coef * kl
    lengths = mask.sum(1).clamp_min(1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    n = mask.sum().clamp_min(1)
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).to(logp.dtype)
        stats = {"pg": ((pg * mask).sum(1) / lengths).mean(), "kl": (kl * mask).sum() / n,
                 "clip_frac": (clipped * mask).sum() / n, "ratio": (ratio * mask).sum() / n}
    return loss, {k: v.detach() for k, v in stats.items()}
