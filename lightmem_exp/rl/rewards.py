"""ADRPO rewards: session-QA accuracy of the memory a rollout produced, times an expert-length penalty.

For one rollout of agent `t` on a dialogue chunk:

    reward = format_penalty                                   if the reply is not a valid operations object
    reward = qa_acc * (1 - lambda * length_penalty)           otherwise

`qa_acc` is the answerer's accuracy on the chunk's questions over the memory *after* the chunk: the state before
it, the expert's operations of the three other agents, and this rollout's operations (so a rollout is judged by
what it adds to what the others would have written). Lengths are in words (`memory.store.words`):

- core: `L` = words in the core block after the rollout; 0 when L <= theta_min, 1 when L >= theta_max, linear in
  between: (L - theta_min) / (theta_max - theta_min). Core is always in view, so a long core costs every answer.
- episodic / semantic / procedural: `L` = words the rollout wrote, `E` = words the expert wrote for the same
  call, r = L / E. 0 when gamma_l <= r <= gamma_u; (gamma_l - r) / gamma_l below (too terse, 1 at r = 0);
  min(1, (r - gamma_u) / gamma_u) above (too verbose, 1 at r = 2 * gamma_u). When the expert wrote nothing
  (E = 0): 0 if the rollout wrote nothing too, else 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    length_penalty: bool = True
    weight: float = 0.8          # lambda
    core_theta_min: float = 150  # words
    core_theta_max: float = 400
    gamma_lower: float = 0.5
    gamma_upper: float = 1.3
    format_penalty: float = -1.0

    def __post_init__(self):
        if not 0 <= self.weight <= 1:
            raise ValueError(f"length penalty weight must be in [0, 1], got {self.weight}")
        if not 0 <= self.core_theta_min < self.core_theta_max:
            raise ValueError(f"need 0 <= core_theta_min < core_theta_max, got {self.core_theta_min}, "
                             f"{self.core_theta_max}")
        if not 0 < self.gamma_lower <= 1 <= self.gamma_upper:
            raise ValueError(f"need 0 < gamma_lower <= 1 <= gamma_upper, got {self.gamma_lower}, {self.gamma_upper}")


@dataclass(frozen=True)
class RewardParts:
    reward: float
    format_ok: bool
    qa_acc: float | None          # None when the format failed (no memory was built from the reply)
    length_penalty: float | None


def core_length_penalty(core_words: float, theta_min: float, theta_max: float) -> float:
    if core_words <= theta_min:
        return 0.0
    if core_words >= theta_max:
        return 1.0
    return (core_words - theta_min) / (theta_max - theta_min)


def other_length_penalty(written: float, expert: float, gamma_lower: float, gamma_upper: float) -> float:
    if expert <= 0:
        return 0.0 if written <= 0 else 1.0
    r = written / expert
    if r < gamma_lower:
        return (gamma_lower - r) / gamma_lower
    if r > gamma_upper:
        return min(1.0, (r - gamma_upper) / gamma_upper)
    return 0.0


def length_penalty(agent: str, cfg: RewardConfig, *, core_words: float, written: float, expert_written: float
                   ) -> float:
    if not cfg.length_penalty:
        return 0.0
    if agent == "core":
        return core_length_penalty(core_words, cfg.core_theta_min, cfg.core_theta_max)
    return other_length_penalty(written, expert_written, cfg.gamma_lower, cfg.gamma_upper)


def rollout_reward(cfg: RewardConfig, *, format_ok: bool, qa_acc: float | None = None,
                   penalty: float | None = None) -> RewardParts:
    """Combine the parts (see the module docstring)."""
    if not format_ok:
        return RewardParts(cfg.format_penalty, False, None, None)
    if qa_acc is None or penalty is None:
        raise ValueError("a well-formed rollout needs qa_acc and penalty")
    weight = cfg.weight if cfg.length_penalty else 0.0
    return RewardParts(qa_acc * (1.0 - weight * penalty), True, qa_acc, penalty)
