"""The step1 objective: a multi-positive InfoNCE between `<recall>` queries and frozen memory keys."""

from __future__ import annotations

import torch


def recall_contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, *,
                            temperature: float, negatives: str = "bank",
                            key_groups: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over queries of -log( sum_pos exp(s/t) / sum_cand exp(s/t) ), s = cosine(query, key).

    queries [B, H] and keys [K, H] are unit vectors; targets [B, P] holds key indices, padded with -1.
    negatives="bank" scores every key; "in_batch" scores only the keys that are positives somewhere in the batch;
    "conversation" scores only the keys of the query's own group (`key_groups` [K], e.g. a conversation index; a
    query's group is its first target's), the candidates per-conversation retrieval ranks.
    """
    if negatives == "conversation":
        if key_groups is None:
            raise ValueError("negatives='conversation' needs key_groups")
        key_groups = key_groups.to(keys.device)
        own = key_groups[targets[:, 0]]
        logits = (queries @ keys.T / temperature).masked_fill(key_groups[None, :] != own[:, None], float("-inf"))
        return _multi_positive_nll(logits, targets)
    if negatives == "in_batch":
        cand = torch.unique(targets[targets >= 0])
        remap = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        remap[cand] = torch.arange(len(cand), device=keys.device)
        keys = keys[cand]
        targets = torch.where(targets >= 0, remap[targets.clamp_min(0)], targets)
    elif negatives != "bank":
        raise ValueError(f"negatives must be 'bank', 'in_batch' or 'conversation', got {negatives!r}")
    return _multi_positive_nll(queries @ keys.T / temperature, targets)


def _multi_positive_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    pos_mask = torch.zeros_like(logits, dtype=torch.bool)
    rows, cols = torch.nonzero(targets >= 0, as_tuple=True)
    pos_mask[rows, targets[rows, cols]] = True
    pos = torch.logsumexp(logits.masked_fill(~pos_mask, float("-inf")), dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos).mean()
