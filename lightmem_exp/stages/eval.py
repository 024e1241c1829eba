"""Stage eval: every method on the same questions, one report (knobs `eval.*`, `EvalConfig`; methods in
eval/methods.py, scoring and files in eval/report.py).

Phases: `setup_data` loads the data manifest and the optional upstreams (sft, step2, step1), naming each missing one,
and selects the questions (split conversations, a seeded per-conversation sample stratified by category);
`setup_methods` builds the methods and names those a missing upstream rules out; `answer` runs them grouped by the
model that answers (base, then base + sft adapter, then the step2 export), with the update-decision parse rate
measured on the base and on the sft adapter in between; `score` scores, judges (optional), aggregates and
bootstraps (intervals and paired differences vs closed_book over questions, seeded by `seed`); `report` writes
predictions, summary, report and plots and logs them; `finish` writes the manifest last.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from lightmem_exp.artifacts import Manifest, git_sha, load_manifest, read_json, read_jsonl, write_jsonl, write_text
from lightmem_exp.config.schema import EvalConfig, Headline
from lightmem_exp.data.schema import read_artifact
from lightmem_exp.errors import UpstreamError
from lightmem_exp.eval import report
from lightmem_exp.eval.methods import GROUP_ORDER, METHODS, Conversation, EvalContext, Method, run_method
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.stages.base import Recipe, StageResult

log = logging.getLogger(__name__)


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
        raise UpstreamError(f"{source}: the {split} split has no conversations (choose another eval.split, or all)")
    qa, memories, sessions = (artifacts[k] for k in ("qa", "memories", "sessions"))
    group = lambda rows: {c: [r for r in rows if r["conv_id"] == c] for c in conv_ids}  # noqa: E731
    by_q, by_m, by_s = group(qa), group(memories), group(sessions)
    return [Conversation(c, by_m[c], by_s[c], select_questions(by_q[c], cap, seed)) for c in conv_ids]


def written_evidence_questions(convs: list[Conversation], qa: list[dict], written: set[str]) -> list[Conversation]:
    """Per conversation, every question whose evidence includes a written memory, in the data's order."""
    return [Conversation(c.conv_id, c.memories, c.sessions,
                         [q for q in qa if q["conv_id"] == c.conv_id and written & set(q["evidence_memory_ids"])])
            for c in convs]


def _update_rows(data: Manifest, convs: list[Conversation], cap: int, seed: int) -> list[dict]:
    ids = {c.conv_id for c in convs}
    rows = [r for r in read_artifact(data, "update_decisions") if r["conv_id"] in ids]
    if len(rows) > cap:
        rows = sorted(random.Random(f"{seed}:eval:update").sample(rows, cap), key=lambda r: r["id"])
    return rows


# ------------------------------------------------------------------------------------------------------ scoring


def not_run_reasons(methods: list[Method], missing: dict[str, str]) -> dict[str, str]:
    out = {}
    for m in methods:
        absent = [s for s in m.requires() if s in missing]
        if absent:
            out[m.name] = "; ".join(f"upstream {s} not run ({missing[s]})" for s in absent)
    return out


def summarize(args: EvalConfig, records: list[dict], benchmark: str, seed: int) -> dict[str, float]:
    """Every metric of scored records: per method and category (`report.aggregate`), then the bootstrap intervals,
    paired differences vs closed_book and added prompt tokens (`report.compare`, seeded by `seed`)."""
    metrics = report.aggregate(records, benchmark, sorted(set(args.ks)))
    metrics.update(report.compare(records, benchmark, resamples=args.bootstrap.resamples,
                                  confidence=float(args.bootstrap.confidence), seed=seed, rag_k=args.rag.k))
    return metrics


