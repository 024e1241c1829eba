"""RolloutScorer: what memory each rollout is judged on, the reward it gets, attribution, and reward failures."""

import pytest

from lightmem_exp.errors import LmxError
from lightmem_exp.memory.ops import Op
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore
from lightmem_exp.rl.answerers import LocalAnswerer, QAScore, RewardError
from lightmem_exp.rl.reward_service import InProcessRewards, RewardErrorBudget
from lightmem_exp.rl.rewards import RewardConfig
from lightmem_exp.rl.scoring import AgentCall, RlItem, RolloutScorer

EXPERT = {"core": [Op("APPEND", {"content": "Jon is a dancer."})],
          "episodic": [Op("ADD", {"content": "Jon opened a studio in June.", "timestamp": "2023-06-01"})],
          "semantic": [Op("SKIP", {})],
          "procedural": []}
WRITTEN = {"core": 4, "episodic": 6, "semantic": 0, "procedural": 0}


def item() -> RlItem:
    state = MemoryStore(search_mode="bm25")
    state.insert("semantic", "Gina - Jon's friend")
    calls = {a: AgentCall(a, [], [1, 2], EXPERT[a], WRITTEN[a]) for a in MEMORY_TYPES}
    qs = [{"question": "What is Jon?", "answer": "dancer"},
          {"question": "When did Jon open the studio?", "answer": "June"}]
    return RlItem("c1/s1_c00", state.snapshot(), "2023-06-01T10:00:00", calls, qs)


class Recording:
    """Scores like the local answerer and keeps every memory it was asked about."""

    def __init__(self):
        self.inner, self.seen = InProcessRewards(LocalAnswerer(top_k=3)), []

    def score(self, items):
        self.seen += [m.snapshot() for m, _ in items]
        return self.inner.score(items)


def test_each_rollout_is_judged_with_the_other_agents_expert_ops():
    service = Recording()
    scorer = RolloutScorer(service, RewardConfig(), search_mode="bm25", embedder=None)
    texts = [[
        ['{"operations": []}', "garbage"],                                                  # core
        ['{"operations": []}', '{"operations": [{"action": "ADD", "content": "Jon opened a studio in June."}]}'],
        ['{"operations": [{"action": "SKIP"}]}', '{"operations": [{"action": "SKIP"}]}'],   # semantic
        ['{"operations": []}', '{"operations": [{"action": "ADD", "content": "Jon stretches daily."}]}'],
    ]]
    out = scorer.score([item()], texts)
    r = out.rewards
    assert r.shape == (4, 2) and out.group_agents == list(MEMORY_TYPES)
    # core, empty: the memory lacks "dancer" but has June (expert episodic) -> acc 0.5, core 0 words -> no penalty
    assert r[0, 0].item() == pytest.approx(0.5)
    assert r[0, 1].item() == -1.0  # invalid JSON: the format penalty
    # episodic, empty: core (expert) has "dancer", no June: acc 0.5, wrote 0 of the expert's 6 words: penalty 1
    assert r[1, 0].item() == pytest.approx(0.5 * (1 - 0.8))
    assert r[1, 1].item() == pytest.approx(1.0)  # the expert's event: both answers, same length
    assert r[2].tolist() == pytest.approx([1.0, 1.0])  # semantic SKIPs like the expert
    # procedural: the expert wrote nothing; writing 3 words costs the full penalty
    assert r[3].tolist() == pytest.approx([1.0, 0.2])
    # the memory judged for core rollout 0: the state + the other agents' expert ops, not the expert's core op
    first = service.seen[0]
    assert first["core"] == "" and [e["content"] for e in first["entries"]] == \
        ["Gina - Jon's friend", "Jon opened a studio in June."]
    assert out.stats["reward/format_valid"] == pytest.approx(7 / 8)
    assert out.served["core"] > 0 and out.served["episodic"] > 0
    assert out.dominant == [None] or out.dominant[0] in MEMORY_TYPES


class Failing:
    def score(self, items):
        raise RewardError("server down")


def test_failed_rewards_skip_the_step_then_stop_the_run():
    budget = RewardErrorBudget(max_errors=1)
    scorer = RolloutScorer(Failing(), RewardConfig(), search_mode="bm25", embedder=None, budget=budget)
    texts = [[['{"operations": []}'] * 2 for _ in MEMORY_TYPES]]
    assert scorer.score([item()], texts, where="step 0") is None and budget.errors == 1
    with pytest.raises(LmxError, match="never substituted"):
        scorer.score([item()], texts, where="step 1")
    with pytest.raises(RewardError):  # without a budget the error propagates as is
        RolloutScorer(Failing(), RewardConfig(), search_mode="bm25", embedder=None).score([item()], texts)


class Fixed:
    """Every memory answers the first question, served by `types[k]` for the k-th memory asked about."""

    def __init__(self, types):
        self.types, self.k = types, 0

    def score(self, items):
        out = []
        for _, qs in items:
            t = self.types[self.k % len(self.types)]
            self.k += 1
            out.append(QAScore([True] + [False] * (len(qs) - 1), [1.0] * len(qs), [1.0] * len(qs),
                               [t] + [None] * (len(qs) - 1)))
        return out


def test_dominant_type_is_the_one_serving_most_correct_answers():
    scorer = RolloutScorer(Fixed(["semantic", "semantic", "core"]), RewardConfig(), search_mode="bm25",
                           embedder=None)
    texts = [[['{"operations": []}'] * 3 for _ in MEMORY_TYPES]]
    out = scorer.score([item()], texts)
    assert out.served == {"semantic": 8, "core": 4} and out.dominant == ["semantic"]
