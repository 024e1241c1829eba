"""The step2 training rows: G4 (step2 step vs plain causal-LM SFT on the same tokens, and peak RSS), G5 (mixed vs
pure batches), G6 (packed vs padded batches), and the `recall/capacity` curve.

G4-G6 run the stage itself on the tiny default model: the data stage (`DataRecipe`) and step1 (`Step1Recipe`, set up
and exported without training) build its upstream in a temporary folder, then `Step2Recipe.read_upstream`, `setup_data` and
`setup_model` give exactly the memories, dataset, vectors, LoRA and token rows the stage trains, and
`Step2Recipe.module` its Lightning module. A training step here is forward, backward and an AdamW step
(`MixedMemoryModule.training_step`), called directly on both sides (Lightning's loop is left out on both).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightmem_exp.bench.rows import make_row, ratio_of, side
from lightmem_exp.bench.timing import measure_pair
from lightmem_exp.config import CONF_DIR

log = logging.getLogger(__name__)
KINDS = ("memory_front", "memory_full", "sft_only")


# ---- setup ---------------------------------------------------------------------------------------------------


def stage_config(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The real config tree composed as the CLI would for `stage=<stage>` on the tiny model (nothing written)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config",
                           overrides=[f"stage={stage}", "model=tiny", "logger=none", *overrides])
    finally:
        GlobalHydra.instance().clear()


def step2_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    return stage_config("step2", overrides)


def _view(cfg: DictConfig, name: str, sdir: Path, **inputs: Path) -> DictConfig:
    """Stage `name`'s view of `cfg` run in `sdir`, reading its upstreams from `inputs`."""
    from lightmem_exp.stages import stage_config as stage_view

    sub = stage_view(cfg, name)
    sub.runtime.stage_dir = str(sdir)
    for upstream, path in inputs.items():
        sub[name].inputs[upstream] = str(path)
    return sub


def build_upstream(cfg: DictConfig, root: Path) -> Path:
    """The data stage and step1 under `root`, as step2 reads them. step1 is set up and exported without training
    (the memories step2 writes, its tokenizer, the base model's bank, a fresh adapter): the rows time work that does
    not depend on trained values."""
    from lightmem_exp.stages.data import DataRecipe
    from lightmem_exp.stages.step1 import Step1Recipe

    DataRecipe(_view(cfg, "data", root / "data")).run()
    step1 = Step1Recipe(_view(cfg, "step1", root / "step1", data=root / "data"))
    step1.setup_data()
    step1.setup_model()
    step1.setup_queries()
    step1.setup_training()
    step1.export()
    step1.finish()
    return root


@dataclass
class Setup:
    recipe: Any                 # the Step2Recipe, its data set up
    items: list[dict]           # epoch 0's samples in dataset order (collator input)

    @property
    def args(self) -> Any:
        return self.recipe.args

    def collator(self) -> Any:
        from lightmem_exp.data.mixed_memory import MixedMemoryCollator

        return MixedMemoryCollator(self.recipe.tokenizer.pad_token_id, self.recipe.tok_ids.memory_pad)


def setup(cfg: DictConfig, upstream: Path) -> Setup:
    """step2 over the `upstream` data and step1 (`build_upstream`): its upstream and data phases, epoch 0 drawn."""
    from lightmem_exp.stages.step2 import Step2Recipe

    torch.manual_seed(int(cfg.seed))
    view = _view(cfg, "step2", upstream / "step2", step1=upstream / "step1")
    # The rows compare the decoding step with a plain reference; the query anchor's extra forward is not in either.
    view.step2.keep_query.weight = 0
    recipe = Step2Recipe(view)
    recipe.read_upstream()
    dataset = recipe.setup_data()
    dataset.refresh_epoch_data(0)
    return Setup(recipe, [dataset[i] for i in range(len(dataset))])


def _optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from lightmem_exp.lit.trainer import decay_groups

    return torch.optim.AdamW(decay_groups(module, weight_decay), lr=lr)


