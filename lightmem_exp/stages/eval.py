"""Stage eval: every method on the same questions, one report (conf/stage/eval.yaml; methods in eval/methods.py,
scoring and files in eval/report.py).

Order of work: validate; load the data manifest and the optional upstreams (sft, step2, step1), naming each missing
one and the methods it rules out; select the questions (split conversations, a seeded per-conversation sample
stratified by category); run the methods grouped by the model that answers (base, then base + sft adapter, then the
step2 export), with the update-decision parse rate measured on the base and on the sft adapter in between; score,
judge (optional), aggregate, bootstrap (intervals and paired differences vs closed_book over questions, seeded by
cfg.seed); write predictions, summary, report, plots; log; write the manifest last.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightmem_exp.artifacts import Manifest, git_sha, load_manifest, read_json, write_jsonl, write_manifest
from lightmem_exp.config import positive, require
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.errors import ConfigError, UpstreamError
from lightmem_exp.eval import report
from lightmem_exp.eval.methods import GROUP_ORDER, METHODS, Conversation, EvalContext, Method, run_method
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.stages.base import StageResult, load_upstream

log = logging.getLogger(__name__)
UPSTREAM = ("data",)
OPTIONAL_UPSTREAM = ("sft", "step2", "step1")
SPLITS = ("train", "val", "test", "all")


def _int_at_least(n: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def validate(cfg: DictConfig) -> None:
    s = "stage."
    require(cfg, s + "methods", lambda v: len(v) > 0 and all(m in METHODS for m in v) and len(set(v)) == len(v),
            f"a non-empty list of distinct methods from {list(METHODS)}")
    require(cfg, s + "split", lambda v: v in SPLITS, f"one of {list(SPLITS)}")
    require(cfg, s + "max_questions_per_conv", _int_at_least(1), "null or an integer >= 1", allow_none=True)
    require(cfg, s + "batch_size", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "max_new_tokens", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "context_tokens", _int_at_least(16), "null or an integer >= 16", allow_none=True)
    require(cfg, s + "ks", lambda v: len(v) > 0 and all(_int_at_least(1)(k) for k in v), "a list of integers >= 1")
    require(cfg, s + "rag.k", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "rag.hybrid_depth", _int_at_least(1), "an integer >= 1")
    for key in ("chunk_turns", "prefilter", "top_sessions"):
        require(cfg, f"{s}session_rank.{key}", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "session_rank.session_tokens", _int_at_least(8), "an integer >= 8")
    require(cfg, s + "recall.bank", lambda v: v in ("step1", "export", "encode"), "'step1', 'export' or 'encode'")
    require(cfg, s + "recall.memory_tokens", _int_at_least(0), "an integer >= 0")
    require(cfg, s + "recall.force", lambda v: isinstance(v, bool), "true or false")
    require(cfg, s + "update_decisions.max", _int_at_least(0), "an integer >= 0")
    require(cfg, s + "update_decisions.max_new_tokens", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "judge.enabled", lambda v: isinstance(v, bool), "true or false")
    if cfg.stage.judge.enabled:
        require(cfg, s + "judge.base_url", lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
                "an http(s) URL")
        require(cfg, s + "judge.model", lambda v: isinstance(v, str) and v, "a model name")
        require(cfg, s + "judge.api_key_env", lambda v: isinstance(v, str) and v, "null or an environment variable "
                "name", allow_none=True)
        require(cfg, s + "judge.timeout_s", positive, "a number > 0")
        require(cfg, s + "judge.max_retries", _int_at_least(0), "an integer >= 0")
        require(cfg, s + "judge.concurrency", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "headline.method", lambda v: v in METHODS, f"one of {list(METHODS)}")
    require(cfg, s + "headline.metric", lambda v: isinstance(v, str) and v, "a metric name such as f1")
    require(cfg, s + "plots", lambda v: isinstance(v, bool), "true or false")
    require(cfg, s + "bootstrap.resamples", _int_at_least(1), "an integer >= 1")
    require(cfg, s + "bootstrap.confidence", lambda v: isinstance(v, float) and 0 < v < 1, "a number in (0, 1)")
    if cfg.stage.context_tokens is not None and cfg.stage.max_new_tokens >= cfg.stage.context_tokens:
        raise ConfigError(s + "max_new_tokens", f"got {cfg.stage.max_new_tokens}, must be below stage.context_tokens")


# ------------------------------------------------------------------------------------------------------ upstream


def _explicit(cfg: DictConfig, name: str) -> bool:
    return bool(OmegaConf.select(cfg, f"stage.inputs.{name}", default=None))


def _optional(cfg: DictConfig, name: str, found: dict[str, Manifest], missing: dict[str, str]) -> None:
    """Load upstream `name` if it finished; a missing default upstream is recorded, a missing explicit one raises."""
    try:
        found[name] = load_upstream(cfg, name)
    except UpstreamError as e:
        if _explicit(cfg, name):
            raise
        missing[name] = str(e)


def resolve_upstream(cfg: DictConfig, data: Manifest) -> tuple[dict[str, Manifest], dict[str, str]]:
    found: dict[str, Manifest] = {"data": data}
    missing: dict[str, str] = {}
    _optional(cfg, "sft", found, missing)
    _optional(cfg, "step2", found, missing)
    if "step2" in found and cfg.stage.recall.bank == "step1":
        ref = found["step2"].inputs.get("step1", {}).get("manifest")
        if not _explicit(cfg, "step1") and ref and Path(ref).exists():
            found["step1"] = load_manifest(ref, expect_stage="step1")
        else:
            _optional(cfg, "step1", found, missing)
    return found, missing


def not_run_reasons(methods: list[Method], missing: dict[str, str]) -> dict[str, str]:
    out = {}
    for m in methods:
        absent = [s for s in m.requires() if s in missing]
        if absent:
            out[m.name] = "; ".join(f"upstream {s} not run ({missing[s]})" for s in absent)
    return out


# ----------------------------------------------------------------------------------------------------- questions


def select_questions(qa: list[dict], cap: int | None, seed: int) -> list[dict]:
    """All of one conversation's questions, or a seeded sample of `cap` taken round-robin over categories (so every
    category is represented), in the data's order."""
    if cap is None or len(qa) <= cap:
        return list(qa)
    by_cat: dict = defaultdict(list)
    for q in qa:
        by_cat[q["category"]].append(q)
    queues = []
    for cat in sorted(by_cat, key=str):
        rows = list(by_cat[cat])
        random.Random(f"{seed}:eval:{rows[0]['conv_id']}:{cat}").shuffle(rows)
        queues.append(rows)
    chosen: list[dict] = []
    while len(chosen) < cap:
        for qs in queues:
            if qs and len(chosen) < cap:
                chosen.append(qs.pop())
    order = {q["id"]: i for i, q in enumerate(qa)}
    return sorted(chosen, key=lambda q: order[q["id"]])


