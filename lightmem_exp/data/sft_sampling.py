"""Seeded draws from the SFT pool with a true-token-length filter: over-long items are skipped and the
draw refills from the rest; a pool that runs short is an error, never a silently smaller set.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from lightmem_exp.errors import LmxError

T = TypeVar("T")

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass
class Draw:
    items: list
    skipped_too_long: int
    examined: int


def draw_within_limit(candidates: Sequence[T], target: int, *, n_tokens: Callable[[T], int], max_tokens: int,
                      rng: random.Random, what: str) -> Draw:
    """Shuffle `candidates` and take the first `target` whose token count is <= max_tokens."""
    if target <= 0:
        return Draw([], 0, 0)
    order = list(range(len(candidates)))
    rng.shuffle(order)
    chosen, skipped = [], 0
    for examined, i in enumerate(order, start=1):
        if n_tokens(candidates[i]) > max_tokens:
            skipped += 1
            continue
        chosen.append(candidates[i])
        if len(chosen) == target:
            return Draw(chosen, skipped, examined)
    raise LmxError(
        f"{what}: needed {target} items within {max_tokens} tokens but the pool of {len(candidates)} gave only "
        f"{len(chosen)} ({skipped} skipped as too long); add SFT data, raise the token limit, or lower the ratio "
        f"or data.max_memories"
    )


def think_segments(pool: Sequence[dict]) -> list[dict]:
    """Every <think>…</think> segment of every assistant turn: {pool_index, turn, think, context}.

    `context` is the conversation up to and including that assistant turn, cut right after the segment,
    so a model reading it has just 'thought' the segment.
    """
    out = []
    for row in pool:
        for t, msg in enumerate(row["messages"]):
            if msg["role"] != "assistant":
                continue
            m = THINK_RE.search(msg["content"])
            if m and m.group(1).strip():
                context = [*row["messages"][:t], {"role": "assistant", "content": msg["content"][: m.end()]}]
                out.append({"pool_index": row["index"], "turn": t, "think": m.group(1).strip(), "context": context})
    return out
