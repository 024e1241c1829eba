"""Stage adrpo: MemBuilder-style memory construction trained with ADRPO (conf/stage/adrpo.yaml).

Phases, in order (seconds of each in `stats.seconds`):
1. expert: trajectories for the train split's conversations (first `expert.train_sessions` sessions) and the
   held-out conversations (`heldout.*`), written under `expert/<conv_id>/` and read back from there;
2. warmup: LoRA SFT of the policy on the expert calls of all four agents (train split; a seeded sample of
   `sft.max_samples`; calls whose reply is longer than `rl.max_new_tokens` tokens are skipped and counted, since the
   policy could never produce them); its adapter is exported as `export/adapter_sft`;
3. heldout_sft: the SFT-only policy builds memory on the held-out sessions by itself; QA accuracy over it;
4. rl: `rl.max_steps` ADRPO steps (`lit/adrpo.py`) on train-split chunks with answerable questions;
5. heldout_rl: the same held-out evaluation after RL (same sessions, same questions, same answerer).

Outputs: `expert/`, `export/adapter` (after RL), `export/adapter_sft`, `rl_steps.jsonl` (every step's metrics),
`heldout/{expert,sft,rl}/<conv_id>.json` (the memories scored) and `heldout/questions.json`.
Metrics (manifest): `heldout/qa_acc_{sft,rl,expert}` (the headline is `heldout/qa_acc_rl`), `heldout/format_valid_*`,
`reward/*` (mean reward and its parts over the RL steps: `qa_acc`, `length_penalty`, `format_valid`...),
`attribution/<type>` (steps' chunks whose dominant type it was), `served/<type>` (correct answers it served),
`rl/*`, `time/*` (per-step generation / reward / update seconds and `time/reward_share`).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import (
    Manifest,
    atomic_dir,
    read_json,
    write_json,
    write_jsonl,
    write_manifest,
)
from lightmem_exp.config import non_negative, positive, require, require_all
from lightmem_exp.data.chat_sft import IGNORE_INDEX, ChatSftDataset, encode_rows
from lightmem_exp.data.schema import FACT_KINDS, read_artifact
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.lit.adrpo import AdrpoModule
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.sft import ChatSftModule
from lightmem_exp.lit.trainer import make_trainer, resume_path
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.memory.ops import Op
from lightmem_exp.memory.store import MEMORY_TYPES, SEARCH_MODES, MemoryStore, TextEmbedder
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, save_adapter
from lightmem_exp.rl.answerers import RewardError
from lightmem_exp.rl.expert import (
    Annotations,
    ExpertConfig,
    derive,
    load_trajectory,
    locomo_events,
    split_chunks,
    write_trajectory,
)
from lightmem_exp.rl.heldout import policy_memories
from lightmem_exp.rl.rewards import RewardConfig
from lightmem_exp.rl.rollouts import prompt_token_ids
from lightmem_exp.rl.scoring import AgentCall, RlItem, RolloutScorer
from lightmem_exp.stages.base import StageResult, load_upstream

log = logging.getLogger(__name__)
UPSTREAM = ("data",)


def _int(n: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def _unit(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1


def validate(cfg: DictConfig) -> None:
    s = "stage."
    st = cfg.stage
    require(cfg, s + "init_from", lambda v: v in ("base", "step2"), "'base' or 'step2'")
    require(cfg, s + "max_seq_len", _int(64), "an integer >= 64")
    require(cfg, s + "train_reply_vocab", lambda v: isinstance(v, bool), "true or false")
    require(cfg, s + "memory.core_char_limit", _int(1), "an integer >= 1")
    require(cfg, s + "memory.search", lambda v: v in SEARCH_MODES, f"one of {list(SEARCH_MODES)}")
    require(cfg, s + "memory.shown", _int(0), "an integer >= 0")
    e = s + "expert."
    require(cfg, e + "source", lambda v: v in ("annotations", "api"), "'annotations' or 'api'")
    require(cfg, e + "chunk_turns", _int(1), "an integer >= 1")
    require(cfg, e + "train_sessions", _int(1), "null or an integer >= 1", allow_none=True)
    require(cfg, e + "max_train_conversations", _int(1), "null or an integer >= 1", allow_none=True)
    require(cfg, e + "event_summaries", lambda v: isinstance(v, bool), "true or false")
    for key in ("core_max_words", "summary_max_words", "max_ops_per_call"):
        require(cfg, e + key, _int(1), "an integer >= 1")
    require(cfg, e + "dedup_f1", _unit, "a number in [0, 1]")
    require(cfg, e + "update_f1", lambda v: _unit(v) and v <= st.expert.dedup_f1, "a number in [0, expert.dedup_f1]")
    if st.expert.source == "api":
        for key in ("base_url", "model"):
            require(cfg, e + "api." + key, lambda v: isinstance(v, str) and v, "set when expert.source=api")
    f = s + "sft."
    require(cfg, f + "max_samples", _int(1), "null or an integer >= 1", allow_none=True)
    require(cfg, f + "max_epochs", _int(0), "an integer >= 0 (0: no warm start)")
    require(cfg, f + "batch_size", _int(1), "an integer >= 1")
    require(cfg, f + "lr", positive, "a number > 0")
    require(cfg, f + "weight_decay", lambda v: v >= 0, "a number >= 0")
    require(cfg, f + "warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)")
    require(cfg, f + "gradient_clip_val", positive, "null or a number > 0", allow_none=True)
    r = s + "rl."
    require(cfg, r + "max_steps", _int(0), "an integer >= 0 (0: SFT only)")
    for key in ("chunks_per_step", "ppo_epochs", "logprob_batch_size", "gen_batch_size", "min_questions"):
        require(cfg, r + key, _int(1), "an integer >= 1")
    require(cfg, r + "group_size", _int(2), "an integer >= 2 (advantages are relative within a group)")
    require(cfg, r + "lr", positive, "a number > 0")
    require(cfg, r + "weight_decay", lambda v: v >= 0, "a number >= 0")
    require(cfg, r + "clip_eps", lambda v: positive(v) and v < 1, "a number in (0, 1)")
    require(cfg, r + "kl_coef", lambda v: isinstance(v, int | float) and v >= 0, "a number >= 0")
    require(cfg, r + "max_new_tokens", lambda v: _int(1)(v) and v < st.max_seq_len, "an integer in [1, max_seq_len)")
    require(cfg, r + "temperature", positive, "a number > 0")
    require(cfg, r + "top_p", lambda v: positive(v) and v <= 1, "a number in (0, 1]")
    require(cfg, r + "gradient_clip_val", positive, "null or a number > 0", allow_none=True)
    require(cfg, r + "adv_eps", positive, "a number > 0")
    require(cfg, r + "skip_zero_advantage", lambda v: isinstance(v, bool), "true or false")
    require(cfg, r + "ckpt_every_n_steps", _int(1), "null or an integer >= 1", allow_none=True)
    w = s + "reward."
    require(cfg, w + "mode", lambda v: v in ("local", "api"), "'local' or 'api' (the reward server)")
    require(cfg, w + "answerer", lambda v: v in ("local", "recall", "api"), "'local', 'recall' or 'api'")
    require(cfg, w + "format_penalty", lambda v: isinstance(v, int | float) and v <= 0, "a number <= 0")
    require(cfg, w + "length_penalty.enabled", lambda v: isinstance(v, bool), "true or false")
    require(cfg, w + "length_penalty.weight", _unit, "a number in [0, 1]")
    require(cfg, w + "length_penalty.core_theta_min", lambda v: isinstance(v, int | float) and v >= 0, "a number >= 0")
    require(cfg, w + "length_penalty.core_theta_max", lambda v: isinstance(v, int | float)
            and v > st.reward.length_penalty.core_theta_min, "a number > core_theta_min")
    require(cfg, w + "length_penalty.gamma_lower", lambda v: positive(v) and v <= 1, "a number in (0, 1]")
    require(cfg, w + "length_penalty.gamma_upper", lambda v: isinstance(v, int | float) and v >= 1, "a number >= 1")
    require(cfg, w + "attribution.enabled", lambda v: isinstance(v, bool), "true or false")
    require(cfg, w + "attribution.alpha", positive, "a number > 0")
    require(cfg, w + "local.top_k", _int(1), "an integer >= 1")
    require(cfg, w + "local.threshold", lambda v: positive(v) and v <= 1, "a number in (0, 1]")
    require(cfg, w + "recall.max_new_tokens", _int(1), "an integer >= 1")
    require(cfg, w + "server.timeout_s", positive, "a number > 0")
    require(cfg, w + "max_errors", _int(0), "an integer >= 0")
    if st.reward.mode == "api":
        require(cfg, w + "server.url", lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
                "an http(s) URL of python -m lightmem_exp.reward_server")
    if st.reward.answerer == "api" and st.reward.mode == "local":
        for key in ("base_url", "model"):
            require(cfg, w + "api." + key, lambda v: isinstance(v, str) and v, "set when reward.answerer=api")
    require_all(cfg, s, [  # the API clients' settings, checked even when unused so a later switch cannot fail late
        ("expert.api.timeout_s", positive, "a number > 0"),
        ("expert.api.temperature", non_negative, "a number >= 0"),
        ("reward.api.timeout_s", positive, "a number > 0"),
    ])
    h = s + "heldout."
    require(cfg, h + "split", lambda v: v in ("train", "val", "test"), "'train', 'val' or 'test'")
    require(cfg, h + "max_conversations", _int(1), "an integer >= 1")
    require(cfg, h + "sessions", _int(1), "an integer >= 1")
    require(cfg, h + "batch_size", _int(1), "an integer >= 1")
    if cfg.trainer.accumulate_grad_batches != 1:
        raise ConfigError("trainer.accumulate_grad_batches", "must be 1 for adrpo (manual optimisation; use "
                          "stage.rl.logprob_batch_size to bound memory)")
    if st.init_from == "step2" or (st.reward.answerer == "recall" and st.reward.mode == "local"):
        load_upstream(cfg, "step2")  # fail now, naming what is missing, not after the warm start


# ------------------------------------------------------------------------------------------------------ helpers


def _device(cfg: DictConfig) -> str | None:
    accel = str(OmegaConf.select(cfg, "trainer.lightning.accelerator", default="cpu"))
    return "cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else None


def _model_cfg(cfg: DictConfig) -> DictConfig:
    """model= as configured, or the step2 export (merged weights + tokenizer in one directory)."""
    if cfg.stage.init_from == "base":
        return cfg.model
    export = load_upstream(cfg, "step2").path("model")
    return OmegaConf.merge(cfg.model, {"name_or_path": str(export), "build": None, "init": "pretrained"})


def _service(cfg: DictConfig, sdir: Path, embedder, device: str | None):
    from lightmem_exp.rl.reward_service import InProcessRewards, RemoteRewards

    rw = cfg.stage.reward
    if rw.mode == "api":
        remote = RemoteRewards(rw.server.url, timeout_s=rw.server.timeout_s, token_env=rw.server.token_env,
                               search_mode=cfg.stage.memory.search)
        try:
            health = remote.health()
        except RewardError as e:
            raise LmxError(f"reward.mode=api: the reward server does not answer ({e}); start it with "
                           "`python -m lightmem_exp.reward_server` or use stage.reward.mode=local") from e
        log.info("reward server %s: %s", rw.server.url, health)
        return remote, {"server": rw.server.url, "health": health}
    from lightmem_exp.rl.answerers import ApiAnswerer, LocalAnswerer, RecallAnswerer

    if rw.answerer == "local":
        answerer = LocalAnswerer(top_k=rw.local.top_k, threshold=rw.local.threshold)
    elif rw.answerer == "api":
        from lightmem_exp.rl.api_client import ChatClient

        client = ChatClient(rw.api.base_url, rw.api.model, api_key_env=rw.api.api_key_env, timeout_s=rw.api.timeout_s)
        judge = ChatClient(rw.api.base_url, rw.api.judge_model or rw.api.model, api_key_env=rw.api.api_key_env,
                           timeout_s=rw.api.timeout_s)
        answerer = ApiAnswerer(client, judge=judge, top_k=rw.local.top_k, verdicts_path=sdir / "verdicts.jsonl")
    else:
        step2 = load_upstream(cfg, "step2")
        mcfg = OmegaConf.merge(cfg.model, {"name_or_path": str(step2.path("model")), "build": None,
                                           "init": "pretrained"})
        answerer = RecallAnswerer(load_model(mcfg, cfg.paths.data, device=device), load_tokenizer(mcfg, cfg.paths.data),
                                  max_new_tokens=rw.recall.max_new_tokens, threshold=rw.local.threshold)
    return InProcessRewards(answerer), {"answerer": rw.answerer}


def _annotations(data, conv_ids: set[str], use_events: bool) -> tuple[dict[str, Annotations], dict]:
    memories = read_artifact(data, "memories")
    ann = {c: Annotations() for c in conv_ids}
    for m in memories:
        if m["conv_id"] not in ann:
            continue
        if m["kind"] in FACT_KINDS:
            ann[m["conv_id"]].observations.append(m)
        elif m["kind"] == "session_summary":
            ann[m["conv_id"]].summaries[m["session"]] = m["text"]
    info = {"event_summaries": "off"}
    if use_events:
        dataset, source = data.stats.get("dataset"), data.stats.get("source")
        if dataset == "locomo" and source and Path(source).is_file():
            events = locomo_events(read_json(source))
            for c in conv_ids:
                ann[c].events = events.get(c, {})
            info = {"event_summaries": source,
                    "events": sum(len(v) for c in conv_ids for v in ann[c].events.values())}
        else:
            info = {"event_summaries": f"not available ({dataset} data, source {source})"}
    return ann, info


def _first_sessions(rows: list[dict], n: int | None) -> list[dict]:
    rows = sorted(rows, key=lambda r: (str(type(r["session"])), r["session"]))
    return rows if n is None else rows[:n]


def _encode_sft(tokenizer, trajectories, st: DictConfig, seed: int) -> tuple[list[dict], Counter]:
    rows = [{"id": f"{c['conv_id']}/{c['chunk']}/{c['agent']}", "agent": c["agent"],
             "messages": [*c["messages"], {"role": "assistant", "content": c["reply"]}]}
            for t in trajectories for c in t.calls if c["valid"]]
    skipped: Counter = Counter()
    rng = random.Random(f"{seed}:adrpo:sft")
    rng.shuffle(rows)
    out = []
    for row in rows:
        if st.sft.max_samples is not None and len(out) >= st.sft.max_samples:
            break
        enc, skip = encode_rows(tokenizer, [row], max_seq_len=st.max_seq_len, group="expert")
        skipped += skip
        if enc and sum(lab != IGNORE_INDEX for lab in enc[0]["labels"]) > st.rl.max_new_tokens:
            skipped["expert_reply_over_max_new_tokens"] += 1
            continue
        out += [{**e, "agent": row["agent"]} for e in enc]
    return out, skipped


def _reply_vocab(tokenizer, trajectories, sft_rows: list[dict]) -> list[int]:
    """Token ids of every expert reply of the train split (and the warm start's end-of-turn tokens)."""
    ids = {t for r in sft_rows for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != IGNORE_INDEX}
    for t in trajectories:
        for c in t.calls:
            ids.update(tokenizer(c["reply"], add_special_tokens=False)["input_ids"])
    return sorted(ids)


def _rl_items(tokenizer, trajectories, st: DictConfig) -> tuple[list[RlItem], Counter]:
    budget = st.max_seq_len - st.rl.max_new_tokens
    items, skipped = [], Counter()
    for t in trajectories:
        by_chunk = defaultdict(dict)
        for c in t.calls:
            by_chunk[c["chunk"]][c["agent"]] = c
        for ch in t.metadata["chunks"]:
            qids = ch["question_ids"]
            if len(qids) < st.rl.min_questions:
                skipped["too_few_questions"] += 1
                continue
            calls = {}
            for agent in MEMORY_TYPES:
                c = by_chunk[ch["key"]][agent]
                ids = prompt_token_ids(tokenizer, c["messages"])
                if len(ids) > budget or not c["valid"]:
                    break
                calls[agent] = AgentCall(agent, c["messages"], ids, [Op(o["action"], {k: v for k, v in o.items()
                                                                                      if k != "action"})
                                                                     for o in c["ops"]], int(c["written_words"]))
            if len(calls) < len(MEMORY_TYPES):
                skipped["prompt_too_long_or_invalid"] += 1
                continue
            questions = [t.metadata["questions"][q] for q in qids]
            items.append(RlItem(f"{t.conv_id}/{ch['key']}", t.states[ch["key"]], ch["timestamp"], calls, questions))
    return items, skipped


def _phase(seconds: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 1)
    return now


# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: DictConfig) -> StageResult:
    sdir, st = Path(cfg.runtime.stage_dir), cfg.stage
    seconds: dict[str, float] = {}
    t = start = time.perf_counter()
    data = load_upstream(cfg, "data")
    splits = read_json(data.path("splits"))
    sessions = read_artifact(data, "sessions")
    qa = read_artifact(data, "qa")
    train_convs = sorted(splits["train"])[: st.expert.max_train_conversations]
    held_convs = sorted(splits[st.heldout.split])[: st.heldout.max_conversations]
    if not train_convs or not held_convs:
        raise LmxError(f"{data.dir}: adrpo needs train conversations and {st.heldout.split} conversations "
                       f"(got {len(train_convs)} and {len(held_convs)})")
    if st.heldout.split == "train":
        log.warning("heldout.split=train: the held-out sessions are conversations the policy is trained on")
    ann, ann_info = _annotations(data, set(train_convs) | set(held_convs), st.expert.event_summaries)
    embedder = TextEmbedder() if st.memory.search != "bm25" else None
    ecfg = ExpertConfig(chunk_turns=st.expert.chunk_turns, shown=st.memory.shown,
                        core_max_words=st.expert.core_max_words, summary_max_words=st.expert.summary_max_words,
                        max_ops_per_call=st.expert.max_ops_per_call, dedup_f1=st.expert.dedup_f1,
                        update_f1=st.expert.update_f1, core_char_limit=st.memory.core_char_limit,
                        search_mode=st.memory.search)
    client = None
    if st.expert.source == "api":
        from lightmem_exp.rl.api_client import ChatClient

        a = st.expert.api
        client = ChatClient(a.base_url, a.model, api_key_env=a.api_key_env, timeout_s=a.timeout_s,
                            temperature=a.temperature)

    # 1. expert trajectories, written then read back (the files are what the rest of the stage uses)
    def conv_sessions(conv: str, n: int | None) -> list[dict]:
        return _first_sessions([s for s in sessions if s["conv_id"] == conv], n)

    qa_by_conv = defaultdict(list)
    for q in qa:
        qa_by_conv[q["conv_id"]].append(q)
    plan = [(c, "train", st.expert.train_sessions) for c in train_convs] + \
           [(c, st.heldout.split, st.heldout.sessions) for c in held_convs]
    trajectories = {}
    for conv, split, n in plan:
        traj = derive(conv, conv_sessions(conv, n), ann[conv], qa_by_conv[conv], ecfg, embedder=embedder,
                      client=client, split=split)
        trajectories[conv] = load_trajectory(write_trajectory(sdir / "expert", traj))
    train_t = [trajectories[c] for c in train_convs]
    t = _phase(seconds, "expert", t)

    # 2. model, LoRA, SFT warm start on the expert calls
    device = _device(cfg)
    mcfg = _model_cfg(cfg)
    tokenizer = load_tokenizer(mcfg, cfg.paths.data)
    sft_rows, sft_skipped = _encode_sft(tokenizer, train_t, st, cfg.seed)
    model = load_model(mcfg, cfg.paths.data, quant_cfg=cfg.quant, device=device)
    vocab = _reply_vocab(tokenizer, train_t, sft_rows) if st.train_reply_vocab else None
    model = attach_lora(model, cfg.lora, token_ids=vocab)
    service, service_info = _service(cfg, sdir, embedder, device)
    logger = make_logger(cfg, sdir)
    if st.sft.max_epochs > 0:
        if not sft_rows:
            raise LmxError("no expert call fits stage.max_seq_len and stage.rl.max_new_tokens for the warm start "
                           f"(skipped: {dict(sft_skipped)})")
        sft_module = ChatSftModule(model, lr=st.sft.lr, weight_decay=st.sft.weight_decay,
                                   warmup_ratio=st.sft.warmup_ratio, groups=("expert",))
        ds = ChatSftDataset(sft_rows, ("expert",))
        pad_id = tokenizer.pad_token_id
        loader = ResumableLoader(ds, batch_size=st.sft.batch_size, shuffle=True, seed=cfg.seed,
                                 collate_fn=lambda b: ds.collate(b, pad_id))
        trainer = make_trainer(cfg, sdir / "warmup", max_epochs=st.sft.max_epochs, logger=logger,
                               gradient_clip_val=st.sft.gradient_clip_val)
        sft_module.train()
        trainer.fit(sft_module, train_dataloaders=loader, ckpt_path=resume_path(cfg, sdir / "warmup"))
        warm_loss = sft_module.last_train_loss  # also after a resume that found the warm start finished
        if device is not None:
            model.to(device)
    else:
        warm_loss = None
    t = _phase(seconds, "warmup", t)

    # 3. held-out: the SFT-only policy
    held_chunks = {c: [ch for s in conv_sessions(c, st.heldout.sessions) for ch in split_chunks(s, ecfg.chunk_turns)]
                   for c in held_convs}
    held_sessions = {c: {s["session"] for s in conv_sessions(c, st.heldout.sessions)} for c in held_convs}
    held_questions = {c: [q for q in qa_by_conv[c] if q["answer"] is not None and not q["abstention"]
                          and q["evidence_sessions"] and set(q["evidence_sessions"]) <= held_sessions[c]]
                      for c in held_convs}
    n_questions = sum(len(v) for v in held_questions.values())
    if n_questions == 0:
        raise LmxError(f"the held-out sessions ({st.heldout.split} split, first {st.heldout.sessions}) have no "
                       "answerable question; raise stage.heldout.sessions")
    write_json(sdir / "heldout" / "questions.json", held_questions)

    def new_store() -> MemoryStore:
        return MemoryStore(core_char_limit=st.memory.core_char_limit, search_mode=st.memory.search, embedder=embedder)

    def qa_acc(stores: dict[str, MemoryStore], tag: str) -> dict[str, float]:
        for c, s in stores.items():
            write_json(sdir / "heldout" / tag / f"{c}.json", s.snapshot())
        try:
            scores = service.score([(stores[c], held_questions[c]) for c in held_convs])
        except RewardError as e:
            raise LmxError(f"held-out QA scoring ({tag}) failed: {e}") from e
        correct = sum(sum(s.correct) for s in scores)
        served = Counter(x for s in scores for x in s.served_by if x)
        return {f"heldout/qa_acc_{tag}": correct / n_questions,
                f"heldout/qa_f1_{tag}": sum(sum(s.f1) for s in scores) / n_questions,
                f"heldout/memory_words_{tag}": sum(sum(len(u.content.split()) for u in s.units())
                                                   for s in stores.values()) / len(stores),
                **{f"heldout/served_{tag}/{k}": v for k, v in sorted(served.items())}}

    def heldout(tag: str) -> dict[str, float]:
        stores, hstats = policy_memories(model, tokenizer, held_chunks, new_store, shown=st.memory.shown,
                                         max_new_tokens=st.rl.max_new_tokens,
                                         max_prompt_tokens=st.max_seq_len - st.rl.max_new_tokens,
                                         batch_size=st.heldout.batch_size)
        out = qa_acc(stores, tag)
        out.update({f"heldout/{k}_{tag}": float(v) for k, v in hstats.items()})
        log.info("adrpo held-out %s: %s", tag, {k: round(v, 4) for k, v in out.items()})
        return out

    metrics: dict[str, float] = {}
    metrics.update(qa_acc({c: MemoryStore.from_snapshot(trajectories[c].states["final"], search_mode=st.memory.search,
                                                        embedder=embedder) for c in held_convs}, "expert"))
    metrics.update(heldout("sft"))
    sft_adapter = sdir / "export" / "adapter_sft"
    with atomic_dir(sft_adapter) as tmp:
        save_adapter(model, tmp)
    t = _phase(seconds, "heldout_sft", t)

    # 4. ADRPO
    items, item_skipped = _rl_items(tokenizer, train_t, st)
    from lightmem_exp.rl.reward_service import RewardErrorBudget

    budget = RewardErrorBudget(st.reward.max_errors)
    lp = st.reward.length_penalty
    reward_cfg = RewardConfig(length_penalty=lp.enabled, weight=lp.weight, core_theta_min=lp.core_theta_min,
                              core_theta_max=lp.core_theta_max, gamma_lower=lp.gamma_lower, gamma_upper=lp.gamma_upper,
                              format_penalty=st.reward.format_penalty)
    scorer = RolloutScorer(service, reward_cfg, search_mode=st.memory.search, embedder=embedder, budget=budget)
    module = AdrpoModule(model, tokenizer, scorer, group_size=st.rl.group_size, lr=st.rl.lr,
                         weight_decay=st.rl.weight_decay, clip_eps=st.rl.clip_eps, kl_coef=st.rl.kl_coef,
                         ppo_epochs=st.rl.ppo_epochs, logprob_batch_size=st.rl.logprob_batch_size,
                         gen_batch_size=st.rl.gen_batch_size, max_new_tokens=st.rl.max_new_tokens,
                         temperature=st.rl.temperature, top_p=st.rl.top_p, gradient_clip_val=st.rl.gradient_clip_val,
                         attribution=st.reward.attribution.enabled, alpha=st.reward.attribution.alpha,
                         adv_eps=st.rl.adv_eps, skip_zero_advantage=st.rl.skip_zero_advantage, seed=cfg.seed)
    steps = st.rl.max_steps
    if steps > 0:
        if not items:
            raise LmxError(f"no RL chunk has >= {st.rl.min_questions} questions and prompts within "
                           f"stage.max_seq_len - stage.rl.max_new_tokens (skipped: {dict(item_skipped)}); raise "
                           "stage.expert.train_sessions or stage.max_seq_len")
        order = list(range(len(items)))
        random.Random(f"{cfg.seed}:adrpo:rl").shuffle(order)
        need = steps * st.rl.chunks_per_step
        schedule = [items[order[i % len(order)]] for i in range(need)]  # cycles when there are fewer chunks
        loader = ResumableLoader(schedule, batch_size=st.rl.chunks_per_step, shuffle=False, collate_fn=list)
        trainer = make_trainer(cfg, sdir / "rl", max_epochs=1, logger=logger,
                               ckpt_every_n_steps=st.rl.ckpt_every_n_steps, gradient_clip_val=None)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_path(cfg, sdir / "rl"))
        if device is not None:
            model.to(device)
    t = _phase(seconds, "rl", t)

    # 5. held-out after RL
    metrics.update(heldout("rl"))
    t = _phase(seconds, "heldout_rl", t)
    seconds["total"] = round(t - start, 1)

    done = [h for h in module.history if "skipped" not in h]
    if done:
        keys = sorted({k for h in done for k in h if k.startswith(("reward/", "rl/"))})
        for k in keys:
            vals = [h[k] for h in done if k in h]
            metrics[k] = sum(vals) / len(vals)
        metrics["reward/mean_first_step"] = done[0]["reward/mean"]
        metrics["reward/mean_last_step"] = done[-1]["reward/mean"]
        for k in ("generate_s", "reward_s", "update_s", "step_s"):
            metrics[f"time/{k}"] = sum(h[f"time/{k}"] for h in done) / len(done)
        metrics["time/reward_share"] = sum(h["time/reward_s"] for h in done) / sum(h["time/step_s"] for h in done)
    metrics["rl/steps"] = len(done)
    metrics["reward/errors"] = budget.errors
    for k in [*MEMORY_TYPES, "none"]:
        metrics[f"attribution/{k}"] = module.attribution_counts.get(k, 0)
    for k in MEMORY_TYPES:
        metrics[f"served/{k}"] = module.served_counts.get(k, 0)
    if warm_loss is not None:
        metrics["warmup/train_loss_last"] = float(warm_loss)
    metrics["headline"] = metrics["heldout/qa_acc_rl"]

    manifest = None
    if getattr(module, "_trainer", None) is None or module.trainer.is_global_zero:
        adapter = sdir / "export" / "adapter"
        with atomic_dir(adapter) as tmp:
            save_adapter(model, tmp)
        write_jsonl(sdir / "rl_steps.jsonl", module.history)
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "headline"})
        calls = Counter(c["agent"] for tr in train_t for c in tr.calls)
        manifest = Manifest(
            stage="adrpo", seed=cfg.seed, metrics=metrics, run_id=run_id(logger), inputs={"data": data.ref()},
            outputs={"adapter": str(adapter.relative_to(sdir)), "adapter_sft": str(sft_adapter.relative_to(sdir)),
                     "expert": "expert", "rl_steps": "rl_steps.jsonl", "heldout": "heldout"},
            stats={"init_from": st.init_from, "reward_service": service_info, "annotations": ann_info,
                   "train_conversations": train_convs, "heldout_conversations": held_convs,
                   "expert_calls": dict(calls), "sft_samples": len(sft_rows),
                   "sft_samples_per_agent": dict(Counter(r["agent"] for r in sft_rows)),
                   "sft_skipped": dict(sft_skipped), "rl_items": len(items), "rl_items_skipped": dict(item_skipped),
                   "heldout_questions": n_questions, "reward_error_messages": budget.messages,
                   "seconds": seconds,
                   "reply_vocab_rows": len(vocab) if vocab else 0,
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        )
        write_manifest(sdir, manifest)
    return StageResult(stage="adrpo", dir=sdir, manifest=manifest, metrics=metrics, headline=metrics["headline"])
