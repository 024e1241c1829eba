"""Stage step2: mixed memory SFT — write the step1 memories into the model so that the memory vector injected at
`<|memory_pad|>` decodes to the memory text, while plain SFT keeps ordinary chat alive (`Step2Config`,
config/schema.py).

Outputs (stage dir):
  export/model      the LoRA merged into a full-precision base (`merge_and_unload`) + the tokenizer: one HF dir
  export/bank       the memory bank of the WRITTEN memories only (their step1 vectors, unchanged): the rows this
                    model was trained to decode; the full step1 bank stays upstream
  export/adapter    the adapter alone (LoRA + trainable token rows), applies to the plain base with `load_adapter`
  epoch_draws.jsonl every epoch's re-draw: pool indices per sample type, memory ids per type
  recall.jsonl      the final recall of every written memory and of `unwritten_size` never-written ones (split
                    "unwritten"): recalled text, exact match, token F1
  demo.jsonl        question -> <recall> -> memory -> continuation, generated from the export with the bank
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightmem_exp.artifacts import Manifest, atomic_dir, load_manifest, read_json, read_jsonl, write_jsonl
from lightmem_exp.config.schema import KeepQuery, Step2Config
from lightmem_exp.data.mixed_memory import MixedMemorySFTDataset, build_sft_only
from lightmem_exp.data.recall_queries import answer_memories, conversation_groups, pair_query_rows
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.data.sft_sampling import draw_within_limit
from lightmem_exp.errors import ConfigError, LmxError, UpstreamError
from lightmem_exp.lit.recall_test import RecallTestCallback, recall_eval, recall_prompt_ids
from lightmem_exp.lit.step2 import (
    DRAWS_FILE,
    MixedMemoryModule,
    QueryAnchor,
    memory_vocab_ids,
    sft_perplexity,
    start_from_step1,
)
from lightmem_exp.lit.step2_packed import PackedMixedMemoryModule
from lightmem_exp.lit.trainer import make_trainer, resume_path, throughput_stats
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.generation import generate_with_recall
from lightmem_exp.models.loading import (
    MemoryTokenIds,
    ensure_memory_tokens,
    load_adapter,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    require_memory_tokens,
    save_adapter,
)
from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.stages.base import Recipe, StageResult, load_upstream
from lightmem_exp.stages.step1 import conversation_retrieval


def lora_config(cfg: DictConfig) -> DictConfig:
    """The step2 LoRA: `step2.lora` when set, else the global `lora=` group."""
    return cfg.step2.lora if OmegaConf.select(cfg, "step2.lora", default=None) is not None else cfg.lora


def load_data_manifest(cfg: DictConfig, step1: Manifest) -> Manifest:
    """`step2.inputs.data` when given, else the data manifest step1 was trained on, else this exp's data dir."""
    if OmegaConf.select(cfg, "step2.inputs.data", default=None):
        return load_upstream(cfg, "data")
    ref = step1.inputs.get("data", {}).get("manifest")
    return load_manifest(ref, expect_stage="data") if ref else load_upstream(cfg, "data")


def memory_dataset(args: Step2Config, tokenizer, pool: list[dict], memories: list[dict], ids: MemoryTokenIds,
                   seed: int, sft_ratio: float | None = None) -> MixedMemorySFTDataset:
    """The stage's mixed memory dataset over `memories` (`sft_ratio`: instead of step2.sft_ratio)."""
    return MixedMemorySFTDataset(
        tokenizer, pool, memories, recall_id=ids.recall, memory_pad_id=ids.memory_pad, end_marker=args.end_marker,
        sft_ratio=args.sft_ratio if sft_ratio is None else sft_ratio, sft_max_tokens=args.sft_max_tokens, seed=seed,
        full_think_only=args.full_think_only, context_max_tokens=args.context_max_tokens)


def trainable_token_rows(args: Step2Config, tokenizer, ids: MemoryTokenIds, memories: list[dict]) -> list[int]:
    """The embedding rows step2 trains: the memory tokens, plus the memories' vocabulary with train_memory_vocab."""
    rows = [ids.recall, ids.memory_pad]
    if args.train_memory_vocab:
        marker = tokenizer(args.end_marker, add_special_tokens=False)["input_ids"]
        rows += [t for t in memory_vocab_ids(tokenizer, [m["text"] for m in memories], marker) if t not in rows]
    return rows


