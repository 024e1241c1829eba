"""Stage adrpo: MemBuilder-style memory construction trained with ADRPO (`adrpo.*`, AdrpoConfig).

Phases, in order (seconds of each in `stats.seconds`):
1. expert: trajectories for the train split's conversations (first `expert.train_sessions` sessions; the val
   split's too when the warm start measures a val loss) and the held-out conversations (`heldout.*`), written under
   `expert/<conv_id>/` and read back from there;
2. warmup: LoRA SFT of the policy on the expert calls of all four agents (train split; a seeded sample of
   `sft.max_samples`; calls whose reply is longer than `rl.max_new_tokens` tokens are skipped and counted, since the
   policy could never produce them), its loss on `sft.val_samples` expert calls of the val split's conversations
   measured at every epoch end; its adapter is exported as `export/adapter_sft`;
3. heldout_sft: the SFT-only policy builds memory on the held-out sessions by itself; QA accuracy over it;
4. rl: `rl.max_steps` ADRPO steps (`lit/adrpo.py`) on train-split chunks with answerable questions;
5. heldout_rl: the same held-out evaluation after RL (same sessions, same questions, same answerer).

Outputs: `expert/`, `export/adapter` (after RL), `export/adapter_sft`, `rl_steps.jsonl` (every step's metrics),
`heldout/{expert,sft,rl}/<conv_id>.json` (the memories scored) and `heldout/questions.json`.
Metrics (manifest): `heldout/qa_acc_{sft,rl,expert}` (the headline is `heldout/qa_acc_rl`), `heldout/format_valid_*`,
`reward/*` (mean reward and its parts over the RL steps: `qa_acc`, `length_penalty`, `format_valid`...),
`warmup/{train_loss_last,val_loss}`, `attribution/<type>` (steps' chunks whose dominant type it was),
`served/<type>` (correct answers it served), `rl/*`, `time/*` (per-step generation / reward / update seconds and
`time/reward_share`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightmem_exp.artifacts import Manifest, atomic_dir, read_json, write_json, write_jsonl
from lightmem_exp.config import schema, typed
from lightmem_exp.data.chat_sft import IGNORE_INDEX, ChatSftDataset, encode_rows
from lightmem_exp.data.schema import FACT_KINDS, read_artifact
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.lit.adrpo import AdrpoModule
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.sft import ChatSftModule
from lightmem_exp.lit.trainer import make_trainer, resume_path
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.memory.ops import Op
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, pretrained_model_cfg, save_adapter
from lightmem_exp.models.memory_bank import export_key_space
from lightmem_exp.retrieval import TextEmbedder
from lightmem_exp.rl.answerers import ApiAnswerer, LocalAnswerer, RecallAnswerer, RewardError
from lightmem_exp.rl.api_client import ChatClient
from lightmem_exp.rl.expert import (
    Annotations,
    ExpertConfig,
    Trajectory,
    derive,
    load_trajectory,
    locomo_events,
    split_chunks,
    write_trajectory,
)
from lightmem_exp.rl.heldout import policy_memories
from lightmem_exp.rl.reward_service import InProcessRewards, RemoteRewards, RewardErrorBudget
from lightmem_exp.rl.rewards import RewardConfig
from lightmem_exp.rl.rollouts import prompt_token_ids
from lightmem_exp.rl.scoring import AgentCall, RlItem, RolloutScorer
from lightmem_exp.runtime import model_device
from lightmem_exp.stages.base import Recipe, StageResult, load_upstream

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ helpers


def _needs_step2(a: schema.AdrpoConfig) -> bool:
    """init_from=step2 starts from the step2 export; the in-process recall answerer answers with its model (a reward
    server loads its own)."""
    return a.init_from == "step2" or (a.reward.answerer == "recall" and a.reward.mode == "local")


def _step2_model_cfg(cfg: DictConfig, step2: Manifest) -> DictConfig:
    """model= pointed at the step2 export (merged weights + tokenizer in one directory)."""
    return OmegaConf.create(pretrained_model_cfg(cfg.model, step2.path("model")))


def _service(cfg: DictConfig, sdir: Path, embedder, device: str | None, step2: Manifest | None = None):
    """The reward service of `adrpo.reward` and what the manifest says of it. `step2`: the step2 manifest the recall
    answerer loads its model from (loaded here when not given)."""
    rw = cfg.adrpo.reward
    if rw.mode == "api":
        remote = RemoteRewards(rw.server.url, timeout_s=rw.server.timeout_s, token_env=rw.server.token_env,
                               search_mode=cfg.adrpo.memory.search)
        try:
            health = remote.health()
        except RewardError as e:
            raise LmxError(f"reward.mode=api: the reward server does not answer ({e}); start it with "
                           "`python -m lightmem_exp.reward_server` or use adrpo.reward.mode=local") from e
        log.info("reward server %s: %s", rw.server.url, health)
        return remote, {"server": rw.server.url, "health": health}
    if rw.answerer == "local":
        answerer = LocalAnswerer(top_k=rw.local.top_k, threshold=rw.local.threshold)
    elif rw.answerer == "api":
        client = ChatClient(rw.api.base_url, rw.api.model, api_key_env=rw.api.api_key_env, timeout_s=rw.api.timeout_s)
        judge = ChatClient(rw.api.base_url, rw.api.judge_model or rw.api.model, api_key_env=rw.api.api_key_env,
                           timeout_s=rw.api.timeout_s)
        answerer = ApiAnswerer(client, judge=judge, top_k=rw.local.top_k, verdicts_path=sdir / "verdicts.jsonl")
    else:
        step2 = step2 or load_upstream(cfg, "step2")
        mcfg = _step2_model_cfg(cfg, step2)
        answerer = RecallAnswerer(load_model(mcfg, cfg.paths.data, device=device), load_tokenizer(mcfg, cfg.paths.data),
                                  max_new_tokens=rw.recall.max_new_tokens, threshold=rw.local.threshold,
                                  key_space=export_key_space(step2))
    return InProcessRewards(answerer), {"answerer": rw.answerer}


def _reward_config(rw: schema.RewardConfig) -> RewardConfig:
    lp = rw.length_penalty
    return RewardConfig(length_penalty=lp.enabled, weight=lp.weight, core_theta_min=lp.core_theta_min,
                        core_theta_max=lp.core_theta_max, gamma_lower=lp.gamma_lower, gamma_upper=lp.gamma_upper,
                        format_penalty=rw.format_penalty)


def _expert_client(e: schema.ExpertConfig) -> ChatClient | None:
    """expert.source=api: the OpenAI-compatible model the expert asks; None for the annotations."""
    if e.source != "api":
        return None
    return ChatClient(e.api.base_url, e.api.model, api_key_env=e.api.api_key_env, timeout_s=e.api.timeout_s,
                      temperature=e.api.temperature)


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


def _encode_sft(tokenizer, trajectories, a: schema.AdrpoConfig, seed: int, cap: int | None,
                tag: str = "sft", max_noop_share: float = 1.0) -> tuple[list[dict], Counter]:
    """A seeded sample of at most `cap` valid expert calls, encoded for chat SFT (reply tokens labelled), with at
    most `max_noop_share` of them no-op calls (no operation; `_cap_noops`)."""
    rows = [{"id": f"{c['conv_id']}/{c['chunk']}/{c['agent']}", "agent": c["agent"], "noop": not c["ops"],
             "messages": [*c["messages"], {"role": "assistant", "content": c["reply"]}]}
            for t in trajectories for c in t.calls if c["valid"]]
    skipped: Counter = Counter()
    rng = random.Random(f"{seed}:adrpo:{tag}")
    rng.shuffle(rows)
    out = []
    for row in rows:
        if max_noop_share >= 1 and cap is not None and len(out) >= cap:
            break
        enc, skip = encode_rows(tokenizer, [row], max_seq_len=a.max_seq_len, group="expert")
        skipped += skip
        if enc and sum(lab != IGNORE_INDEX for lab in enc[0]["labels"]) > a.rl.max_new_tokens:
            skipped["expert_reply_over_max_new_tokens"] += 1
            continue
        out += [{**e, "agent": row["agent"], "noop": row["noop"]} for e in enc]
    if max_noop_share < 1:
        out = _cap_noops(out, cap, max_noop_share, skipped)
    return out, skipped


def _cap_noops(rows: list[dict], cap: int | None, share: float, skipped: Counter) -> list[dict]:
    """The largest sample of `rows` (at most `cap`) whose no-op share is at most `share` (< 1), as close to it as
    the rows allow; the first writes and no-ops in the rows' (seeded) order, kept in that order."""
    writes, noops = [r for r in rows if not r["noop"]], [r for r in rows if r["noop"]]
    room = len(rows) if cap is None else cap
    n_write = min(len(writes), room - min(len(noops), math.floor(share * room + 1e-9)))
    n_noop = min(len(noops), math.floor(share / (1 - share) * n_write + 1e-9), room - n_write)
    skipped["noop_over_max_noop_share"] += len(noops) - n_noop
    keep = {id(r) for r in writes[:n_write] + noops[:n_noop]}
    return [r for r in rows if id(r) in keep]


