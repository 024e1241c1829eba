"""`python -m lightmem_exp.serve SOURCE`: an OpenAI-compatible server over a step2 export + bank, a sft adapter or a
base model (SOURCE as `lightmem_exp.serve.model` reads it; API in `lightmem_exp.serve.app`).

It binds 127.0.0.1 unless `--host` says otherwise. When the environment variable named by `--token-env` (default
LMX_SERVE_TOKEN) is set, every request needs `Authorization: Bearer <token>` (the `openai` client sends its api_key
so); the token is never read from the command line. The URL is printed once the socket is bound (`--port 0`: a free
port).

    python -m lightmem_exp.serve outputs/default/step2 --port 8000
    python -m lightmem_exp.serve outputs/default/sft --name sft
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), after the OpenMP setting (torch reads it once, at its import)
    from lightmem_exp.serve.engine import Engine
    from lightmem_exp.serve.http import UvicornServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lightmem_exp.serve.model import RECALL_MODES

    p = argparse.ArgumentParser(prog="python -m lightmem_exp.serve", description=__doc__.splitlines()[0])
    p.add_argument("source", help="step2 stage dir / export, sft stage dir / adapter, or a model dir / hub id")
    p.add_argument("--name", default=None, help="the model id clients send (default: lightmem-step2, lightmem-sft "
                                                "or the model's directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: a free port")
    p.add_argument("--bank", default=None, help="a memory bank dir replacing the step2 export's own")
    p.add_argument("--recall", choices=RECALL_MODES, default="force",
                   help="force: every prompt ends with <recall> (as eval's recall method); model: only when the "
                        "model emits it; off: no recall")
    p.add_argument("--memory-tokens", type=int, default=48, help="new tokens a recalled memory may take before the "
                                                                 "answer's max_tokens start")
    p.add_argument("--max-tokens", type=int, default=256, help="a request's max_tokens when it sends none")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together")
    p.add_argument("--batch-wait-ms", type=float, default=15.0,
                   help="a tick takes requests until none arrives for this long (or --max-batch are in)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones get 503")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request, waiting included (504 after)")
    p.add_argument("--top-k-trace", type=int, default=5, help="candidates listed per recall")
    p.add_argument("--token-env", default="LMX_SERVE_TOKEN", help="env var holding the bearer token (if set)")
    p.add_argument("--device", default="auto", help="auto (the first GPU when there is one), cpu or cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: the checkpoint's)")
    p.add_argument("--context-tokens", type=int, default=None, help="default: the model's max_position_embeddings")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[UvicornServer, Engine]:
    """The bound server and its engine (not started)."""
    from lightmem_exp.serve.app import create_app
    from lightmem_exp.serve.engine import Engine
    from lightmem_exp.serve.http import UvicornServer, warn_if_exposed
    from lightmem_exp.serve.model import load_memory_model

    token = os.environ.get(args.token_env) if args.token_env else None
    warn_if_exposed(args.host, token, args.token_env)
    mm = load_memory_model(args.source, name=args.name, bank=args.bank, recall=args.recall,
                           memory_tokens=args.memory_tokens, context_tokens=args.context_tokens,
                           device_map=args.device, torch_dtype=args.dtype)
    engine = Engine(mm, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000, max_queue=args.max_queue,
                    top_k_trace=args.top_k_trace)
    app = create_app(engine, token=token, timeout_s=args.timeout_s, default_max_tokens=args.max_tokens)
    return UvicornServer(app, args.host, args.port), engine


def setup_env() -> None:
    """Before torch is imported: OpenMP threads that spin while they wait made every step of the generating thread
    compete with the HTTP thread (64 tiny-model tokens served in 5.6 s, 0.21 s with passive waiting)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    setup_env()
    from lightmem_exp.errors import LmxError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        server, engine = build(args)
    except LmxError as e:
        raise SystemExit(f"error: {e}") from None
    mm = engine.mm
    recall = f", recall {mm.recall} over {len(mm.bank)} memories" if mm.recalls else ""
    print(f"serving {mm.name} ({mm.kind}{recall}) on {server.url}/v1", flush=True)
    engine.start()
    try:
        # uvicorn stops gracefully on Ctrl+C / SIGTERM, then raises the signal again (SIGTERM then ends the process)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
