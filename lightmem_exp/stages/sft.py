"""Stage sft: a LoRA adapter for fact QA and memory-update decisions, measured before vs after (conf/stage/sft.yaml).

Data (all seeded by `seed`):
- train: a sample of `fact_qa` and `update_decisions` rows of the train split's conversations (caps
  `stage.max_train_samples.*`), plus general `sft_pool` conversations making up `general_fraction` of the mix;
- val: the same from the val split (`stage.max_val_samples.*`), general share alike; early stopping and the best
  epoch use its assistant-token loss;
- test: `eval.max_fact_qa` fact_qa and `eval.max_update` update_decisions rows of the test split, and
  `eval.max_general` general conversations. `sft_pool` has no split: one seeded shuffle of it is dealt out to
  test, val and train in that order, so the three never share a conversation.
Samples longer than `stage.max_seq_len` tokens are skipped (counted in `stats.skipped`), never truncated.

Metrics (manifest), each `_before` on the base model and `_after` on base + the best epoch's adapter:
`factqa/{em,f1}` (closed-book, test split, SQuAD normalisation), `factqa_train/{em,f1}` (the same on trained
samples: knowledge injection), `update/{acc,json_ok,json_strict}` (through the local_hf_lora backend's parsing),
`general/ppl` (assistant tokens of held-out sft_pool conversations), and `val/loss` (best epoch; the headline,
lower is better). Outputs: `export/adapter` (PEFT), `export/backend_config.json` (a `local_hf_lora` config for
this adapter), `eval_predictions.jsonl` (every scored reply, before and after).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightmem_exp.artifacts import (
    Manifest,
    atomic_dir,
    read_json,
    write_json,
    write_jsonl,
    write_manifest,
)
from lightmem_exp.backends.local_hf_lora import HFChatGenerator, LocalHFLoraBackend, LocalHFLoraConfig
from lightmem_exp.config import positive, require
from lightmem_exp.data.chat_sft import MASK_METHODS, ChatSftDataset, encode_rows
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.lit.sft import (
    ChatSftModule,
    fact_qa_scores,
    perplexity,
    restore_best,
    sft_callbacks,
    update_scores,
)
from lightmem_exp.lit.trainer import make_trainer, resume_path, throughput_stats
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, prepare_for_kbit_training, save_adapter
from lightmem_exp.stages.base import StageResult, load_upstream

log = logging.getLogger(__name__)
UPSTREAM = ("data",)
GROUPS = ("fact_qa", "update_decisions", "general")
TASKS = ("fact_qa", "update_decisions")


def _int_at_least(n: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def validate(cfg: DictConfig) -> None:
    s = "stage."
    require(cfg, s + "max_epochs", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "batch_size", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "lr", positive, "a number > 0")
    require(cfg, s + "weight_decay", lambda v: v >= 0, "a number >= 0")
    require(cfg, s + "warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)")
    require(cfg, s + "max_seq_len", _int_at_least(16), "an integer >= 16")
    require(cfg, s + "general_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)")
    for group in ("max_train_samples", "max_val_samples"):
        for task in TASKS:
            require(cfg, f"{s}{group}.{task}", _int_at_least(1), "null or an integer >= 1", allow_none=True)
    require(cfg, s + "early_stopping.patience", _int_at_least(1), "null or an integer >= 1", allow_none=True)
    require(cfg, s + "early_stopping.min_delta", lambda v: v >= 0, "a number >= 0")
    require(cfg, s + "gradient_clip_val", positive, "null or a number > 0", allow_none=True)
    require(cfg, s + "ckpt_every_n_steps", _int_at_least(1), "null or an integer >= 1", allow_none=True)
    require(cfg, s + "mask_method", lambda v: v in MASK_METHODS, f"one of {list(MASK_METHODS)}")
    for key in ("max_fact_qa", "max_fact_qa_train", "max_update", "max_general", "max_retries"):
        require(cfg, f"{s}eval.{key}", _int_at_least(0), "an integer >= 0")
    require(cfg, s + "eval.batch_size", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "eval.max_new_tokens", lambda v: _int_at_least(1)(v) and v < cfg.stage.max_seq_len,
            "an integer >= 1 and < stage.max_seq_len")
    if cfg.quant.mode == "nf4" and cfg.model.init == "random":
        raise ConfigError("quant.mode", "nf4 needs pretrained weights; use quant=none with model.init=random")


def _sample(rows: list[dict], cap: int | None, rng: random.Random) -> list[dict]:
    return rows if cap is None or len(rows) <= cap else sorted(rng.sample(rows, cap), key=lambda r: r["id"])


def _share(n_task: int, fraction: float) -> int:
    """General conversations to add to `n_task` task samples so they are `fraction` of the mix."""
    return math.ceil(n_task * fraction / (1 - fraction)) if n_task and fraction else 0


def _deal_general(pool: list[dict], quotas: dict[str, int], encode, seed: int) -> tuple[dict[str, list], Counter]:
    """Deal a seeded shuffle of the pool out to the quotas in order (test, val, train), encoding as it goes;
    a pool that runs out is an error, never a smaller set."""
    order = list(range(len(pool)))
    random.Random(f"{seed}:sft:general").shuffle(order)
    dealt: dict[str, list] = {k: [] for k in quotas}
    skipped: Counter = Counter()
    it = iter(order)
    for name, want in quotas.items():
        while len(dealt[name]) < want:
            i = next(it, None)
            if i is None:
                raise LmxError(f"the sft_pool ran out: {name} needs {want} general conversations within the token "
                               f"limit, got {len(dealt[name])} ({dict(skipped)}); lower stage.general_fraction or "
                               "stage.eval.max_general, or raise stage.max_seq_len")
            enc, skip = encode([pool[i]])
            skipped += skip
            dealt[name] += [{**e, "pool_index": pool[i]["index"]} for e in enc]
    return dealt, skipped


def _device(cfg: DictConfig) -> str | None:
    """Where the model is loaded (and quantised): this rank's CUDA device when the trainer uses one, else CPU."""
    accel = str(OmegaConf.select(cfg, "trainer.lightning.accelerator", default="cpu"))
    if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def _measure(model, tokenizer, sets: dict, ev: DictConfig, max_seq_len: int, pad_id: int, tag: str,
             predictions: dict) -> dict[str, float]:
    """Every before/after metric on `model` as it is now; replies go into `predictions[row id][tag]`."""
    gen_kwargs = {"max_new_tokens": ev.max_new_tokens, "do_sample": False}
    generate = HFChatGenerator(model, tokenizer, gen_kwargs=gen_kwargs, batch_size=ev.batch_size)
    out: dict[str, float] = {}
    for group in ("factqa", "factqa_train"):
        if sets[group]:
            scores, preds = fact_qa_scores(generate, sets[group])
            out.update({f"{group}/{k}_{tag}": v for k, v in scores.items()})
            for r, p in zip(sets[group], preds, strict=True):
                predictions[(group, r["id"])][tag] = p
    if sets["update"]:
        backend = LocalHFLoraBackend.from_model(model, tokenizer, LocalHFLoraConfig(
            base_model=str(model.name_or_path), max_seq_len=max_seq_len, gen_kwargs=gen_kwargs,
            max_retries=ev.max_retries, batch_size=ev.batch_size))
        scores, records = update_scores(backend, sets["update"])
        out.update({f"update/{k}_{tag}": v for k, v in scores.items()})
        for r, rec in zip(sets["update"], records, strict=True):
            predictions[("update", r["id"])][tag] = rec
    if sets["general"]:
        out[f"general/ppl_{tag}"] = perplexity(model, sets["general"], pad_id=pad_id, batch_size=ev.batch_size)
    log.info("sft %s: %s", tag, {k: round(v, 4) for k, v in out.items()})
    return out