def _reply_vocab(tokenizer, trajectories, sft_rows: list[dict]) -> list[int]:
    """Token ids of every expert reply of the train split (and the warm start's end-of-turn tokens)."""
    ids = {t for r in sft_rows for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != IGNORE_INDEX}
    for t in trajectories:
        for c in t.calls:
            ids.update(tokenizer(c["reply"], add_special_tokens=False)["input_ids"])
    return sorted(ids)


def _rl_items(tokenizer, trajectories, a: schema.AdrpoConfig) -> tuple[list[RlItem], Counter]:
    budget = a.max_seq_len - a.rl.max_new_tokens
    items, skipped = [], Counter()
    for t in trajectories:
        by_chunk = defaultdict(dict)
        for c in t.calls:
            by_chunk[c["chunk"]][c["agent"]] = c
        for ch in t.metadata["chunks"]:
            qids = ch["question_ids"]
            if len(qids) < a.rl.min_questions:
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


# ------------------------------------------------------------------------------------------------------- recipe


class AdrpoRecipe(Recipe):
    name = "adrpo"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.seconds: dict[str, float] = {}  # per phase, into stats.seconds
        self._start = self._lap_start = time.perf_counter()

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        if cfg.trainer.accumulate_grad_batches != 1:
            raise ConfigError("trainer.accumulate_grad_batches", "must be 1 for adrpo (manual optimisation; use "
                              "adrpo.rl.logprob_batch_size to bound memory)")
        if _needs_step2(typed(cfg, cls.name)):
            load_upstream(cfg, "step2")  # fail now, naming what is missing, not after the warm start

    def run(self) -> StageResult:
        self.setup_data()
        self.setup_model()
        self.warm_start()
        self.evaluate_expert()
        self.evaluate_heldout("sft")
        self.train_rl()
        self.evaluate_heldout("rl")
        self.summarise_rl()
        if not self._rank_zero():
            return self.result_without_manifest()
        self.export()
        return self.finish(self.metrics["headline"])

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._lap_start, 1)
        self._lap_start = now

    # ------------------------------------------------------------------------------------------------- data
    def setup_data(self) -> None:
        """The upstreams (data; step2 when `_needs_step2`), the expert trajectories of the train and held-out
        conversations, and the held-out sessions' chunks and answerable questions."""
        a = self.args
        data = self.upstream("data")
        self.step2 = self.upstream("step2") if _needs_step2(a) else None
        splits = read_json(data.path("splits"))
        self.sessions = read_artifact(data, "sessions")
        self.qa_by_conv: dict[str, list[dict]] = defaultdict(list)
        for q in read_artifact(data, "qa"):
            self.qa_by_conv[q["conv_id"]].append(q)
        self.train_convs = sorted(splits["train"])[: a.expert.max_train_conversations]
        self.held_convs = sorted(splits[a.heldout.split])[: a.heldout.max_conversations]
        self.val_convs = ([c for c in sorted(splits["val"]) if c not in self.held_convs]
                          if a.sft.val_samples and a.sft.max_epochs else [])
        if not self.train_convs or not self.held_convs:
            raise LmxError(f"{data.dir}: adrpo needs train conversations and {a.heldout.split} conversations "
                           f"(got {len(self.train_convs)} and {len(self.held_convs)})")
        if a.heldout.split == "train":
            log.warning("heldout.split=train: the held-out sessions are conversations the policy is trained on")
        self.trajectories = self._expert_trajectories(data)
        self.train_trajectories = [self.trajectories[c] for c in self.train_convs]
        self.val_trajectories = [self.trajectories[c] for c in self.val_convs]
        self._lap("expert")
        self._heldout_questions()

    def _sessions_of(self, conv: str, n: int | None) -> list[dict]:
        return _first_sessions([s for s in self.sessions if s["conv_id"] == conv], n)

    def _expert_trajectories(self, data: Manifest) -> dict[str, Trajectory]:
        """Expert trajectories, written under expert/ then read back: the files are what the rest of the stage uses."""
        a, e = self.args, self.args.expert
        ann, self.annotations_info = _annotations(data, {*self.train_convs, *self.val_convs, *self.held_convs},
                                                  e.event_summaries)
        self.embedder = TextEmbedder() if a.memory.search != "bm25" else None
        self.expert_cfg = ExpertConfig(
            chunk_turns=e.chunk_turns, shown=a.memory.shown, core_max_words=e.core_max_words,
            summary_max_words=e.summary_max_words, max_ops_per_call=e.max_ops_per_call, dedup_f1=e.dedup_f1,
            update_f1=e.update_f1, core_char_limit=a.memory.core_char_limit, search_mode=a.memory.search)
        client = _expert_client(e)
        plan = [(c, "train", e.train_sessions) for c in self.train_convs] + \
               [(c, "val", e.train_sessions) for c in self.val_convs] + \
               [(c, a.heldout.split, a.heldout.sessions) for c in self.held_convs]
        trajectories = {}
        for conv, split, n in plan:
            traj = derive(conv, self._sessions_of(conv, n), ann[conv], self.qa_by_conv[conv], self.expert_cfg,
                          embedder=self.embedder, client=client, split=split)
            trajectories[conv] = load_trajectory(write_trajectory(self.dir / "expert", traj))
        return trajectories

    def _heldout_questions(self) -> None:
        """Every chunk of the held-out sessions, and the answerable questions whose evidence lies within them
        (heldout/questions.json)."""
        h = self.args.heldout
        sessions = {c: self._sessions_of(c, h.sessions) for c in self.held_convs}
        self.held_chunks = {c: [ch for s in sessions[c] for ch in split_chunks(s, self.expert_cfg.chunk_turns)]
                            for c in self.held_convs}
        held_sessions = {c: {s["session"] for s in sessions[c]} for c in self.held_convs}
        self.held_questions = {c: [q for q in self.qa_by_conv[c] if q["answer"] is not None and not q["abstention"]
                                   and q["evidence_sessions"] and set(q["evidence_sessions"]) <= held_sessions[c]]
                               for c in self.held_convs}
        self.n_questions = sum(len(v) for v in self.held_questions.values())
        if self.n_questions == 0:
            raise LmxError(f"the held-out sessions ({h.split} split, first {h.sessions}) have no answerable "
                           "question; raise adrpo.heldout.sessions")
        write_json(self.dir / "heldout" / "questions.json", self.held_questions)

    # ------------------------------------------------------------------------------------------------ model
    def setup_model(self) -> None:
        """The policy (model= or the step2 export) with LoRA, plus the reply tokens' embedding rows when
        train_reply_vocab; the expert calls encoded for the warm start; the reward service; the logger."""
        a, cfg = self.args, self.cfg
        self.device = model_device(cfg)
        mcfg = cfg.model if a.init_from == "base" else _step2_model_cfg(cfg, self.step2)
        self.tokenizer = load_tokenizer(mcfg, cfg.paths.data)
        self.sft_rows, self.sft_skipped = _encode_sft(self.tokenizer, self.train_trajectories, a, cfg.seed,
                                                      a.sft.max_samples, max_noop_share=a.sft.max_noop_share)
        self.val_rows, _ = _encode_sft(self.tokenizer, self.val_trajectories, a, cfg.seed, a.sft.val_samples,
                                       tag="sft_val")
        model = load_model(mcfg, cfg.paths.data, quant_cfg=cfg.quant, device=self.device)
        self.vocab = None
        if a.train_reply_vocab:
            self.vocab = _reply_vocab(self.tokenizer, self.train_trajectories, self.sft_rows)
        self.model = attach_lora(model, cfg.lora, token_ids=self.vocab)
        self.service, self.service_info = _service(cfg, self.dir, self.embedder, self.device, self.step2)
        self.logger = make_logger(cfg, self.dir)

    def warm_start(self) -> None:
        """SFT of the policy on the expert calls (`adrpo.sft`, skipped at max_epochs=0), resumed from its own
        checkpoint under warmup/, its loss on the val conversations' calls measured at every epoch end; the
        resulting policy's adapter is exported as export/adapter_sft."""
        s = self.args.sft
        self.warm_loss = self.warm_val_loss = None
        if s.max_epochs > 0:
            if not self.sft_rows:
                raise LmxError("no expert call fits adrpo.max_seq_len and adrpo.rl.max_new_tokens for the warm start "
                               f"(skipped: {dict(self.sft_skipped)})")
            module = ChatSftModule(self.model, lr=s.lr, weight_decay=s.weight_decay, warmup_ratio=s.warmup_ratio,
                                   groups=("expert",))
            ds = ChatSftDataset(self.sft_rows, ("expert",))
            pad_id = self.tokenizer.pad_token_id
            loader = ResumableLoader(ds, batch_size=s.batch_size, shuffle=True, seed=self.cfg.seed,
                                     collate_fn=lambda b: ds.collate(b, pad_id))
            trainer = make_trainer(self.cfg, self.dir / "warmup", max_epochs=s.max_epochs, logger=self.logger,
                                   gradient_clip_val=s.gradient_clip_val)
            module.train()
            val_loader = None
            if self.val_rows:
                vds = ChatSftDataset(self.val_rows, ("expert",))
                val_loader = DataLoader(vds, batch_size=s.batch_size, collate_fn=lambda b: vds.collate(b, pad_id))
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader,
                        ckpt_path=resume_path(self.cfg, self.dir / "warmup"))
            # kept in the module's checkpoint: also set after a resume that found the warm start finished
            self.warm_loss, self.warm_val_loss = module.last_train_loss, module.last_val_loss
            if self.device is not None:  # Lightning's teardown moved the model to CPU
                self.model.to(self.device)
        with atomic_dir(self.dir / "export" / "adapter_sft") as tmp:
            save_adapter(self.model, tmp)
        self._lap("warmup")

    # ------------------------------------------------------------------------------------------------- held-out
    def _new_store(self) -> MemoryStore:
        m = self.args.memory
        return MemoryStore(core_char_limit=m.core_char_limit, search_mode=m.search, embedder=self.embedder)

    def _score_memories(self, stores: dict[str, MemoryStore], tag: str) -> dict[str, float]:
        """QA accuracy over the held-out memories (snapshots under heldout/<tag>/), answered by the reward service."""
        for c, s in stores.items():
            write_json(self.dir / "heldout" / tag / f"{c}.json", s.snapshot())
        try:
            scores = self.service.score([(stores[c], self.held_questions[c]) for c in self.held_convs])
        except RewardError as e:
            raise LmxError(f"held-out QA scoring ({tag}) failed: {e}") from e
        n = self.n_questions
        served = Counter(x for s in scores for x in s.served_by if x)
        return {f"heldout/qa_acc_{tag}": sum(sum(s.correct) for s in scores) / n,
                f"heldout/qa_f1_{tag}": sum(sum(s.f1) for s in scores) / n,
                f"heldout/memory_words_{tag}": sum(sum(len(u.content.split()) for u in s.units())
                                                   for s in stores.values()) / len(stores),
                **{f"heldout/served_{tag}/{k}": v for k, v in sorted(served.items())}}

    def evaluate_expert(self) -> None:
        """The expert's own final memory of the held-out sessions, scored like the policy's (heldout/*_expert)."""
        search = self.args.memory.search
        stores = {c: MemoryStore.from_snapshot(self.trajectories[c].states["final"], search_mode=search,
                                               embedder=self.embedder) for c in self.held_convs}
        self.metrics.update(self._score_memories(stores, "expert"))

    def evaluate_heldout(self, tag: str) -> None:
        """The policy as it is now builds memory on the held-out sessions by itself (greedy), then its QA accuracy
        (heldout/*_<tag>). An RL phase that left every trainable weight as the warm start had it (no step updated a
        row) has the SFT policy's greedy replies: its figures are the SFT ones, copied, and the stats say so."""
        a = self.args
        if tag == "rl" and not self.rl_changed_weights:
            self.metrics.update({k.replace("_sft", "_rl"): v for k, v in list(self.metrics.items())
                                 if k.startswith("heldout/") and "_sft" in k})
            for c in self.held_convs:
                write_json(self.dir / "heldout" / "rl" / f"{c}.json", read_json(self.dir / "heldout" / "sft" / f"{c}.json"))
            self._lap(f"heldout_{tag}")
            return
        stores, hstats = policy_memories(self.model, self.tokenizer, self.held_chunks, self._new_store,
                                         shown=a.memory.shown, max_new_tokens=a.rl.max_new_tokens,
                                         max_prompt_tokens=a.max_seq_len - a.rl.max_new_tokens,
                                         batch_size=a.heldout.batch_size)
        out = self._score_memories(stores, tag)
        out.update({f"heldout/{k}_{tag}": float(v) for k, v in hstats.items()})
        log.info("adrpo held-out %s: %s", tag, {k: round(v, 4) for k, v in out.items()})
        self.metrics.update(out)
        self._lap(f"heldout_{tag}")

    # --------------------------------------------------------------------------------------------------- RL
    def train_rl(self) -> None:
        """`adrpo.rl.max_steps` ADRPO steps on a seeded schedule of the train chunks (cycled when there are fewer),
        resumed from the stage's own checkpoint under rl/."""
        a, rl = self.args, self.args.rl
        self.rl_items, self.rl_items_skipped = _rl_items(self.tokenizer, self.train_trajectories, a)
        self.budget = RewardErrorBudget(a.reward.max_errors)
        scorer = RolloutScorer(self.service, _reward_config(a.reward), search_mode=a.memory.search,
                               embedder=self.embedder, budget=self.budget)
        self.module = AdrpoModule(
            self.model, self.tokenizer, scorer, group_size=rl.group_size, lr=rl.lr, weight_decay=rl.weight_decay,
            clip_eps=rl.clip_eps, kl_coef=rl.kl_coef, ppo_epochs=rl.ppo_epochs,
            logprob_batch_size=rl.logprob_batch_size, gen_batch_size=rl.gen_batch_size,
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
            gradient_clip_val=rl.gradient_clip_val, attribution=a.reward.attribution.enabled,
            alpha=a.reward.attribution.alpha, adv_eps=rl.adv_eps, skip_zero_advantage=rl.skip_zero_advantage,
            seed=self.cfg.seed)
        before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        if rl.max_steps > 0:
            if not self.rl_items:
                raise LmxError(f"no RL chunk has >= {rl.min_questions} questions and prompts within "
                               f"adrpo.max_seq_len - adrpo.rl.max_new_tokens (skipped: {dict(self.rl_items_skipped)}); "
                               "raise adrpo.expert.train_sessions or adrpo.max_seq_len")
            order = list(range(len(self.rl_items)))
            random.Random(f"{self.cfg.seed}:adrpo:rl").shuffle(order)
            need = rl.max_steps * rl.chunks_per_step
            schedule = [self.rl_items[order[i % len(order)]] for i in range(need)]  # cycles when there are fewer
            loader = ResumableLoader(schedule, batch_size=rl.chunks_per_step, shuffle=False, collate_fn=list)
            trainer = make_trainer(self.cfg, self.dir / "rl", max_epochs=1, logger=self.logger,
                                   ckpt_every_n_steps=rl.ckpt_every_n_steps, gradient_clip_val=None)
            trainer.fit(self.module, train_dataloaders=loader, ckpt_path=resume_path(self.cfg, self.dir / "rl"))
            if self.device is not None:
                self.model.to(self.device)
        self.rl_changed_weights = any(not torch.equal(p.detach().cpu(), before[n].cpu())
                                      for n, p in self.model.named_parameters() if p.requires_grad)
        self._lap("rl")

    def summarise_rl(self) -> None:
        """Means over the RL steps that ran (reward/*, rl/*, time/*), reward errors, attribution and served counts,
        the warm start's last loss; the headline is heldout/qa_acc_rl."""
        module, metrics = self.module, self.metrics
        self.seconds["total"] = round(self._lap_start - self._start, 1)
        done = [h for h in module.history if "skipped" not in h]
        if done:
            for k in sorted({k for h in done for k in h if k.startswith(("reward/", "rl/"))}):
                vals = [h[k] for h in done if k in h]
                metrics[k] = sum(vals) / len(vals)
            metrics["reward/mean_first_step"] = done[0]["reward/mean"]
            metrics["reward/mean_last_step"] = done[-1]["reward/mean"]
            for k in ("generate_s", "reward_s", "update_s", "step_s"):
                metrics[f"time/{k}"] = sum(h[f"time/{k}"] for h in done) / len(done)
            metrics["time/reward_share"] = sum(h["time/reward_s"] for h in done) / sum(h["time/step_s"] for h in done)
        metrics["rl/steps"] = len(done)
        metrics["reward/errors"] = self.budget.errors
        for k in [*MEMORY_TYPES, "none"]:
            metrics[f"attribution/{k}"] = module.attribution_counts.get(k, 0)
        for k in MEMORY_TYPES:
            metrics[f"served/{k}"] = module.served_counts.get(k, 0)
        if self.warm_loss is not None:
            metrics["warmup/train_loss_last"] = float(self.warm_loss)
        if self.warm_val_loss is not None:
            metrics["warmup/val_loss"] = float(self.warm_val_loss)
        metrics["headline"] = metrics["heldout/qa_acc_rl"]

    def _rank_zero(self) -> bool:
        """Rank 0 of the RL trainer, or the only process when no RL step ran."""
        return getattr(self.module, "_trainer", None) is None or self.module.trainer.is_global_zero

    # ----------------------------------------------------------------------------------------------- export
    def export(self) -> None:
        """Rank 0: the adapter after RL (atomically), every step's metrics, and the manifest's outputs and stats."""
        a = self.args
        with atomic_dir(self.dir / "export" / "adapter") as tmp:
            save_adapter(self.model, tmp)
        write_jsonl(self.dir / "rl_steps.jsonl", self.module.history)
        self.outputs = {"adapter": "export/adapter", "adapter_sft": "export/adapter_sft", "expert": "expert",
                        "rl_steps": "rl_steps.jsonl", "heldout": "heldout"}
        self.stats = {
            "init_from": a.init_from, "reward_service": self.service_info, "annotations": self.annotations_info,
            "train_conversations": self.train_convs, "heldout_conversations": self.held_convs,
            "expert_calls": dict(Counter(c["agent"] for tr in self.train_trajectories for c in tr.calls)),
            "sft_samples": len(self.sft_rows), "sft_val_conversations": self.val_convs,
            "sft_val_samples": len(self.val_rows),
            "sft_samples_per_agent": dict(Counter(r["agent"] for r in self.sft_rows)),
            "sft_noop_samples": sum(r["noop"] for r in self.sft_rows),
            "sft_skipped": dict(self.sft_skipped), "rl_items": len(self.rl_items),
            "rl_items_skipped": dict(self.rl_items_skipped), "heldout_questions": self.n_questions,
            "reward_error_messages": self.budget.messages, "seconds": self.seconds,
            "heldout_rl": ("evaluated" if self.rl_changed_weights else
                           "copied from the SFT policy: the RL steps left every trainable weight unchanged"),
            "reply_vocab_rows": len(self.vocab) if self.vocab else 0,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
