"""Scoring, aggregation and the report files of the eval stage.

Files (in the stage dir): `predictions.jsonl` (one row per method x question: prediction, scores, cost, retrieval),
`summary.csv` (one row per method, not-run methods included with their reason), `report.md` (methods x metrics,
per-category table, cost, what was not run and why, update decisions, judge, headline, upstream manifests and git
sha), and `plots/accuracy_vs_prompt_tokens.png`, `plots/per_category.png`.

Metric names: `<method>/<metric>`, e.g. `recall/f1`, `rag_dense/cat1/f1`, `rag_dense/evidence_recall@5`,
`full_context/cost/prompt_tokens`, `closed_book/type/temporal-reasoning/acc` (LongMemEval). Uncertainty
(`compare`): `<method>/<key>_ci_low|_ci_high` and the paired difference against closed_book
`<method>/diff_closed_book/<key>[_ci_low|_ci_high|_p|_frac_le_0]` for every key of `headline_keys` (LoCoMo `f1`, with
category 5, and `answerable/f1`, without it; LongMemEval `acc`); added cost `<method>/cost/added_prompt_tokens` and
`cost/added_prompt_ratio_recall_vs_rag_dense` (+ `cost/added_prompt_ratio_goal_met` at rag.k=5).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightmem_exp.artifacts import Manifest, atomic_path, write_text
from lightmem_exp.eval.metrics import ADVERSARIAL, locomo_scores, longmemeval_scores
from lightmem_exp.eval.stats import bootstrap_ci, paired_bootstrap
from lightmem_exp.retrieval import ranking_metrics

LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
WRITTEN = "written"  # metric prefix of the questions whose evidence step2 wrote (eval.written_evidence)
COST_KEYS = ("prompt_tokens", "generated_tokens", "scoring_tokens", "processed_tokens", "latency_s", "peak_mem_mb")
REFERENCE = "closed_book"  # paired differences and added prompt tokens are taken against the question alone
# Issue 13: recall's added prompt tokens over closed_book at most a tenth of rag_dense's, at rag.k = 5.
ADDED_PROMPT_GOAL, ADDED_PROMPT_GOAL_K = 0.1, 5
ADDED_RATIO = "cost/added_prompt_ratio_recall_vs_rag_dense"


def benchmark_of(questions: Sequence[dict]) -> str:
    """LoCoMo categories are the integers 1-5; LongMemEval's are question-type strings."""
    return "locomo" if all(isinstance(q["category"], int) for q in questions) else "longmemeval"


def accuracy_key(benchmark: str) -> str:
    """The per-question accuracy a benchmark reports per category: LoCoMo F1, LongMemEval acc."""
    return "f1" if benchmark == "locomo" else "acc"


def score_record(rec: dict, benchmark: str) -> dict[str, float]:
    if benchmark == "locomo":
        return locomo_scores(rec["prediction"], rec["answer"], int(rec["category"]))
    return longmemeval_scores(rec["prediction"], rec["answer"], rec["abstention"])


def headline_keys(benchmark: str) -> tuple[str, ...]:
    """The figures that get a confidence interval and a paired difference: LoCoMo F1 over every question
    (category 5 scored as abstention, `f1`) and without category 5 (`answerable/f1`); LongMemEval accuracy."""
    return ("f1", "answerable/f1") if benchmark == "locomo" else ("acc",)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _by_method(records: Sequence[dict]) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    return by_method


def _evidence(recs: list[dict], retrieved: str, evidence: str, ks: Sequence[int]) -> dict[str, float]:
    """recall@k (any evidence item in the top k) and MRR over the questions that have evidence."""
    rows = [r for r in recs if r.get(retrieved) is not None and r.get(evidence)]
    if not rows:
        return {}
    ranked, positives = [], []
    for r in rows:
        ids = {str(x): i for i, x in enumerate(dict.fromkeys(str(x) for x in [*r[retrieved], *r[evidence]]))}
        ranked.append([ids[str(x)] for x in r[retrieved]])
        positives.append({ids[str(x)] for x in r[evidence]})
    m = ranking_metrics(ranked, positives, ks)
    return {**m, "n": float(len(rows))}


