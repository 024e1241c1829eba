"""Reward components and the length-penalty math against hand-computed values."""

import pytest

from lightmem_exp.rl.rewards import (
    RewardConfig,
    core_length_penalty,
    length_penalty,
    other_length_penalty,
    rollout_reward,
)

CFG = RewardConfig()  # lambda 0.8, theta 150/400, gamma 0.5/1.3, format penalty -1


def test_defaults_are_the_papers():
    assert (CFG.weight, CFG.core_theta_min, CFG.core_theta_max, CFG.gamma_lower, CFG.gamma_upper) == \
        (0.8, 150, 400, 0.5, 1.3)


@pytest.mark.parametrize(("words", "expected"), [
    (0, 0.0), (150, 0.0), (151, 1 / 250), (275, 0.5), (300, 0.6), (399, 249 / 250), (400, 1.0), (5000, 1.0)])
def test_core_penalty_is_zero_then_linear_then_one(words, expected):
    assert core_length_penalty(words, 150, 400) == pytest.approx(expected)


@pytest.mark.parametrize(("written", "expert", "expected"), [
    (10, 10, 0.0), (5, 10, 0.0), (13, 10, 0.0),       # inside [gamma_l, gamma_u]
    (4, 10, 0.2),                                      # r = 0.4: (0.5 - 0.4) / 0.5
    (0, 10, 1.0),                                      # wrote nothing where the expert wrote
    (2, 10, 0.6),                                      # r = 0.2: (0.5 - 0.2) / 0.5
    (20, 10, (2.0 - 1.3) / 1.3),                       # r = 2.0
    (26, 10, 1.0), (100, 10, 1.0),                     # r >= 2 * gamma_u: capped at 1
    (0, 0, 0.0), (3, 0, 1.0)])                         # the expert wrote nothing
def test_other_penalty_against_the_expert_length(written, expert, expected):
    assert other_length_penalty(written, expert, 0.5, 1.3) == pytest.approx(expected)


def test_length_penalty_dispatches_by_agent_and_can_be_disabled():
    assert length_penalty("core", CFG, core_words=300, written=999, expert_written=1) == pytest.approx(0.6)
    assert length_penalty("semantic", CFG, core_words=999, written=4, expert_written=10) == pytest.approx(0.2)
    off = RewardConfig(length_penalty=False)
    assert length_penalty("core", off, core_words=1000, written=0, expert_written=0) == 0.0


def test_reward_combines_accuracy_and_penalty():
    # acc 0.75, core at 300 words: 0.75 * (1 - 0.8 * 0.6) = 0.39
    parts = rollout_reward(CFG, format_ok=True, qa_acc=0.75, penalty=0.6)
    assert parts.reward == pytest.approx(0.39) and parts.format_ok and parts.length_penalty == 0.6
    assert rollout_reward(CFG, format_ok=True, qa_acc=1.0, penalty=1.0).reward == pytest.approx(0.2)
    assert rollout_reward(CFG, format_ok=True, qa_acc=0.0, penalty=0.0).reward == 0.0
    assert rollout_reward(RewardConfig(length_penalty=False), format_ok=True, qa_acc=0.5, penalty=1.0).reward == 0.5


def test_invalid_format_gets_the_penalty_whatever_else():
    parts = rollout_reward(CFG, format_ok=False, qa_acc=1.0, penalty=0.0)
    assert parts.reward == -1.0 and not parts.format_ok and parts.qa_acc is None
    assert rollout_reward(RewardConfig(format_penalty=-0.25), format_ok=False).reward == -0.25
    with pytest.raises(ValueError):
        rollout_reward(CFG, format_ok=True)


@pytest.mark.parametrize("kw", [{"weight": 1.5}, {"core_theta_min": 400, "core_theta_max": 150},
                                {"gamma_lower": 1.2}, {"gamma_upper": 0.9}])
def test_bad_reward_config_is_rejected(kw):
    with pytest.raises(ValueError):
        RewardConfig(**kw)
