"""Stage sft: a LoRA adapter for fact QA and memory-update decisions, measured before vs after (`sft.*`, SftConfig).

Data (all seeded by `seed`):
- train: a sample of `fact_qa` and `update_decisions` rows of the train split's conversations (caps
  `sft.max_train_samples.*`), plus general `sft_pool` conversations making up `general_fraction` of the mix;
- val: the same from the val split (`sft.max_val_samples.*`), general share alike; early stopping and the best
  epoch use its assistant-token loss;
- test: `eval.max_fact_qa` fact_qa and `eval.max_update` update_decisions rows of the test split, and
  `eval.max_general` general conversations. `sft_pool` has no split: one seeded shuffle of it is dealt out to
  test, val and train in that order, so the three never share a conversation.
Samples longer than `sft.max_seq_len` tokens are skipped (counted in `stats.skipped`), never truncated.

Metrics (manifest), each `_before` on the base model and `_after` on base + the best epoch's adapter:
`factqa/{em,f1}` (closed-book, test split, SQuAD normalisation), `factqa_train/{em,f1}` (the same on trained
samples, trained wording), `factqa_asked/{em,f1}` (knowledge injection: LoCoMo's own questions about trained
memories, a wording never trained on, against the benchmark's answers), `update/{acc,json_ok,json_strict}` (through the local_hf_lora backend's parsing),
`general/ppl` (assistant tokens of held-out sft_pool conversations), and `val/loss` (best epoch; the headline,
lower is better). Outputs: `export/adapter` (PEFT), `export/backend_config.json` (a `local_hf_lora` config for
this adapter), `eval_predictions.jsonl` (every scored reply, before and after).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightmem_exp.artifacts import atomic_dir, read_json, write_json, write_jsonl
from lightmem_exp.backends.local_hf_lora import HFChatGenerator, LocalHFLoraBackend, LocalHFLoraConfig
from lightmem_exp.config.schema import SftEval
from lightmem_exp.data.build import FACT_SYSTEM
from lightmem_exp.data.chat_sft import ChatSftDataset, encode_rows
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
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, prepare_for_kbit_training, save_adapter
from lightmem_exp.runtime import model_device
from lightmem_exp.stages.base import Recipe, StageResult

log = logging.getLogger(__name__)
GROUPS = ("fact_qa", "update_decisions", "general")
TASKS = ("fact_qa", "update_decisions")
FACT_GROUPS = ("factqa", "factqa_train", "factqa_asked")  # closed-book groups scored by token F1 / EM


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
                               f"limit, got {len(dealt[name])} ({dict(skipped)}); lower sft.general_fraction or "
                               "sft.eval.max_general, or raise sft.max_seq_len")
            enc, skip = encode([pool[i]])
            skipped += skip
            dealt[name] += [{**e, "pool_index": pool[i]["index"]} for e in enc]
    return dealt, skipped


def _measure(model, tokenizer, sets: dict, ev: SftEval, max_seq_len: int, pad_id: int, tag: str,
             predictions: dict) -> dict[str, float]:
    """Every before/after metric on `model` as it is now; replies go into `predictions[row id][tag]`."""
    gen_kwargs = {"max_new_tokens": ev.max_new_tokens, "do_sample": False}
    generate = HFChatGenerator(model, tokenizer, gen_kwargs=gen_kwargs, batch_size=ev.batch_size)
    out: dict[str, float] = {}
    for group in FACT_GROUPS:
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


class SftRecipe(Recipe):
    name = "sft"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.seconds: dict[str, float] = {}  # per phase, into stats.seconds
        self._t0 = time.perf_counter()

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        if cfg.quant.mode == "nf4" and cfg.model.init == "random":
            raise ConfigError("quant.mode", "nf4 needs pretrained weights; use quant=none with model.init=random")

    def run(self) -> StageResult:
        self.setup_data()
        self.setup_model()
        self.evaluate("before")
        self.attach_adapter()
        self.train()
        self.evaluate("after")
        if not self.trainer.is_global_zero:
            return self.result_without_manifest()
        self.export()
        return self.finish(self.metrics["headline"])

    def _lap(self, phase: str) -> None:
        self.seconds[phase] = time.perf_counter() - self._t0 - sum(self.seconds.values())

    # ------------------------------------------------------------------------------------------------- data
    def setup_data(self) -> None:
        """The data manifest's rows encoded with `model=`'s tokenizer: seeded train / val samples, the test sets, and
        the general pool dealt to test, val and train."""
        a, ev = self.args, self.args.eval
        self.data = self.upstream("data")
        self.splits = {k: set(v) for k, v in read_json(self.data.path("splits")).items()}
        self.rows = {t: read_artifact(self.data, t) for t in TASKS}
        pool = read_artifact(self.data, "sft_pool")
        self.tokenizer = load_tokenizer(self.cfg.model, self.cfg.paths.data)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_rows, self.val_rows, self.skipped = self._task_samples()
        trained_ids = {e["id"] for e in self.train_rows}
        self.test_sets = {
            "factqa": self._take(self._split_rows("fact_qa", "test"), ev.max_fact_qa, "fact_qa", "test:fact_qa"),
            "update": self._take(self._split_rows("update_decisions", "test"), ev.max_update, "update_decisions",
                                 "test:update_decisions"),
            "factqa_train": self._take([r for r in self._split_rows("fact_qa", "train") if r["id"] in trained_ids],
                                       ev.max_fact_qa_train, "fact_qa", "seen"),
            "factqa_asked": self._take(self._asked_rows(trained_ids), ev.max_fact_qa_asked, "fact_qa", "asked"),
        }
        quotas = {"test": ev.max_general, "val": _share(len(self.val_rows), a.general_fraction),
                  "train": _share(len(self.train_rows), a.general_fraction)}
        for name, cap in (("factqa", ev.max_fact_qa), ("update", ev.max_update),
                          ("factqa_train", ev.max_fact_qa_train), ("factqa_asked", ev.max_fact_qa_asked)):
            if cap and not self.test_sets[name]:
                log.warning("sft: no %s rows within sft.max_seq_len for evaluation; its metrics are not written", name)
        self.general, skip = _deal_general(pool, quotas, self._encode, self.cfg.seed)
        self.skipped += Counter({f"general/{k}": v for k, v in skip.items()})
        self.train_rows += self.general["train"]
        self.val_rows += self.general["val"]
        self.test_sets["general"] = self.general["test"]
        self.predictions: dict = {key: {} for group in (*FACT_GROUPS, "update")
                                  for key in ((group, r["id"]) for r in self.test_sets[group])}

    def _encode(self, batch: list[dict], group: str = "general") -> tuple[list[dict], Counter]:
        return encode_rows(self.tokenizer, batch, max_seq_len=self.args.max_seq_len, group=group,
                           method=self.args.mask_method)

    def _asked_rows(self, trained_ids: set[str]) -> list[dict]:
        """LoCoMo questions of the train split (not adversarial) whose evidence memories were all trained on as
        fact_qa, as closed-book chats under the fact_qa system prompt with the benchmark's answer."""
        trained = {r["memory_id"] for r in self.rows["fact_qa"] if r["id"] in trained_ids}
        return [{"id": q["id"], "conv_id": q["conv_id"],
                 "messages": [{"role": "system", "content": FACT_SYSTEM}, {"role": "user", "content": q["question"]},
                              {"role": "assistant", "content": str(q["answer"])}]}
                for q in read_artifact(self.data, "qa")
                if q["conv_id"] in self.splits["train"] and q["category"] != 5 and q["evidence_memory_ids"]
                and set(q["evidence_memory_ids"]) <= trained]

    def _split_rows(self, task: str, split: str) -> list[dict]:
        return [r for r in self.rows[task] if r["conv_id"] in self.splits[split]]

    def _task_samples(self) -> tuple[list[dict], list[dict], Counter]:
        """Train / val task samples (seeded caps); samples over sft.max_seq_len are skipped and counted."""
        a = self.args
        skipped: Counter = Counter()
        train, val = [], []
        for task in TASKS:
            for split, caps, out in (("train", a.max_train_samples, train), ("val", a.max_val_samples, val)):
                rng = random.Random(f"{self.cfg.seed}:sft:{split}:{task}")
                enc, skip = self._encode(_sample(self._split_rows(task, split), getattr(caps, task), rng), task)
                skipped += Counter({f"{split}/{k}": v for k, v in skip.items()})
                out += enc
        if not train:
            raise LmxError(f"no training samples: the train split of {self.data.dir} has no fact_qa/update_decisions "
                           f"rows within sft.max_seq_len={a.max_seq_len}")
        if not val:
            raise LmxError(f"no validation samples: the val split of {self.data.dir} has none within sft.max_seq_len; "
                           "early stopping needs a val set")
        return train, val, skipped

    def _take(self, candidates: list[dict], cap: int, task: str, salt: str) -> list[dict]:
        """Up to `cap` rows of a seeded shuffle that fit the token limit, in id order."""
        order = list(candidates)
        random.Random(f"{self.cfg.seed}:sft:{salt}").shuffle(order)
        chosen = []
        for r in order:
            if len(chosen) == cap:
                break
            if self._encode([r], task)[0]:
                chosen.append(r)
        return sorted(chosen, key=lambda r: r["id"])

    # ------------------------------------------------------------------------------------------------ model
    def setup_model(self) -> None:
        """The base model as configured (4-bit with quant=nf4), on this rank's device."""
        self.device = model_device(self.cfg)
        self.model = load_model(self.cfg.model, self.cfg.paths.data, quant_cfg=self.cfg.quant, device=self.device)
        self._lap("prepare")  # read, encode and load the model

    def evaluate(self, tag: str) -> None:
        """Every before/after metric on the model as it is now (`_measure`); after training, also the best epoch's
        val loss, the headline."""
        a = self.args
        self.metrics.update(_measure(self.model, self.tokenizer, self.test_sets, a.eval, a.max_seq_len, self.pad_id,
                                     tag, self.predictions))
        self._lap(f"measure_{tag}")
        if tag == "after":
            self.metrics["val/loss"] = self.best["val_loss"]
            self.metrics["headline"] = self.best["val_loss"]

    def attach_adapter(self) -> None:
        """LoRA (QLoRA when 4-bit): only the adapter trains."""
        gradient_checkpointing = self.cfg.trainer.gradient_checkpointing
        self.quantised = bool(getattr(self.model, "is_loaded_in_4bit", False))
        model = prepare_for_kbit_training(self.model, gradient_checkpointing=gradient_checkpointing)
        if gradient_checkpointing and not self.quantised:
            if hasattr(model, "activation_checkpointing_enable"):  # the name transformers >= 5 uses
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = attach_lora(model, self.cfg.lora)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """Lightning fit with early stopping on the val loss, resumed from the stage's own checkpoint; the best
        epoch's adapter is put back afterwards."""
        a, pad_id = self.args, self.pad_id
        module = ChatSftModule(self.model, lr=a.lr, weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio,
                               groups=GROUPS)
        train_ds, val_ds = ChatSftDataset(self.train_rows, GROUPS), ChatSftDataset(self.val_rows, GROUPS)
        loaders = {
            "train_dataloaders": ResumableLoader(train_ds, batch_size=a.batch_size, shuffle=True, seed=self.cfg.seed,
                                                 collate_fn=lambda b: train_ds.collate(b, pad_id)),
            "val_dataloaders": DataLoader(val_ds, batch_size=a.eval.batch_size, shuffle=False,
                                          collate_fn=lambda b: val_ds.collate(b, pad_id)),
        }
        self.logger = make_logger(self.cfg, self.dir)
        callbacks = sft_callbacks(self.dir, patience=a.early_stopping.patience,
                                  min_delta=a.early_stopping.min_delta)
        self.trainer = make_trainer(self.cfg, self.dir, max_epochs=a.max_epochs, logger=self.logger,
                                    callbacks=callbacks, ckpt_every_n_steps=a.ckpt_every_n_steps,
                                    gradient_clip_val=a.gradient_clip_val)
        module.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds (LoRA dropout)
        self.trainer.fit(module, **loaders, ckpt_path=resume_path(self.cfg, self.dir))
        self.throughput = throughput_stats(self.trainer, self.model)
        self._lap("train")
        self.best = restore_best(module, callbacks)
        if self.device is not None:  # Lightning's teardown moved the model to CPU
            self.model.to(self.device)
        self.stopped_early = any(getattr(c, "stopped_epoch", 0) for c in callbacks)

    # ----------------------------------------------------------------------------------------------- export
    def export(self) -> None:
        """Rank 0: the adapter (atomically), a local_hf_lora backend config for it, every scored reply, and the
        manifest's outputs and stats."""
        a, ev, cfg = self.args, self.args.eval, self.cfg
        adapter_dir = self.dir / "export" / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            save_adapter(self.model, tmp)
        backend_cfg = {"base_model": str(self.model.peft_config["default"].base_model_name_or_path),
                       "adapter_path": str(adapter_dir.resolve()), "device_map": "auto",
                       "torch_dtype": str(cfg.model.torch_dtype), "max_seq_len": int(a.max_seq_len),
                       "gen_kwargs": {"max_new_tokens": int(ev.max_new_tokens), "do_sample": False},
                       "max_retries": 2, "batch_size": int(ev.batch_size),
                       "quant": OmegaConf.to_container(cfg.quant) if cfg.quant.mode != "none" else None,
                       "attn_implementation": cfg.model.get("attn_implementation")}
        LocalHFLoraConfig.from_mapping(backend_cfg)  # what is written must load
        write_json(self.dir / "export" / "backend_config.json", backend_cfg)
        write_jsonl(self.dir / "eval_predictions.jsonl",
                    ({"set": group, "id": rid, **preds} for (group, rid), preds in self.predictions.items()))
        self.outputs = {"adapter": "export/adapter", "backend_config": "export/backend_config.json",
                        "eval_predictions": "eval_predictions.jsonl"}
        train, val = self.train_rows, self.val_rows
        self.stats = {
            "throughput": self.throughput, "train_samples": dict(sorted(Counter(e["group"] for e in train).items())),
            "train_total": len(train), "val_samples": dict(sorted(Counter(e["group"] for e in val).items())),
            "test_samples": {k: len(v) for k, v in self.test_sets.items()},
            "skipped": dict(sorted(self.skipped.items())),
            "general_pool_indices": {k: [e["pool_index"] for e in v] for k, v in self.general.items()},
            "epochs_run": self.trainer.current_epoch, "global_steps": self.trainer.global_step,
            "stopped_early": bool(self.stopped_early), "best_checkpoint": Path(self.best["path"]).name,
            "quantised_4bit": self.quantised, "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