def aggregate(records: Sequence[dict], benchmark: str, ks: Sequence[int]) -> dict[str, float]:
    """Every `<method>/<metric>` from scored records (each record holds `scores`, and `judge` when judged)."""
    out: dict[str, float] = {}
    for method, recs in _by_method(records).items():
        p = f"{method}/"
        out[p + "n"] = float(len(recs))
        for key in recs[0]["scores"]:
            vals = [r["scores"][key] for r in recs if key in r["scores"]]
            if key != "abstention":
                out[p + key] = _mean(vals)
        cats: dict[Any, list[dict]] = defaultdict(list)
        for r in recs:
            cats[r["category"]].append(r)
        if benchmark == "locomo":
            answerable = [r for r in recs if r["category"] != 5]
            for key in ("f1", "bleu1", "em"):
                if answerable:
                    out[f"{p}answerable/{key}"] = _mean([r["scores"][key] for r in answerable])
            for c, rs in sorted(cats.items()):
                if c == 5:
                    out[f"{p}cat5/abstention"] = _mean([r["scores"]["abstention"] for r in rs])
                else:
                    for key in ("f1", "bleu1", "em"):
                        out[f"{p}cat{c}/{key}"] = _mean([r["scores"][key] for r in rs])
                out[f"{p}cat{c}/n"] = float(len(rs))
        else:
            type_acc = {}
            for c, rs in sorted(cats.items()):
                type_acc[c] = _mean([r["scores"]["acc"] for r in rs])
                out[f"{p}type/{c}/acc"] = type_acc[c]
                out[f"{p}type/{c}/n"] = float(len(rs))
            out[p + "task_avg_acc"] = _mean(list(type_acc.values()))
            abst = [r["scores"]["abstention"] for r in recs if "abstention" in r["scores"]]
            if abst:
                out[p + "abstention/acc"] = _mean(abst)
        for name, retrieved, evidence in (("evidence", "retrieved_memory_ids", "evidence_memory_ids"),
                                          ("session", "retrieved_sessions", "evidence_sessions")):
            for key, v in _evidence(recs, retrieved, evidence, ks).items():
                out[f"{p}{name}_{key}"] = v
        for key in COST_KEYS:
            out[f"{p}cost/{key}"] = _mean([float(r[key]) for r in recs])
        memory = [float(r["memory_tokens"]) for r in recs if r.get("memory_tokens") is not None]
        if memory:
            out[f"{p}cost/memory_tokens"] = _mean(memory)
        out[f"{p}cost/peak_mem_mb_max"] = max(float(r["peak_mem_mb"]) for r in recs)
        out[p + "truncated_frac"] = _mean([float(r["truncated"]) for r in recs])
        out[p + "context_tokens_dropped"] = _mean([float(r["context_tokens_dropped"]) for r in recs])
        whole = [r for r in recs if r.get("extra", {}).get("context_tokens_full")]
        if whole:  # full_context: how much of the conversation the prompt kept (oldest lines dropped first)
            out[p + "context_tokens_full"] = _mean([float(r["extra"]["context_tokens_full"]) for r in whole])
            out[p + "context_coverage"] = _mean([1 - r["context_tokens_dropped"] / r["extra"]["context_tokens_full"]
                                                 for r in whole])
        seen = [r["extra"]["end_marker_seen"] for r in recs if "end_marker_seen" in r.get("extra", {})]
        if seen:
            out[p + "end_marker_rate"] = _mean([float(x) for x in seen])
            hits = [float(r["extra"]["recalled_memory_id"] in r["evidence_memory_ids"])
                    for r in recs if r["evidence_memory_ids"]]
            if hits:
                out[p + "recalled_evidence@1"] = _mean(hits)
            for key in ("recalled_text_f1", "recalled_text_exact", "evidence_in_bank"):
                out[p + key] = _mean([float(r["extra"][key]) for r in recs if key in r["extra"]])
        judged = [r["judge"]["correct"] for r in recs if "judge" in r]
        if judged:
            ok = [float(x) for x in judged if x is not None]
            out[p + "judge/acc"] = _mean(ok)
            out[p + "judge/n"] = float(len(ok))
            out[p + "judge/failed"] = float(len(judged) - len(ok))
            for c, rs in sorted(cats.items()):
                vals = [float(r["judge"]["correct"]) for r in rs if r.get("judge", {}).get("correct") is not None]
                if vals:
                    out[f"{p}judge/{_cat_key(benchmark, c)}/acc"] = _mean(vals)
    return out


