"""Stage step1: train `<recall>` so its hidden state queries the memory bank (see conf/stage/step1.yaml)."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig

from lightmem_exp.artifacts import (
    Manifest,
    atomic_dir,
    read_json,
    write_json,
    write_jsonl,
    write_manifest,
)
from lightmem_exp.config import INT1, OPT_INT1, OPT_POSITIVE, int_at_least, is_bool, positive, require, require_all
from lightmem_exp.data.recall_queries import RecallQueryDataset, collate_queries, think_query_ids, user_query_ids
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.data.sft_sampling import draw_within_limit, think_segments
from lightmem_exp.errors import LmxError
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.step1 import RecallQueryModule
from lightmem_exp.lit.trainer import make_trainer, resume_path, throughput_stats
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.models.loading import (
    attach_lora,
    ensure_memory_tokens,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    save_adapter,
)
from lightmem_exp.models.memory_bank import MemoryBank, bank_token_ids
from lightmem_exp.retrieval import BM25Retriever, DenseRetriever, ranking_metrics
from lightmem_exp.stages.base import StageResult, load_upstream

log = logging.getLogger(__name__)
UPSTREAM = ("data",)


def validate(cfg: DictConfig) -> None:
    s = "stage."
    require(cfg, s + "max_epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "lr", positive, "a number > 0")
    require(cfg, s + "temperature", positive, "a number > 0")
    require(cfg, s + "weight_decay", lambda v: v >= 0, "a number >= 0")
    require(cfg, s + "warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)")
    require(cfg, s + "negatives", lambda v: v in ("bank", "in_batch"), "'bank' or 'in_batch'")
    require(cfg, s + "sft_ratio", lambda v: v >= 0, "a number >= 0")
    require(cfg, s + "sft_max_tokens", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "max_query_tokens", lambda v: isinstance(v, int) and v >= 8, "an integer >= 8")
    require(cfg, "data.max_memories", lambda v: isinstance(v, int) and v >= 1, "null or an integer >= 1",
            allow_none=True)
    require(cfg, "data.write_splits", lambda v: len(v) > 0 and len(set(v)) == len(v)
            and set(v) <= {"train", "val", "test"}, "a non-empty list of distinct splits among train, val, test")
    require_all(cfg, s, [
        ("bank_batch_size", *INT1),
        ("max_train_queries", *OPT_INT1),
        ("eval_ks", lambda v: len(v) > 0 and all(int_at_least(1)(k) for k in v), "a non-empty list of integers >= 1"),
        ("ckpt_every_n_steps", *OPT_INT1),
        ("gradient_clip_val", *OPT_POSITIVE),
        ("refresh_keys", is_bool, "true or false"),
    ])


def select_written_memories(memories: list[dict], pairs: list[dict], train_convs: set[str], cap: int | None,
                            seed: int) -> list[dict]:
    """The memories this pipeline writes into the model (step2's set): train-split memories that answer at least
    one train recall pair, a seeded sample of `cap` of them."""
    wanted = {mid for p in pairs if p["conv_id"] in train_convs for mid in p["memory_ids"]}
    chosen = [m for m in memories if m["conv_id"] in train_convs and m["id"] in wanted]
    if cap is not None and len(chosen) > cap:
        chosen = sorted(random.Random(seed).sample(chosen, cap), key=lambda m: m["id"])
    return chosen


def written_memories(memories: list[dict], pairs: list[dict], splits: dict[str, list[str]],
                     write_splits: list[str], cap: int | None, seed: int) -> list[dict]:
    """Every memory step2 writes into the model, tagged with its split: train-split memories that answer a train
    pair (step1's query training targets) plus the memories of the other `write_splits` conversations.

    Writing an eval conversation's memories is the recall model's analogue of indexing it for RAG: step2 learns to
    decode their text from their vectors and never sees a question, so only memory text (what RAG is given too)
    crosses the split. Eval memories are sampled without looking at the questions. `cap` is shared evenly
    between the write splits (a split with fewer memories leaves its share to the others).
    """
    pools: dict[str, list[dict]] = {}
    for split in write_splits:
        convs = set(splits[split])
        pools[split] = (select_written_memories(memories, pairs, convs, None, seed) if split == "train"
                        else [m for m in memories if m["conv_id"] in convs])
    quota = {s: len(p) for s, p in pools.items()}
    if cap is not None:
        quota = dict.fromkeys(pools, 0)
        for _ in range(min(cap, sum(map(len, pools.values())))):
            open_splits = [s for s in pools if quota[s] < len(pools[s])]
            quota[min(open_splits, key=quota.get)] += 1
    chosen = []
    for split, pool in pools.items():
        picked = pool if quota[split] >= len(pool) else random.Random(f"{seed}/{split}").sample(pool, quota[split])
        chosen += [{**m, "split": split} for m in sorted(picked, key=lambda m: m["id"])]
    return chosen


@torch.no_grad()
def recall_metrics(module: RecallQueryModule, rows: list[dict], bank: MemoryBank, pad_id: int, batch_size: int,
                   ks: list[int]) -> dict:
    """recall@k / MRR of `<recall>` queries against every vector of `bank`."""
    was_training = module.training
    module.eval()
    q = []
    for i in range(0, len(rows), batch_size):
        b = collate_queries(rows[i : i + batch_size], pad_id)
        q.append(module.encode(b["input_ids"].to(module.device), b["attention_mask"].to(module.device)).cpu())
    module.train(was_training)
    _, idx = bank.topk(torch.cat(q), max(ks))
    return ranking_metrics(idx.tolist(), [set(r["targets"]) for r in rows], ks)


def run(cfg: DictConfig) -> StageResult:
    sdir, st = Path(cfg.runtime.stage_dir), cfg.stage
    data = load_upstream(cfg, "data")
    memories = read_artifact(data, "memories")
    pairs = read_artifact(data, "recall_pairs")
    splits = read_json(data.path("splits"))
    pool = read_artifact(data, "sft_pool")

    tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
    model = load_model(cfg.model, cfg.paths.data, quant_cfg=cfg.quant)
    tok_ids = ensure_memory_tokens(model, tokenizer)
    pad_id, bs, ks, mq = tokenizer.pad_token_id, st.batch_size, list(st.eval_ks), st.max_query_tokens
    train_convs, val_convs = set(splits["train"]), set(splits["val"])

    written = written_memories(memories, pairs, splits, list(cfg.data.write_splits), cfg.data.max_memories,
                               cfg.seed)
    if not written:
        raise LmxError(f"no memories to train on: the train split of {data.dir} has no recall pairs")
    segments = think_segments(pool)
    draw = draw_within_limit(
        segments, math.ceil(len(written) * st.sft_ratio), max_tokens=st.sft_max_tokens, rng=random.Random(cfg.seed),
        n_tokens=lambda s: len(tokenizer(s["think"], add_special_tokens=False)["input_ids"]),
        what="step1 <think> sampling from the SFT pool",
    )

    # Training keys: every train-split memory that answers a train pair, then the drawn <think> segments.
    key_mems = select_written_memories(memories, pairs, train_convs, None, cfg.seed)
    key_of = {m["id"]: k for k, m in enumerate(key_mems)}
    key_texts = [m["text"] for m in key_mems] + [s["think"] for s in draw.items]
    key_ids = bank_token_ids(tokenizer, key_texts)
    train_rows = [
        {"input_ids": user_query_ids(tokenizer, p["query"], tok_ids.recall, mq), "kind": p["query_kind"],
         "targets": [key_of[m] for m in p["memory_ids"] if m in key_of]}
        for p in pairs if p["conv_id"] in train_convs
    ]
    train_rows = [r for r in train_rows if r["targets"]]
    if st.max_train_queries is not None and len(train_rows) > st.max_train_queries:
        train_rows = random.Random(cfg.seed).sample(train_rows, st.max_train_queries)  # fits the time budget
    train_rows += [
        {"input_ids": think_query_ids(tokenizer, s["context"], tok_ids.recall, mq), "kind": "think",
         "targets": [len(key_mems) + j]}
        for j, s in enumerate(draw.items)
    ]

    # Evaluation: the val split's questions against the full bank of every memory.
    bank = MemoryBank.build(model, tokenizer, memories, batch_size=st.bank_batch_size, progress=cfg.progress)
    row_of = {mid: i for i, mid in enumerate(bank.ids)}
    val_pairs = [p for p in pairs if p["conv_id"] in val_convs and p["query_kind"] == "question"
                 and any(m in row_of for m in p["memory_ids"])]
    val_rows = [{"input_ids": user_query_ids(tokenizer, p["query"], tok_ids.recall, mq), "kind": "question",
                 "targets": [row_of[m] for m in p["memory_ids"] if m in row_of]} for p in val_pairs]

    # LoRA plus only the <recall>/<|memory_pad|> embedding rows (PEFT trainable tokens: the adapter stores just
    # those rows, so neither a full embedding matrix nor its optimizer state exists).
    model = prepare_for_kbit_training(model, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    model = attach_lora(model, cfg.lora, token_ids=[tok_ids.recall, tok_ids.memory_pad])
    module = RecallQueryModule(model, key_ids, pad_id=pad_id, temperature=st.temperature, negatives=st.negatives,
                               refresh_keys=st.refresh_keys, lr=st.lr, weight_decay=st.weight_decay,
                               warmup_ratio=st.warmup_ratio, encode_batch_size=st.bank_batch_size)
    metrics: dict[str, float] = {}
    if val_rows:
        metrics.update({f"untrained/{k}": v for k, v in recall_metrics(module, val_rows, bank, pad_id, bs, ks).items()})

    logger = make_logger(cfg, sdir)
    loader = ResumableLoader(RecallQueryDataset(train_rows), batch_size=bs, shuffle=True, seed=cfg.seed,
                             collate_fn=lambda rows: collate_queries(rows, pad_id))
    trainer = make_trainer(cfg, sdir, max_epochs=st.max_epochs, logger=logger,
                           ckpt_every_n_steps=st.ckpt_every_n_steps, gradient_clip_val=st.gradient_clip_val)
    module.train()  # from_pretrained returns eval mode and Lightning keeps it: gradient checkpointing would be off
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_path(cfg, sdir))
    throughput = throughput_stats(trainer, model)
    if st.refresh_keys:  # the keys moved with the model: the exported bank is re-encoded by the trained model
        bank = MemoryBank.build(model, tokenizer, memories, batch_size=st.bank_batch_size, progress=cfg.progress)

    if val_rows:
        metrics.update({f"val/{k}": v for k, v in recall_metrics(module, val_rows, bank, pad_id, bs, ks).items()})
        texts = [m["text"] for m in bank.entries]
        questions = [p["query"] for p in val_pairs]
        positives = [set(r["targets"]) for r in val_rows]
        for name, retriever in (("bm25", BM25Retriever(texts)), ("dense", DenseRetriever(texts))):
            idx, _ = retriever.search(questions, max(ks))
            metrics.update({f"baseline/{name}/{k}": v for k, v in ranking_metrics(idx.tolist(), positives, ks).items()})
    metrics["headline"] = metrics.get("val/recall@1", float("nan"))

    manifest = None
    if trainer.is_global_zero:
        for name, save in (("bank", bank.save), ("adapter", lambda d: save_adapter(model, d)),
                           ("tokenizer", lambda d: tokenizer.save_pretrained(str(d)))):
            with atomic_dir(sdir / name) as tmp:
                save(tmp)
        write_jsonl(sdir / "written_memories.jsonl",
                    ({k: m[k] for k in ("id", "text", "conv_id", "split")} for m in written))
        write_json(sdir / "sft_draw.json", {"pool_indices": [[s["pool_index"], s["turn"]] for s in draw.items],
                                            "skipped_too_long": draw.skipped_too_long})
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "headline"})
        manifest = Manifest(
            stage="step1", seed=cfg.seed, metrics=metrics, run_id=run_id(logger), inputs={"data": data.ref()},
            outputs={"bank": "bank", "adapter": "adapter", "tokenizer": "tokenizer", "written_memories": "written_memories.jsonl", "sft_draw": "sft_draw.json"},
            stats={"throughput": throughput, "train_queries": len(train_rows), "train_keys": len(key_ids), "written_memories": len(written),
                   "written_per_split": dict(Counter(m["split"] for m in written)),
                   "think_samples": len(draw.items),
                   "val_questions": len(val_rows), "bank_size": len(bank), "memory_tokens_added": tok_ids.added,
                   "bank_vectors": "re-encoded by the trained model" if st.refresh_keys else "frozen base model"},
        )
        write_manifest(sdir, manifest)
    return StageResult(stage="step1", dir=sdir, manifest=manifest, metrics=metrics, headline=metrics["headline"])