def mixed_memory_module(args: Step2Config, model: torch.nn.Module, dataset: MixedMemorySFTDataset,
                        vectors: torch.Tensor, *, pad_id: int, memory_pad_id: int, packed: bool,
                        draws_path: Path | None = None, query_anchor: QueryAnchor | None = None) -> MixedMemoryModule:
    """The Lightning module step2 trains (`packed`: several samples per row, block-diagonal attention)."""
    extra = {"pack_max_tokens": args.packing.max_tokens, "pack_flatten": args.packing.flatten} if packed else {}
    return (PackedMixedMemoryModule if packed else MixedMemoryModule)(
        model, dataset, vectors, pad_id=pad_id, memory_pad_id=memory_pad_id, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, loss_reduction=args.loss_reduction,
        draws_path=draws_path, query_anchor=query_anchor, **extra)


def step1_settings(step1: Manifest) -> DictConfig:
    """step1's own knobs from its saved config (the anchor uses its question sample, temperature and query length)."""
    saved = step1.dir / "config.yaml"
    if not saved.is_file():
        raise UpstreamError(f"{saved}: step1's saved config is missing (step2.keep_query reads its question sample, "
                            "temperature and query length); rerun step1 or set step2.keep_query.weight=0")
    return OmegaConf.load(saved).step1


def query_anchor(s1: DictConfig, data: Manifest, pairs: list[dict], bank: MemoryBank, tokenizer: Any, recall_id: int,
                 keep: KeepQuery, seed: int) -> QueryAnchor:
    """step1's training questions and frozen keys (the step1 bank's vectors of its training memories), with step1's
    own sample, temperature, query length and conversation negatives (`s1`, `step1_settings`)."""
    train = set(read_json(data.path("splits"))["train"])
    row_of = {mid: i for i, mid in enumerate(bank.ids)}
    keys = [m for m in answer_memories(read_artifact(data, "memories"), pairs, train) if m["id"] in row_of]
    rows = pair_query_rows(tokenizer, pairs, keys, train, recall_id, s1.max_query_tokens, s1.max_train_queries, seed)
    if not rows:
        raise LmxError(f"step2.keep_query: {data.dir} has no train question whose memory is in {bank.path}; "
                       "set step2.keep_query.weight=0")
    groups = torch.tensor(conversation_groups(keys)) if s1.get("negatives") == "conversation" else None
    return QueryAnchor(rows, bank.vectors[[row_of[m["id"]] for m in keys]], bank.key_space, keep.weight,
                       keep.batch_size, float(s1.temperature), tokenizer.pad_token_id, seed, key_groups=groups)


def _guard_set(pool: list[dict], size: int, ds: MixedMemorySFTDataset, seed: int) -> list[dict]:
    """Held-out plain conversations (fixed for the run) for the perplexity guard; never drawn for training."""
    if size == 0:
        return []
    plain = [r for r in pool if not ds.conversation_has_think(r)]
    return draw_within_limit(plain, size, n_tokens=ds.chat_length, max_tokens=ds.sft_max_tokens,
                             rng=random.Random(f"step2-guard/{seed}"), what="step2 guard set").items


def _unwritten_sample(bank: MemoryBank, written_ids: set[str], n: int, seed: int) -> list[int]:
    """Bank rows of `n` memories step2 does not write (seeded), in bank order."""
    rows = [i for i, mid in enumerate(bank.ids) if mid not in written_ids]
    return sorted(random.Random(f"step2-unwritten/{seed}").sample(rows, min(n, len(rows))))


def _demo_rows(pairs: list[dict], splits: dict, written_ids: set[str], n: int, seed: int) -> list[dict]:
    """Questions about written memories, from the train split when step2 wrote train memories (else from the split
    it wrote: a showcase of the path, the measurement is eval's `written/recall/*`)."""
    rows = [p for p in pairs if p.get("query_kind") == "question" and any(m in written_ids for m in p["memory_ids"])]
    train = set(splits["train"])
    rows = [p for p in rows if p["conv_id"] in train] or rows
    return random.Random(f"step2-demo/{seed}").sample(rows, min(n, len(rows)))


