"""The measured rows: G1/G2 (generation), G3 (Memory Head top-k), G8 (BM25). Each returns a list of rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LogitsProcessor, LogitsProcessorList

from lightmem_exp.bench.bm25_naive import NaiveBM25, locomo_texts, synth_corpus, top1_agreement
from lightmem_exp.bench.rows import make_row, ratio_of, side
from lightmem_exp.bench.timing import measure_pair
from lightmem_exp.config import CONF_DIR

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Sizes and repeat counts; `quick()` is the tiny variant the tests run."""

    repeats: int = 9
    warmup: int = 2
    seed: int = 0
    min_sample_s: float = 0.05  # micro-benchmarks (G3) loop until one sample lasts this long
    prompt_tokens: int = 32
    new_tokens: int = 128
    recall_every: int = 16
    bank_size: int = 10_000
    topk_sizes: list[tuple[int, int | None]] = field(  # (N, H); H None = the tiny model's hidden size
        default_factory=lambda: [(1_000, None), (10_000, None), (100_000, None), (100_000, 4096)])
    topk_k: int = 10
    topk_check_queries: int = 16
    bm25_docs: int = 10_000
    bm25_queries: int = 100
    bm25_k: int = 10
    bm25_min_agreement: float = 0.9
    train_batches: int = 2          # G4-G6: step2 batches (of step2.batch_size) per timed pass
    train_repeats: int = 7          # G4-G6: timed repeats per side (each is whole training steps)
    rss: bool = True                # G4: peak RSS of each side in a fresh process
    capacity_sizes: tuple[int, ...] = (64, 256, 1024, 0)   # 0: every train-split memory
    capacity_steps: int = 200       # the fixed optimizer-step budget of every capacity point
    capacity_eval_batch: int = 128  # memories decoded per batch (exact match is over all N)

    @classmethod
    def quick(cls) -> Settings:
        return cls(repeats=3, warmup=1, min_sample_s=0.002, prompt_tokens=8, new_tokens=20, recall_every=8,
                   bank_size=256, topk_sizes=[(500, None), (1_000, None), (2_000, None)], topk_check_queries=4,
                   bm25_docs=300, bm25_queries=10, train_batches=1, train_repeats=3, rss=False,
                   capacity_sizes=(4, 8), capacity_steps=2, capacity_eval_batch=3)


# ---- the tiny default model --------------------------------------------------------------------------------

def tiny_config() -> DictConfig:
    """`model` (conf/model/tiny.yaml) and `paths` (conf/paths/default.yaml), resolved as the CLI resolves them."""
    cfg = OmegaConf.create({"model": OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"),
                            "paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml")})
    OmegaConf.resolve(cfg)
    return cfg


def load_tiny(cfg: DictConfig):
    from lightmem_exp.models.loading import ensure_memory_tokens, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
    model = load_model(cfg.model, cfg.paths.data).eval()
    ids = ensure_memory_tokens(model, tokenizer)
    return model, tokenizer, ids


def random_bank(n: int, hidden: int, embed_scale: float, seed: int):
    from lightmem_exp.models.memory_bank import MemoryBank

    g = torch.Generator().manual_seed(seed)
    rows = [{"id": f"m{i}", "text": ""} for i in range(n)]
    return MemoryBank(torch.randn(n, hidden, generator=g), rows, embed_scale=embed_scale)


class ForceEvery(LogitsProcessor):
    """Forces `token` as the 1st..nth generated token at every `every`-th position (token ids only)."""

    def __init__(self, prompt_len: int, every: int, token: int):
        self.prompt_len, self.every, self.token = prompt_len, every, token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if (input_ids.shape[1] - self.prompt_len + 1) % self.every == 0:
            scores.fill_(-float("inf"))
            scores[:, self.token] = 0.0
        return scores


def prompt_ids(tokenizer, text: str, n_tokens: int) -> torch.LongTensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)


# ---- G1 / G2 -----------------------------------------------------------------------------------------------

