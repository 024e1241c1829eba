"""Stage step1: train `<recall>` so its hidden state queries the memory bank (`Step1Config`, config/schema.py).

Outputs (stage dir): bank/ (every memory's vector), adapter/ (LoRA + the two memory-token rows), tokenizer/,
written_memories.jsonl (what step2 writes, tagged with its split), sft_draw.json (the <think> samples drawn).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import torch

from lightmem_exp.artifacts import atomic_dir, read_json, write_json, write_jsonl
from lightmem_exp.data.recall_queries import (
    RecallQueryDataset,
    answer_memories,
    collate_queries,
    conversation_groups,
    pair_query_rows,
    think_query_ids,
    user_query_ids,
)
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.data.sft_sampling import draw_within_limit, think_segments
from lightmem_exp.errors import LmxError
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.step1 import RecallQueryModule
from lightmem_exp.lit.trainer import make_trainer, resume_path, throughput_stats
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.models.chat import text_token_ids
from lightmem_exp.models.loading import (
    attach_lora,
    ensure_memory_tokens,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    save_adapter,
)
from lightmem_exp.models.memory_bank import MemoryBank, bank_token_ids, last_token_hidden
from lightmem_exp.retrieval import BM25Retriever, DenseRetriever, ranking_metrics
from lightmem_exp.stages.base import Recipe, StageResult


def written_memories(memories: list[dict], pairs: list[dict], splits: dict[str, list[str]],
                     write_splits: list[str], cap: int | None, seed: int,
                     kinds: list[str] | None = None) -> list[dict]:
    """Every memory step2 writes into the model, tagged with its split: train-split memories that answer a train
    pair (step1's query training targets) plus the memories of the other `write_splits` conversations, of `kinds`
    (None: every kind).

    Writing an eval conversation's memories is the recall model's analogue of indexing it for RAG: step2 learns to
    decode their text from their vectors and never sees a question, so only memory text (what RAG is given too)
    crosses the split. Eval memories are sampled without looking at the questions. `cap` is shared evenly
    between the write splits (a split with fewer memories leaves its share to the others).
    """
    pools: dict[str, list[dict]] = {}
    for split in write_splits:
        convs = set(splits[split])
        pools[split] = [m for m in (answer_memories(memories, pairs, convs) if split == "train"
                                    else [m for m in memories if m["conv_id"] in convs])
                        if kinds is None or m["kind"] in kinds]
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
def query_topk(model: torch.nn.Module, rows: list[dict], bank: MemoryBank, pad_id: int, batch_size: int,
               k: int) -> list[list[int]]:
    """The top-k bank rows of each `<recall>` query (rows of query token ids): `model`'s last-layer hidden state at
    the last token, scored by the bank's Memory Head, as in generation."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    q = []
    for i in range(0, len(rows), batch_size):
        b = collate_queries(rows[i : i + batch_size], pad_id)
        q.append(last_token_hidden(model, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu())
    model.train(was_training)
    return bank.topk(torch.cat(q), k)[1].tolist()


def conversation_retrieval(model: torch.nn.Module, tokenizer: Any, bank: MemoryBank, pairs: list[dict],
                           convs: list[str], recall_id: int, max_query_tokens: int, batch_size: int,
                           ks: list[int], baselines: bool = True) -> dict[str, float]:
    """recall@k / MRR of the questions of `convs`, each searching only its own conversation's memories in `bank` (the
    bank eval's `recall` searches), micro-averaged over questions: `n`, `recall@k`, `mrr`; with `baselines`, BM25
    and MiniLM on the same questions and banks: `bm25/*`, `dense/*`."""
    rows_of: dict[str, list[int]] = {}
    for i, m in enumerate(bank.entries):
        rows_of.setdefault(m["conv_id"], []).append(i)
    ranked: dict[str, list[list[int]]] = {"recall": [], **({"bm25": [], "dense": []} if baselines else {})}
    positives: list[set[int]] = []
    for conv in sorted(set(convs) & set(rows_of)):
        rows = rows_of[conv]
        local = {bank.entries[i]["id"]: j for j, i in enumerate(rows)}
        asked = [p for p in pairs if p["conv_id"] == conv and p["query_kind"] == "question"
                 and any(m in local for m in p["memory_ids"])]
        if not asked:
            continue
        queries = [{"input_ids": user_query_ids(tokenizer, p["query"], recall_id, max_query_tokens), "targets": []}
                   for p in asked]
        positives += [{local[m] for m in p["memory_ids"] if m in local} for p in asked]
        ranked["recall"] += query_topk(model, queries, bank.subset(rows), tokenizer.pad_token_id, batch_size,
                                       max(ks))
        if baselines:
            texts, questions = [bank.entries[i]["text"] for i in rows], [p["query"] for p in asked]
            for name, retriever in (("bm25", BM25Retriever(texts)), ("dense", DenseRetriever(texts))):
                ranked[name] += retriever.search(questions, max(ks))[0].tolist()
    if not positives:
        return {}
    out = {"n": float(len(positives))}
    for name, idx in ranked.items():
        prefix = "" if name == "recall" else f"{name}/"
        out.update({prefix + k: v for k, v in ranking_metrics(idx, positives, ks).items()})
    return out


class Step1Recipe(Recipe):
    name = "step1"

    def run(self) -> StageResult:
        self.setup_data()
        self.setup_model()
        self.setup_queries()
        self.setup_training()
        self.train()
        self.evaluate()
        if not self.trainer.is_global_zero:
            return self.result_without_manifest()
        self.export()
        return self.finish(self.metrics["headline"])

    def setup_data(self) -> None:
        """The data manifest's artifacts and the memories step2 will write (data.write_splits, data.max_memories)."""
        data = self.upstream("data")
        self.memories = read_artifact(data, "memories")
        self.pairs = read_artifact(data, "recall_pairs")
        self.splits = read_json(data.path("splits"))
        self.pool = read_artifact(data, "sft_pool")
        d = self.cfg.data
        self.written = written_memories(self.memories, self.pairs, self.splits, list(d.write_splits), d.max_memories,
                                        self.cfg.seed, None if d.write_kinds is None else list(d.write_kinds))
        if not self.written:
            raise LmxError(f"no memories to train on: the train split of {data.dir} has no recall pairs")

    def setup_model(self) -> None:
        """The base model and tokenizer with the memory tokens added."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
        self.model = load_model(cfg.model, cfg.paths.data, quant_cfg=cfg.quant)
        self.tok_ids = ensure_memory_tokens(self.model, self.tokenizer)

    def setup_queries(self) -> None:
        """Training keys (every train-split memory that answers a train pair, then the drawn <think> segments) and
        their `<recall>` queries; the base model's bank of every memory and the val split's questions against it."""
        a, seed, tokenizer, recall = self.args, self.cfg.seed, self.tokenizer, self.tok_ids.recall
        self.draw = draw_within_limit(
            think_segments(self.pool), math.ceil(len(self.written) * a.sft_ratio), max_tokens=a.sft_max_tokens,
            rng=random.Random(seed), what="step1 <think> sampling from the SFT pool",
            n_tokens=lambda s: len(text_token_ids(tokenizer, s["think"])),
        )
        train_convs = set(self.splits["train"])
        key_mems = answer_memories(self.memories, self.pairs, train_convs)
        self.key_ids = bank_token_ids(tokenizer, [m["text"] for m in key_mems] + [s["think"] for s in self.draw.items])
        self.key_groups = conversation_groups(key_mems) + [-1] * len(self.draw.items)  # <think> keys: one group
        rows = pair_query_rows(tokenizer, self.pairs, key_mems, train_convs, recall, a.max_query_tokens,
                               a.max_train_queries, seed)  # max_train_queries fits the time budget
        self.train_rows = rows + [
            {"input_ids": think_query_ids(tokenizer, s["context"], recall, a.max_query_tokens), "kind": "think",
             "targets": [len(key_mems) + j]}
            for j, s in enumerate(self.draw.items)
        ]
        self.bank = MemoryBank.build(self.model, tokenizer, self.memories, batch_size=a.bank_batch_size,
                                     progress=self.cfg.progress, pooling=a.key_pooling,
                                     standardise=a.standardise_keys)

    def setup_training(self) -> None:
        """LoRA plus only the <recall>/<|memory_pad|> embedding rows (PEFT trainable tokens: the adapter stores just
        those rows, so neither a full embedding matrix nor its optimizer state exists), in the query module."""
        a, cfg = self.args, self.cfg
        model = prepare_for_kbit_training(self.model, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
        self.model = attach_lora(model, cfg.lora, token_ids=[self.tok_ids.recall, self.tok_ids.memory_pad])
        self.module = RecallQueryModule(
            self.model, self.key_ids, pad_id=self.tokenizer.pad_token_id, temperature=a.temperature,
            negatives=a.negatives, refresh_keys=a.refresh_keys, lr=a.lr, weight_decay=a.weight_decay,
            warmup_ratio=a.warmup_ratio, encode_batch_size=a.bank_batch_size, key_space=self.bank.key_space,
            key_groups=self.key_groups)

    def train(self) -> None:
        """Lightning fit from the stage's own checkpoint when one exists."""
        a, cfg, pad_id = self.args, self.cfg, self.tokenizer.pad_token_id
        self.logger = make_logger(cfg, self.dir)
        loader = ResumableLoader(RecallQueryDataset(self.train_rows), batch_size=a.batch_size, shuffle=True,
                                 seed=cfg.seed, collate_fn=lambda rows: collate_queries(rows, pad_id))
        self.trainer = make_trainer(cfg, self.dir, max_epochs=a.max_epochs, logger=self.logger,
                                    ckpt_every_n_steps=a.ckpt_every_n_steps, gradient_clip_val=a.gradient_clip_val)
        # from_pretrained returns eval mode and Lightning keeps it: gradient checkpointing would be off
        self.module.train()
        self.trainer.fit(self.module, train_dataloaders=loader, ckpt_path=resume_path(cfg, self.dir))
        self.stats["throughput"] = throughput_stats(self.trainer, self.model)
        if a.refresh_keys:  # the keys moved with the model: the exported bank is re-encoded by the trained model
            self.bank = MemoryBank.build(self.model, self.tokenizer, self.memories, batch_size=a.bank_batch_size,
                                         progress=cfg.progress, key_space=self.bank.key_space)

    def evaluate(self) -> None:
        """Per conversation on val and test (`conversation_retrieval`), next to BM25 / MiniLM over the same memories;
        the headline is val recall@5 (choose settings on val)."""
        for split in ("val", "test"):
            self.metrics.update(self.conversation_retrieval(split))
        self.metrics["headline"] = self.metrics.get(f"val_conv/recall@{max(self.args.eval_ks)}", float("nan"))

    def conversation_retrieval(self, split: str) -> dict[str, float]:
        """`conversation_retrieval` on `split`: `<split>_conv/*`, with BM25 / MiniLM on the same questions and banks as
        `baseline/{bm25,dense}/<split>_conv/*`. Choose settings on val; test is reported, not tuned on."""
        a = self.args
        out = conversation_retrieval(self.model, self.tokenizer, self.bank, self.pairs, self.splits[split],
                                     self.tok_ids.recall, a.max_query_tokens, a.batch_size, list(a.eval_ks))
        named = {}
        for key, v in out.items():
            method, _, metric = key.rpartition("/")
            named[f"baseline/{method}/{split}_conv/{metric}" if method else f"{split}_conv/{metric}"] = v
        return named

    def export(self) -> None:
        """Rank 0: the bank, adapter and tokenizer (each written atomically), the written memories and the draw."""
        for name, save in (("bank", self.bank.save), ("adapter", lambda d: save_adapter(self.model, d)),
                           ("tokenizer", lambda d: self.tokenizer.save_pretrained(str(d)))):
            with atomic_dir(self.dir / name) as tmp:
                save(tmp)
        write_jsonl(self.dir / "written_memories.jsonl",
                    ({k: m[k] for k in ("id", "text", "conv_id", "split")} for m in self.written))
        write_json(self.dir / "sft_draw.json", {"pool_indices": [[s["pool_index"], s["turn"]] for s in self.draw.items],
                                                "skipped_too_long": self.draw.skipped_too_long})
        self.outputs = {"bank": "bank", "adapter": "adapter", "tokenizer": "tokenizer",
                        "written_memories": "written_memories.jsonl", "sft_draw": "sft_draw.json"}
        self.stats.update({
            "train_queries": len(self.train_rows), "train_keys": len(self.key_ids),
            "written_memories": len(self.written), "written_per_split": dict(Counter(m["split"] for m in self.written)),
            "think_samples": len(self.draw.items), "bank_size": len(self.bank),
            "memory_tokens_added": self.tok_ids.added,
            "bank_vectors": "re-encoded by the trained model" if self.args.refresh_keys else "frozen base model",
            "bank_key_space": {"pooling": self.bank.pooling, "standardised": self.bank.key_space.standardised}})