class Step2Recipe(Recipe):
    name = "step2"

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        attn = str(OmegaConf.select(cfg, "model.attn_implementation", default=None) or "")
        packing = cfg.step2.packing
        if packing.enabled and not packing.flatten and "flash" in attn:
            raise ConfigError("step2.packing.flatten", f"model.attn_implementation={attn} keeps packed samples apart "
                              "only in one flattened row: set step2.packing.flatten=true")

    def run(self) -> StageResult:
        self.read_upstream()
        self.setup_model()
        self.setup_data()
        self.train()
        if not self.trainer.is_global_zero:
            return self.result_without_manifest()
        self.evaluate()
        self.export()
        self.demo()
        return self.finish(self.metrics["headline"])

    def read_upstream(self) -> None:
        """step1's written memories, tokenizer and bank vectors (checked against the model before any data work)."""
        self.step1 = step1 = self.upstream("step1")
        self.data = self.upstream("data", load_data_manifest(self.cfg, step1))
        # Rows without a split come from a step1 that wrote train-split memories only.
        self.written = [{"id": m["id"], "text": m["text"], "split": m.get("split", "train")}
                        for m in read_jsonl(step1.path("written_memories"))]
        if not self.written:
            raise LmxError(f"{step1.path('written_memories')}: no memories to write")
        self.tokenizer = AutoTokenizer.from_pretrained(str(step1.path("tokenizer")))
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tok_ids = require_memory_tokens(self.tokenizer, step1.path("tokenizer"))
        self.bank = MemoryBank.load(step1.path("bank"))
        row_of = {mid: i for i, mid in enumerate(self.bank.ids)}
        absent = [m["id"] for m in self.written if m["id"] not in row_of]
        if absent:
            raise LmxError(f"{step1.path('bank')}: the bank lacks written memories {absent[:5]}")
        self.bank_rows = [row_of[m["id"]] for m in self.written]
        self.vectors = self.bank.injection_vectors(self.bank_rows)
        self.marker_ids = self.tokenizer(self.args.end_marker, add_special_tokens=False)["input_ids"]

    def setup_data(self) -> MixedMemorySFTDataset:
        """The mixed memory dataset over the data stage's SFT pool, less the held-out guard conversations; step1's
        training questions and keys for the query anchor (`step2.keep_query`)."""
        a, seed = self.args, self.cfg.seed
        pool = read_artifact(self.data, "sft_pool")
        self.dataset = memory_dataset(a, self.tokenizer, pool, self.written, self.tok_ids, seed)
        self.guard = _guard_set(pool, a.guard_size, self.dataset, seed)
        guard_ids = {g["index"] for g in self.guard}
        self.dataset.pool = [r for r in self.dataset.pool if r["index"] not in guard_ids]
        self.guard_samples = [build_sft_only(self.dataset.conversation(r)) for r in self.guard]
        self.anchor = None
        if a.keep_query.weight > 0:
            self.step1_args = step1_settings(self.step1)
            self.pairs = read_artifact(self.data, "recall_pairs")
            self.anchor = query_anchor(self.step1_args, self.data, self.pairs, self.bank, self.tokenizer,
                                       self.tok_ids.recall, a.keep_query, seed)
        return self.dataset

    def setup_model(self) -> torch.nn.Module:
        """The base exactly as step1 set it up (same added tokens, same mean-initialised rows), LoRA initialised to
        the step1 adapter (function-preserving), plus the trainable token rows."""
        cfg = self.cfg
        model = load_model(cfg.model, cfg.paths.data, quant_cfg=cfg.quant)
        base_ids = ensure_memory_tokens(model, load_tokenizer(cfg.model, cfg.paths.data))
        if (self.tok_ids.recall, self.tok_ids.memory_pad) != (base_ids.recall, base_ids.memory_pad):
            raise LmxError(f"{self.step1.path('tokenizer')}: memory token ids {self.tok_ids.recall}/"
                           f"{self.tok_ids.memory_pad} differ from the base's {base_ids.recall}/"
                           f"{base_ids.memory_pad}; step1 used another model.*")
        self.bank.check_compatible(model)
        if cfg.trainer.gradient_checkpointing and not getattr(model, "is_loaded_in_4bit", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = prepare_for_kbit_training(model, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
        self.token_rows = trainable_token_rows(self.args, self.tokenizer, self.tok_ids, self.written)
        self.model = start_from_step1(model, self.step1.path("adapter"), cfg.model, lora_config(cfg), self.token_rows)
        return self.model

    def module(self, model: torch.nn.Module, packed: bool) -> MixedMemoryModule:
        """The stage's Lightning module over `model`, the dataset and the written memories' vectors."""
        return mixed_memory_module(self.args, model, self.dataset, self.vectors, pad_id=self.tokenizer.pad_token_id,
                                   memory_pad_id=self.tok_ids.memory_pad, packed=packed,
                                   draws_path=self.dir / DRAWS_FILE, query_anchor=self.anchor)

    def train(self) -> None:
        """Lightning fit from the stage's own checkpoint when one exists, with the recall test every few epochs;
        the guard perplexity before training."""
        a, cfg = self.args, self.cfg
        if self.guard_samples:
            self.metrics["guard/ppl_before"] = sft_perplexity(self.model, self.guard_samples,
                                                              self.tokenizer.pad_token_id, self.tok_ids.memory_pad,
                                                              a.batch_size)
        max_mem = max(len(ids) for ids in self.dataset.memory_ids)
        self.max_new_tokens = a.recall_test.max_new_tokens or max_mem + len(self.marker_ids) + 8
        self.prompt_ids = recall_prompt_ids(self.tokenizer, a.recall_test.prompt, self.tok_ids.recall,
                                            self.tok_ids.memory_pad)
        test_rows = sorted(random.Random(f"step2-recall-test/{cfg.seed}").sample(
            range(len(self.written)), min(a.recall_test.sample_size, len(self.written))))
        self.recall_cb = RecallTestCallback(
            self.tokenizer, [self.written[i] for i in test_rows], test_rows, prompt_ids=self.prompt_ids,
            memory_pad_id=self.tok_ids.memory_pad, marker_ids=self.marker_ids, max_new_tokens=self.max_new_tokens,
            every_n_epochs=a.recall_test.every_n_epochs)
        self.lit_module = self.module(self.model, a.packing.enabled)
        self.logger = make_logger(cfg, self.dir)
        self.trainer = make_trainer(cfg, self.dir, max_epochs=a.max_epochs, logger=self.logger,
                                    callbacks=[self.recall_cb], ckpt_every_n_steps=a.ckpt_every_n_steps,
                                    gradient_clip_val=a.gradient_clip_val)
        # from_pretrained returns eval mode and Lightning keeps it: gradient checkpointing would be off
        self.lit_module.train()
        self.trainer.fit(self.lit_module, ckpt_path=resume_path(cfg, self.dir))
        self.throughput = throughput_stats(self.trainer, self.model)

    def evaluate(self) -> None:
        """Rank 0: guard perplexity after training, the recall of every written memory (per split) and of a sample
        of never-written ones decoded from their step1 vectors; recall.jsonl."""
        a, model, tokenizer, ids = self.args, self.model, self.tokenizer, self.tok_ids
        device = self.trainer.strategy.root_device
        if next(model.parameters()).device != device:  # Lightning's teardown may have moved the module to CPU
            self.lit_module.to(device)
        if self.guard_samples:
            self.metrics["guard/ppl_after"] = sft_perplexity(model, self.guard_samples, tokenizer.pad_token_id,
                                                             ids.memory_pad, a.batch_size)
        if self.anchor is not None:  # did the <recall> query survive? step1 reports the same before step2
            s1 = self.step1_args
            retrieval = conversation_retrieval(model, tokenizer, self.bank, self.pairs,
                                               read_json(self.data.path("splits"))["val"], ids.recall,
                                               s1.max_query_tokens, a.batch_size, list(s1.eval_ks), baselines=False)
            self.metrics.update({f"query/val_conv/{k}": v for k, v in retrieval.items()})
        scores, recall_rows = recall_eval(model, tokenizer, self.written, self.lit_module.memory_vectors,
                                          prompt_ids=self.prompt_ids, memory_pad_id=ids.memory_pad,
                                          marker_ids=self.marker_ids, max_new_tokens=self.max_new_tokens)
        self.metrics.update({f"recall/{k}": v for k, v in scores.items()})
        split_of = {m["id"]: m["split"] for m in self.written}
        for row in recall_rows:
            row["split"] = split_of[row["id"]]
        for split in sorted(set(split_of.values())):
            rows = [r for r in recall_rows if r["split"] == split]
            for key in ("exact_match", "token_f1"):
                self.metrics[f"recall/{split}/{key}"] = sum(r[key] for r in rows) / len(rows)
        self.metrics["headline"] = self.metrics["recall/exact_match"]
        unwritten = _unwritten_sample(self.bank, set(split_of), a.unwritten_size, self.cfg.seed)
        if unwritten:  # generalisation: memories never trained on, decoded from their step1 vectors
            entries = [self.bank.entries[i] for i in unwritten]
            texts = tokenizer([e["text"] for e in entries], add_special_tokens=False)["input_ids"]
            longest = max(len(t) for t in texts)
            scores, rows = recall_eval(
                model, tokenizer, entries, self.bank.injection_vectors(unwritten, device=device),
                prompt_ids=self.prompt_ids, memory_pad_id=ids.memory_pad, marker_ids=self.marker_ids,
                max_new_tokens=a.recall_test.max_new_tokens or longest + len(self.marker_ids) + 8)
            self.metrics.update({f"recall/unwritten/{k}": v for k, v in scores.items()})
            recall_rows += [{**r, "split": "unwritten"} for r in rows]
        write_jsonl(self.dir / "recall.jsonl", recall_rows)

    def export(self) -> None:
        """Rank 0: the adapter, the merged full-precision model with the tokenizer, the written memories' bank (each
        written atomically); the training model is released first."""
        export = self.dir / "export"
        with atomic_dir(export / "adapter") as tmp:
            save_adapter(self.model, tmp)
        del self.lit_module, self.model, self.trainer
        export_merged(self.cfg, export / "adapter", self.tokenizer, export / "model")
        with atomic_dir(export / "bank") as tmp:
            self.bank.subset(self.bank_rows).save(tmp)
        self.outputs = {"model": "export/model", "tokenizer": "export/model", "bank": "export/bank",
                        "adapter": "export/adapter", "epoch_draws": DRAWS_FILE, "recall": "recall.jsonl",
                        "demo": "demo.jsonl"}
        self.stats = {
            "throughput": self.throughput, "written_memories": len(self.written),
            "written_per_split": dict(Counter(m["split"] for m in self.written)),
            "samples_per_epoch": len(self.dataset),
            "memory_full_with_think_last_epoch": self.dataset.record.get("memory_full_with_think"),
            "guard_conversations": len(self.guard), "trainable_token_rows": len(self.token_rows),
            "end_marker": self.args.end_marker, "packing": OmegaConf.to_container(self.cfg.step2.packing),
            "recall_test_history": self.recall_cb.history,
            "bank": "written memories only (step1 vectors), every write split",
            "lora": OmegaConf.to_container(lora_config(self.cfg))}

    def demo(self) -> None:
        """Rank 0: demo.jsonl from the export, and how often the Memory Head picked an expected memory."""
        demo = run_demo(self.dir / "export" / "model", self.dir / "export" / "bank",
                        read_artifact(self.data, "recall_pairs"), read_json(self.data.path("splits")), self.args,
                        self.cfg.seed)
        write_jsonl(self.dir / "demo.jsonl", demo)
        if demo:
            self.metrics["demo/memory_hit@1"] = sum(r["hit"] for r in demo) / len(demo)


def export_merged(cfg: DictConfig, adapter_dir: Path, tokenizer, out_dir: Path) -> Path:
    """Base in full precision (never the 4-bit weights) + the adapter, merged, saved with the tokenizer."""
    base = load_model(cfg.model, cfg.paths.data)
    ensure_memory_tokens(base, load_tokenizer(cfg.model, cfg.paths.data))
    merged = load_adapter(base, adapter_dir, cfg.model).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir


@torch.no_grad()
def run_demo(model_dir: Path, bank_dir: Path, pairs: list[dict], splits: dict, args: Step2Config,
             seed: int) -> list[dict]:
    """Questions about written memories (`_demo_rows`): the prompt ends with `<recall>`, so the Memory Head picks a
    memory from the exported bank, its vector is injected, and the model continues (`generate_with_recall`)."""
    bank = MemoryBank.load(bank_dir)
    rows = _demo_rows(pairs, splits, set(bank.ids), args.demo_size, seed)
    if not rows:
        return []
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = require_memory_tokens(tokenizer, model_dir)
    out = []
    for p in rows:
        prompt = chat_token_ids(tokenizer, [{"role": "user", "content": p["query"]}], add_generation_prompt=True)
        gen = generate_with_recall(model, torch.tensor([[*prompt, ids.recall]]), bank=bank,
                                   recall_token_id=ids.recall, memory_pad_token_id=ids.memory_pad,
                                   max_new_tokens=args.demo_max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, use_sampling=False)
        trace = gen.recall_trace[0]
        chosen = trace[0]["memory_id"] if trace else None
        out.append({"question": p["query"], "expected_memory_ids": p["memory_ids"], "recalled_memory_id": chosen,
                    "hit": chosen in p["memory_ids"],
                    "generated": tokenizer.decode(gen.sequences[0, len(prompt):], skip_special_tokens=False),
                    "recall_trace": trace})
    return out
