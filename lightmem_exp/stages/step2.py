"""Stage step2: mixed memory SFT — write the step1 memories into the model so that the memory vector injected at
`<|memory_pad|>` decodes to the memory text, while plain SFT keeps ordinary chat alive (see conf/stage/step2.yaml).

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

import logging
import random
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightmem_exp.artifacts import (
    Manifest,
    atomic_dir,
    load_manifest,
    read_json,
    read_jsonl,
    write_jsonl,
    write_manifest,
)
from lightmem_exp.config import OPT_INT1, OPT_POSITIVE, int_at_least, is_bool, positive, require, require_all
from lightmem_exp.data.mixed_memory import MixedMemorySFTDataset, build_sft_only
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.data.sft_sampling import draw_within_limit
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.lit.recall_test import RecallTestCallback, recall_eval, recall_prompt_ids
from lightmem_exp.lit.step2 import DRAWS_FILE, MixedMemoryModule, memory_vocab_ids, sft_perplexity, start_from_step1
from lightmem_exp.lit.step2_packed import PackedMixedMemoryModule
from lightmem_exp.lit.trainer import make_trainer, resume_path, throughput_stats
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.generation import generate_with_recall
from lightmem_exp.models.loading import (
    ensure_memory_tokens,
    load_adapter,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    require_memory_tokens,
    save_adapter,
    validate_lora_cfg,
)
from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.stages.base import StageResult, load_upstream

log = logging.getLogger(__name__)
UPSTREAM = ("step1", "data")


def validate(cfg: DictConfig) -> None:
    s = "stage."
    require(cfg, s + "max_epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "lr", positive, "a number > 0")
    require(cfg, s + "weight_decay", lambda v: v >= 0, "a number >= 0")
    require(cfg, s + "warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)")
    require(cfg, s + "loss_reduction", lambda v: v in ("sample", "token"), "'sample' or 'token'")
    require(cfg, s + "sft_ratio", positive, "a number > 0 (1.5: every memory once per epoch)")
    require(cfg, s + "sft_max_tokens", lambda v: isinstance(v, int) and v >= 8, "an integer >= 8")
    require(cfg, s + "context_max_tokens", lambda v: isinstance(v, int) and v >= 0, "null or an integer >= 0",
            allow_none=True)
    require(cfg, s + "end_marker", lambda v: isinstance(v, str) and v.strip(), "a non-blank string")
    require(cfg, s + "full_think_only", lambda v: isinstance(v, bool), "true or false")
    require(cfg, s + "train_memory_vocab", lambda v: isinstance(v, bool), "true or false")
    require(cfg, s + "guard_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    require(cfg, s + "unwritten_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    require(cfg, s + "recall_test.sample_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    require(cfg, s + "recall_test.every_n_epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, s + "recall_test.prompt", lambda v: isinstance(v, str), "a string")
    require(cfg, s + "demo_size", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    require(cfg, s + "demo_max_new_tokens", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require_all(cfg, s, [
        ("packing.enabled", is_bool, "true or false"),
        ("packing.max_tokens", int_at_least(2), "null or an integer >= 2", True),
        ("packing.flatten", is_bool, "true or false"),
        ("recall_test.max_new_tokens", *OPT_INT1),
        ("ckpt_every_n_steps", *OPT_INT1),
        ("gradient_clip_val", *OPT_POSITIVE),
    ])
    attn = str(OmegaConf.select(cfg, "model.attn_implementation", default=None) or "")
    if cfg.stage.packing.enabled and not cfg.stage.packing.flatten and "flash" in attn:
        raise ConfigError("stage.packing.flatten", f"model.attn_implementation={attn} keeps packed samples apart only "
                          "in one flattened row: set stage.packing.flatten=true")
    validate_lora_cfg(lora_config(cfg), "stage.lora." if OmegaConf.select(cfg, "stage.lora") is not None else "lora.")


def lora_config(cfg: DictConfig) -> DictConfig:
    """The step2 LoRA: `stage.lora` when set (a stage-level override), else the global `lora=` group."""
    return cfg.stage.lora if OmegaConf.select(cfg, "stage.lora", default=None) is not None else cfg.lora


def load_data_manifest(cfg: DictConfig, step1: Manifest) -> Manifest:
    """`stage.inputs.data` when given, else the data manifest step1 was trained on, else this exp's data dir."""
    if OmegaConf.select(cfg, "stage.inputs.data", default=None):
        return load_upstream(cfg, "data")
    ref = step1.inputs.get("data", {}).get("manifest")
    return load_manifest(ref, expect_stage="data") if ref else load_upstream(cfg, "data")


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
    train = set(splits["train"])
    rows = [p for p in pairs if p["conv_id"] in train and p.get("query_kind") == "question"
            and any(m in written_ids for m in p["memory_ids"])]
    return random.Random(f"step2-demo/{seed}").sample(rows, min(n, len(rows)))


