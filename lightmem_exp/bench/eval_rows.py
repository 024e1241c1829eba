"""Bench rows E1 (issue 13): what each eval method costs the answering model, counted by the eval stage's own code.

- `E1` (goal <= 0.1): prompt tokens a method ADDS per question over `closed_book` on the same questions, `recall` vs
  `rag_dense` at rag.k = 5. (It replaces issue 5's ratio of TOTAL prompt tokens, which a fixed part shared by both
  prompts, ~58 tokens of system prompt, template and question, kept above 0.2 whatever recall does.)
- `E1 cost` (a table, no goal): every method side by side, tokens the model processes per question (prompt,
  generated with recall's decoded memory, session_rank's scoring passes) and latency: recall pays in decode steps
  what RAG pays in prefill.

Both come from one run of the eval stage's methods (`eval.methods.run_method`) on the questions the stage selects by
default (its `EvalConfig`, test-split conversations of the bundled LoCoMo file, data built by the data
stage's `build_dataset`), summarised by `stages.eval.summarize`, the table rendered by `eval.report.cost_table`.
The model is the tiny one, as in every bench row. recall needs a step2 export and the bench trains none, so the base
tiny model stands in for it with `eval.recall.bank=encode` (the conversation's memories encoded by that model): its
prompt is exactly recall's (the closed-book prompt + `<recall>`, checked per question), but an untrained model does
not close the memory with the end marker, so its decode count is a ceiling (max_new_tokens + recall.memory_tokens
unless it stops at end-of-sequence). Token counts are deterministic, so the methods run once (no repeats); the
latencies are that one pass's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from lightmem_exp.artifacts import Manifest
from lightmem_exp.bench.rows import make_row, side
from lightmem_exp.bench.timing import Stats
from lightmem_exp.bench.train_cases import stage_config

log = logging.getLogger(__name__)

K = 5  # the rag.k the goal is set at (eval.report.ADDED_PROMPT_GOAL_K)


def eval_config(overrides: list[str]) -> DictConfig:
    """The eval stage's config composed as the CLI would, on the tiny model (nothing written)."""
    return stage_config("eval", overrides)


def stand_in_step2(cfg: DictConfig) -> Manifest:
    """An in-memory step2 manifest whose export is the base tiny model (built into paths.cache when missing)."""
    from lightmem_exp.models.loading import resolve_model_path

    return Manifest(stage="step2", seed=int(cfg.seed), outputs={"model": ".", "tokenizer": "."},
                    dir=Path(resolve_model_path(cfg.model, cfg.paths.data)))