def run(cfg: DictConfig) -> StageResult:
    t0 = time.perf_counter()
    sdir, st = Path(cfg.runtime.stage_dir), cfg.stage
    ev = st.eval
    data = load_upstream(cfg, "data")
    splits = {k: set(v) for k, v in read_json(data.path("splits")).items()}
    rows = {t: read_artifact(data, t) for t in TASKS}
    pool = read_artifact(data, "sft_pool")

    tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
    pad_id = tokenizer.pad_token_id

    def encode(batch, group="general"):
        return encode_rows(tokenizer, batch, max_seq_len=st.max_seq_len, group=group, method=st.mask_method)

    def split_rows(task: str, split: str) -> list[dict]:
        return [r for r in rows[task] if r["conv_id"] in splits[split]]

    # Train / val task samples (seeded caps); samples over stage.max_seq_len are skipped and counted.
    skipped: Counter = Counter()
    train, val = [], []
    for task in TASKS:
        for split, caps, out in (("train", st.max_train_samples, train), ("val", st.max_val_samples, val)):
            chosen = _sample(split_rows(task, split), caps[task], random.Random(f"{cfg.seed}:sft:{split}:{task}"))
            enc, skip = encode(chosen, task)
            skipped += Counter({f"{split}/{k}": v for k, v in skip.items()})
            out += enc
    if not train:
        raise LmxError(f"no training samples: the train split of {data.dir} has no fact_qa/update_decisions rows "
                       f"within stage.max_seq_len={st.max_seq_len}")
    if not val:
        raise LmxError(f"no validation samples: the val split of {data.dir} has none within stage.max_seq_len; "
                       "early stopping needs a val set")

    # Test sets (rows within the same token limit) and the general pool dealt to test, val, train.
    def take(candidates: list[dict], cap: int, task: str, salt: str) -> list[dict]:
        order = list(candidates)
        random.Random(f"{cfg.seed}:sft:{salt}").shuffle(order)
        chosen = []
        for r in order:
            if len(chosen) == cap:
                break
            if encode([r], task)[0]:
                chosen.append(r)
        return sorted(chosen, key=lambda r: r["id"])

    trained_ids = {e["id"] for e in train}
    test_sets = {
        "factqa": take(split_rows("fact_qa", "test"), ev.max_fact_qa, "fact_qa", "test:fact_qa"),
        "update": take(split_rows("update_decisions", "test"), ev.max_update, "update_decisions",
                       "test:update_decisions"),
        "factqa_train": take([r for r in split_rows("fact_qa", "train") if r["id"] in trained_ids],
                             ev.max_fact_qa_train, "fact_qa", "seen"),
    }
    quotas = {"test": ev.max_general, "val": _share(len(val), st.general_fraction),
              "train": _share(len(train), st.general_fraction)}
    for name, cap in (("factqa", ev.max_fact_qa), ("update", ev.max_update), ("factqa_train", ev.max_fact_qa_train)):
        if cap and not test_sets[name]:
            log.warning("sft: no %s rows within stage.max_seq_len for evaluation; its metrics are not written", name)
    general, skip = _deal_general(pool, quotas, encode, cfg.seed)
    skipped += Counter({f"general/{k}": v for k, v in skip.items()})
    train += general["train"]
    val += general["val"]
    test_sets["general"] = general["test"]

    # Before: the base model as loaded.
    device = _device(cfg)
    if device is None:
        # Denormal floats appear as the LoRA weights train and make CPU kernels several times slower (measured on
        # the tiny model: epochs went 6 s -> 41 s -> 57 s without this, a steady 6 s with it).
        torch.set_flush_denormal(True)
    model = load_model(cfg.model, cfg.paths.data, quant_cfg=cfg.quant, device=device)
    predictions: dict = {key: {} for group in ("factqa", "factqa_train", "update")
                         for key in ((group, r["id"]) for r in test_sets[group])}
    seconds = {"prepare": time.perf_counter() - t0}  # read, encode and load the model
    metrics: dict[str, float] = _measure(model, tokenizer, test_sets, ev, st.max_seq_len, pad_id, "before",
                                         predictions)
    seconds["measure_before"] = time.perf_counter() - t0 - sum(seconds.values())

    # LoRA (QLoRA when 4-bit): only the adapter trains.
    quantised = bool(getattr(model, "is_loaded_in_4bit", False))
    model = prepare_for_kbit_training(model, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    if cfg.trainer.gradient_checkpointing and not quantised:
        if hasattr(model, "activation_checkpointing_enable"):  # the name transformers >= 5 uses
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, cfg.lora)
    module = ChatSftModule(model, lr=st.lr, weight_decay=st.weight_decay, warmup_ratio=st.warmup_ratio,
                           groups=GROUPS)
    train_ds, val_ds = ChatSftDataset(train, GROUPS), ChatSftDataset(val, GROUPS)
    loaders = {
        "train_dataloaders": ResumableLoader(train_ds, batch_size=st.batch_size, shuffle=True, seed=cfg.seed,
                                             collate_fn=lambda b: train_ds.collate(b, pad_id)),
        "val_dataloaders": DataLoader(val_ds, batch_size=ev.batch_size, shuffle=False,
                                      collate_fn=lambda b: val_ds.collate(b, pad_id)),
    }
    logger = make_logger(cfg, sdir)
    callbacks = sft_callbacks(sdir, patience=st.early_stopping.patience, min_delta=st.early_stopping.min_delta)
    trainer = make_trainer(cfg, sdir, max_epochs=st.max_epochs, logger=logger, callbacks=callbacks,
                           ckpt_every_n_steps=st.ckpt_every_n_steps, gradient_clip_val=st.gradient_clip_val)
    module.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds (LoRA dropout)
    trainer.fit(module, **loaders, ckpt_path=resume_path(cfg, sdir))
    throughput = throughput_stats(trainer, model)
    seconds["train"] = time.perf_counter() - t0 - sum(seconds.values())
    best = restore_best(module, callbacks)
    if device is not None:  # Lightning's teardown moved the model to CPU
        model.to(device)
    stopped_early = any(getattr(c, "stopped_epoch", 0) for c in callbacks)

    # After: base + the best epoch's adapter.
    metrics.update(_measure(model, tokenizer, test_sets, ev, st.max_seq_len, pad_id, "after", predictions))
    seconds["measure_after"] = time.perf_counter() - t0 - sum(seconds.values())
    metrics["val/loss"] = best["val_loss"]
    metrics["headline"] = best["val_loss"]

    manifest = None
    if trainer.is_global_zero:
        adapter_dir = sdir / "export" / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            save_adapter(model, tmp)
        backend_cfg = {"base_model": str(model.peft_config["default"].base_model_name_or_path),
                       "adapter_path": str(adapter_dir.resolve()), "device_map": "auto",
                       "torch_dtype": str(cfg.model.torch_dtype), "max_seq_len": int(st.max_seq_len),
                       "gen_kwargs": {"max_new_tokens": int(ev.max_new_tokens), "do_sample": False},
                       "max_retries": 2, "batch_size": int(ev.batch_size),
                       "quant": OmegaConf.to_container(cfg.quant) if cfg.quant.mode != "none" else None,
                       "attn_implementation": cfg.model.get("attn_implementation")}
        LocalHFLoraConfig.from_mapping(backend_cfg)  # what is written must load
        write_json(sdir / "export" / "backend_config.json", backend_cfg)
        write_jsonl(sdir / "eval_predictions.jsonl",
                    ({"set": group, "id": rid, **preds} for (group, rid), preds in predictions.items()))
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "headline"})
        counts = Counter(e["group"] for e in train)
        manifest = Manifest(
            stage="sft", seed=cfg.seed, metrics=metrics, run_id=run_id(logger), inputs={"data": data.ref()},
            outputs={"adapter": "export/adapter", "backend_config": "export/backend_config.json",
                     "eval_predictions": "eval_predictions.jsonl"},
            stats={"throughput": throughput, "train_samples": dict(sorted(counts.items())), "train_total": len(train),
                   "val_samples": dict(sorted(Counter(e["group"] for e in val).items())),
                   "test_samples": {k: len(v) for k, v in test_sets.items()}, "skipped": dict(sorted(skipped.items())),
                   "general_pool_indices": {k: [e["pool_index"] for e in v] for k, v in general.items()},
                   "epochs_run": trainer.current_epoch, "global_steps": trainer.global_step,
                   "stopped_early": bool(stopped_early), "best_checkpoint": Path(best["path"]).name,
                   "quantised_4bit": quantised, "seconds": {k: round(v, 1) for k, v in seconds.items()},
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        )
        write_manifest(sdir, manifest)
    return StageResult(stage="sft", dir=sdir, manifest=manifest, metrics=metrics, headline=metrics["headline"])