def _cat_key(benchmark: str, c: Any) -> str:
    return f"cat{c}" if benchmark == "locomo" else f"type/{c}"


def _per_question(recs: Sequence[dict], key: str) -> dict[tuple[str, str], float]:
    """Per-question value of a `headline_keys` key, by (conversation, question id)."""
    if key == "answerable/f1":
        recs = [r for r in recs if r["category"] != ADVERSARIAL]
        key = "f1"
    return {(r["conv_id"], r["id"]): float(r["scores"][key]) for r in recs if key in r["scores"]}


def compare(records: Sequence[dict], benchmark: str, *, resamples: int, confidence: float, seed: int,
            rag_k: int) -> dict[str, float]:
    """Bootstrap intervals of every method's `headline_keys`, the paired bootstrap difference of every method
    against closed_book on the questions both answered, and prompt tokens added over closed_book on them."""
    by_method = _by_method(records)
    ref = by_method.get(REFERENCE)
    boot = {"resamples": resamples, "confidence": confidence, "seed": seed}
    out: dict[str, float] = {}
    for method, recs in by_method.items():
        for key in headline_keys(benchmark):
            vals = _per_question(recs, key)
            if not vals:
                continue
            ci = bootstrap_ci(list(vals.values()), **boot)
            out[f"{method}/{key}_ci_low"], out[f"{method}/{key}_ci_high"] = ci.low, ci.high
            if ref is None or method == REFERENCE:
                continue
            base = _per_question(ref, key)
            common = [q for q in vals if q in base]  # a method that skipped questions is paired on the rest
            if common:
                d = paired_bootstrap([vals[q] for q in common], [base[q] for q in common], **boot)
                p = f"{method}/diff_{REFERENCE}/{key}"
                out.update({p: d.mean, p + "_ci_low": d.low, p + "_ci_high": d.high, p + "_p": d.p_two_sided,
                            p + "_frac_le_0": d.frac_le_0})
        if ref is not None:
            base_prompt = {(r["conv_id"], r["id"]): r["prompt_tokens"] for r in ref}
            added = [r["prompt_tokens"] - base_prompt[(r["conv_id"], r["id"])] for r in recs
                     if (r["conv_id"], r["id"]) in base_prompt]
            out[f"{method}/diff_{REFERENCE}/paired_n"] = float(len(added))
            if added:
                out[f"{method}/cost/added_prompt_tokens"] = _mean(added)
    recall, rag = out.get("recall/cost/added_prompt_tokens"), out.get("rag_dense/cost/added_prompt_tokens")
    if recall is not None and rag is not None and rag > 0:
        out[ADDED_RATIO] = recall / rag
        if rag_k == ADDED_PROMPT_GOAL_K:
            out["cost/added_prompt_ratio_goal_met"] = float(out[ADDED_RATIO] <= ADDED_PROMPT_GOAL)
    return out


# ------------------------------------------------------------------------------------------------------- tables


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main_columns(benchmark: str, ks: Sequence[int]) -> list[tuple[str, str]]:
    """(header, metric suffix) of the methods x metrics table."""
    if benchmark == "locomo":
        cols = [("F1", "f1"), ("BLEU-1", "bleu1"), ("EM", "em"), ("answerable F1", "answerable/f1"),
                ("cat-5 abstention", "cat5/abstention")]
    else:
        cols = [("acc", "acc"), ("task-avg acc", "task_avg_acc"), ("F1", "f1"), ("EM", "em")]
    cols += [(f"evidence R@{k}", f"evidence_recall@{k}") for k in ks]
    cols += [(f"session R@{k}", f"session_recall@{k}") for k in ks]
    cols += [("recalled = chosen memory (F1)", "recalled_text_f1"), ("evidence in recall bank", "evidence_in_bank"),
             ("judge acc", "judge/acc")]
    return cols