def run(cfg: DictConfig) -> StageResult:
    sdir, st = Path(cfg.runtime.stage_dir), cfg.stage
    step1 = load_upstream(cfg, "step1")
    data = load_data_manifest(cfg, step1)
    pool = read_artifact(data, "sft_pool")
    # Rows without a split come from a step1 that wrote train-split memories only.
    written = [{"id": m["id"], "text": m["text"], "split": m.get("split", "train")}
               for m in read_jsonl(step1.path("written_memories"))]
    if not written:
        raise LmxError(f"{step1.path('written_memories')}: no memories to write")

    # The base exactly as step1 set it up (same added tokens, same mean-initialised rows), then step1's tokenizer.
    model = load_model(cfg.model, cfg.paths.data, quant_cfg=cfg.quant)
    base_ids = ensure_memory_tokens(model, load_tokenizer(cfg.model, cfg.paths.data))
    tokenizer = AutoTokenizer.from_pretrained(str(step1.path("tokenizer")))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tok_ids = require_memory_tokens(tokenizer, step1.path("tokenizer"))
    if (tok_ids.recall, tok_ids.memory_pad) != (base_ids.recall, base_ids.memory_pad):
        raise LmxError(f"{step1.path('tokenizer')}: memory token ids {tok_ids.recall}/{tok_ids.memory_pad} differ "
                       f"from the base's {base_ids.recall}/{base_ids.memory_pad}; step1 used another model.*")

    bank = MemoryBank.load(step1.path("bank"))
    bank.check_compatible(model)
    row_of = {mid: i for i, mid in enumerate(bank.ids)}
    absent = [m["id"] for m in written if m["id"] not in row_of]
    if absent:
        raise LmxError(f"{step1.path('bank')}: the bank lacks written memories {absent[:5]}")
    bank_rows = [row_of[m["id"]] for m in written]
    vectors = bank.injection_vectors(bank_rows)

    marker_ids = tokenizer(st.end_marker, add_special_tokens=False)["input_ids"]
    dataset = MixedMemorySFTDataset(
        tokenizer, pool, written, recall_id=tok_ids.recall, memory_pad_id=tok_ids.memory_pad,
        end_marker=st.end_marker, sft_ratio=st.sft_ratio, sft_max_tokens=st.sft_max_tokens, seed=cfg.seed,
        full_think_only=st.full_think_only, context_max_tokens=st.context_max_tokens)
    guard = _guard_set(pool, st.guard_size, dataset, cfg.seed)
    dataset.pool = [r for r in dataset.pool if r["index"] not in {g["index"] for g in guard}]
    guard_samples = [build_sft_only(dataset.conversation(r)) for r in guard]

    # LoRA initialised to the step1 adapter (function-preserving), plus the trainable token rows.
    if cfg.trainer.gradient_checkpointing and not getattr(model, "is_loaded_in_4bit", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_for_kbit_training(model, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    token_rows = [tok_ids.recall, tok_ids.memory_pad]
    if st.train_memory_vocab:
        token_rows += [t for t in memory_vocab_ids(tokenizer, [m["text"] for m in written], marker_ids)
                       if t not in token_rows]
    model = start_from_step1(model, step1.path("adapter"), cfg.model, lora_config(cfg), token_rows)

    metrics: dict[str, float] = {}
    pad_id = tokenizer.pad_token_id
    if guard_samples:
        metrics["guard/ppl_before"] = sft_perplexity(model, guard_samples, pad_id, tok_ids.memory_pad, st.batch_size)

    max_mem = max(len(ids) for ids in dataset.memory_ids)
    max_new = st.recall_test.max_new_tokens or max_mem + len(marker_ids) + 8
    prompt_ids = recall_prompt_ids(tokenizer, st.recall_test.prompt, tok_ids.recall, tok_ids.memory_pad)
    test_rows = sorted(random.Random(f"step2-recall-test/{cfg.seed}").sample(
        range(len(written)), min(st.recall_test.sample_size, len(written))))
    recall_cb = RecallTestCallback(tokenizer, [written[i] for i in test_rows], test_rows, prompt_ids=prompt_ids,
                                   memory_pad_id=tok_ids.memory_pad, marker_ids=marker_ids, max_new_tokens=max_new,
                                   every_n_epochs=st.recall_test.every_n_epochs)

    packed = {"pack_max_tokens": st.packing.max_tokens, "pack_flatten": st.packing.flatten}
    module_cls, extra = (PackedMixedMemoryModule, packed) if st.packing.enabled else (MixedMemoryModule, {})
    module = module_cls(model, dataset, vectors, pad_id=pad_id, memory_pad_id=tok_ids.memory_pad,
                        batch_size=st.batch_size, lr=st.lr, weight_decay=st.weight_decay,
                        warmup_ratio=st.warmup_ratio, loss_reduction=st.loss_reduction,
                        draws_path=sdir / DRAWS_FILE, **extra)
    logger = make_logger(cfg, sdir)
    trainer = make_trainer(cfg, sdir, max_epochs=st.max_epochs, logger=logger, callbacks=[recall_cb],
                           ckpt_every_n_steps=st.ckpt_every_n_steps, gradient_clip_val=st.gradient_clip_val)
    module.train()  # from_pretrained returns eval mode and Lightning keeps it: gradient checkpointing would be off
    trainer.fit(module, ckpt_path=resume_path(cfg, sdir))
    throughput = throughput_stats(trainer, model)

    if not trainer.is_global_zero:
        return StageResult(stage="step2", dir=sdir, manifest=None, metrics=metrics)

    device = trainer.strategy.root_device
    if next(model.parameters()).device != device:  # Lightning's teardown may have moved the module to CPU
        module.to(device)
    if guard_samples:
        metrics["guard/ppl_after"] = sft_perplexity(model, guard_samples, pad_id, tok_ids.memory_pad, st.batch_size)
    scores, recall_rows = recall_eval(model, tokenizer, written, module.memory_vectors, prompt_ids=prompt_ids,
                                      memory_pad_id=tok_ids.memory_pad, marker_ids=marker_ids,
                                      max_new_tokens=max_new)
    metrics.update({f"recall/{k}": v for k, v in scores.items()})
    split_of = {m["id"]: m["split"] for m in written}
    for row in recall_rows:
        row["split"] = split_of[row["id"]]
    for split in sorted(set(split_of.values())):
        rows = [r for r in recall_rows if r["split"] == split]
        for key in ("exact_match", "token_f1"):
            metrics[f"recall/{split}/{key}"] = sum(r[key] for r in rows) / len(rows)
    metrics["headline"] = metrics["recall/exact_match"]
    unwritten = _unwritten_sample(bank, {m["id"] for m in written}, st.unwritten_size, cfg.seed)
    if unwritten:  # generalisation: memories never trained on, decoded from their step1 vectors
        entries = [bank.entries[i] for i in unwritten]
        longest = max(len(ids) for ids in tokenizer([e["text"] for e in entries], add_special_tokens=False)["input_ids"])
        scores, rows = recall_eval(model, tokenizer, entries, bank.injection_vectors(unwritten, device=device),
                                   prompt_ids=prompt_ids, memory_pad_id=tok_ids.memory_pad, marker_ids=marker_ids,
                                   max_new_tokens=st.recall_test.max_new_tokens or longest + len(marker_ids) + 8)
        metrics.update({f"recall/unwritten/{k}": v for k, v in scores.items()})
        recall_rows += [{**r, "split": "unwritten"} for r in rows]
    write_jsonl(sdir / "recall.jsonl", recall_rows)

    export = sdir / "export"
    with atomic_dir(export / "adapter") as tmp:
        save_adapter(model, tmp)
    del module, model, trainer
    merged_dir = export_merged(cfg, export / "adapter", tokenizer, export / "model")
    bank_out = MemoryBank(bank.vectors[bank_rows], [bank.entries[i] for i in bank_rows],
                          embed_scale=bank.embed_scale, model_name=bank.model_name, normalize=False)
    with atomic_dir(export / "bank") as tmp:
        bank_out.save(tmp)
    demo = run_demo(merged_dir, export / "bank", read_artifact(data, "recall_pairs"), read_json(data.path("splits")),
                    st, cfg.seed)
    write_jsonl(sdir / "demo.jsonl", demo)
    if demo:
        metrics["demo/memory_hit@1"] = sum(r["hit"] for r in demo) / len(demo)

    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if k != "headline"})
    record = dataset.record
    manifest = Manifest(
        stage="step2", seed=cfg.seed, metrics=metrics, run_id=run_id(logger),
        inputs={"step1": step1.ref(), "data": data.ref()},
        outputs={"model": "export/model", "tokenizer": "export/model", "bank": "export/bank",
                 "adapter": "export/adapter", "epoch_draws": DRAWS_FILE, "recall": "recall.jsonl",
                 "demo": "demo.jsonl"},
        stats={"throughput": throughput, "written_memories": len(written),
               "written_per_split": dict(Counter(m["split"] for m in written)), "samples_per_epoch": len(dataset),
               "memory_full_with_think_last_epoch": record.get("memory_full_with_think"),
               "guard_conversations": len(guard), "trainable_token_rows": len(token_rows),
               "end_marker": st.end_marker, "packing": OmegaConf.to_container(st.packing), "recall_test_history": recall_cb.history,
               "bank": "written memories only (step1 vectors), every write split", "lora": OmegaConf.to_container(lora_config(cfg))},
    )
    write_manifest(sdir, manifest)
    return StageResult(stage="step2", dir=sdir, manifest=manifest, metrics=metrics, headline=metrics["headline"])


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
def run_demo(model_dir: Path, bank_dir: Path, pairs: list[dict], splits: dict, st: DictConfig,
             seed: int) -> list[dict]:
    """Train-split questions about written memories: the prompt ends with `<recall>`, so the Memory Head picks a
    memory from the exported bank, its vector is injected, and the model continues (`generate_with_recall`)."""
    bank = MemoryBank.load(bank_dir)
    rows = _demo_rows(pairs, splits, set(bank.ids), st.demo_size, seed)
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
                                   max_new_tokens=st.demo_max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, use_sampling=False)
        trace = gen.recall_trace[0]
        chosen = trace[0]["memory_id"] if trace else None
        out.append({"question": p["query"], "expected_memory_ids": p["memory_ids"], "recalled_memory_id": chosen,
                    "hit": chosen in p["memory_ids"],
                    "generated": tokenizer.decode(gen.sequences[0, len(prompt):], skip_special_tokens=False),
                    "recall_trace": trace})
    return out
