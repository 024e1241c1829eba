"""`python -m lightmem_exp.reward_server`: the ADRPO QA-reward service (`reward.mode=api` points the stage at it).

Endpoints (JSON; wire format in `lightmem_exp.rl.reward_service`):
  GET  /health   {"status": "ok", "answerer": ..., "search_mode": ..., "auth": bool, "served": n, "failed": n,
                  "active": batches scoring now, "cancelled": timed-out batches stopped early}
  POST /reward   a batch of (memory snapshot, questions) items -> one QA score per item

It binds 127.0.0.1 unless `--host` says otherwise. When the environment variable named by `--token-env` (default
LMX_REWARD_TOKEN) is set, every request needs `Authorization: Bearer <token>` (401 otherwise); the token is never
read from the command line. A request body over `--max-body-mb` is refused (413), and a batch that takes longer
than `--timeout-s` to score is answered 504: the client counts it as a failed reward, it is never replaced. The
scoring of a timed-out batch stops at its next item (one item is the unit of work), so abandoned batches do not keep
the `--workers` threads busy for nobody while later requests queue behind them.

    python -m lightmem_exp.reward_server --port 8765 --answerer local --top-k 5
    python -m lightmem_exp.reward_server --answerer api --api-base-url http://localhost:8000/v1 --api-model m
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lightmem_exp.memory.store import SEARCH_MODES, MemoryStore, TextEmbedder
from lightmem_exp.rl.answerers import Answerer, RewardError, prefetch_embeddings

log = logging.getLogger("lightmem_exp.reward_server")


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], answerer: Answerer, *, token: str | None = None,
                 timeout_s: float = 60.0, max_body_bytes: int = 64 << 20, search_mode: str = "hybrid",
                 workers: int = 2):
        super().__init__(address, _Handler)
        self.answerer, self.token, self.timeout_s = answerer, token or None, timeout_s
        self.max_body_bytes, self.search_mode = max_body_bytes, search_mode
        self.embedder = TextEmbedder()  # shared across requests: consecutive batches repeat most texts
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self.served = self.failed = self.cancelled = 0
        self.active = 0  # batches being scored right now (health reports it)
        self._lock = threading.Lock()

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


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # route through logging instead of stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if not self.server.token:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def do_GET(self) -> None:
        if not self._authorised():
            return self._send(401, {"error": "missing or wrong bearer token"})
        if self.path != "/health":
            return self._send(404, {"error": f"no such endpoint {self.path}"})
        self._send(200, {"status": "ok", "answerer": self.server.answerer.name,
                         "search_mode": self.server.search_mode, "auth": bool(self.server.token),
                         "served": self.server.served, "failed": self.server.failed,
                         "active": self.server.active, "cancelled": self.server.cancelled})

    def do_POST(self) -> None:
        if not self._authorised():
            return self._send(401, {"error": "missing or wrong bearer token"})
        if self.path != "/reward":
            return self._send(404, {"error": f"no such endpoint {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body_bytes:
            self.close_connection = True
            return self._send(413, {"error": f"body of {length} bytes is over the limit"})
        try:
            payload = json.loads(self.rfile.read(length).decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._send(400, {"error": f"the body is not JSON: {e}"})
        start = time.perf_counter()
        cancel = threading.Event()
        future = self.server.pool.submit(self.server.score, payload, cancel)
        try:
            result = future.result(timeout=self.server.timeout_s)
        except FutureTimeout:
            cancel.set()  # a running batch stops at its next item; a queued one never starts
            future.cancel()
            self.server.failed += 1
            return self._send(504, {"error": f"scoring took longer than {self.server.timeout_s} s"})
        except ValueError as e:
            self.server.failed += 1
            return self._send(400, {"error": str(e)})
        except RewardError as e:
            self.server.failed += 1
            return self._send(502, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - report any scoring failure to the client as an error, never a reward
            self.server.failed += 1
            log.exception("scoring failed")
            return self._send(500, {"error": f"{type(e).__name__}: {e}"})
        self.server.served += 1
        result["seconds"] = round(time.perf_counter() - start, 4)
        self._send(200, result)


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

    from lightmem_exp.rl.answerers import RecallAnswerer

    if not args.recall_model:
        raise SystemExit("--answerer recall needs --recall-model (a step2 export/model directory)")
    model = AutoModelForCausalLM.from_pretrained(args.recall_model)
    return RecallAnswerer(model, AutoTokenizer.from_pretrained(args.recall_model), threshold=args.threshold)


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
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("binding %s without a bearer token: anyone who can reach it can use it (set %s)",
                    args.host, args.token_env)
    return RewardServer((args.host, args.port), make_answerer(args), token=token, timeout_s=args.timeout_s,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), search_mode=args.search,
                        workers=args.workers)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    server = build_server(args)
    host, port = server.server_address[:2]
    log.info("reward server on http://%s:%d (answerer %s, auth %s)", host, port, server.answerer.name,
             "on" if server.token else "off")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