COST_COLUMNS = [("prompt tok/q", "cost/prompt_tokens"),
                ("added prompt tok/q vs closed_book", "cost/added_prompt_tokens"), ("generated tok/q", "cost/generated_tokens"), ("of which recalled memory", "cost/memory_tokens"),
                ("scoring tok/q", "cost/scoring_tokens"), ("processed tok/q", "cost/processed_tokens"),
                ("latency s/q", "cost/latency_s"), ("peak MB (max)", "cost/peak_mem_mb_max"),
                ("truncated", "truncated_frac")]
COST_NOTE = (
    "processed = prompt + generated + scoring: every token the answering model runs over for a question (prefill, "
    "one decode step per generated token, and extra scoring passes: session_rank's re-ranking of its pre-filtered "
    "sessions). recall's generated tokens include the memory it decodes after `<recall>` (of which recalled memory, "
    "through the end marker): recall pays in decode steps what RAG pays in prefill. Added prompt tokens: the mean, "
    "over the questions both answered, of the method's prompt minus closed_book's. Left out: index building per "
    "conversation (BM25 and MiniLM indexes, session-chunk embeddings, recall's bank) and MiniLM's query embeddings "
    "(another model). Latency is each batch's wall time divided by its questions (retrieval and scoring included, "
    "index building excluded); peak memory is the largest per-batch peak (see `peak_memory_kind` in the manifest); "
    "truncated is the share of prompts whose context was cut to fit the model's context.")


def uncertainty_columns(benchmark: str) -> list[tuple[str, str]]:
    """(header, metric suffix) of the intervals and paired differences, for summary.csv and the logger."""
    cols = []
    for key in headline_keys(benchmark):
        d = f"diff_{REFERENCE}/{key}"
        cols += [(f"{key} CI low", f"{key}_ci_low"), (f"{key} CI high", f"{key}_ci_high"),
                 (f"{key} - {REFERENCE}", d), (f"{key} diff CI low", d + "_ci_low"),
                 (f"{key} diff CI high", d + "_ci_high"), (f"{key} diff p", d + "_p")]
    return [*cols, ("paired questions", f"diff_{REFERENCE}/paired_n")]


def _present(cols: list[tuple[str, str]], metrics: dict, methods: Sequence[str]) -> list[tuple[str, str]]:
    return [(h, k) for h, k in cols if any(f"{m}/{k}" in metrics for m in methods)]


def category_columns(benchmark: str, metrics: dict, methods: Sequence[str]) -> list[tuple[str, str]]:
    if benchmark == "locomo":
        cols = [(f"{c} {name}", f"cat{c}/f1" if c != 5 else "cat5/abstention")
                for c, name in LOCOMO_CATEGORIES.items()]
    else:
        types = sorted({k.split("/")[2] for k in metrics if k.count("/") == 3 and k.split("/")[1] == "type"
                        and k.endswith("/acc")})
        cols = [(t, f"type/{t}/acc") for t in types]
    return _present(cols, metrics, methods)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_rows(cols: list[tuple[str, str]], metrics: dict, methods: Sequence[str]) -> list[list[Any]]:
    return [[m, int(metrics.get(f"{m}/n", 0))] + [metrics.get(f"{m}/{k}") for _, k in cols] for m in methods]


def write_summary_csv(path: Path, benchmark: str, ks: Sequence[int], metrics: dict, methods: Sequence[str],
                      not_run: dict[str, str]) -> None:
    """One row per requested method; a method that was not run has its reason and empty metric cells."""
    cols = _present(main_columns(benchmark, ks) + uncertainty_columns(benchmark) + COST_COLUMNS, metrics, methods)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "status", "n", *[k for _, k in cols]])
    for m in methods:
        if m in not_run:
            w.writerow([m, f"not run: {not_run[m]}", 0, *["" for _ in cols]])
        else:
            w.writerow([m, "run", int(metrics.get(f"{m}/n", 0)),
                        *["" if metrics.get(f"{m}/{k}") is None else f"{metrics[f'{m}/{k}']:.6g}" for _, k in cols]])
    write_text(path, buf.getvalue())