def generation_rows(s: Settings, model, tokenizer, ids, prompt_text: str, explain: dict,
                    which: tuple[str, ...] | list[str] = ("G1", "G2")) -> list[dict]:
    """G1: recall on but never fired vs `model.generate`; G2: a forced recall every `recall_every` tokens."""
    from lightmem_exp.models.generation import generate_with_recall
    from lightmem_exp.models.memory_bank import measure_embed_scale, model_hidden_size

    torch.manual_seed(s.seed)
    prompt = prompt_ids(tokenizer, prompt_text, s.prompt_tokens)
    mask = torch.ones_like(prompt)
    plen = prompt.shape[1]
    bank = random_bank(s.bank_size, model_hidden_size(model), measure_embed_scale(model), s.seed)
    common = {"max_new_tokens": s.new_tokens, "pad_token_id": tokenizer.pad_token_id}
    params = {"model": str(model.name_or_path), "batch": 1, "prompt_tokens": plen,
              "max_new_tokens": s.new_tokens, "bank_size": s.bank_size, "decoding": "greedy, KV cache"}

    def ours(processors=None):
        return generate_with_recall(model, prompt, mask, bank=bank, recall_token_id=ids.recall,
                                    memory_pad_token_id=ids.memory_pad, use_sampling=False,
                                    logits_processor=processors, **common)

    def hf(processors=None):
        return model.generate(prompt, attention_mask=mask, do_sample=False, logits_processor=processors, **common)

    rows = []
    if "G1" in which:
        out, ref = ours(), hf()
        n_ours, n_ref = out.sequences.shape[1] - plen, ref.shape[1] - plen
        same = bool(out.sequences.shape == ref.shape and torch.equal(out.sequences, ref))
        check = {"check": "identical tokens", "ok": same and out.num_recalls == 0, "identical": same,
                 "recalls_fired": out.num_recalls, "new_tokens": [n_ours, n_ref],
                 "summary": f"{'identical' if same else 'DIFFERENT'} {n_ours} tokens, {out.num_recalls} recalls"}
        a, b = measure_pair(ours, hf, repeats=s.repeats, warmup=s.warmup)
        a, b = a.scaled(n_ours), b.scaled(n_ref)
        rows.append(make_row(
            "G1", "per-token decode, recall on but never fired, vs model.generate", "<= 1.10",
            ours=side("generate_with_recall", a, "s/token"), baseline=side("model.generate", b, "s/token"),
            ratio=ratio_of(a, b), ratio_def="ours / baseline", check=check, params=params,
            explanation=explain.get("G1")))
    if "G2" in which:
        force = LogitsProcessorList([ForceEvery(plen, s.recall_every, ids.recall)])
        out, ref = ours(force), hf(force)
        n_ours, n_ref = out.sequences.shape[1] - plen, ref.shape[1] - plen
        # A <recall> as the very last token has no step after it to recall in.
        expected = sum(1 for i in range(n_ours - 1) if (i + 1) % s.recall_every == 0)
        check = {"check": "a recall at every forced <recall>", "ok": out.num_recalls == expected and expected > 0,
                 "recalls_fired": out.num_recalls, "recalls_expected": expected, "new_tokens": [n_ours, n_ref],
                 "summary": f"{out.num_recalls}/{expected} recalls over {s.bank_size} memories in {n_ours} tokens"}
        a, b = measure_pair(lambda: ours(force), lambda: hf(force), repeats=s.repeats, warmup=s.warmup)
        a, b = a.scaled(n_ours), b.scaled(n_ref)
        rows.append(make_row(
            "G2", f"per-token decode with a recall every {s.recall_every} tokens over {_n(s.bank_size)} memories "
                  "vs model.generate (same <recall>-forcing processor on both)", "<= 1.25",
            ours=side("generate_with_recall", a, "s/token"), baseline=side("model.generate", b, "s/token"),
            ratio=ratio_of(a, b), ratio_def="ours / baseline", check=check,
            params={**params, "recall_every": s.recall_every}, explanation=explain.get("G2")))
    return rows


# ---- G3 ----------------------------------------------------------------------------------------------------