def build_conversations(data: Manifest, split: str, cap: int | None, seed: int) -> list[Conversation]:
    """The split's conversations from the data stage's files, with their selected questions."""
    arts = {k: read_artifact(data, k) for k in ("qa", "memories", "sessions")}
    return conversations_of(read_json(data.path("splits")), arts, split, cap, seed, source=str(data.path("splits")))


def conversations_of(splits: dict[str, list[str]], artifacts: dict[str, list[dict]], split: str, cap: int | None,
                     seed: int, source: str = "splits") -> list[Conversation]:
    """The split's conversations from data-stage artifacts (`qa`, `memories`, `sessions` rows; the bench passes
    them in memory), with their selected questions."""
    conv_ids = [c for s in ("train", "val", "test") for c in splits[s]] if split == "all" else list(splits[split])
    if not conv_ids:
        raise UpstreamError(f"{source}: the {split} split has no conversations (choose another stage.split, or all)")
    qa, memories, sessions = (artifacts[k] for k in ("qa", "memories", "sessions"))
    group = lambda rows: {c: [r for r in rows if r["conv_id"] == c] for c in conv_ids}  # noqa: E731
    by_q, by_m, by_s = group(qa), group(memories), group(sessions)
    return [Conversation(c, by_m[c], by_s[c], select_questions(by_q[c], cap, seed)) for c in conv_ids]


# ---------------------------------------------------------------------------------------------------------- run


def _update_rows(data: Manifest, convs: list[Conversation], cap: int, seed: int) -> list[dict]:
    ids = {c.conv_id for c in convs}
    rows = [r for r in read_artifact(data, "update_decisions") if r["conv_id"] in ids]
    if len(rows) > cap:
        rows = sorted(random.Random(f"{seed}:eval:update").sample(rows, cap), key=lambda r: r["id"])
    return rows


