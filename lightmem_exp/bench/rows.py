"""Bench rows: the result schema, goal checks and the markdown table.

A row compares two sides measured in the same run. `ratio` is defined per row (`ratio_def`), `goal` is a string
such as "<= 1.10", ">= 10" or "in [0.5, 2]", and `pass` holds only when the ratio meets the goal *and* the row's
check (identical outputs, top-1 agreement, ...) succeeded. A failing row carries an `explanation`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lightmem_exp.bench.timing import Stats

# Rows whose stages are not built yet: listed in results.md without numbers, never written to results.json.
NOT_BUILT: tuple[str, ...] = ()
NOT_BUILT_NOTE = "not measured: stage not built"

_BOUND = re.compile(r"^\s*(<=|>=)\s*([0-9]*\.?[0-9]+)\s*$")
_RANGE = re.compile(r"^\s*in\s*\[\s*([0-9]*\.?[0-9]+)\s*,\s*([0-9]*\.?[0-9]+)\s*\]\s*$")


def goal_met(ratio: float | None, goal: str) -> bool:
    """Whether `ratio` satisfies `goal` ("<= x", ">= x" or "in [lo, hi]"); a missing or NaN ratio never does."""
    if ratio is None or ratio != ratio:  # NaN
        return False
    if m := _BOUND.match(goal):
        op, bound = m.group(1), float(m.group(2))
        return ratio <= bound if op == "<=" else ratio >= bound
    if m := _RANGE.match(goal):
        lo, hi = float(m.group(1)), float(m.group(2))
        if lo > hi:
            raise ValueError(f"goal {goal!r}: empty range")
        return lo <= ratio <= hi
    raise ValueError(f"unknown goal {goal!r}; expected '<= x', '>= x' or 'in [lo, hi]'")


def side(label: str, stats: Stats, unit: str) -> dict:
    """One side of a row: what ran, the unit its times are in, median / IQR / min / max / repeats."""
    return {"label": label, "unit": unit, **stats.as_dict()}


def make_row(
    name: str,
    what: str,
    goal: str,
    *,
    ours: dict,
    baseline: dict,
    ratio: float,
    ratio_def: str,
    check: dict | None = None,
    params: dict | None = None,
    explanation: str | Callable[[dict], str] | None = None,
) -> dict:
    """A result row. `check` (if any) must hold an `ok` bool; a failed check fails the row whatever the ratio."""
    if check is not None and not isinstance(check.get("ok"), bool):
        raise ValueError(f"row {name}: check needs a boolean 'ok', got {check!r}")
    ratio_ok = goal_met(ratio, goal)
    check_ok = check is None or check["ok"]
    row = {
        "name": name,
        "what": what,
        "ratio": ratio,
        "ratio_def": ratio_def,
        "goal": goal,
        "pass": bool(ratio_ok and check_ok),
        "goal_met": ratio_ok,
        "ours": ours,
        "baseline": baseline,
        "repeats": min(ours["repeats"], baseline["repeats"]),
        "check": check,
        "params": params or {},
    }
    if not row["pass"]:
        text = explanation(row) if callable(explanation) else explanation
        reasons = []
        if not ratio_ok:
            reasons.append(f"ratio {ratio:.3g} misses the goal {goal}")
        if not check_ok:
            reasons.append(f"check failed: {check.get('check', 'check')}")
        row["explanation"] = "; ".join(reasons) + (f". {text}" if text else "")
    return row


def ratio_of(numerator: Stats, denominator: Stats) -> float:
    """Ratio of medians (both already in the same unit)."""
    if denominator.median <= 0:
        return float("nan")
    return numerator.median / denominator.median


# ---- rendering ----------------------------------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "nan"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_side(s: dict) -> str:
    lo, hi = s["iqr_s"]
    if not s["unit"].startswith("s/"):  # a count (e.g. E1's added tokens/question), not a time
        return f"{s['median_s']:.4g} {s['unit']} [IQR {lo:.4g}–{hi:.4g}]"
    unit = s["unit"].split("/", 1)[1] if "/" in s["unit"] else ""
    per = f"/{unit}" if unit else ""
    return f"{fmt_time(s['median_s'])}{per} [IQR {fmt_time(lo)}–{fmt_time(hi)}]"


def _fmt_check(check: dict | None) -> str:
    if check is None:
        return "–"
    summary = check.get("summary") or check.get("check", "")
    return f"{'ok' if check['ok'] else 'FAILED'}: {summary}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_curve(curve: dict) -> list[str]:
    """Markdown lines for the `recall/capacity` curve (no goal: a measurement)."""
    b, pool = curve["budget"], curve.get("sft_pool", {})
    lines = ["", f"## {curve['name']}", "",
             f"Step2 memorisation at one fixed budget for every N: {b['optimizer_steps']} optimizer steps x "
             f"{b['batch_size']} samples = {b['optimizer_steps'] * b['batch_size']} samples (all train-split "
             f"memories: {curve['all_train_split_memories']}); memory vectors: {curve['vectors']}. Exact match is "
             "verbatim recalled text vs memory text (`recall_eval`) over all N memories."]
    if pool:
        lines[-1] += (f" The SFT pool has {pool['within_sft_max_tokens']} of {pool['conversations']} conversations "
                      "within sft_max_tokens, and each epoch draws ceil(N x sft_ratio) distinct ones, so sft_ratio is "
                      f"min({curve.get('stage', {}).get('sft_ratio', 'step2.sft_ratio')}, "
                      f"{pool['within_sft_max_tokens']} / N); every epoch keeps the thirds memory_front / "
                      "memory_full / sft_only, so the mix per step is the same for every N.")
    lines += ["", "| N | sft_ratio | exact match | token F1 | steps | samples | memory samples per memory | "
                  "non-pad tokens | train / recall eval |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in curve["points"]:
        if not p.get("measured", True):
            lines.append(f"| {p['N']} | {p.get('sft_ratio', 0):.3f} | not measured: {_cell(p['reason'])} "
                         "| – | – | – | – | – | – |")
            continue
        lines.append(f"| {p['N']} | {p['sft_ratio']:.3f} | {p['exact_match']:.3f} | {p['token_f1']:.3f} | "
                     f"{p['steps']} | {p['samples_trained']} | {p['per_memory']:.2f} | {p['tokens_trained']} | "
                     f"{p['train_s']:.0f} s / {p['eval_s']:.0f} s |")
    return lines


def render_markdown(rows: Sequence[dict], *, header: dict | None = None, curves: Sequence[dict] = (),
                    tables: Sequence[dict] = ()) -> str:
    """results.md: the table of measured rows, the rows not built, curves, tables without a goal (`name`, `intro`,
    `markdown`, `note`, e.g. E1 cost), then the explanations of failing rows."""
    lines = ["# lightmem_exp bench", ""]
    for key, value in (header or {}).items():
        lines.append(f"- {key}: {value}")
    if header:
        lines.append("")
    lines += [
        "| row | what | ours: median [IQR] | baseline: median [IQR] | ratio | goal | pass | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in (
            r["name"], r["what"], f"{r['ours']['label']}: {_fmt_side(r['ours'])}",
            f"{r['baseline']['label']}: {_fmt_side(r['baseline'])}", f"{r['ratio']:.3f} ({r['ratio_def']})",
            r["goal"], "PASS" if r["pass"] else "FAIL", _fmt_check(r["check"]),
        )) + " |")
    for name in NOT_BUILT:
        lines.append(f"| {name} | {NOT_BUILT_NOTE} | – | – | – | – | – | – |")
    for curve in curves:
        lines += render_curve(curve)
    for t in tables:
        lines += ["", f"## {t['name']}", "", t["intro"], "", t["markdown"], "", t["note"]]
    failing = [r for r in rows if not r["pass"]]
    if failing:
        lines += ["", "## What would close the failing goals", ""]
        lines += [f"- **{r['name']}**: {r['explanation']}" for r in failing]
    return "\n".join(lines) + "\n"
