"""Bench S1 (serve): served tokens/s at 1, 4 and 16 concurrent greedy requests vs the same prompts through
`generate_with_recall` in one batch.

Setup: the tiny default model and a memory bank it builds over the first LoCoMo conversation's memories, recall
forced (every prompt ends with `<recall>`, so every row recalls a memory at its first step), the first LoCoMo
questions as chats. Served side: `lightmem_exp.serve` on 127.0.0.1 in this process (uvicorn + the per-tick engine),
c client threads of the `openai` package each sending one request, `temperature=0`, `ignore_eos`, so every row
decodes exactly `new_tokens` tokens; a sample is the wall time until all c replies are in. Baseline: the same c
prompts, left-padded, in one `generate_with_recall` call decoding `new_tokens` tokens per row. Both sides are in
seconds per generated token; ratio = served tokens/s / batch tokens/s at c = 16 (goal >= 0.8); `params` has the
tokens/s of both sides and the ratio at every c. Check: the served replies and recalled memories equal the batch's.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lightmem_exp.bench.rows import make_row, ratio_of, side
from lightmem_exp.bench.timing import measure_pair

CONCURRENCY = (1, 4, 16)


def _setup(locomo: Path):
    from lightmem_exp.bench.cases import load_tiny, tiny_config
    from lightmem_exp.data.locomo import read_locomo
    from lightmem_exp.models.memory_bank import MemoryBank
    from lightmem_exp.serve.model import MemoryModel

    cfg = tiny_config()
    model, tokenizer, ids = load_tiny(cfg)
    src = read_locomo(locomo)
    conv = src.memories[0]["conv_id"]
    memories = [{"id": m["id"], "text": m["text"]} for m in src.memories if m["conv_id"] == conv]
    bank = MemoryBank.build(model, tokenizer, memories, progress=False)
    # memory_tokens 0: a served row's budget is exactly max_tokens, the batch side's max_new_tokens
    mm = MemoryModel("tiny-recall", "step2", str(cfg.model.name_or_path), model, tokenizer,
                     int(model.config.max_position_embeddings), bank=bank, recall="force", recall_id=ids.recall,
                     memory_pad_id=ids.memory_pad, end_marker="</memory>", memory_tokens=0)
    questions = [q["question"] for q in src.qa if q["conv_id"] == conv][: max(CONCURRENCY)]
    return mm, [[{"role": "user", "content": q}] for q in questions]


def serve_rows(locomo: Path, *, quick: bool = False, repeats: int | None = None, seed: int = 0) -> list[dict]:
    """The S1 row (see the module docstring)."""
    import logging

    import openai

    from lightmem_exp.eval.methods import split_recall_output
    from lightmem_exp.models.generation import generate_with_recall
    from lightmem_exp.models.inputs import pad_batch
    from lightmem_exp.serve.app import serving

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    torch.manual_seed(seed)
    new_tokens, warmup = (8, 1) if quick else (128, 2)
    repeats = repeats or (3 if quick else 9)
    mm, chats = _setup(locomo)
    prompts = [mm.prompt_ids(c) for c in chats]
    per_c: dict[int, dict] = {}
    with serving(mm, max_batch=max(CONCURRENCY), timeout_s=600) as (url, engine), \
            ThreadPoolExecutor(max(CONCURRENCY)) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        def one(chat: list[dict]):
            r = client.chat.completions.create(model=mm.name, messages=chat, max_tokens=new_tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
            return r.choices[0].message.content, [t["memory_id"] for t in r.choices[0].recall_trace], r.usage

        def batch(n: int):
            ids, mask = pad_batch(prompts[:n], mm.pad_id)
            return generate_with_recall(mm.model, ids, mask, bank=mm.bank, recall_token_id=mm.recall_id,
                                        memory_pad_token_id=mm.memory_pad_id, max_new_tokens=new_tokens,
                                        eos_token_id=[], pad_token_id=mm.pad_id, use_sampling=False)

        for c in CONCURRENCY:
            served, direct = measure_pair(lambda c=c: list(pool.map(one, chats[:c])), lambda c=c: batch(c),
                                          repeats=repeats, warmup=warmup)
            per_c[c] = {"served": served.scaled(c * new_tokens), "batch": direct.scaled(c * new_tokens)}
        replies = list(pool.map(one, chats))
        batch_wait_ms = engine.batch_wait_s * 1000
    out = batch(len(chats))
    width = out.sequences.shape[1] - new_tokens
    texts = mm.tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
    expected = [(split_recall_output(t, mm.end_marker)[1], [x["memory_id"] for x in tr])
                for t, tr in zip(texts, out.recall_trace, strict=True)]
    same = [(content, ids) for content, ids, _ in replies] == expected
    tokens = {r[2].completion_tokens for r in replies}
    top = max(CONCURRENCY)
    ratio = ratio_of(per_c[top]["batch"], per_c[top]["served"])
    rate = {c: {"served_tokens_per_s": round(1 / v["served"].median, 1),
                "batch_tokens_per_s": round(1 / v["batch"].median, 1),
                "ratio": round(ratio_of(v["batch"], v["served"]), 3)} for c, v in per_c.items()}
    return [make_row(
        f"S1 serve@{top}",
        f"served greedy tokens/s, {top} concurrent requests (openai client -> HTTP -> per-tick batch with recall) vs "
        f"the same prompts in one generate_with_recall batch; {new_tokens} tokens per reply",
        ">= 0.8",
        ours=side(f"serve, {top} concurrent", per_c[top]["served"], "s/token"),
        baseline=side(f"generate_with_recall batch of {top}", per_c[top]["batch"], "s/token"),
        ratio=ratio, ratio_def="served tokens/s / batch tokens/s",
        check={"ok": same and tokens == {new_tokens}, "check": "served replies == batch replies",
               "summary": f"{len(replies)} replies and recalled memories identical: {same}; "
                          f"tokens per reply {sorted(tokens)}"},
        params={"concurrency": json.loads(json.dumps(rate)), "new_tokens": new_tokens, "batch_wait_ms": batch_wait_ms,
                "bank": len(mm.bank), "prompt_tokens": [len(p) for p in prompts]},
        explanation="the served side pays HTTP, JSON and the client threads on the same cores as the model, and "
                    "requests that miss a tick wait for the next batch",
    )]
