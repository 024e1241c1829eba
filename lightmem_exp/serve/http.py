"""HTTP plumbing shared by `serve` and the reward server: uvicorn on a pre-bound socket, the bearer-token check."""

from __future__ import annotations

import hmac
import logging
import socket
import threading

LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger(__name__)


class UvicornServer:
    """An ASGI app served by uvicorn on a socket bound at construction, so `port=0` picks a free port that is known
    (`server_address`, `url`) before serving starts. `serve_forever` runs in the calling thread until `shutdown`
    (from another thread); `start` runs it in a daemon thread. The socketserver-style names keep the reward server's
    callers unchanged."""

    def __init__(self, app: object, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        # lifespan off: the apps here start their workers before serving and stop them after
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                     timeout_graceful_shutdown=5))
        self._stopped = threading.Event()
        self._stopped.set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self) -> UvicornServer:
        self._stopped.clear()  # before the thread runs: a shutdown right after start must wait for it
        self._thread = threading.Thread(target=self.serve_forever, name="uvicorn", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait (at most `timeout_s`) until `serve_forever` has returned."""
        self._server.should_exit = True
        if not self._stopped.wait(timeout_s):
            log.warning("the HTTP server did not stop within %.0f s", timeout_s)

    def server_close(self) -> None:
        self.socket.close()


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header carries `token` (always true when no token is set); constant-time."""
    if not token:
        return True
    header = header or ""
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), token.encode())


def warn_if_exposed(host: str, token: str | None, token_env: str) -> None:
    if host not in LOOPBACK and not token:
        log.warning("binding %s without a bearer token: anyone who can reach it can use it (set %s)", host, token_env)