def eval_cost_rows(locomo_path: Path, *, seed: int = 0, quick: bool = False) -> tuple[list[dict], dict]:
    """The `E1` row and the `E1 cost` table (markdown and the cost metrics), from one run of the eval methods."""
    from lightmem_exp.config import typed
    from lightmem_exp.data import build_dataset
    from lightmem_exp.eval import report
    from lightmem_exp.eval.methods import GROUP_ORDER, METHODS, EvalContext, run_method
    from lightmem_exp.retrieval import minilm
    from lightmem_exp.stages import validate
    from lightmem_exp.stages.eval import conversations_of, not_run_reasons, summarize

    cfg = eval_config([f"seed={seed}", f"data.path={locomo_path}", f"eval.rag.k={K}", "eval.recall.bank=encode",
                       "progress=false", *(["eval.max_questions_per_conv=2"] if quick else [])])
    validate(cfg)
    st, d = typed(cfg, "eval"), cfg.data
    built = build_dataset(d.name, Path(d.path), None, lambda _: 0, seed=int(cfg.seed),
                          split_fractions=tuple(d.split_fractions), context_window=int(d.context_window),
                          progress=False)
    convs = conversations_of(built.splits, built.artifacts, st.split, st.max_questions_per_conv, int(cfg.seed))
    ctx = EvalContext(cfg, {"step2": stand_in_step2(cfg)})
    methods = [METHODS[name](ctx) for name in st.methods]
    not_run = not_run_reasons(methods, {"sft": "no sft stage in the bench"})
    runnable = [m for m in methods if m.name not in not_run]
    minilm()  # loaded once before any method, as the stage does, so no method's prepare time carries it
    records, prepare_s = [], {}
    for group in GROUP_ORDER:
        for m in (m for m in runnable if m.group == group):
            log.info("E1: eval method %s", m.name)
            recs, stats = run_method(m, convs, batch_size=st.batch_size)
            records += recs
            prepare_s[m.name] = round(stats["prepare_seconds"], 2)
        ctx.release(group)
    for r in records:
        r["scores"] = report.score_record(r, "locomo")
    metrics = summarize(st, records, "locomo", int(cfg.seed))
    ran = [m.name for m in runnable]

    by_q = {(r["method"], r["conv_id"], r["id"]): r["prompt_tokens"] for r in records}
    closed = [(c, i) for (m, c, i) in by_q if m == "closed_book"]
    plus_one = sum(by_q.get(("recall", c, i)) == by_q[("closed_book", c, i)] + 1 for c, i in closed)
    n = len(closed)
    check = {"check": "recall's prompt is closed_book's + <recall> on every question (both answered all of them)",
             "ok": n > 0 and plus_one == n == metrics.get("recall/n"), "questions": n, "recall_plus_one": plus_one,
             "summary": f"{plus_one}/{n} recall prompts are the closed-book prompt + 1 token"}
    recall, rag = (metrics.get(f"{m}/cost/added_prompt_tokens", float("nan")) for m in ("recall", "rag_dense"))
    params = {"questions": n, "conversations": [c.conv_id for c in convs],
              "max_questions_per_conv": st.max_questions_per_conv, "k": K, "model": "tiny",
              "step2": "stand-in: the base tiny model, eval.recall.bank=encode", "not_run": not_run,
              "closed_book_prompt_tokens": metrics.get("closed_book/cost/prompt_tokens"),
              "recall_added_prompt_tokens": recall, "rag_dense_added_prompt_tokens": rag,
              "rag_dense_truncated": metrics.get("rag_dense/truncated_frac"), "prepare_seconds": prepare_s}
    row = make_row(
        "E1", f"prompt tokens added per question over closed_book, recall vs rag_dense (MiniLM top-{K}), {n} LoCoMo "
              "test questions", f"<= {report.ADDED_PROMPT_GOAL}",
        ours=side("recall", Stats.of([recall]), "added tokens/question"),
        baseline=side(f"rag_dense k={K}", Stats.of([rag]), "added tokens/question"),
        ratio=metrics.get(report.ADDED_RATIO, float("nan")), ratio_def="mean added prompt tokens, recall / rag_dense",
        check=check, params=params, explanation=_explain)
    table = {"name": "E1 cost", "intro": (
        f"Tokens the answering model processes and latency per question, every method of the eval stage on the same "
        f"{n} LoCoMo test questions (tiny model, rag.k={K}, max_new_tokens={st.max_new_tokens}, "
        f"recall.memory_tokens={st.recall.memory_tokens}; no goal). recall runs on a stand-in export, the untrained "
        "base model, which never closes the memory with the end marker: its generated tokens are the ceiling "
        "max_new_tokens + recall.memory_tokens (unless it stops at end-of-sequence), and none count as recalled "
        "memory, which ends at the marker. Not run: "
        + (", ".join(f"{m} ({why})" for m, why in not_run.items()) or "none") + "."),
             "markdown": report.cost_table(metrics, ran), "note": report.COST_NOTE,
             "metrics": {k: v for k, v in metrics.items() if "cost/" in k or k.endswith(("/n", "/truncated_frac"))}}
    return [row], table


def _explain(row: dict) -> str:
    p = row["params"]
    return (f"recall adds {p['recall_added_prompt_tokens']:.1f} prompt tokens per question over closed_book, "
            f"rag_dense {p['rag_dense_added_prompt_tokens']:.1f} (its top-{p['k']} memory block). recall should add "
            "only the <recall> token: a larger addition means its prompt gained context (e.g. recall_rag's memories), "
            "which is what the check reports per question.")