def choose_headline(h: Headline, metrics: dict, methods: list[str], ran: list[str], not_run: dict[str, str]) -> dict:
    """`h.method/h.metric` when it was measured, else the first method of `methods` that ran, with the reason."""
    requested = f"{h.method}/{h.metric}"
    if requested in metrics:
        return {"requested": requested, "used": requested, "value": metrics[requested], "fallback_reason": None}
    reason = (f"{h.method} not run ({not_run[h.method]})" if h.method in not_run
              else f"{h.method} not in eval.methods" if h.method not in methods
              else f"no metric {h.metric} for {h.method}")
    for m in methods:
        if m in ran and f"{m}/{h.metric}" in metrics:
            used = f"{m}/{h.metric}"
            log.warning("eval headline: %s; falling back to %s", reason, used)
            return {"requested": requested, "used": used, "value": metrics[used],
                    "fallback_reason": f"{reason}; fell back to the first method that ran, {m}"}
    return {"requested": requested, "used": requested, "value": math.nan,
            "fallback_reason": f"{reason}; no method that ran has {h.metric}"}


# ------------------------------------------------------------------------------------------------------- recipe


class EvalRecipe(Recipe):
    name = "eval"
    args: EvalConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.started = time.perf_counter()
        self.missing: dict[str, str] = {}         # optional upstream -> why it is not available
        self.convs: list[Conversation] = []
        self.written_convs: list[Conversation] = []  # questions whose evidence step2 wrote (eval.written_evidence)
        self.benchmark = ""
        self.update_rows: list[dict] = []
        self.ctx: EvalContext | None = None
        self.runnable: list[Method] = []
        self.not_run: dict[str, str] = {}         # method -> why it did not run
        self.records: list[dict] = []
        self.run_stats: dict[str, dict] = {}
        self.setup_s: dict[str, float] = {}       # one-time loads, timed apart from answering
        self.update: dict[str, dict] = {}
        self.update_records: list[dict] = []
        self.judge_info: dict | None = None
        self.headline: dict = {}

    def run(self) -> StageResult:
        self.setup_data()
        self.setup_methods()
        self.answer()
        self.score()
        self.report()
        return self.finish(float(self.headline["value"]))

    # ---- phases
    def setup_data(self) -> list[Conversation]:
        """The data manifest (required) and the sft, step2 and step1 ones (optional: a missing one is recorded, one
        set explicitly under eval.inputs must exist); the split's conversations with their selected questions, and
        the update-decision rows when the sft adapter is there to be measured."""
        a, seed = self.args, self.cfg.seed
        data = self.upstream("data")
        self._optional("sft")
        self._optional("step2")
        if "step2" in self.inputs and a.recall.bank == "step1":
            ref = self.inputs["step2"].inputs.get("step1", {}).get("manifest")
            if not a.inputs.step1 and ref and Path(ref).exists():
                self.upstream("step1", load_manifest(ref, expect_stage="step1"))
            else:
                self._optional("step1")
        for name, why in self.missing.items():
            log.warning("eval: upstream %s not available: %s", name, why)
        self.convs = build_conversations(data, a.split, a.max_questions_per_conv, seed)
        self.benchmark = report.benchmark_of([q for c in self.convs for q in c.questions])
        step2 = self.inputs.get("step2")
        if a.written_evidence.enabled and step2 is not None and "bank" in step2.outputs:
            from lightmem_exp.models.memory_bank import ENTRIES_FILE

            written = {e["id"] for e in read_jsonl(step2.path("bank") / ENTRIES_FILE)}
            self.written_convs = written_evidence_questions(self.convs, read_artifact(data, "qa"), written)
        if "sft" in self.inputs and a.update_decisions.max > 0:
            self.update_rows = _update_rows(data, self.convs, a.update_decisions.max, seed)
        return self.convs

    def setup_methods(self) -> list[Method]:
        """The requested methods on a shared context; those a missing upstream rules out are named, not run."""
        self.ctx = EvalContext(self.cfg, {k: v for k, v in self.inputs.items() if k != "data"})
        methods = [METHODS[name](self.ctx) for name in self.args.methods]
        self.not_run = not_run_reasons(methods, self.missing)
        self.runnable = [m for m in methods if m.name not in self.not_run]
        log.info("eval: %d questions from %d %s conversations (%s), methods %s, not run %s",
                 sum(len(c.questions) for c in self.convs), len(self.convs), self.args.split, self.benchmark,
                 [m.name for m in self.runnable], list(self.not_run))
        return self.runnable

    def answer(self) -> list[dict]:
        """Every runnable method, grouped by the model that answers; the update decisions on the base and then on the
        sft adapter around the sft group. One-time loads are timed apart, so per-question figures hold index
        building and answering only."""
        ctx, rows = self.ctx, self.update_rows
        if any(m.uses_minilm for m in self.runnable):
            from lightmem_exp.retrieval import minilm

            t0 = time.perf_counter()
            minilm()
            self.setup_s["minilm_load"] = time.perf_counter() - t0
        sft_next = "sft" in {m.group for m in self.runnable} or bool(rows)
        for group in GROUP_ORDER:
            group_methods = [m for m in self.runnable if m.group == group]
            if group == "sft" and rows:  # the base reference first: the sft adapter then wraps the same base model
                self._measure_updates("base", "base")
            if group_methods or (group == "sft" and rows):
                t0 = time.perf_counter()
                ctx.lm(group)
                self.setup_s[f"{group}_model_load"] = time.perf_counter() - t0
            for m in group_methods:
                self._run_method(m)
                if m.name in self.args.written_evidence.methods:
                    self._run_written_extra(m)
            if group == "sft" and rows:
                self._measure_updates("sft", "sft_adapter")
            if group != "base" or not sft_next:
                ctx.release(group)  # the base stays loaded when the sft adapter is to wrap it next
            if group == "sft":
                ctx.release("base")
        return self.records

    def score(self) -> dict:
        """Rule-based scores per record, the judge's verdicts (when enabled), every aggregate metric, the update
        decisions' and the headline."""
        for r in self.records:
            r["scores"] = report.score_record(r, self.benchmark)
        if self.args.judge.enabled:
            self.judge_info = self._judge()
        self.metrics = summarize(self.args, [r for r in self.records if r["sampled"]], self.benchmark, self.cfg.seed)
        written = {(q["conv_id"], q["id"]) for c in self.written_convs for q in c.questions}
        methods = self.args.written_evidence.methods
        subset = [r for r in self.records if (r["conv_id"], r["id"]) in written and r["method"] in methods]
        if subset:
            self.metrics.update({f"{report.WRITTEN}/{k}": v
                                 for k, v in summarize(self.args, subset, self.benchmark, self.cfg.seed).items()})
        for name, v in self.update.items():
            self.metrics.update({f"update/{name}/{k}": float(x) for k, x in v.items()})
        self.headline = choose_headline(self.args.headline, self.metrics, list(self.args.methods), self.ran,
                                        self.not_run)
        self.metrics["headline"] = self.headline["value"]
        return self.metrics

    def report(self) -> None:
        """predictions.jsonl, summary.csv, plots/, update_decisions.jsonl, report.md; the tables and plots to the
        experiment logger; the run's stats for the manifest."""
        a, sdir, ran = self.args, self.dir, self.ran
        self.outputs = {"predictions": "predictions.jsonl", "summary": "summary.csv", "report": "report.md"}
        write_jsonl(sdir / "predictions.jsonl", self.records)
        report.write_summary_csv(sdir / "summary.csv", self.benchmark, self.ks, self.metrics, list(a.methods),
                                 self.not_run)
        plots = report.write_plots(sdir / "plots", self.benchmark, self.metrics, ran) if a.plots and ran else []
        if plots:
            self.outputs["plots"] = "plots"
        if self.update_records:
            write_jsonl(sdir / "update_decisions.jsonl", self.update_records)
            self.outputs["update_decisions"] = "update_decisions.jsonl"
        if self.judge_info:
            self.outputs["judge"] = "judge.jsonl"
        settings = self._settings()
        write_text(sdir / "report.md", self._render(settings))
        self.logger = make_logger(self.cfg, sdir)
        report.log_to_logger(self.logger, self.metrics, self.benchmark, self.ks, ran, plots)
        self.stats = self._stats(settings)

    # ---- helpers
    @property
    def ks(self) -> list[int]:
        return sorted(set(self.args.ks))

    @property
    def ran(self) -> list[str]:
        return [m.name for m in self.runnable]

    def _optional(self, name: str) -> None:
        """Read upstream `name` if it finished; a missing one is recorded, or raises when set under eval.inputs."""
        try:
            self.upstream(name)
        except UpstreamError as e:
            if getattr(self.args.inputs, name):
                raise
            self.missing[name] = str(e)

    def _run_method(self, m: Method) -> None:
        recs, stats = run_method(m, self.convs, batch_size=self.args.batch_size, progress=bool(self.cfg.progress))
        self.records += [{**r, "sampled": True} for r in recs]
        self.run_stats[m.name] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                                  "seconds_per_question": round((stats["prepare_seconds"] + stats["answer_seconds"])
                                                                / max(len(recs), 1), 3)}

    def _run_written_extra(self, m: Method) -> None:
        """The written-evidence questions outside the sample (`sampled: false`: they stay out of the main table)."""
        sampled = {(q["conv_id"], q["id"]) for c in self.convs for q in c.questions}
        extra = [Conversation(c.conv_id, c.memories, c.sessions,
                              [q for q in c.questions if (q["conv_id"], q["id"]) not in sampled])
                 for c in self.written_convs]
        recs, stats = run_method(m, extra, batch_size=self.args.batch_size, progress=bool(self.cfg.progress))
        self.records += [{**r, "sampled": False} for r in recs]
        self.run_stats[m.name]["written_extra_questions"] = len(recs)
        self.run_stats[m.name]["written_extra_seconds"] = round(stats["prepare_seconds"] + stats["answer_seconds"], 2)

    def _measure_updates(self, group: str, label: str) -> None:
        """Update-decision parse rate and accuracy through the local_hf_lora backend on the `group` model."""
        from lightmem_exp.backends.local_hf_lora import LocalHFLoraBackend, LocalHFLoraConfig
        from lightmem_exp.lit.sft import update_scores

        lm, rows = self.ctx.lm(group), self.update_rows
        backend = LocalHFLoraBackend.from_model(lm.model, lm.tokenizer, LocalHFLoraConfig(
            base_model=str(lm.source), max_seq_len=lm.context_tokens, max_retries=0, batch_size=self.args.batch_size,
            gen_kwargs={"max_new_tokens": self.args.update_decisions.max_new_tokens, "do_sample": False}))
        scores, records = update_scores(backend, rows)
        self.update[label] = {**scores, "n": float(len(rows))}
        self.update_records += [{"model": label, "id": r["id"], **x} for r, x in zip(rows, records, strict=True)]

    def _judge(self) -> dict:
        """Judge every prediction; verdicts go into the records and judge.jsonl (never the key)."""
        from lightmem_exp.eval.judge import LLMJudge, judge_messages, prompt_sha256

        j = self.args.judge
        judge = LLMJudge(j.base_url, j.model, api_key_env=j.api_key_env, timeout_s=float(j.timeout_s),
                         max_retries=j.max_retries, concurrency=j.concurrency)
        verdicts = judge.judge_many([judge_messages(r["question"], r["answer"], r["prediction"], r["abstention"])
                                     for r in self.records])
        rows = []
        for r, v in zip(self.records, verdicts, strict=True):
            r["judge"] = {"correct": v.correct, "reply": v.reply, "error": v.error}
            rows.append({"method": r["method"], "id": r["id"], "correct": v.correct, "reply": v.reply,
                         "error": v.error, "attempts": v.attempts})
        write_jsonl(self.dir / "judge.jsonl", rows)
        return {"model": j.model, "base_url": j.base_url, "prompt_sha256": prompt_sha256(),
                "judged": len(rows), "failed": sum(v.correct is None for v in verdicts)}

    def _settings(self) -> dict[str, str]:
        """The defaults that bound what the run could find, in words, for the report and the manifest."""
        a, sr, seed, metrics = self.args, self.args.session_rank, self.cfg.seed, self.metrics
        per_conv = ", ".join(f"{c.conv_id}: {len(c.questions)}" for c in self.convs)
        out = {"questions": f"{sum(len(c.questions) for c in self.convs)} from {len(self.convs)} conversations "
                            f"({per_conv}); eval.max_questions_per_conv={a.max_questions_per_conv}, a sample "
                            f"stratified by category, seed {seed}"}
        if self.ctx.context_tokens:
            line = (", ".join(f"{g} model {n} tokens" for g, n in self.ctx.context_tokens.items())
                    + f" (eval.context_tokens={'null' if a.context_tokens is None else a.context_tokens}: "
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
        out["rag.k"] = (f"{a.rag.k} memories in the prompt (rag_*, recall_rag); rag_hybrid fuses the top "
                        f"{a.rag.hybrid_depth} of each retriever")
        out["max_new_tokens"] = (f"{a.max_new_tokens}, greedy, batch {a.batch_size}; recall and recall_rag may "
                                 f"decode recall.memory_tokens={a.recall.memory_tokens} more for the recalled memory "
                                 f"(recall.bank={a.recall.bank})")
        out["bootstrap"] = f"{a.bootstrap.resamples} resamples, {a.bootstrap.confidence:.0%} intervals, seed {seed}"
        if self.written_convs:
            per_conv = ", ".join(f"{c.conv_id}: {len(c.questions)}" for c in self.written_convs)
            out["written evidence"] = (f"{sum(len(c.questions) for c in self.written_convs)} questions of the split "
                                       f"cite a memory step2 wrote ({per_conv}); answered by "
                                       f"{', '.join(a.written_evidence.methods)}")
        return out

    def _render(self, settings: dict[str, str]) -> str:
        a, cfg = self.args, self.cfg
        setup = {"benchmark": f"{self.benchmark} ({self.inputs['data'].dir})", "split": a.split,
                 "conversations": ", ".join(c.conv_id for c in self.convs),
                 "model": f"{cfg.model.name} ({cfg.model.name_or_path})"}
        note = ("model=tiny is a random-init 1.3M-parameter model: these accuracies measure the machinery (prompts, "
                "retrieval, recall, scoring), not a language model's ability." if cfg.model.name == "tiny" else None)
        return report.render_report(
            benchmark=self.benchmark, ks=self.ks, metrics=self.metrics, methods_run=self.ran, not_run=self.not_run,
            setup=setup, settings=settings, headline=self.headline, upstream=self.inputs,
            missing_upstream=self.missing, update=self.update, judge=self.judge_info, git_sha=git_sha(), note=note,
            confidence=float(a.bootstrap.confidence), resamples=a.bootstrap.resamples, rag_k=a.rag.k)

    def _stats(self, settings: dict[str, str]) -> dict:
        run_stats = self.run_stats
        return {"benchmark": self.benchmark, "split": self.args.split, "conversations": [c.conv_id for c in self.convs],
                "questions": {c.conv_id: [q["id"] for q in c.questions] for c in self.convs},
                "written_evidence_questions": {c.conv_id: [q["id"] for q in c.questions] for c in self.written_convs},
                "methods_run": self.ran, "not_run": self.not_run, "missing_upstream": self.missing,
                "headline": self.headline, "settings": settings, "methods": run_stats, "judge": self.judge_info,
                "setup_seconds": {k: round(v, 2) for k, v in self.setup_s.items()},
                "embedding_cache": {"hits": self.ctx.embed.hits, "misses": self.ctx.embed.misses},
                # index building + answering, every method, per question (LongMemEval: one haystack per question)
                "seconds_per_question_all_methods": round(sum(v["seconds_per_question"] for v in run_stats.values()),
                                                          3),
                "seconds": round(time.perf_counter() - self.started, 1)}
