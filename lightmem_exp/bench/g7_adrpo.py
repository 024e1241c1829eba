"""Bench G7 (stage adrpo): batched generation of a group's G rollouts, and the reward's share of an RL step.

Setup, shared by both rows: the tiny default model with the stage's LoRA (+ reply-vocabulary rows), and a real
RL item: the first chunk with questions of the first LoCoMo conversation, its four agents' prompts rendered by the
deterministic expert (hybrid search, as the stage's default).

- `G7 rollouts`: the G = 8 rollouts of one agent prompt as the stage generates them (one prefill, its KV cache
  repeated 8 times, one `generate` call decoding 8 rows) vs 8 `generate` calls of one row, sampling, every row
  forced to exactly `new_tokens` tokens (`min_new_tokens`) so both sides do the same work. Ratio = tokens/s
  batched / tokens/s sequential (goal >= 3). `params.shared_prefill_gain` = time of the same batch without the
  shared prefill (8 left-padded rows, each prefilled) / with it, timed as a second interleaved pair.
- `G7 reward share`: one RL step on that item (4 agents x G = 32 rollouts) timed part by part with the stage's
  code: batched generation (`rl.rollouts.generate`), the reward (`RolloutScorer` with the in-process local
  answerer: parse, build 32 memories, hybrid search, QA), and the update (reference + policy log-probs of every
  row, backward, optimizer step). The reward is scored on G copies of the expert's replies, so every rollout is
  valid and needs QA: the most reward work a step can have (an untrained model's invalid replies cost nothing).
  Ratio = median reward time / median step time (goal <= 0.25).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lightmem_exp.bench.rows import make_row, ratio_of, side
from lightmem_exp.bench.timing import Stats, measure_pair


@dataclass
class G7Settings:
    repeats: int = 9
    warmup: int = 2
    seed: int = 0
    group_size: int = 8
    new_tokens: int = 64       # per rollout in the G7 rollouts row
    step_new_tokens: int = 96   # per rollout in the RL step (fixed so G7 stays comparable; the stage default is 64)

    @classmethod
    def quick(cls) -> G7Settings:
        return cls(repeats=3, warmup=1, new_tokens=8, step_new_tokens=16)


def _setup(locomo: Path):
    from lightmem_exp.bench.cases import tiny_config
    from lightmem_exp.data.locomo import read_locomo
    from lightmem_exp.memory.ops import Op
    from lightmem_exp.memory.store import MEMORY_TYPES
    from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer
    from lightmem_exp.retrieval import TextEmbedder
    from lightmem_exp.rl.expert import Annotations, ExpertConfig, derive, locomo_events
    from lightmem_exp.rl.rollouts import prompt_token_ids
    from lightmem_exp.rl.scoring import AgentCall, RlItem

    cfg = tiny_config()
    src, raw = read_locomo(locomo), json.loads(Path(locomo).read_text())
    conv = raw[0]["sample_id"]
    sessions = sorted((s for s in src.sessions if s["conv_id"] == conv), key=lambda s: s["session"])[:1]
    ann = Annotations([m for m in src.memories if m["conv_id"] == conv and m["kind"] == "observation"],
                      {m["session"]: m["text"] for m in src.memories
                       if m["conv_id"] == conv and m["kind"] == "session_summary"}, locomo_events(raw)[conv])
    embedder = TextEmbedder()
    traj = derive(conv, sessions, ann, [q for q in src.qa if q["conv_id"] == conv], ExpertConfig(),
                  embedder=embedder)
    chunk = next(c for c in traj.metadata["chunks"] if c["question_ids"])
    tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
    calls = {c["agent"]: c for c in traj.calls if c["chunk"] == chunk["key"]}
    item = RlItem(f"{conv}/{chunk['key']}", traj.states[chunk["key"]], chunk["timestamp"],
                  {a: AgentCall(a, calls[a]["messages"], prompt_token_ids(tokenizer, calls[a]["messages"]),
                                [Op(o["action"], {k: v for k, v in o.items() if k != "action"}) for o in calls[a]["ops"]],
                                calls[a]["written_words"]) for a in MEMORY_TYPES},
                  [traj.metadata["questions"][q] for q in chunk["question_ids"]])
    vocab = sorted({t for c in traj.calls for t in tokenizer(c["reply"], add_special_tokens=False)["input_ids"]})
    model = attach_lora(load_model(cfg.model, cfg.paths.data),
                        {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, token_ids=vocab)
    replies = {a: calls[a]["reply"] for a in MEMORY_TYPES}
    return model, tokenizer, item, replies, embedder


def g7_rows(locomo: Path, *, quick: bool = False, repeats: int | None = None, seed: int = 0,
            explain: dict | None = None) -> list[dict]:
    from lightmem_exp.lit.trainer import decay_groups
    from lightmem_exp.memory.store import MEMORY_TYPES
    from lightmem_exp.rl.answerers import LocalAnswerer
    from lightmem_exp.rl.loss import clipped_pg_loss
    from lightmem_exp.rl.reward_service import InProcessRewards
    from lightmem_exp.rl.rewards import RewardConfig
    from lightmem_exp.rl.rollouts import completion_logprobs, generate
    from lightmem_exp.rl.scoring import RolloutScorer

    s = G7Settings.quick() if quick else G7Settings()
    s.seed = seed
    if repeats is not None:
        s.repeats = repeats
    explain = explain or {}
    model, tokenizer, item, replies, embedder = _setup(locomo)
    model.eval()
    G = s.group_size
    prompt = item.calls["semantic"].prompt_ids
    common = {"max_new_tokens": s.new_tokens, "min_new_tokens": s.new_tokens, "do_sample": True}

    def batched():
        torch.manual_seed(s.seed)
        return generate(model, tokenizer, [prompt], group_size=G, batch_size=G, **common)

    def sequential():
        torch.manual_seed(s.seed)
        return [generate(model, tokenizer, [prompt], group_size=1, batch_size=1, **common) for _ in range(G)]

    def batched_no_share():
        torch.manual_seed(s.seed)
        return generate(model, tokenizer, [prompt], group_size=G, batch_size=G, share_prefix=False, **common)

    out_b, out_s = batched(), sequential()
    n_b = sum(len(c) for c in out_b.completion_ids)
    n_s = sum(len(c) for o in out_s for c in o.completion_ids)
    check = {"check": f"{G} rollouts of {s.new_tokens} tokens on both sides", "ok": n_b == n_s == G * s.new_tokens,
             "tokens": [n_b, n_s], "summary": f"{n_b} vs {n_s} tokens, prompt {len(prompt)} tokens"}
    a, b = measure_pair(batched, sequential, repeats=s.repeats, warmup=s.warmup)
    shared, unshared = measure_pair(batched, batched_no_share, repeats=s.repeats, warmup=1)
    a, b = a.scaled(n_b), b.scaled(n_s)
    rows = [make_row(
        "G7 rollouts", f"G={G} rollouts of one agent prompt: one batched generate vs {G} sequential generates "
                       "(tokens/s speed-up)", ">= 3",
        ours=side(f"batched ({G} rows, shared prefill)", a, "s/token"), baseline=side(f"sequential ({G} calls)", b, "s/token"),
        ratio=ratio_of(b, a), ratio_def="baseline s/token / ours s/token (speed-up)", check=check,
        params={"G": G, "prompt_tokens": len(prompt), "new_tokens": s.new_tokens, "sampling": True,
                "model": str(model.name_or_path), "shared_prefill_gain": ratio_of(unshared, shared)}, explanation=explain.get("G7 rollouts"))]

    # ---- one RL step, part by part ----
    scorer = RolloutScorer(InProcessRewards(LocalAnswerer()), RewardConfig(), search_mode="hybrid",
                           embedder=embedder)
    opt = torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-4)
    prompts = [item.calls[a].prompt_ids for a in MEMORY_TYPES]
    texts = [[[replies[a]] * G for a in MEMORY_TYPES]]
    pad = tokenizer.pad_token_id
    parts: dict[str, list[float]] = {"generate": [], "reward": [], "update": [], "step": []}

    def step() -> None:
        torch.manual_seed(s.seed)
        t0 = time.perf_counter()
        roll = generate(model, tokenizer, prompts, group_size=G, max_new_tokens=s.step_new_tokens,
                        min_new_tokens=s.step_new_tokens, batch_size=len(prompts) * G)
        t1 = time.perf_counter()
        embedder.cache.clear()  # every step meets new memory texts; keep the cache from hiding that cost
        scored = scorer.score([item], texts)
        t2 = time.perf_counter()
        adv = torch.randn(len(roll.prompt_ids))
        opt.zero_grad()
        for i in range(0, len(adv), 16):
            idx = list(range(i, min(i + 16, len(adv))))
            ps, cs = [roll.prompt_ids[j] for j in idx], [roll.completion_ids[j] for j in idx]
            with torch.no_grad(), model.disable_adapter():
                ref, _ = completion_logprobs(model, ps, cs, pad)
            logp, mask = completion_logprobs(model, ps, cs, pad)
            loss, _ = clipped_pg_loss(logp, logp.detach(), ref, adv[idx], mask)
            (loss * len(idx) / len(adv)).backward()
        opt.step()
        t3 = time.perf_counter()
        assert scored is not None and float(scored.stats["reward/format_valid"]) == 1.0
        for name, v in (("generate", t1 - t0), ("reward", t2 - t1), ("update", t3 - t2), ("step", t3 - t0)):
            parts[name].append(v)

    for _ in range(s.warmup):
        step()
    for v in parts.values():
        v.clear()
    for _ in range(s.repeats):
        step()
    reward, total = Stats.of(parts["reward"]), Stats.of(parts["step"])
    med = {k: statistics.median(v) for k, v in parts.items()}
    rows.append(make_row(
        "G7 reward share", f"reward computation / whole RL step (1 chunk x 4 agents x G={G} rollouts, local answerer, "
                           "hybrid search, every rollout valid)", "<= 0.25",
        ours=side("reward (parse, 32 memories, QA)", reward, "s/step"),
        baseline=side("RL step (generate + reward + update)", total, "s/step"), ratio=ratio_of(reward, total),
        ratio_def="reward median / step median",
        params={"G": G, "rollouts": len(prompts) * G, "questions": len(item.questions),
                "new_tokens": s.step_new_tokens, "median_s": {k: round(v, 4) for k, v in med.items()},
                "item": item.key}, explanation=explain.get("G7 reward share")))
    return rows


def _rollouts_explain(row: dict) -> str:
    return ("Batched sampling pays the prompt's prefill once and amortises each decoding step's fixed cost (Python, "
            f"kernel launches) over {row['params']['G']} rows. With few new tokens the prefill dominates both sides "
            "(e.g. --quick); otherwise a shortfall most likely means other jobs saturated the cores during the "
            "batched side (see the IQRs and load average): re-run on a quiet machine.")


def _reward_explain(row: dict) -> str:
    med = row["params"]["median_s"]
    return (f"Reward {med['reward']:.3g} s of a {med['step']:.3g} s step (generate {med['generate']:.3g} s, update "
            f"{med['update']:.3g} s). The reward builds {row['params']['rollouts']} memories and embeds their new "
            "texts with MiniLM; search.mode=bm25, fewer questions per chunk, or the reward server on another machine "
            "(reward.mode=api) would take it off the step's critical path.")


EXPLANATIONS = {"G7 rollouts": _rollouts_explain, "G7 reward share": _reward_explain}
