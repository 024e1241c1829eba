"""A minimal OpenAI-compatible chat client (stdlib HTTP) for the optional API expert and the `api` answerer.

The key is read from the environment variable named by `api_key_env` (never from a config file); an endpoint
that needs no key (a local vLLM server) works with the variable unset. Every failure (connection, timeout, HTTP
status, a reply without text) raises ApiError: callers count it, they never invent a reply.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass


class ApiError(RuntimeError):
    pass


@dataclass
class ChatClient:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 512

    def chat(self, messages: list[dict]) -> str:
        """The assistant text of one chat completion."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise ApiError(f"{url}: HTTP {e.code} {e.read()[:300].decode(errors='replace')}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ApiError(f"{url}: {e}") from e
        except json.JSONDecodeError as e:
            raise ApiError(f"{url}: the reply is not JSON ({e.msg})") from e
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ApiError(f"{url}: no choices[0].message.content in the reply") from e
        if not isinstance(text, str):
            raise ApiError(f"{url}: the reply content is not text")
        return text