def ours_steps(module, batches: list[dict], opt: torch.optim.Optimizer):
    """One call = one step2 training step (MixedMemoryModule.training_step, backward, AdamW) per batch."""
    def run() -> None:
        for i, b in enumerate(batches):
            module.training_step(b, i).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def plain_steps(model, batches: list[dict], opt: torch.optim.Optimizer):
    """The baseline: plain causal-LM SFT on the same token batches (HF loss from `labels`), backward, AdamW."""
    def run() -> None:
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                  use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def _tokens(batches: list[dict]) -> int:
    """Non-pad tokens (padded batches: the attention mask; packed batches: the sample lengths)."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["lengths"].sum()) for b in batches)


def _lengths(samples: list[dict]) -> dict:
    n = sorted(len(s["input_ids"]) for s in samples)
    return {"min": n[0], "median": n[len(n) // 2], "max": n[-1], "samples": len(n)}


# ---- G4 -----------------------------------------------------------------------------------------------------


def g4_batches(su: Setup, n_batches: int) -> list[dict]:
    bs, collate = su.args.batch_size, su.collator()
    return [collate(su.items[i * bs:(i + 1) * bs]) for i in range(min(n_batches, len(su.items) // bs))]


def g4_sides(su: Setup, batches: list[dict]):
    """(ours, plain) step functions on separate copies of the stage's model, each with its own AdamW."""
    a = su.args
    model = su.recipe.setup_model()
    plain_model = copy.deepcopy(model)
    module = su.recipe.module(model, packed=False).train()
    plain_model.train()
    return (ours_steps(module, batches, _optimizer(module, a.lr, a.weight_decay)),
            plain_steps(plain_model, batches, _optimizer(plain_model, a.lr, a.weight_decay)))


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_probe(which: str, n_batches: int, passes: int, upstream: str) -> dict:
    """In a fresh process: set up step2 over `upstream` as G4 does, then run `passes` x the G4 batches on ONE side
    only.

    Peak RSS is VmHWM, reset to the current RSS right before training (/proc/self/clear_refs "5") where the
    kernel allows it, so `train_increase` is what training added on top of the loaded model and data."""
    su = setup(step2_config(), Path(upstream))
    batches = g4_batches(su, n_batches)
    ours, plain = g4_sides(su, batches)
    run = ours if which == "ours" else plain
    import gc

    gc.collect()
    before = _vm("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(passes):
        run()
    peak = _vm("VmHWM")
    return {"side": which, "rss_before_train": before, "peak_rss": peak, "train_increase": peak - before,
            "peak_reset_before_train": reset, "batches": len(batches), "passes": passes}


def _rss_in_subprocess(which: str, n_batches: int, passes: int, threads: int, upstream: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = (f"import json, torch; torch.set_num_threads({threads}); "
            "from lightmem_exp.bench.train_cases import rss_probe; "
            f"print('RSS_PROBE ' + json.dumps(rss_probe({which!r}, {n_batches}, {passes}, {str(upstream)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RSS_PROBE ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"peak-RSS probe ({which}) failed: {out.stderr[-2000:]}")
    return json.loads(line[len("RSS_PROBE "):])


def g4_row(s, su: Setup, upstream: Path, explain: dict, threads: int) -> dict:
    batches = g4_batches(su, s.train_batches)
    ours, plain = g4_sides(su, batches)
    tokens = _tokens(batches)
    a, b = measure_pair(ours, plain, repeats=s.train_repeats, warmup=1)
    a_t, b_t = a.scaled(tokens), b.scaled(tokens)
    check = {"check": "peak RSS <= 1.15x plain SFT's (fresh process per side)", "ok": True}
    if s.rss:
        r_ours = _rss_in_subprocess("ours", s.train_batches, 2, threads, upstream)
        r_plain = _rss_in_subprocess("plain", s.train_batches, 2, threads, upstream)
        ratio_rss = r_ours["peak_rss"] / max(r_plain["peak_rss"], 1)
        check.update(ok=ratio_rss <= 1.15, peak_rss_ratio=ratio_rss, ours=r_ours, plain=r_plain,
                     train_increase_ratio=r_ours["train_increase"] / max(r_plain["train_increase"], 1),
                     summary=f"peak RSS {r_ours['peak_rss'] / 2**20:.0f} vs {r_plain['peak_rss'] / 2**20:.0f} MiB "
                             f"= {ratio_rss:.3f}x; added by training {r_ours['train_increase'] / 2**20:.0f} vs "
                             f"{r_plain['train_increase'] / 2**20:.0f} MiB")
    else:
        check.update(summary="peak RSS not measured (--quick)", not_measured=True)
    a = su.args
    return make_row(
        "G4", f"step2 training tokens/s (MixedMemoryModule.training_step + backward + AdamW, {len(batches)} batches "
              f"of {a.batch_size}) vs plain causal-LM SFT on the same tokens", ">= 0.85",
        ours=side("step2 step", a_t, "s/token"), baseline=side("plain SFT step", b_t, "s/token"),
        ratio=ratio_of(b_t, a_t), ratio_def="ours tokens/s / baseline tokens/s", check=check,
        params={"tokens_per_pass": tokens, "batches": len(batches), "batch_size": a.batch_size,
                "loss_reduction": a.loss_reduction, "lora": OmegaConf.to_container(_lora_of(su.recipe.cfg)),
                "trainable_token_rows": len(su.recipe.token_rows), "written_memories": len(su.recipe.written),
                "lengths": _lengths(su.items[:len(batches) * a.batch_size])},
        explanation=explain.get("G4"))


# ---- G5 -----------------------------------------------------------------------------------------------------


def g5_row(s, su: Setup, explain: dict) -> dict:
    """Mixed batches (half memory samples, half sft_only) vs the same samples in pure batches."""
    bs = su.args.batch_size
    half = bs // 2
    mem = [x for x in su.items if x["kind"] != "sft_only"]
    sft = [x for x in su.items if x["kind"] == "sft_only"]
    n_batches = min(s.train_batches, len(mem) // half, len(sft) // half)
    mem, sft = mem[:n_batches * half], sft[:n_batches * half]
    collate = su.collator()
    mixed = [collate(mem[i * half:(i + 1) * half] + sft[i * half:(i + 1) * half]) for i in range(n_batches)]
    pure_mem = [collate(mem[i:i + bs]) for i in range(0, len(mem), bs)]
    pure_sft = [collate(sft[i:i + bs]) for i in range(0, len(sft), bs)]
    module = su.recipe.module(su.recipe.setup_model(), packed=False).train()
    opt = _optimizer(module, su.args.lr, su.args.weight_decay)
    run_mixed, run_mem, run_sft = (ours_steps(module, b, opt) for b in (mixed, pure_mem, pure_sft))

    def run_pure() -> None:
        run_mem()
        run_sft()

    a, b = measure_pair(run_mixed, run_pure, repeats=s.train_repeats, warmup=1)
    tokens = _tokens(mixed)
    assert tokens == _tokens(pure_mem) + _tokens(pure_sft)  # the same samples on both sides
    # The pure runs alone, for the record (each side's rate; their token-weighted harmonic mean is the baseline).
    pm, ps = measure_pair(run_mem, run_sft, repeats=3, warmup=0)
    a_t, b_t = a.scaled(tokens), b.scaled(tokens)
    return make_row(
        "G5", f"step2 tokens/s on {len(mixed)} batches of {half} memory + {half} sft_only samples vs the same samples "
              "in pure batches (token-weighted harmonic mean of the pure runs' tokens/s)", ">= 0.9",
        ours=side("mixed batches", a_t, "s/token"), baseline=side("pure batches", b_t, "s/token"),
        ratio=ratio_of(b_t, a_t), ratio_def="mixed tokens/s / harmonic mean of pure tokens/s",
        params={"tokens": tokens, "batch_size": bs, "pure_memory_tokens_per_s": _tokens(pure_mem) / pm.median,
                "pure_sft_tokens_per_s": _tokens(pure_sft) / ps.median,
                "padding_share": {"mixed": _pad_share(mixed), "pure": _pad_share(pure_mem + pure_sft)},
                "lengths": {"memory": _lengths(mem), "sft_only": _lengths(sft)}},
        explanation=explain.get("G5"))


def _pad_share(batches: list[dict]) -> float:
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1.0 - sum(int(b["attention_mask"].sum()) for b in batches) / max(total, 1)


# ---- G6 -----------------------------------------------------------------------------------------------------

# G6 is defined on a wide length mix: step2's samples with the conversation length limit of the stage's first
# defaults (256 tokens) and uncut memory_front contexts, whatever the stage's current (tuned) defaults are.
G6_OVERRIDES = ("step2.sft_max_tokens=256", "step2.context_max_tokens=null")



def per_sample_losses(module, batch: dict, packed: bool) -> torch.Tensor:
    from lightmem_exp.lit.losses import lm_losses

    with torch.no_grad():
        nll, mask = module.sample_losses(batch) if packed else lm_losses(module(batch), batch["labels"])
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1)


def g6_row(s, su: Setup, explain: dict) -> dict:
    from lightmem_exp.data.packing import PackedMixedMemoryCollator

    a = su.args
    bs = a.batch_size
    groups = [su.items[i * bs:(i + 1) * bs] for i in range(min(s.train_batches, len(su.items) // bs))]
    pad = su.collator()
    pack = PackedMixedMemoryCollator(su.recipe.tokenizer.pad_token_id, su.recipe.tok_ids.memory_pad)
    padded, packed = [pad(g) for g in groups], [pack(g) for g in groups]
    model = su.recipe.setup_model()
    twin = copy.deepcopy(model)
    m_pad = su.recipe.module(model, packed=False).train()
    m_pack = su.recipe.module(twin, packed=True).train()
    # Correctness first, on identical weights: every sample's mean loss, packed vs padded.
    diffs = [float((per_sample_losses(m_pad, p, False) - per_sample_losses(m_pack, q, True)).abs().max())
             for p, q in zip(padded, packed, strict=True)]
    worst = max(diffs)
    check = {"check": "per-sample loss packed == padded within 1e-5", "ok": worst <= 1e-5, "max_abs_diff": worst,
             "summary": f"per-sample loss max |diff| {worst:.1e} over {sum(len(g) for g in groups)} samples"}
    t_pack, t_pad = measure_pair(ours_steps(m_pack, packed, _optimizer(m_pack, a.lr, a.weight_decay)),
                                 ours_steps(m_pad, padded, _optimizer(m_pad, a.lr, a.weight_decay)),
                                 repeats=s.train_repeats, warmup=1)
    tokens = _tokens(padded)
    a_t, b_t = t_pack.scaled(tokens), t_pad.scaled(tokens)
    rows_padded = sum(p["input_ids"].shape[0] for p in padded)
    rows_packed = sum(p["input_ids"].shape[0] for p in packed)
    cells = {"padded": sum(p["input_ids"].numel() for p in padded),
             "packed": sum(p["input_ids"].numel() for p in packed)}
    return make_row(
        "G6", f"step2 non-pad tokens/s, the same {len(groups)} batches of {bs} packed into rows (block-diagonal "
              "causal attention via per-sample position ids) vs padded, on a wide length mix "
              f"({' '.join(G6_OVERRIDES)})", ">= 1.3",
        ours=side("packed", a_t, "s/token"), baseline=side("padded", b_t, "s/token"),
        ratio=ratio_of(b_t, a_t), ratio_def="packed tokens/s / padded tokens/s", check=check,
        params={"non_pad_tokens": tokens, "rows": {"padded": rows_padded, "packed": rows_packed},
                "token_cells": cells, "padding_share_padded": 1 - tokens / cells["padded"],
                "lengths": _lengths([x for g in groups for x in g]), "overrides": list(G6_OVERRIDES),
                "attn_implementation": str(getattr(model.config, "_attn_implementation", None))},
        explanation=explain.get("G6"))


# ---- recall/capacity ------------------------------------------------------------------------------------------


@dataclass
class CapacityData:
    """What the curve trains on: every train-split memory and the SFT pool, built in memory by the data stage's
    readers, the tiny tokenizer, and step2's own dataset, token rows, LoRA and module for any set of memories."""

    cfg: DictConfig
    args: Any                    # Step2Config
    tokenizer: Any
    ids: Any                     # MemoryTokenIds
    train_memories: list[dict]   # every train-split memory {id, text}, in file order
    pool: list[dict]

    @classmethod
    def build(cls, cfg: DictConfig) -> CapacityData:
        from lightmem_exp.config import typed
        from lightmem_exp.data import build_dataset
        from lightmem_exp.models.chat import chat_token_ids
        from lightmem_exp.models.loading import load_tokenizer, require_memory_tokens

        tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
        built = build_dataset(cfg.data.name, Path(cfg.data.path), Path(cfg.data.sft_dir),
                              lambda messages: len(chat_token_ids(tokenizer, messages)), seed=cfg.seed,
                              split_fractions=tuple(cfg.data.split_fractions), max_sft=cfg.data.max_sft,
                              context_window=cfg.data.context_window, progress=False)
        train = set(built.splits["train"])
        memories = [{"id": m["id"], "text": m["text"]} for m in built.artifacts["memories"] if m["conv_id"] in train]
        return cls(cfg, typed(cfg, "step2"), tokenizer, require_memory_tokens(tokenizer, "the tiny tokenizer"),
                   memories, built.artifacts["sft_pool"])

    def dataset(self, memories: list[dict], sft_ratio: float | None = None) -> Any:
        from lightmem_exp.stages.step2 import memory_dataset

        return memory_dataset(self.args, self.tokenizer, self.pool, memories, self.ids, self.cfg.seed, sft_ratio)

    def token_rows(self, memories: list[dict]) -> list[int]:
        from lightmem_exp.stages.step2 import trainable_token_rows

        return trainable_token_rows(self.args, self.tokenizer, self.ids, memories)

    def base_model(self) -> torch.nn.Module:
        from lightmem_exp.models.loading import ensure_memory_tokens, load_model

        model = load_model(self.cfg.model, self.cfg.paths.data)
        ensure_memory_tokens(model, self.tokenizer)
        return model

    def lora_model(self, memories: list[dict]) -> torch.nn.Module:
        """Base + the step2 LoRA and trainable rows, freshly initialised."""
        from lightmem_exp.models.loading import attach_lora

        return attach_lora(self.base_model(), _lora_of(self.cfg), token_ids=self.token_rows(memories))

    def module(self, model: torch.nn.Module, dataset: Any, vectors: torch.Tensor) -> L.LightningModule:
        from lightmem_exp.stages.step2 import mixed_memory_module

        return mixed_memory_module(self.args, model, dataset, vectors, pad_id=self.tokenizer.pad_token_id,
                                   memory_pad_id=self.ids.memory_pad, packed=False)


class TokenCounter(L.Callback):
    """Counts the samples, memory samples and non-pad tokens of the batches a Trainer actually trains on."""

    def __init__(self) -> None:
        self.tokens = self.samples = self.memory_samples = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += len(batch["kinds"])
        self.memory_samples += sum(k != "sft_only" for k in batch["kinds"])


def capacity_vectors(data: CapacityData, memories: list[dict], step1_dir: Path):
    """(injection vectors [N, H] for `memories`, source note, model factory). A step1 bank (and its adapter, as the
    stage starts from it) when `step1_dir` holds a complete step1 run with every memory; else the base model's
    last-token states (`MemoryBank.build`) and a fresh LoRA."""
    from lightmem_exp.models.memory_bank import MemoryBank

    note = None
    if (step1_dir / "manifest.json").exists() and (step1_dir / "bank").is_dir():
        try:
            bank = MemoryBank.load(step1_dir / "bank")
            row = {mid: i for i, mid in enumerate(bank.ids)}
            missing = [m["id"] for m in memories if m["id"] not in row]
            if missing:
                raise ValueError(f"{len(missing)} memories are not in it")
            vectors = bank.injection_vectors([row[m["id"]] for m in memories])

            def model_factory(mems: list[dict]):
                from lightmem_exp.lit.step2 import start_from_step1

                return start_from_step1(data.base_model(), step1_dir / "adapter", data.cfg.model,
                                        _lora_of(data.cfg), data.token_rows(mems))
            model_factory(memories[:1])  # fails here, not mid-curve, when the adapter does not fit the config
            return vectors, f"step1 bank + adapter ({step1_dir})", model_factory
        except Exception as e:  # noqa: BLE001 - any unusable step1 output falls back to base-model vectors
            note = f"{step1_dir} not usable ({type(e).__name__}: {str(e)[:160]}); "
    base = data.base_model()
    bank = MemoryBank.build(base, data.tokenizer, memories, progress=False)
    del base
    return (bank.injection_vectors(range(len(memories))),
            (note or "") + "base-model last-token states (MemoryBank.build), fresh LoRA", data.lora_model)


def pool_ratio(n: int, fitting: int, ratio: float) -> float:
    """The largest sft_ratio <= `ratio` whose per-epoch draw, ceil(n x sft_ratio) conversations, fits in the
    `fitting` pool conversations within sft_max_tokens (0.0 when none fits)."""
    r = min(float(ratio), fitting / n)
    while r > 0 and math.ceil(n * r) > fitting:
        r = math.nextafter(r, 0.0)
    return r


def recall_by_length(model, data: CapacityData, memories: list[dict], vectors: torch.Tensor, *, prompt: list[int],
                     marker: list[int], batch_size: int) -> dict:
    """`recall_eval` over every memory, in batches of similar token length, each decoding at most its longest
    memory + end marker + 8 tokens (the stage's recall-test length, per batch instead of per run: a model that never
    emits the marker then decodes ~31 tokens per memory here instead of the longest memory's 241+)."""
    from lightmem_exp.lit.recall_test import recall_eval

    lengths = [len(data.tokenizer(m["text"], add_special_tokens=False)["input_ids"]) for m in memories]
    order = sorted(range(len(memories)), key=lambda i: lengths[i])
    exact = f1 = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        scores, _ = recall_eval(model, data.tokenizer, [memories[i] for i in batch], vectors[batch],
                                prompt_ids=prompt, memory_pad_id=data.ids.memory_pad, marker_ids=marker,
                                max_new_tokens=max(lengths[i] for i in batch) + len(marker) + 8,
                                batch_size=len(batch))
        exact += scores["exact_match"] * len(batch)
        f1 += scores["token_f1"] * len(batch)
    return {"exact_match": exact / len(memories), "token_f1": f1 / len(memories)}


def capacity_curve(s, cfg: DictConfig, step1_dir: Path, threads: int) -> dict:
    """Exact match of recalled vs memory text, over all N memories, after the same optimizer steps for every N.

    N's memories are nested (a seeded shuffle of the train-split memories, then its first N). Each epoch the real
    dataset draws ceil(N x sft_ratio) distinct pool conversations within sft_max_tokens and refuses a pool that is
    short, so every N gets sft_ratio = min(step2.sft_ratio, fitting / N) (`pool_ratio`). At a fixed step budget
    this changes only the epoch length: every epoch is still split in thirds (memory_front / memory_full /
    sft_only), so every N trains on the same mix, and an epoch below 1.5 holds a reshuffled subset of the
    memories instead of each once. An N the dataset still cannot draw is recorded as not measured."""
    import random
    import time

    from lightmem_exp.errors import LmxError
    from lightmem_exp.lit.recall_test import recall_prompt_ids

    data = CapacityData.build(cfg)
    st = data.args
    pool = sorted(data.train_memories, key=lambda m: m["id"])
    random.Random(f"bench-capacity/{cfg.seed}").shuffle(pool)
    probe = data.dataset(pool[:1])
    fitting = sum(probe.chat_length(r) <= st.sft_max_tokens for r in probe.pool)
    sizes = sorted({min(n, len(pool)) if n else len(pool) for n in s.capacity_sizes})
    datasets, points = {}, {}
    for n in sizes:
        ratio = pool_ratio(n, fitting, st.sft_ratio)
        try:
            if ratio <= 0:
                raise LmxError(f"no SFT conversation of the pool fits in {st.sft_max_tokens} tokens")
            ds = data.dataset(pool[:n], sft_ratio=ratio)
            ds.refresh_epoch_data(0)
            datasets[n] = ds
        except LmxError as e:
            points[n] = {"N": n, "measured": False, "sft_ratio": ratio, "reason": str(e)}
    measured = sorted(datasets)
    source = "none measured"
    if measured:
        vectors_all, source, make_model = capacity_vectors(data, pool[:measured[-1]], step1_dir)
    marker = data.tokenizer(st.end_marker, add_special_tokens=False)["input_ids"]
    ids = data.ids
    prompt = recall_prompt_ids(data.tokenizer, st.recall_test.prompt, ids.recall, ids.memory_pad)
    for n in measured:
        memories = pool[:n]
        torch.manual_seed(int(cfg.seed))
        module = data.module(make_model(memories), datasets[n], vectors_all[:n])
        counter = TokenCounter()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=s.capacity_steps, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, gradient_clip_val=st.gradient_clip_val,
                            callbacks=[counter])
        t0 = time.perf_counter()
        trainer.fit(module)
        t1 = time.perf_counter()
        torch.set_num_threads(threads)  # Lightning may reset torch's thread count
        scores = recall_by_length(module.model, data, memories, module.memory_vectors, prompt=prompt, marker=marker,
                                  batch_size=s.capacity_eval_batch)
        t2 = time.perf_counter()
        points[n] = {"N": n, "measured": True, "sft_ratio": module.dataset.sft_ratio,
                     "exact_match": scores["exact_match"], "token_f1": scores["token_f1"],
                     "steps": trainer.global_step, "samples_trained": counter.samples,
                     "memory_samples": counter.memory_samples, "per_memory": counter.memory_samples / n,
                     "tokens_trained": counter.tokens, "epochs": counter.samples / max(len(module.dataset), 1),
                     "train_s": t1 - t0, "eval_s": t2 - t1}
        log.info("capacity N=%d (sft_ratio %.3f): exact_match %.3f token_f1 %.3f after %d steps (train %.0f s, "
                 "eval %.0f s)", n, module.dataset.sft_ratio, scores["exact_match"], scores["token_f1"],
                 trainer.global_step, t1 - t0, t2 - t1)
        del module, trainer
    return {"name": "recall/capacity", "points": [points[n] for n in sizes], "vectors": source,
            "budget": {"optimizer_steps": s.capacity_steps, "batch_size": int(st.batch_size)},
            "all_train_split_memories": len(pool),
            "sft_pool": {"conversations": len(probe.pool), "within_sft_max_tokens": fitting},
            "stage": {k: getattr(st, k) for k in ("lr", "loss_reduction", "sft_ratio", "sft_max_tokens", "end_marker",
                                                  "train_memory_vocab", "gradient_clip_val")},
            "lora": OmegaConf.to_container(_lora_of(cfg))}


def _lora_of(cfg: DictConfig) -> DictConfig:
    from lightmem_exp.stages.step2 import lora_config

    return lora_config(cfg)


def train_rows(s, explain: dict, which: list[str], threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmx-bench-step2-") as tmp:
        log.info("G4-G6: building step2's upstream (data stage, step1 set up without training) in %s", tmp)
        upstream = build_upstream(step2_config(), Path(tmp))
        if {"G4", "G5"} & set(which):
            su = setup(step2_config(), upstream)
            for name, fn in (("G4", lambda: g4_row(s, su, upstream, explain, threads)),
                             ("G5", lambda: g5_row(s, su, explain))):
                if name in which:
                    log.info("%s: step2 training", name)
                    rows.append(fn())
        if "G6" in which:
            log.info("G6: step2 training, packed vs padded (%s)", " ".join(G6_OVERRIDES))
            rows.append(g6_row(s, setup(step2_config(G6_OVERRIDES), upstream), explain))
    return rows