# -------------------------------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, benchmark: str, metrics: dict, methods: Sequence[str]) -> list[Path]:
    """accuracy_vs_prompt_tokens.png (one point per method) and per_category.png (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = accuracy_key(benchmark)
    label = "token F1 (LoCoMo harness)" if benchmark == "locomo" else "accuracy (answer contained)"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^vP*Xh<>"
    for i, m in enumerate(methods):
        x, y = metrics.get(f"{m}/cost/prompt_tokens"), metrics.get(f"{m}/{acc}")
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=45, marker=markers[i % len(markers)], label=m, alpha=0.85)
    ax.legend(fontsize=7, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens per question (mean, log scale)")
    ax.set_ylabel(label)
    ax.set_title("accuracy vs prompt tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "accuracy_vs_prompt_tokens.png"))
    plt.close(fig)

    cols = category_columns(benchmark, metrics, methods)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(cols) + 2), 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [metrics.get(f"{m}/{k}", float("nan")) for _, k in cols]
        ax.bar([j + i * width for j in range(len(cols))], ys, width=width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [h for h, _ in cols], fontsize=8)
    ax.set_ylabel(label + (" (cat 5: abstention)" if benchmark == "locomo" else ""))
    ax.set_title("per category" if benchmark == "locomo" else "per question type")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "per_category.png"))
    plt.close(fig)
    return paths


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# ------------------------------------------------------------------------------------------------------ report.md


def cost_table(metrics: dict, methods: Sequence[str]) -> str:
    """Tokens the answering model processes and latency per question, every method side by side (no goal)."""
    cols = _present(COST_COLUMNS, metrics, methods)
    return markdown_table(["method", "n", *[h for h, _ in cols]], method_rows(cols, metrics, methods))


def added_ratio_line(metrics: dict, rag_k: int) -> str:
    """The added-prompt-token ratio recall / rag_dense, against its goal (which is set at rag.k = 5)."""
    if ADDED_RATIO not in metrics:
        return (f"Added prompt tokens, recall vs rag_dense: not measured (it needs {REFERENCE}, recall and rag_dense "
                "with rag_dense adding tokens).")
    r, rag = metrics["recall/cost/added_prompt_tokens"], metrics["rag_dense/cost/added_prompt_tokens"]
    verdict = ("PASS" if metrics["cost/added_prompt_ratio_goal_met"] else "FAIL") if rag_k == ADDED_PROMPT_GOAL_K \
        else f"not judged: the goal is set at rag.k={ADDED_PROMPT_GOAL_K}"
    return (f"Added prompt tokens per question over {REFERENCE}, recall vs rag_dense at rag.k={rag_k}: {r:.1f} / "
            f"{rag:.1f} = **{metrics[ADDED_RATIO]:.3f}** (`{ADDED_RATIO}`), goal <= {ADDED_PROMPT_GOAL}: {verdict}.")


def _interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(key + "_ci_low"), metrics.get(key + "_ci_high")
    return "–" if low is None or high is None else f"[{_fmt(low)}, {_fmt(high)}]"


def uncertainty_lines(benchmark: str, metrics: dict, methods: Sequence[str], confidence: float,
                      resamples: int) -> list[str]:
    """Per headline key: a table of method, n, value, its interval, the paired difference vs closed_book."""
    level = f"{confidence:.0%}"
    lines = [f"## Uncertainty: {level} bootstrap intervals over questions", "",
             f"{resamples} resamples of the questions (percentile intervals). The difference vs {REFERENCE} is "
             "paired: every replicate draws one set of questions and scores both methods on it; p is the two-sided "
             f"bootstrap p-value of that difference (0.000: below 1/{resamples})."]
    paired_n = {m: metrics.get(f"{m}/diff_{REFERENCE}/paired_n") for m in methods}
    n_ref = metrics.get(f"{REFERENCE}/n", 0)
    short = [m for m, n in paired_n.items() if n is not None and n < max(metrics.get(f"{m}/n", 0), n_ref)]
    if short:  # a method skipped questions (or closed_book did): the difference is over the shared ones only
        lines[-1] += (" Paired on the questions both answered: " + "; ".join(
            f"{m} {int(paired_n[m])} (it answered {int(metrics[f'{m}/n'])}, {REFERENCE} {int(n_ref)})"
            for m in short) + ".")
    if REFERENCE not in methods:
        lines[-1] += f" {REFERENCE} did not run, so there are no differences."
    titles = {"f1": "F1 over every question, category 5 included (`f1`)",
              "answerable/f1": "F1 without category 5 (`answerable/f1`)", "acc": "accuracy (`acc`)"}
    for key in headline_keys(benchmark):
        name = "F1" if key.endswith("f1") else "acc"
        d = f"diff_{REFERENCE}/{key}"
        rows = [[m, _n(metrics, m, key), metrics.get(f"{m}/{key}"), _interval(metrics, f"{m}/{key}"),
                 metrics.get(f"{m}/{d}"), _interval(metrics, f"{m}/{d}"), metrics.get(f"{m}/{d}_p")] for m in methods]
        lines += ["", f"### {titles[key]}", "",
                  markdown_table(["method", "n", name, f"{level} CI", f"diff vs {REFERENCE}", f"{level} CI of diff",
                                  "p"], rows)]
    if benchmark == "locomo":
        n5 = next((metrics[f"{m}/cat{ADVERSARIAL}/n"] for m in methods if f"{m}/cat{ADVERSARIAL}/n" in metrics), 0.0)
        n = next((metrics[f"{m}/n"] for m in methods if f"{m}/n" in metrics), 0.0)
        share = n5 / n if n else float("nan")
        lines += ["", f"Category 5 (adversarial) questions are scored as correct abstention: 1 when the reply says "
                  f"\"not mentioned\" or \"no information available\", else 0. They are {int(n5)} of the {int(n)} "
                  f"questions ({_fmt(share)}), so a model that always abstains scores about {_fmt(share)} on `f1` "
                  "from them alone. Published LoCoMo tables differ on whether they include them: compare `f1` with "
                  "tables that do, `answerable/f1` (categories 1-4) with tables that leave them out."]
    return lines


def written_evidence_lines(benchmark: str, ks: Sequence[int], metrics: dict, confidence: float,
                           resamples: int) -> list[str]:
    """The main and uncertainty tables again, on the questions whose evidence memory step2 wrote (`written/*`)."""
    prefix = WRITTEN + "/"
    sub = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    methods = list(dict.fromkeys(k.split("/")[0] for k in sub if k.endswith("/n")))
    if not methods:
        return []
    cols = _present(main_columns(benchmark, ks), sub, methods)
    lines = ["", "## Questions whose evidence memory step2 wrote", "",
             "Every question of the split citing a memory the recall model wrote (in the sample or not), answered by "
             "the methods below: the recall model can only answer from memory here. Metrics `written/<method>/*`.",
             "", markdown_table(["method", "n", *[h for h, _ in cols]], method_rows(cols, sub, methods))]
    body = uncertainty_lines(benchmark, sub, methods, confidence, resamples)
    return lines + ["", *(f"#{line}" if line.startswith("##") else line for line in body)]


def _n(metrics: dict, method: str, key: str) -> int:
    """Questions behind `key`: every question, or for `answerable/f1` those outside category 5."""
    n = metrics.get(f"{method}/n", 0)
    if key == "answerable/f1":
        n -= metrics.get(f"{method}/cat{ADVERSARIAL}/n", 0)
    return int(n)


def render_report(*, benchmark: str, ks: Sequence[int], metrics: dict, methods_run: Sequence[str],
                  not_run: dict[str, str], setup: dict, settings: dict[str, str], headline: dict,
                  upstream: dict[str, Manifest], missing_upstream: dict[str, str], update: dict[str, dict],
                  judge: dict | None, git_sha: str | None, note: str | None, confidence: float, resamples: int,
                  rag_k: int) -> str:
    acc = accuracy_key(benchmark)
    lines = ["# Evaluation report", ""]
    for k, v in setup.items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- git sha: {git_sha or 'unknown (not a git checkout)'}")
    if note:
        lines += ["", f"> {note}"]
    lines += ["", "## Settings that bound this run", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += ["", "## Methods × metrics", ""]
    if methods_run:
        cols = _present(main_columns(benchmark, ks), metrics, methods_run)
        lines.append(markdown_table(["method", "n", *[h for h, _ in cols]], method_rows(cols, metrics, methods_run)))
        lines += ["", *uncertainty_lines(benchmark, metrics, methods_run, confidence, resamples)]
        lines += ["", "## Cost per question", "", cost_table(metrics, methods_run), "", COST_NOTE, "",
                  added_ratio_line(metrics, rag_k), ""]
        title = "Per category (token F1; category 5: correct abstention)" if benchmark == "locomo" else \
            "Per question type (accuracy)"
        lines += [f"## {title}", ""]
        cols = category_columns(benchmark, metrics, methods_run)
        if cols:
            lines.append(markdown_table(["method", "n", *[h for h, _ in cols]],
                                        method_rows(cols, metrics, methods_run)))
    else:
        lines.append("No method was run.")
    lines += written_evidence_lines(benchmark, ks, metrics, confidence, resamples)
    lines += ["", "## Not run", ""]
    if not_run or missing_upstream:
        for m, why in not_run.items():
            lines.append(f"- **{m}**: not run: {why}")
        for s, why in missing_upstream.items():
            if not any(s in why_m for why_m in not_run.values()):
                lines.append(f"- upstream **{s}** not run: {why}")
    else:
        lines.append("Every requested method ran.")
    lines += ["", "## Update decisions through `local_hf_lora`", ""]
    if update:
        rows = [[name, int(v["n"]), v["json_ok"], v["json_strict"], v["acc"]] for name, v in update.items()]
        lines.append(markdown_table(["model", "n", "JSON parse rate (repaired)", "strict JSON", "action acc"], rows))
    else:
        lines.append(f"Not measured: {missing_upstream.get('sft', 'eval.update_decisions.max is 0')}.")
    lines += ["", "## LLM judge", ""]
    if judge:
        lines.append(f"Judge `{judge['model']}` at {judge['base_url']}, prompt sha256 `{judge['prompt_sha256']}`, "
                     f"verdicts in `judge.jsonl`; failed calls are excluded from its accuracy (column judge/failed "
                     "in the manifest).")
    else:
        lines.append("Off (eval.judge.enabled=false): scores above are rule-based only.")
    lines += ["", "## Headline", "",
              f"`{headline['used']}` = {_fmt(headline['value'], 4)}"
              + (f" (requested `{headline['requested']}`: {headline['fallback_reason']})"
                 if headline.get("fallback_reason") else ""), ""]
    lines += ["## Upstream manifests", ""]
    rows = [[name, str(Path(m.dir) / 'manifest.json'), m.created, m.run_id or "–", m.git_sha or "–"]
            for name, m in upstream.items()]
    lines.append(markdown_table(["stage", "manifest", "created", "run id", "git sha"], rows))
    lines += ["", "## Plots", "", "![accuracy vs prompt tokens](plots/accuracy_vs_prompt_tokens.png)",
              "", "![per category](plots/per_category.png)", "",
              f"Accuracy in the plots is `{acc}`" + (" (LoCoMo harness token F1; category 5 scored as abstention)."
                                                     if benchmark == "locomo" else " (answer contained in the reply).")]
    return "\n".join(lines) + "\n"


def log_to_logger(logger: Any, metrics: dict, benchmark: str, ks: Sequence[int], methods: Sequence[str],
                  plots: Sequence[Path]) -> None:
    """The tables and plots to the experiment logger when it is wandb (the metrics go to it in `Recipe.finish`)."""
    log_table = getattr(logger, "log_table", None)
    if log_table is None:
        return
    summary = main_columns(benchmark, ks) + uncertainty_columns(benchmark) + COST_COLUMNS
    for key, cols in (("eval/summary", _present(summary, metrics, methods)),
                      ("eval/per_category", category_columns(benchmark, metrics, methods))):
        rows = [[m, *[None if metrics.get(f"{m}/{k}") is None else float(metrics[f"{m}/{k}"]) for _, k in cols]]
                for m in methods]
        log_table(key=key, columns=["method", *[h for h, _ in cols]], data=rows)
    if plots and hasattr(logger, "log_image"):
        for p in plots:  # one key each: wandb warns when one key's images differ in size
            logger.log_image(key=f"eval/plots/{p.stem}", images=[str(p)])