def numpy_topk(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: normalise, one matmul, argpartition, then sort only the k survivors."""
    q = query / np.linalg.norm(query, axis=-1, keepdims=True)
    scores = q @ vectors.T
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    top = np.take_along_axis(scores, part, axis=-1)
    order = np.argsort(-top, axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1), np.take_along_axis(part, order, axis=-1)


def topk_rows(s: Settings, tiny_hidden: int, explain: dict) -> list[dict]:
    from lightmem_exp.models.memory_head import MemoryHead

    rows, per_item = [], {}
    for n, h in s.topk_sizes:
        h = h or tiny_hidden
        g = torch.Generator().manual_seed(s.seed)
        vectors = torch.nn.functional.normalize(torch.randn(n, h, generator=g), dim=-1).contiguous()
        head = MemoryHead(vectors)
        v_np = head.vectors.numpy()  # shared storage, no copy
        queries = torch.randn(max(s.topk_check_queries, 1), 1, h, generator=g)
        same = 0
        for q in queries:
            _, ours_idx = head.topk(q, s.topk_k)
            _, ref_idx = numpy_topk(v_np, q.numpy(), s.topk_k)
            same += int(np.array_equal(ours_idx.numpy(), ref_idx))
        check = {"check": "identical top-k ids (in order)", "ok": same == len(queries),
                 "queries": len(queries), "identical": same, "summary": f"ids identical on {same}/{len(queries)}"}
        q_t, q_np = queries[0], queries[0].numpy()
        a, b = measure_pair(lambda head=head, q_t=q_t: head.topk(q_t, s.topk_k),
                            lambda v_np=v_np, q_np=q_np: numpy_topk(v_np, q_np, s.topk_k),
                            repeats=s.repeats, warmup=s.warmup, min_sample_s=s.min_sample_s)
        tag = f"N={_n(n)}, H={h}"
        rows.append(make_row(
            f"G3 {tag}", f"Memory Head top-{s.topk_k}, one query, vs numpy matmul + argpartition + sort of k",
            "<= 1.5", ours=side("MemoryHead.topk", a, "s/query"), baseline=side("numpy", b, "s/query"),
            ratio=ratio_of(a, b), ratio_def="ours / baseline", check=check,
            params={"N": n, "H": h, "k": s.topk_k, "batch": 1}, explanation=explain.get("G3")))
        if h == tiny_hidden:
            per_item[n] = (a.scaled(n), b.scaled(n))
        del head, vectors, v_np
    if len(per_item) >= 2:
        small, large = sorted(per_item)[-2:]
        a, b = per_item[large][0], per_item[small][0]
        numpy_ratio = ratio_of(per_item[large][1], per_item[small][1])
        rows.append(make_row(
            "G3 linear", f"MemoryHead.topk time per memory at N={_n(large)} / at N={_n(small)} (H={tiny_hidden})",
            "in [0.5, 2]", ours=side(f"N={_n(large)}", a, "s/memory"), baseline=side(f"N={_n(small)}", b, "s/memory"),
            ratio=ratio_of(a, b), ratio_def="per-memory time, large N / small N",
            params={"N_large": large, "N_small": small, "H": tiny_hidden, "numpy_same_ratio": numpy_ratio},
            explanation=explain.get("G3 linear")))
    return rows


def _n(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# ---- G8 ----------------------------------------------------------------------------------------------------

def bm25_rows(s: Settings, locomo_path: Path, explain: dict) -> list[dict]:
    """G8: the scorers alone (issue 5's wording: both indexes built before timing, the same queries scored top-k);
    "G8 index+query": index build + the same queries, end to end. Both rows share one top-1 agreement check."""
    from lightmem_exp.retrieval import BM25Retriever

    turns, questions = locomo_texts(locomo_path)
    docs, queries = synth_corpus(turns, questions, s.bm25_docs, s.bm25_queries, seed=s.seed)
    retriever, naive_index = BM25Retriever(docs), NaiveBM25(docs)

    def ours_query():
        return retriever.search(queries, s.bm25_k)

    def naive_query():
        return naive_index.search(queries, s.bm25_k)

    def ours_all():
        return BM25Retriever(docs).search(queries, s.bm25_k)

    def naive_all():
        return NaiveBM25(docs).search(queries, s.bm25_k)

    ours_idx, _ = ours_query()
    naive_idx, _ = naive_query()
    agree = top1_agreement(ours_idx, naive_index, queries, naive_idx)
    ok = agree["top1_up_to_ties"] >= s.bm25_min_agreement
    check = {"check": f"top-1 agreement (up to ties) >= {s.bm25_min_agreement}", "ok": ok, **agree,
             "summary": f"top-1 agrees on {agree['top1_exact']:.0%} exactly, {agree['top1_up_to_ties']:.0%} "
                        "up to ties"}
    qa, qb = measure_pair(ours_query, naive_query, repeats=s.repeats, warmup=min(s.warmup, 1))
    a, b = measure_pair(ours_all, naive_all, repeats=s.repeats, warmup=min(s.warmup, 1))
    # Where the end-to-end time goes: the index build timed alone (the query phase is the G8 row).
    ia, ib = measure_pair(lambda: BM25Retriever(docs), lambda: NaiveBM25(docs), repeats=s.repeats, warmup=1)
    params = {"docs": len(docs), "queries": len(queries), "k": s.bm25_k, "k1": 1.5, "b": 0.75,
              "index_only": {"ours_median_s": ia.median, "naive_median_s": ib.median, "speedup": ratio_of(ib, ia)},
              "query_only": {"ours_median_s": qa.median, "naive_median_s": qb.median, "speedup": ratio_of(qb, qa)}}
    where = f"{len(queries)} queries over {len(docs)} LoCoMo-turn documents"
    return [
        make_row("G8", f"BM25 scoring of {where} (top-{s.bm25_k}, indexes built before timing), speed-up over a "
                       "pure-Python BM25 scorer", ">= 10",
                 ours=side("BM25Retriever.search (bm25s)", qa, "s/run"),
                 baseline=side("naive Python BM25 scores + sort", qb, "s/run"), ratio=ratio_of(qb, qa),
                 ratio_def="baseline / ours (speed-up)", check=check, params=params, explanation=explain.get("G8")),
        make_row("G8 index+query", f"BM25 index build + {where}, end to end, speed-up over pure-Python BM25",
                 ">= 10", ours=side("BM25Retriever (bm25s)", a, "s/run"), baseline=side("naive Python BM25", b, "s/run"),
                 ratio=ratio_of(b, a), ratio_def="baseline / ours (speed-up)", check=dict(check), params=params,
                 explanation=explain.get("G8 index+query")),
    ]
