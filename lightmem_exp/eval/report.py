"""Scoring, aggregation and the report files of the eval stage.

Files (in the stage dir): `predictions.jsonl` (one row per method x question: prediction, scores, cost, retrieval),
`summary.csv` (one row per method, not-run methods included with their reason), `report.md` (methods x metrics,
per-category table, cost, what was not run and why, update decisions, judge, headline, upstream manifests and git
sha), and `plots/accuracy_vs_prompt_tokens.png`, `plots/per_category.png`.

Metric names: `<method>/<metric>`, e.g. `recall/f1`, `rag_dense/cat1/f1`, `rag_dense/evidence_recall@5`,
`full_context/cost/prompt_tokens`, `closed_book/type/temporal-reasoning/acc` (LongMemEval).
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
from lightmem_exp.eval.metrics import locomo_scores, longmemeval_scores
from lightmem_exp.retrieval import ranking_metrics

LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
COST_KEYS = ("prompt_tokens", "generated_tokens", "latency_s", "peak_mem_mb")


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


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


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
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    out: dict[str, float] = {}
    for method, recs in by_method.items():
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
        out[f"{p}cost/peak_mem_mb_max"] = max(float(r["peak_mem_mb"]) for r in recs)
        out[p + "truncated_frac"] = _mean([float(r["truncated"]) for r in recs])
        out[p + "context_tokens_dropped"] = _mean([float(r["context_tokens_dropped"]) for r in recs])
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


COST_COLUMNS = [("prompt tok/q", "cost/prompt_tokens"), ("gen tok/q", "cost/generated_tokens"),
                ("latency s/q", "cost/latency_s"), ("peak MB (max)", "cost/peak_mem_mb_max"),
                ("truncated", "truncated_frac")]


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
    cols = _present(main_columns(benchmark, ks) + COST_COLUMNS, metrics, methods)
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


def render_report(*, benchmark: str, ks: Sequence[int], metrics: dict, methods_run: Sequence[str],
                  not_run: dict[str, str], setup: dict, headline: dict, upstream: dict[str, Manifest],
                  missing_upstream: dict[str, str], update: dict[str, dict], judge: dict | None,
                  git_sha: str | None, note: str | None) -> str:
    acc = accuracy_key(benchmark)
    lines = ["# Evaluation report", ""]
    for k, v in setup.items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- git sha: {git_sha or 'unknown (not a git checkout)'}")
    if note:
        lines += ["", f"> {note}"]
    lines += ["", "## Methods × metrics", ""]
    if methods_run:
        cols = _present(main_columns(benchmark, ks), metrics, methods_run)
        lines.append(markdown_table(["method", "n", *[h for h, _ in cols]], method_rows(cols, metrics, methods_run)))
        lines += ["", "## Cost per question", ""]
        cols = _present(COST_COLUMNS, metrics, methods_run)
        lines.append(markdown_table(["method", "n", *[h for h, _ in cols]], method_rows(cols, metrics, methods_run)))
        lines += ["", "Latency is each batch's wall time divided by its questions (retrieval included, index building "
                  "excluded); peak memory is the largest per-batch peak (see `peak_memory_kind` in the manifest); "
                  "truncated is the share of prompts whose context was cut to fit the model's context.", ""]
        title = "Per category (token F1; category 5: correct abstention)" if benchmark == "locomo" else \
            "Per question type (accuracy)"
        lines += [f"## {title}", ""]
        cols = category_columns(benchmark, metrics, methods_run)
        if cols:
            lines.append(markdown_table(["method", "n", *[h for h, _ in cols]],
                                        method_rows(cols, metrics, methods_run)))
    else:
        lines.append("No method was run.")
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
        lines.append(f"Not measured: {missing_upstream.get('sft', 'stage.update_decisions.max is 0')}.")
    lines += ["", "## LLM judge", ""]
    if judge:
        lines.append(f"Judge `{judge['model']}` at {judge['base_url']}, prompt sha256 `{judge['prompt_sha256']}`, "
                     f"verdicts in `judge.jsonl`; failed calls are excluded from its accuracy (column judge/failed "
                     "in the manifest).")
    else:
        lines.append("Off (stage.judge.enabled=false): scores above are rule-based only.")
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
    """The same numbers and tables to the experiment logger (wandb tables and images when it is wandb)."""
    if logger is None:
        return
    logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)})
    log_table = getattr(logger, "log_table", None)
    if log_table is None:
        logger.save()  # the CSV logger buffers rows until saved (no Trainer runs here to do it)
        return
    for key, cols in (("eval/summary", _present(main_columns(benchmark, ks) + COST_COLUMNS, metrics, methods)),
                      ("eval/per_category", category_columns(benchmark, metrics, methods))):
        rows = [[m, *[None if metrics.get(f"{m}/{k}") is None else float(metrics[f"{m}/{k}"]) for _, k in cols]]
                for m in methods]
        log_table(key=key, columns=["method", *[h for h, _ in cols]], data=rows)
    if plots and hasattr(logger, "log_image"):
        logger.log_image(key="eval/plots", images=[str(p) for p in plots])
