"""python -m lightmem_exp.bench [--quick] [--out DIR] [--only G1,G3] : measure, write results.json + results.md.

Every row times our code and its baseline side by side in this one run (warm-ups, interleaved repeats, median),
with `torch.set_num_threads(2)` and a fixed seed. Rows of stages not built yet are listed as not measured.
`CAPACITY` is the step2 `recall/capacity` curve (capacity.json), a measurement without a goal.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

GROUPS = ("G1", "G2", "G3", "G4", "G5", "G6", "G8", "E1", "G7", "S1", "CAPACITY")
# E1 (the E1 row and the E1 cost table): issue 13, in bench/eval_rows.py; G7: bench/g7_adrpo.py;
# G4-G6 and CAPACITY: bench/train_cases.py; S1 (served tokens/s): bench/serve_rows.py
log = logging.getLogger("lightmem_exp.bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightmem_exp.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs") / "bench", help="output folder (default outputs/bench)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (for tests; numbers mean little)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 9; 3 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity-steps", type=int, default=None,
                   help="optimizer steps of every recall/capacity point (default 200; 2 with --quick)")
    p.add_argument("--step1-dir", default=str(Path("outputs") / "default" / "step1"),
                   help="a step1 stage dir whose bank (and adapter) the capacity curve uses when complete "
                        "(default outputs/default/step1); otherwise base-model vectors")
    args = p.parse_args(argv)
    args.only = [g.strip().upper() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown:
        p.error(f"--only: unknown rows {unknown}; choose from {list(GROUPS)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.capacity_steps is not None and args.capacity_steps < 1:
        p.error("--capacity-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the bench; returns the rows written to `<out>/results.json` (also `results.md` and `run.json`)."""
    args = parse_args(argv)
    # On the shared 2-core dev machine, OpenMP threads that spin while they wait turned each small parallel region
    # of the tiny model into a scheduling lottery (measured 40-300 ms/token instead of ~2-4 ms with two threads
    # while other jobs ran). Passive waiting removes that for both sides alike. It only takes effect when set
    # before torch is first imported, so main() run inside another process (tests) keeps that process's setting.
    omp_policy_set_here = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
    if omp_policy_set_here:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    hf_logging.set_verbosity_error()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, omp_policy_set_here)
    finally:
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace, omp_policy_set_here: bool = False) -> list[dict]:
    import numpy as np
    import torch

    from lightmem_exp.artifacts import write_json, write_text
    from lightmem_exp.bench import cases
    from lightmem_exp.bench.bm25_naive import locomo_texts
    from lightmem_exp.bench.explain import EXPLANATIONS
    from lightmem_exp.bench.rows import render_markdown

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    s = cases.Settings.quick() if args.quick else cases.Settings()
    s.seed = args.seed
    if args.repeats is not None:
        s.repeats = s.train_repeats = args.repeats
    if args.capacity_steps is not None:
        s.capacity_steps = args.capacity_steps
    start, load_start = time.perf_counter(), os.getloadavg()

    cfg = cases.tiny_config()
    locomo = Path(str(cfg.paths.data)) / "locomo" / "locomo10.json"
    rows: list[dict] = []
    if {"G1", "G2"} & set(args.only):
        model, tokenizer, ids = cases.load_tiny(cfg)
        prompt_text = " ".join(locomo_texts(locomo)[0][:8])
        log.info("G1/G2: generation on %s", model.name_or_path)
        rows += cases.generation_rows(s, model, tokenizer, ids, prompt_text, EXPLANATIONS,
                                      which=[g for g in ("G1", "G2") if g in args.only])
        del model
    if "G3" in args.only:
        log.info("G3: Memory Head top-k")
        rows += cases.topk_rows(s, int(cfg.model.tiny.hidden_size), EXPLANATIONS)
    tables = []
    if "E1" in args.only:
        from lightmem_exp.bench.eval_rows import eval_cost_rows

        log.info("E1: the eval methods' cost per question (added prompt tokens, processed tokens, latency)")
        e1_rows, e1_table = eval_cost_rows(locomo, seed=s.seed, quick=args.quick)
        rows += e1_rows
        tables.append(e1_table)
    if "G7" in args.only:
        from lightmem_exp.bench.g7_adrpo import EXPLANATIONS as G7_EXPLAIN
        from lightmem_exp.bench.g7_adrpo import g7_rows

        log.info("G7: adrpo rollouts and reward share")
        rows += g7_rows(locomo, quick=args.quick, repeats=args.repeats, seed=s.seed, explain=G7_EXPLAIN)
    if "S1" in args.only:
        from lightmem_exp.bench.serve_rows import serve_rows

        log.info("S1: served tokens/s at 1, 4 and 16 concurrent requests vs one generate_with_recall batch")
        rows += serve_rows(locomo, quick=args.quick, repeats=args.repeats, seed=s.seed)
    if {"G4", "G5", "G6"} & set(args.only):
        from lightmem_exp.bench.train_cases import train_rows

        rows += train_rows(s, EXPLANATIONS, [g for g in ("G4", "G5", "G6") if g in args.only], args.threads)
    if "G8" in args.only:
        log.info("G8: BM25")
        rows += cases.bm25_rows(s, locomo, EXPLANATIONS)
    curves = []
    if "CAPACITY" in args.only:
        from lightmem_exp.bench.train_cases import capacity_curve, step2_config

        log.info("recall/capacity: step2 at a fixed budget of %d steps, N = %s", s.capacity_steps,
                 ", ".join(str(n or "all") for n in s.capacity_sizes))
        curves.append(capacity_curve(s, step2_config(), Path(args.step1_dir), args.threads))
        torch.set_num_threads(args.threads)

    wall = time.perf_counter() - start
    info = {"quick": args.quick, "only": args.only, "repeats": s.repeats, "warmup": s.warmup, "seed": s.seed,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_wait_policy_set_by_bench": omp_policy_set_here, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(wall, 1)}
    header = {
        "run": f"{'quick, ' if args.quick else ''}{s.repeats} repeats after {s.warmup} warm-ups, sides interleaved, "
               f"median per side; torch threads {info['torch_threads']}, seed {s.seed}, "
               f"OMP_WAIT_POLICY={info['omp_wait_policy']}",
        "machine": f"{info['cpu']}, {info['cpu_count']} cores, load average {info['load_avg_start'][0]} at start, "
                   f"{info['load_avg_end'][0]} at end (other jobs share it: see the IQRs)",
        "wall time": f"{wall:.0f} s",
    }
    table = render_markdown(rows, header=header, curves=curves, tables=tables)
    write_json(args.out / "results.json", rows)
    if curves:
        write_json(args.out / "capacity.json", curves[0])
    if tables:
        write_json(args.out / "eval_cost.json", tables[0])
    write_json(args.out / "run.json", info)
    write_text(args.out / "results.md", table)
    print(table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
