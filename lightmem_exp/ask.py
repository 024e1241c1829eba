"""`python -m lightmem_exp.ask SOURCE ["question"]`: ask a memory model, and see what it recalled.

SOURCE is a step2 stage dir or export (it recalls from its bank), a sft stage dir or adapter (`local_hf_lora`), or a
plain model dir / hub id (`lightmem_exp.serve.model`), so the three can be compared by hand on one question. The
answer is generated as the server generates it (`lightmem_exp.serve.engine.run_batch`, `generate_with_recall`) and
printed with the recall trace: the chosen memory and its score, the top candidates, the memory's text in the bank and
the text the model decoded from its vector. Without a question it reads one question per line from stdin (each a
new chat) until end of input.

    python -m lightmem_exp.ask outputs/default/step2 "What is Audrey's dog called?"
    python -m lightmem_exp.ask outputs/default/sft "What is Audrey's dog called?"
    python -m lightmem_exp.ask outputs/default/step2          # interactive
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), after the OpenMP setting (see lightmem_exp.serve.__main__.setup_env)
    from lightmem_exp.serve.engine import Completion
    from lightmem_exp.serve.model import MemoryModel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lightmem_exp.serve.model import RECALL_MODES

    p = argparse.ArgumentParser(prog="python -m lightmem_exp.ask", description=__doc__.splitlines()[0])
    p.add_argument("source", help="step2 stage dir / export, sft stage dir / adapter, or a model dir / hub id")
    p.add_argument("question", nargs="?", help="omit to read questions from stdin, one per line")
    p.add_argument("--system", default=None, help="a system message before the question")
    p.add_argument("--max-tokens", type=int, default=64, help="answer tokens (a recalled memory may add "
                                                              "--memory-tokens before them)")
    p.add_argument("--memory-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--recall", choices=RECALL_MODES, default="force",
                   help="force: the prompt ends with <recall>; model: only when the model emits it; off: no recall")
    p.add_argument("--bank", default=None, help="a memory bank dir replacing the step2 export's own")
    p.add_argument("--top-k-trace", type=int, default=5, help="candidates listed per recall")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print each reply as one JSON line")
    return p.parse_args(argv)


def format_reply(question: str, c: Completion, mm: MemoryModel) -> str:
    """The answer, then one block per recall, then the token counts."""
    lines = [f"Q: {question}", f"A: {c.content}"]
    if not mm.recalls:
        lines.append(f"recall: none ({mm.kind} model, no memory bank)")
    elif not c.recall_trace:
        lines.append("recall: none (the model did not emit <recall>)")
    for i, t in enumerate(c.recall_trace, start=1):
        verbatim = " (decoded verbatim)" if t["decoded_text"] == t["memory_text"] else ""
        unclosed = "" if t["closed"] else f"  (no {mm.end_marker} before the next recall or the end)"
        lines += [f"recall {i}: memory {t['memory_id']} (score {t['score']:.3f})",
                  f"  decoded: {t['decoded_text']}{unclosed}",
                  f"  memory:  {t['memory_text']}{verbatim}",
                  "  top:     " + " | ".join(f"{x['memory_id']} {x['score']:.3f}" for x in t["candidates"])]
    lines.append(f"[{mm.name}: prompt {c.prompt_tokens} tokens, generated {c.completion_tokens}, "
                 f"finish {c.finish_reason}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from lightmem_exp.serve.__main__ import setup_env

    setup_env()
    args = parse_args(argv)
    from lightmem_exp.errors import LmxError
    from lightmem_exp.serve.engine import GenRequest, Sampling, run_batch
    from lightmem_exp.serve.model import load_memory_model

    try:
        mm = load_memory_model(args.source, bank=args.bank, recall=args.recall, memory_tokens=args.memory_tokens,
                               device_map=args.device)
    except LmxError as e:
        raise SystemExit(f"error: {e}") from None
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    questions = [args.question] if args.question is not None else (q.strip() for q in sys.stdin)
    if args.question is None and sys.stdin.isatty():
        print(f"{mm.name} ({mm.kind}): one question per line, Ctrl-D to end", file=sys.stderr)
    for question in questions:
        if not question:
            continue
        chat = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": question}]
        prompt = mm.prompt_ids(chat)
        if len(prompt) >= mm.context_tokens:
            print(f"error: the question takes {len(prompt)} tokens, the context holds {mm.context_tokens}",
                  file=sys.stderr)
            continue
        reply = run_batch(mm, [GenRequest(prompt, args.max_tokens, sampling)], top_k_trace=args.top_k_trace)[0]
        if args.json:
            print(json.dumps({"question": question, "answer": reply.content, "recall_trace": reply.recall_trace,
                              "finish_reason": reply.finish_reason, "usage": reply.usage(), "output": reply.text}))
        else:
            print(format_reply(question, reply, mm) + "\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
