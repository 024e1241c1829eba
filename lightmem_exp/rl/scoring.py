"""From rollout texts to rewards: parse each reply, build the memory it leads to, ask the reward service for the
chunk's QA accuracy over it, and combine with the length penalty (`rl.rewards`).

An RL item is one dialogue chunk of the expert trajectories: the state before it, the four agents' prompts and
expert operations, and the chunk's questions. A rollout of agent `a` is judged on
`state + expert ops of the other agents + the rollout's ops` (a copy per rollout). All memories of one training
step go to the reward service in a single batch.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from lightmem_exp.memory.ops import Op, apply_ops, parse_reply
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore, TextEmbedder, words
from lightmem_exp.rl.advantages import dominant_type
from lightmem_exp.rl.answerers import QAScore, RewardError
from lightmem_exp.rl.reward_service import RewardErrorBudget, RewardService
from lightmem_exp.rl.rewards import RewardConfig, length_penalty, rollout_reward


@dataclass
class AgentCall:
    agent: str
    messages: list[dict]
    prompt_ids: list[int]
    expert_ops: list[Op]
    expert_written: int


@dataclass
class RlItem:
    key: str                        # "<conv_id>/<chunk key>"
    state: dict                     # snapshot before the chunk
    timestamp: str | None
    calls: dict[str, AgentCall]     # agent -> call, for every agent in MEMORY_TYPES
    questions: list[dict]


@dataclass
class ScoredStep:
    rewards: torch.Tensor                 # [n_items * 4, G], groups ordered item-major, agents in MEMORY_TYPES order
    group_agents: list[str]
    dominant: list[str | None]            # per item
    stats: dict[str, float] = field(default_factory=dict)
    served: Counter = field(default_factory=Counter)


class RolloutScorer:
    def __init__(self, service: RewardService, reward_cfg: RewardConfig, *, search_mode: str,
                 embedder: TextEmbedder | None, budget: RewardErrorBudget | None = None):
        self.service, self.cfg, self.search_mode, self.embedder = service, reward_cfg, search_mode, embedder
        self.budget = budget
        self.seconds = 0.0

    def store(self, snap: dict) -> MemoryStore:
        return MemoryStore.from_snapshot(snap, search_mode=self.search_mode, embedder=self.embedder)

    def score(self, items: list[RlItem], texts: list[list[list[str]]], where: str = "") -> ScoredStep | None:
        """`texts[i][a][g]`: rollout g of agent MEMORY_TYPES[a] on item i. None when the reward service failed
        (counted by the budget, which raises once too many have)."""
        start = time.perf_counter()
        try:
            return self._score(items, texts, where)
        finally:
            self.seconds += time.perf_counter() - start

    def _score(self, items: list[RlItem], texts: list[list[list[str]]], where: str) -> ScoredStep | None:
        G = len(texts[0][0])
        parsed, requests, slots = [], [], []
        written, core_words = {}, {}
        for i, item in enumerate(items):
            base = self.store(item.state)
            for a, agent in enumerate(MEMORY_TYPES):
                others = base.copy()
                for other in MEMORY_TYPES:
                    if other != agent:
                        apply_ops(others, other, item.calls[other].expert_ops, timestamp=item.timestamp)
                for g, text in enumerate(texts[i][a]):
                    p = parse_reply(agent, text)
                    parsed.append(p)
                    if not p.ok:
                        continue
                    mem = others.copy()
                    report = apply_ops(mem, agent, p.ops, timestamp=item.timestamp)
                    written[(i, a, g)], core_words[(i, a, g)] = report.written_words, words(mem.core)
                    requests.append((mem, item.questions))
                    slots.append((i, a, g))
        try:
            scores: list[QAScore] = self.service.score(requests) if requests else []
        except RewardError as e:
            if self.budget is None:
                raise
            self.budget.record(e, where)
            return None
        by_slot = dict(zip(slots, scores, strict=True))
        rewards = torch.zeros(len(items) * len(MEMORY_TYPES), G)
        served_per_item: list[Counter] = [Counter() for _ in items]
        sums: Counter = Counter()
        k = 0
        for i, item in enumerate(items):
            for a, agent in enumerate(MEMORY_TYPES):
                for g in range(G):
                    p = parsed[k]
                    k += 1
                    if not p.ok:
                        parts = rollout_reward(self.cfg, format_ok=False)
                    else:
                        s = by_slot[(i, a, g)]
                        pen = length_penalty(agent, self.cfg, core_words=core_words[(i, a, g)],
                                             written=written[(i, a, g)],
                                             expert_written=item.calls[agent].expert_written)
                        parts = rollout_reward(self.cfg, format_ok=True, qa_acc=s.acc, penalty=pen)
                        served_per_item[i].update(t for t in s.served_by if t is not None)
                        sums["qa_acc"] += s.acc
                        sums["length_penalty"] += pen
                        sums[f"length_penalty_{agent}"] += pen
                        sums[f"valid_{agent}"] += 1
                        sums["repaired"] += p.repaired
                    rewards[i * len(MEMORY_TYPES) + a, g] = parts.reward
                    sums["valid"] += p.ok
        n = len(parsed)
        valid = max(sums["valid"], 1)
        stats = {"reward/mean": float(rewards.mean()), "reward/format_valid": sums["valid"] / n,
                 "reward/json_repaired": sums["repaired"] / valid if sums["valid"] else 0.0}
        if sums["valid"]:
            stats["reward/qa_acc"] = sums["qa_acc"] / valid
            stats["reward/length_penalty"] = sums["length_penalty"] / valid
        for agent in MEMORY_TYPES:
            if sums[f"valid_{agent}"]:
                stats[f"reward/length_penalty_{agent}"] = sums[f"length_penalty_{agent}"] / sums[f"valid_{agent}"]
        dominant = [dominant_type(c.elements()) for c in served_per_item]
        served = sum(served_per_item, Counter())
        return ScoredStep(rewards, [a for _ in items for a in MEMORY_TYPES], dominant, stats, served)
