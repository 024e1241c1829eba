"""`python -m lightmem_exp.reward_server`: the ADRPO QA-reward service (`reward.mode=api` points the stage at it).

Endpoints (JSON; wire format in `lightmem_exp.rl.reward_service`):
  GET  /health   {"status": "ok", "answerer": ..., "search_mode": ..., "auth": bool, "served": n, "failed": n,
                  "active": batches scoring now, "cancelled": timed-out batches stopped early}
  POST /reward   a batch of (memory snapshot, questions) items -> one QA score per item

FastAPI on uvicorn, the stack of `python -m lightmem_exp.serve`. It binds 127.0.0.1 unless `--host` says otherwise. When the environment variable named by `--token-env` (default
LMX_REWARD_TOKEN) is set, every request needs `Authorization: Bearer <token>` (401 otherwise); the token is never
read from the command line. A request body over `--max-body-mb` is refused (413), and a batch that takes longer
than `--timeout-s` to score is answered 504: the client counts it as a failed reward, it is never replaced. The
scoring of a timed-out batch stops at its next item (one item is the unit of work), so abandoned batches do not keep
the `--workers` threads busy for nobody while later requests queue behind them.

    python -m lightmem_exp.reward_server --port 8765 --answerer local --top-k 5
    python -m lightmem_exp.reward_server --answerer api --api-base-url http://127.0.0.1:8000/v1 \
        --api-model lightmem-step2     # answers and verdicts from `python -m lightmem_exp.serve` on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightmem_exp.memory.store import SEARCH_MODES, MemoryStore
from lightmem_exp.retrieval import TextEmbedder
from lightmem_exp.rl.answerers import Answerer, RewardError, prefetch_embeddings
from lightmem_exp.serve.http import UvicornServer, bearer_ok, warn_if_exposed

log = logging.getLogger("lightmem_exp.reward_server")


class RewardServer(UvicornServer):
    """The reward app (FastAPI) on uvicorn. Batches are scored in a pool of `workers` threads, off the event loop."""

    def __init__(self, address: tuple[str, int], answerer: Answerer, *, token: str | None = None,
                 timeout_s: float = 60.0, max_body_bytes: int = 64 << 20, search_mode: str = "hybrid",
                 workers: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.answerer, self.token, self.timeout_s = answerer, token or None, timeout_s
        self.max_body_bytes, self.search_mode = max_body_bytes, search_mode
        self.embedder = TextEmbedder()  # shared across requests: consecutive batches repeat most texts
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self.served = self.failed = self.cancelled = 0
        self.active = 0  # batches being scored right now (health reports it)
        self._lock = threading.Lock()
        super().__init__(self._app(), *address)

    def score(self, payload: dict, cancel: threading.Event | None = None) -> dict:
        mode = payload.get("search_mode", self.search_mode)
        if mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {SEARCH_MODES}")
        items = payload.get("items")
        if not isinstance(items, list):
            raise ValueError("'items' must be a list")
        batch = []
        for i, item in enumerate(items):
            try:
                store = MemoryStore.from_snapshot(item["memory"], search_mode=mode, embedder=self.embedder)
                questions = [{"id": q.get("id"), "question": str(q["question"]), "answer": str(q["answer"])}
                             for q in item["questions"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"items[{i}]: {e!r}") from e
            batch.append((store, questions))
        with self._lock:
            self.active += 1
        try:
            if getattr(self.answerer, "searches_store", False):
                prefetch_embeddings(batch)  # one encode call for the batch; the per-item calls then hit the cache
            results = []
            for i, item in enumerate(batch):
                if cancel is not None and cancel.is_set():  # the request timed out: nobody waits for the rest
                    with self._lock:
                        self.cancelled += 1
                    raise TimeoutError(f"scoring abandoned after {i} of {len(batch)} items (the request timed out)")
                results.append(self.answerer.score([item])[0])
            return {"results": [r.to_dict() for r in results]}
        finally:
            with self._lock:
                self.active -= 1

    def server_close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().server_close()

    def _fail(self, status: int, message: str) -> JSONResponse:
        with self._lock:
            self.failed += 1
        return JSONResponse({"error": message}, status_code=status)

    def _app(self) -> FastAPI:
        app = FastAPI(title="lightmem_exp reward server", docs_url=None, redoc_url=None, openapi_url=None,
                      max_body_size=self.max_body_bytes)  # 413 past it, before the body is read

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
            return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

        def unauthorised(request: Request) -> JSONResponse | None:
            if bearer_ok(request.headers.get("authorization"), self.token):
                return None
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)

        @app.get("/health")
        def health(request: Request) -> JSONResponse:
            return unauthorised(request) or JSONResponse({
                "status": "ok", "answerer": self.answerer.name, "search_mode": self.search_mode,
                "auth": bool(self.token), "served": self.served, "failed": self.failed, "active": self.active,
                "cancelled": self.cancelled})

        @app.post("/reward")
        async def reward(request: Request) -> JSONResponse:
            if denied := unauthorised(request):
                return denied
            try:
                payload = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return JSONResponse({"error": f"the body is not JSON: {e}"}, status_code=400)
            start = time.perf_counter()
            cancel = threading.Event()
            future = self.pool.submit(self.score, payload, cancel)
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout_s)
            except TimeoutError:
                cancel.set()  # a running batch stops at its next item; a queued one never starts
                future.cancel()
                return self._fail(504, f"scoring took longer than {self.timeout_s} s")
            except ValueError as e:
                return self._fail(400, str(e))
            except RewardError as e:
                return self._fail(502, str(e))
            except Exception as e:  # noqa: BLE001 - report any scoring failure to the client as an error, never a reward
                log.exception("scoring failed")
                return self._fail(500, f"{type(e).__name__}: {e}")
            with self._lock:
                self.served += 1
            result["seconds"] = round(time.perf_counter() - start, 4)
            return JSONResponse(result)

        return app


def make_answerer(args: argparse.Namespace) -> Answerer:
    from lightmem_exp.rl.answerers import ApiAnswerer, LocalAnswerer

    if args.answerer == "local":
        return LocalAnswerer(top_k=args.top_k, threshold=args.threshold)
    if args.answerer == "api":
        from lightmem_exp.rl.api_client import ChatClient

        if not args.api_base_url or not args.api_model:
            raise SystemExit("--answerer api needs --api-base-url and --api-model")
        client = ChatClient(args.api_base_url, args.api_model, api_key_env=args.api_key_env,
                            timeout_s=args.api_timeout_s)
        judge = ChatClient(args.api_base_url, args.judge_model or args.api_model, api_key_env=args.api_key_env,
                           timeout_s=args.api_timeout_s)
        return ApiAnswerer(client, judge=judge, top_k=args.top_k, verdicts_path=args.verdicts)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightmem_exp.models.memory_bank import bank_key_space
    from lightmem_exp.rl.answerers import RecallAnswerer

    if not args.recall_model:
        raise SystemExit("--answerer recall needs --recall-model (a step2 export/model directory)")
    model = AutoModelForCausalLM.from_pretrained(args.recall_model)
    key_space = bank_key_space(Path(args.recall_model).parent / "bank")  # a step2 export: model/ beside bank/
    return RecallAnswerer(model, AutoTokenizer.from_pretrained(args.recall_model), threshold=args.threshold,
                          key_space=key_space)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightmem_exp.reward_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--answerer", choices=("local", "recall", "api"), default="local")
    p.add_argument("--search", choices=SEARCH_MODES, default="hybrid", help="default search mode of the memories")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.0, help="containment a correct answer needs (local/recall)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="longest time one /reward batch may take")
    p.add_argument("--max-body-mb", type=float, default=64.0)
    p.add_argument("--workers", type=int, default=2, help="batches scored at once")
    p.add_argument("--token-env", default="LMX_REWARD_TOKEN", help="env var holding the bearer token (if set)")
    p.add_argument("--recall-model", default=None, help="answerer recall: the step2 export/model directory")
    p.add_argument("--api-base-url", default=None)
    p.add_argument("--api-model", default=None)
    p.add_argument("--judge-model", default=None, help="default: --api-model")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--api-timeout-s", type=float, default=60.0)
    p.add_argument("--verdicts", default="reward_verdicts.jsonl", help="answerer api: where verdicts are appended")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace) -> RewardServer:
    token = os.environ.get(args.token_env) if args.token_env else None
    warn_if_exposed(args.host, token, args.token_env)
    return RewardServer((args.host, args.port), make_answerer(args), token=token, timeout_s=args.timeout_s,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), search_mode=args.search,
                        workers=args.workers)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    server = build_server(args)
    log.info("reward server on %s (answerer %s, auth %s)", server.url, server.answerer.name,
             "on" if server.token else "off")
    try:
        # uvicorn stops gracefully on Ctrl+C / SIGTERM, then raises the signal again (SIGTERM then ends the process)
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