def measure_updates(ctx: EvalContext, group: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Update-decision parse rate and accuracy through the local_hf_lora backend on the `group` model."""
    from lightmem_exp.backends.local_hf_lora import LocalHFLoraBackend, LocalHFLoraConfig
    from lightmem_exp.lit.sft import update_scores

    lm = ctx.lm(group)
    ud = ctx.st.update_decisions
    backend = LocalHFLoraBackend.from_model(lm.model, lm.tokenizer, LocalHFLoraConfig(
        base_model=str(lm.source), max_seq_len=lm.context_tokens, max_retries=0, batch_size=int(ctx.st.batch_size),
        gen_kwargs={"max_new_tokens": int(ud.max_new_tokens), "do_sample": False}))
    scores, records = update_scores(backend, rows)
    return {**scores, "n": float(len(rows))}, records


def summarize(cfg: DictConfig, records: list[dict], benchmark: str) -> dict[str, float]:
    """Every metric of scored records: per method and category (`report.aggregate`), then the bootstrap intervals,
    paired differences vs closed_book and added prompt tokens (`report.compare`, seeded by cfg.seed)."""
    st = cfg.stage
    metrics = report.aggregate(records, benchmark, sorted({int(k) for k in st.ks}))
    metrics.update(report.compare(records, benchmark, resamples=int(st.bootstrap.resamples),
                                  confidence=float(st.bootstrap.confidence), seed=int(cfg.seed), rag_k=int(st.rag.k)))
    return metrics


def settings_of(cfg: DictConfig, convs: list[Conversation], ctx: EvalContext, metrics: dict) -> dict[str, str]:
    """The defaults that bound what the run could find, in words, for the report and the manifest."""
    st, sr = cfg.stage, cfg.stage.session_rank
    per_conv = ", ".join(f"{c.conv_id}: {len(c.questions)}" for c in convs)
    out = {"questions": f"{sum(len(c.questions) for c in convs)} from {len(convs)} conversations ({per_conv}); "
                        f"stage.max_questions_per_conv={st.max_questions_per_conv}, a sample stratified by category, "
                        f"seed {cfg.seed}"}
    if ctx.context_tokens:
        line = (", ".join(f"{g} model {n} tokens" for g, n in ctx.context_tokens.items())
                + f" (stage.context_tokens={'null' if st.context_tokens is None else st.context_tokens}: "
                  "null is model.max_seq_len; either is capped at the model's "
                  f"max_position_embeddings), of which max_new_tokens are kept for the reply")
        cov = metrics.get("full_context/context_coverage")
        if cov is not None:
            line += (f"; full_context kept on average {cov:.1%} of a conversation's "
                     f"{metrics['full_context/context_tokens_full']:.0f} tokens (oldest lines dropped first; "
                     f"{metrics['full_context/truncated_frac']:.0%} of its prompts cut)")
        out["context"] = line
    out["session_rank"] = (f"MiniLM pre-filter keeps {sr.prefilter} sessions (each scored by its best run of "
                           f"{sr.chunk_turns} turns), the model re-ranks them on their first {sr.session_tokens} "
                           f"tokens, the top {sr.top_sessions} go in the prompt")
    out["rag.k"] = (f"{st.rag.k} memories in the prompt (rag_*, recall_rag); rag_hybrid fuses the top "
                    f"{st.rag.hybrid_depth} of each retriever")
    out["max_new_tokens"] = (f"{st.max_new_tokens}, greedy, batch {st.batch_size}; recall and recall_rag may "
                             f"decode recall.memory_tokens={st.recall.memory_tokens} more for the recalled memory "
                             f"(recall.bank={st.recall.bank})")
    out["bootstrap"] = (f"{st.bootstrap.resamples} resamples, {st.bootstrap.confidence:.0%} intervals, "
                        f"seed {cfg.seed}")
    return out


def choose_headline(cfg: DictConfig, metrics: dict, methods: list[str], ran: list[str],
                    not_run: dict[str, str]) -> dict:
    h = cfg.stage.headline
    requested = f"{h.method}/{h.metric}"
    if requested in metrics:
        return {"requested": requested, "used": requested, "value": metrics[requested], "fallback_reason": None}
    reason = (f"{h.method} not run ({not_run[h.method]})" if h.method in not_run
              else f"{h.method} not in stage.methods" if h.method not in methods
              else f"no metric {h.metric} for {h.method}")
    for m in methods:
        if m in ran and f"{m}/{h.metric}" in metrics:
            used = f"{m}/{h.metric}"
            log.warning("eval headline: %s; falling back to %s", reason, used)
            return {"requested": requested, "used": used, "value": metrics[used],
                    "fallback_reason": f"{reason}; fell back to the first method that ran, {m}"}
    return {"requested": requested, "used": requested, "value": math.nan,
            "fallback_reason": f"{reason}; no method that ran has {h.metric}"}


def run(cfg: DictConfig) -> StageResult:
    t_start = time.perf_counter()
    sdir, st = Path(cfg.runtime.stage_dir), cfg.stage
    data = load_upstream(cfg, "data")
    upstream, missing = resolve_upstream(cfg, data)
    for name, why in missing.items():
        log.warning("eval: upstream %s not available: %s", name, why)

    ctx = EvalContext(cfg, {k: v for k, v in upstream.items() if k != "data"})
    methods = [METHODS[name](ctx) for name in st.methods]
    not_run = not_run_reasons(methods, missing)
    runnable = [m for m in methods if m.name not in not_run]
    convs = build_conversations(data, st.split, st.max_questions_per_conv, cfg.seed)
    questions = [q for c in convs for q in c.questions]
    benchmark = report.benchmark_of(questions)
    log.info("eval: %d questions from %d %s conversations (%s), methods %s, not run %s", len(questions), len(convs),
             st.split, benchmark, [m.name for m in runnable], list(not_run))

    records: list[dict] = []
    run_stats: dict[str, dict] = {}
    update: dict[str, dict] = {}
    update_records: list[dict] = []
    want_updates = "sft" in upstream and st.update_decisions.max > 0
    rows_u = _update_rows(data, convs, int(st.update_decisions.max), cfg.seed) if want_updates else []
    # One-time loads are timed apart, so per-question figures hold index building and answering only.
    setup_s: dict[str, float] = {}
    if any(m.uses_minilm for m in runnable):
        from lightmem_exp.retrieval import minilm

        t0 = time.perf_counter()
        minilm()
        setup_s["minilm_load"] = time.perf_counter() - t0
    for group in GROUP_ORDER:
        group_methods = [m for m in runnable if m.group == group]
        if group == "sft" and rows_u:  # the base reference first: the sft adapter then wraps the same base model
            update["base"], recs = measure_updates(ctx, "base", rows_u)
            update_records += [{"model": "base", "id": r["id"], **x} for r, x in zip(rows_u, recs, strict=True)]
        if group_methods or (group == "sft" and rows_u):
            t0 = time.perf_counter()
            ctx.lm(group)
            setup_s[f"{group}_model_load"] = time.perf_counter() - t0
        for m in group_methods:
            recs, stats = run_method(m, convs, batch_size=int(st.batch_size), progress=bool(cfg.progress))
            records += recs
            run_stats[m.name] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                                 "seconds_per_question": round((stats["prepare_seconds"] + stats["answer_seconds"])
                                                               / max(len(recs), 1), 3)}
        if group == "sft" and rows_u:
            update["sft_adapter"], recs = measure_updates(ctx, "sft", rows_u)
            update_records += [{"model": "sft_adapter", "id": r["id"], **x} for r, x in zip(rows_u, recs, strict=True)]
        if group != "base" or not ({"sft"} & {m.group for m in runnable} or rows_u):
            ctx.release(group)  # the base stays loaded when the sft adapter is to wrap it next
        if group == "sft":
            ctx.release("base")

    for r in records:
        r["scores"] = report.score_record(r, benchmark)
    judge_info = _judge(cfg, records, sdir) if st.judge.enabled else None

    ks = sorted({int(k) for k in st.ks})
    metrics = summarize(cfg, records, benchmark)
    for name, v in update.items():
        metrics.update({f"update/{name}/{k}": float(x) for k, x in v.items()})
    ran = [m.name for m in runnable]
    headline = choose_headline(cfg, metrics, list(st.methods), ran, not_run)
    metrics["headline"] = headline["value"]

    # Files, then the logger, then the manifest (last).
    outputs = {"predictions": "predictions.jsonl", "summary": "summary.csv", "report": "report.md"}
    write_jsonl(sdir / "predictions.jsonl", records)
    report.write_summary_csv(sdir / "summary.csv", benchmark, ks, metrics, list(st.methods), not_run)
    plots = report.write_plots(sdir / "plots", benchmark, metrics, ran) if st.plots and ran else []
    if plots:
        outputs["plots"] = "plots"
    if update_records:
        write_jsonl(sdir / "update_decisions.jsonl", update_records)
        outputs["update_decisions"] = "update_decisions.jsonl"
    if judge_info:
        outputs["judge"] = "judge.jsonl"
    setup = {
        "benchmark": f"{benchmark} ({data.dir})", "split": st.split,
        "conversations": ", ".join(c.conv_id for c in convs),
        "model": f"{cfg.model.name} ({cfg.model.name_or_path})",
    }
    settings = settings_of(cfg, convs, ctx, metrics)
    note = ("model=tiny is a random-init 1.3M-parameter model: these accuracies measure the machinery (prompts, "
            "retrieval, recall, scoring), not a language model's ability." if cfg.model.name == "tiny" else None)
    text = report.render_report(benchmark=benchmark, ks=ks, metrics=metrics, methods_run=ran, not_run=not_run,
                                setup=setup, settings=settings, headline=headline, upstream=upstream,
                                missing_upstream=missing, update=update, judge=judge_info, git_sha=git_sha(), note=note,
                                confidence=float(st.bootstrap.confidence), resamples=int(st.bootstrap.resamples),
                                rag_k=int(st.rag.k))
    from lightmem_exp.artifacts import write_text

    write_text(sdir / "report.md", text)
    logger = make_logger(cfg, sdir)
    report.log_to_logger(logger, metrics, benchmark, ks, ran, plots)

    manifest = Manifest(
        stage="eval", seed=cfg.seed, metrics=metrics, run_id=run_id(logger),
        inputs={name: m.ref() for name, m in upstream.items()}, outputs=outputs,
        stats={"benchmark": benchmark, "split": st.split, "conversations": [c.conv_id for c in convs],
               "questions": {c.conv_id: [q["id"] for q in c.questions] for c in convs},
               "methods_run": ran, "not_run": not_run, "missing_upstream": missing, "headline": headline,
               "settings": settings,
               "methods": run_stats, "judge": judge_info,
               "setup_seconds": {k: round(v, 2) for k, v in setup_s.items()},
               "embedding_cache": {"hits": ctx.embed.hits, "misses": ctx.embed.misses},
               # index building + answering, every method, per question (LongMemEval: one haystack per question)
               "seconds_per_question_all_methods": round(sum(v["seconds_per_question"] for v in run_stats.values()),
                                                         3),
               "seconds": round(time.perf_counter() - t_start, 1)},
    )
    write_manifest(sdir, manifest)
    return StageResult(stage="eval", dir=sdir, manifest=manifest, metrics=metrics, headline=float(headline["value"]))


def _judge(cfg: DictConfig, records: list[dict], sdir: Path) -> dict:
    """Judge every prediction; verdicts go into the records and judge.jsonl (never the key)."""
    from lightmem_exp.eval.judge import LLMJudge, judge_messages, prompt_sha256

    j = cfg.stage.judge
    judge = LLMJudge(j.base_url, j.model, api_key_env=j.api_key_env, timeout_s=float(j.timeout_s),
                     max_retries=int(j.max_retries), concurrency=int(j.concurrency))
    verdicts = judge.judge_many([judge_messages(r["question"], r["answer"], r["prediction"], r["abstention"])
                                 for r in records])
    rows = []
    for r, v in zip(records, verdicts, strict=True):
        r["judge"] = {"correct": v.correct, "reply": v.reply, "error": v.error}
        rows.append({"method": r["method"], "id": r["id"], "correct": v.correct, "reply": v.reply, "error": v.error,
                     "attempts": v.attempts})
    write_jsonl(sdir / "judge.jsonl", rows)
    return {"model": j.model, "base_url": j.base_url, "prompt_sha256": prompt_sha256(),
            "judged": len(rows), "failed": sum(v.correct is None for v in verdicts)}
