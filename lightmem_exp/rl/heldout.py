"""Held-out evaluation: a policy builds memory on its own, chunk after chunk, from an empty store; then the
questions of those sessions are answered over the result.

Every chunk: the four agents' prompts are rendered from the policy's *own* state, replies are greedy, parsed and
applied (core, episodic, semantic, procedural). A reply that does not parse writes nothing (counted); a prompt
longer than `max_prompt_tokens` is not sent (counted as skipped). All conversations advance together, so one
`generate` call covers every conversation's four agents of the same round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from lightmem_exp.memory.ops import apply_ops, parse_reply
from lightmem_exp.memory.prompts import agent_messages
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore
from lightmem_exp.rl.expert import Chunk
from lightmem_exp.rl.rollouts import generate, prompt_token_ids


@torch.no_grad()
def policy_memories(model: torch.nn.Module, tokenizer, conversations: Mapping[str, Sequence[Chunk]],
                    new_store: Callable[[], MemoryStore], *, shown: int, max_new_tokens: int,
                    max_prompt_tokens: int, batch_size: int = 64) -> tuple[dict[str, MemoryStore], dict]:
    """`(conv_id -> the memory the policy built, stats)`; see the module docstring."""
    stores = {c: new_store() for c in conversations}
    counts: Counter = Counter()
    rounds = max((len(chunks) for chunks in conversations.values()), default=0)
    for r in range(rounds):
        calls, prompts = [], []
        for conv, chunks in conversations.items():
            if r >= len(chunks):
                continue
            chunk = chunks[r]
            for agent in MEMORY_TYPES:
                messages, _ = agent_messages(agent, stores[conv], chunk.turns, session=chunk.session,
                                             timestamp=chunk.timestamp, shown=shown)
                ids = prompt_token_ids(tokenizer, messages)
                if len(ids) > max_prompt_tokens:
                    counts["skipped_long_prompt"] += 1
                    continue
                calls.append((conv, agent, chunk))
                prompts.append(ids)
        if not prompts:
            continue
        out = generate(model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens, do_sample=False,
                       batch_size=batch_size)
        decided: dict[str, dict[str, tuple]] = {}
        for (conv, agent, chunk), text in zip(calls, out.texts, strict=True):
            counts["calls"] += 1
            p = parse_reply(agent, text)
            counts["valid"] += p.ok
            counts[f"valid_{agent}"] += p.ok
            counts[f"calls_{agent}"] += 1
            if p.ok:
                decided.setdefault(conv, {})[agent] = (p.ops, chunk.timestamp)
        for conv, per in decided.items():
            for agent in MEMORY_TYPES:
                if agent in per:
                    report = apply_ops(stores[conv], agent, per[agent][0], timestamp=per[agent][1])
                    counts["ops_applied"] += report.applied
                    counts["ops_failed"] += report.failed
    stats = {"calls": counts["calls"], "format_valid": counts["valid"] / counts["calls"] if counts["calls"] else 0.0,
             "skipped_long_prompt": counts["skipped_long_prompt"], "ops_applied": counts["ops_applied"],
             "ops_failed": counts["ops_failed"],
             **{f"format_valid_{a}": counts[f"valid_{a}"] / counts[f"calls_{a}"]
                for a in MEMORY_TYPES if counts[f"calls_{a}"]}}
    return stores, stats
