"""Answering for `ask` and `serve`: a batch of chats through `generate_with_recall`, and the per-tick batcher.

`run_batch` decodes a left-padded batch of prompts that share their sampling settings in one `generate_with_recall`
call; the token and memory choices go through the same warpers (temperature, top-p, top-k). Each row keeps its own
settings through a stopping criterion that runs after every step (`_Rows`): its token budget, stop strings, end
token and cancellation, and the streamed text. A recall row's output is `memory text</memory> answer`; its answer
(the reply's `content`) is what follows the first end marker, as eval's `recall` method reads it, and it gets
`max_tokens` tokens after the marker, the memory at most `memory_tokens` before it.

The recall trace of a reply, one item per recall: `memory_id`, `index` (bank row), `score` (raw cosine of the chosen
memory), `candidates` (the top `top_k_trace` as `{memory_id, score}`), `memory_text` (the bank's text of the chosen
memory), `decoded_text` (what the model decoded from its vector, up to the end marker, else up to the next recall or
the end of the output) and `closed` (whether the end marker closed it).

`Engine` batches concurrent requests per tick: its worker takes the oldest waiting request and every one arriving
within `batch_wait_s` of the previous (at most `max_batch`), and runs each group sharing sampling settings as one
batch; requests arriving meanwhile wait for the next tick, at most `max_queue` of them (`QueueFull` past that).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lightmem_exp.errors import LmxError
from lightmem_exp.eval.methods import split_recall_output
from lightmem_exp.models.generation import RecallOutput, generate_with_recall
from lightmem_exp.models.inputs import pad_batch
from lightmem_exp.serve.model import MemoryModel

log = logging.getLogger(__name__)
_UNSETTLED_TAIL = re.compile(r"[\s\ufffd]+$")  # trailing space may be cut, a partial UTF-8 character completed


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by a batch; temperature 0 is greedy (the others are then ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, request_id: int) -> tuple:
        if self.greedy:
            return ("greedy",)
        # a seeded request runs alone, so its tokens depend on its seed only, never on its batch mates
        return (self.temperature, self.top_p, self.top_k, self.seed, request_id if self.seed is not None else None)


@dataclass
class GenRequest:
    """One chat's prompt ids and settings. `on_text` receives the answer's streamed pieces (in the generating thread);
    setting `cancelled` stops the row at its next step. `ignore_eos` (vLLM's option) decodes through end tokens."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Completion:
    content: str
    finish_reason: str  # stop (end token or stop string) | length
    prompt_tokens: int
    completion_tokens: int  # every generated token: memory pad, memory text, marker, answer, end token
    recall_trace: list[dict]
    text: str  # the whole decoded output

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def token_budget(mm: MemoryModel, prompt_len: int, max_tokens: int) -> int:
    """New tokens a row may generate: `max_tokens` (+ the memory's share for a recall model), within the context."""
    return min(max_tokens + mm.memory_tokens, mm.context_tokens - prompt_len)


class _Rows(StoppingCriteria):
    """Per-row stopping and streaming for one batch; `generate_with_recall` calls it after every step."""

    def __init__(self, mm: MemoryModel, reqs: Sequence[GenRequest], prompt_len: int):
        self.mm, self.reqs, self.prompt_len = mm, list(reqs), prompt_len
        self.limit = [token_budget(mm, len(r.prompt), r.max_tokens) for r in reqs]
        self.max_new = max(self.limit)
        self.eos = set(mm.eos_ids)
        self.done_at: list[int | None] = [None] * len(reqs)  # generated tokens when the row finished
        self.reason: list[str | None] = [None] * len(reqs)
        self.marker_seen = [not mm.recalls] * len(reqs)
        self.sent = [""] * len(reqs)
        # the marker is looked for in the last few tokens only: decoding a whole row every step costs too much
        self.window = len(mm.tokenizer(mm.end_marker, add_special_tokens=False)["input_ids"]) + 4 if mm.recalls else 0
        self.marker_end = mm.marker_end_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        n = new.shape[1]
        last = new[:, -1].tolist()
        for b, req in enumerate(self.reqs):
            if self.done_at[b] is not None:
                continue
            if req.cancelled.is_set():
                self._finish(b, n, "cancelled")
                continue
            if last[b] in self.eos and not req.ignore_eos:
                self._finish(b, n, "stop")
                continue
            if not self.marker_seen[b] and last[b] in self.marker_end and \
                    self.mm.end_marker in self._decode(new[b, -self.window:]):
                self.marker_seen[b] = True
                self.limit[b] = min(self.limit[b], n + req.max_tokens)
            if (req.stop or req.on_text is not None) and self.marker_seen[b]:  # a memory is no answer to stop
                answer, stopped = self._answer(self._decode(new[b]), req.stop)
                if stopped:
                    self._finish(b, n, "stop")
                    continue
                if req.on_text is not None:
                    self._send(b, _UNSETTLED_TAIL.sub("", _hold_back(answer, req.stop)))
            if n >= self.limit[b]:
                self._finish(b, n, "length")
        return torch.tensor([d is not None for d in self.done_at], device=input_ids.device)

    def _finish(self, b: int, n: int, reason: str) -> None:
        self.done_at[b], self.reason[b] = n, reason

    def _decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.mm.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids,
                                        skip_special_tokens=True)

    def _answer(self, text: str, stop: Sequence[str]) -> tuple[str, bool]:
        """(the answer within `text`, cut before the first stop string; whether one was found)."""
        answer = split_recall_output(text, self.mm.end_marker)[1] if self.mm.recalls else text.strip()
        cuts = [i for i in (answer.find(s) for s in stop) if i >= 0]
        return (answer[: min(cuts)].strip(), True) if cuts else (answer, False)

    def _send(self, b: int, visible: str) -> None:
        # decoding more tokens only appends, except in corner cases of tokenizer clean-up: then wait for the end
        if len(visible) > len(self.sent[b]) and visible.startswith(self.sent[b]):
            self.reqs[b].on_text(visible[len(self.sent[b]):])
            self.sent[b] = visible

    def completions(self, out: RecallOutput) -> list[Completion | None]:
        """One Completion per row (None for a cancelled row), its last streamed piece sent."""
        results: list[Completion | None] = []
        for b, req in enumerate(self.reqs):
            n = self.done_at[b] if self.done_at[b] is not None else out.sequences.shape[1] - self.prompt_len
            reason = self.reason[b] or "length"
            if reason == "cancelled":
                results.append(None)
                continue
            new = out.sequences[b, self.prompt_len : self.prompt_len + n].tolist()
            text = self._decode(new[:-1] if reason == "stop" and new and new[-1] in self.eos else new)
            content, stopped = self._answer(text, req.stop)
            if stopped:
                reason = "stop"
            if req.on_text is not None:
                self._send(b, content)
            results.append(Completion(content, reason, len(req.prompt), n, self._trace(out.recall_trace[b], new),
                                      text))
        return results

    def _trace(self, items: list[dict], new: list[int]) -> list[dict]:
        out = []
        steps = [t["step"] for t in items] + [len(new)]
        for t, end in zip(items, steps[1:], strict=True):
            span = self._decode(new[t["step"] + 1 : end])  # from the injected vector to the next recall or the end
            cut = span.find(self.mm.end_marker)
            out.append({"memory_id": t["memory_id"], "index": t["index"], "score": t["score"],
                        "candidates": [{"memory_id": mid, "score": s} for mid, s in t["candidates"]],
                        "memory_text": self.mm.bank.entries[t["index"]]["text"],
                        "decoded_text": (span[:cut] if cut >= 0 else span).strip(), "closed": cut >= 0})
        return out


def _hold_back(answer: str, stop: Sequence[str]) -> str:
    """`answer` less a tail that may be the start of a stop string (it must not be streamed before it is decided)."""
    keep = len(answer)
    for s in stop:
        for k in range(min(len(s) - 1, len(answer)), 0, -1):
            if answer.endswith(s[:k]):
                keep = min(keep, len(answer) - k)
                break
    return answer[:keep]


def run_batch(mm: MemoryModel, reqs: Sequence[GenRequest], *, top_k_trace: int = 5) -> list[Completion | None]:
    """Answer `reqs` (all with the same `sampling`) in one `generate_with_recall` call; None for cancelled rows."""
    sampling = reqs[0].sampling
    if any(r.sampling != sampling for r in reqs):
        raise LmxError("run_batch: the requests of one batch must share their sampling settings")
    device = mm.device
    ids, mask = pad_batch([r.prompt for r in reqs], mm.pad_id, device=device)
    rows = _Rows(mm, reqs, ids.shape[1])
    generator = None
    if not sampling.greedy and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    out = generate_with_recall(
        mm.model, ids, mask, bank=mm.bank, recall_enabled=mm.recalls,
        recall_token_id=mm.recall_id, memory_pad_token_id=mm.memory_pad_id, max_new_tokens=rows.max_new,
        # end tokens are per row (`ignore_eos`): `_Rows` ends rows, [] keeps the generation config's from doing it
        eos_token_id=[], pad_token_id=mm.pad_id, use_sampling=not sampling.greedy,
        temperature=sampling.temperature or None, top_p=sampling.top_p, top_k=sampling.top_k,
        stopping_criteria=StoppingCriteriaList([rows]), top_k_trace=top_k_trace, generator=generator)
    return rows.completions(out)


class QueueFull(LmxError):
    """More requests wait than the engine's queue holds."""


Done = Callable[[Completion | BaseException | None], None]


class Engine:
    """The per-tick batcher (see the module docstring); `done` callbacks run in its worker thread."""

    def __init__(self, mm: MemoryModel, *, max_batch: int = 16, batch_wait_s: float = 0.015, max_queue: int = 64,
                 top_k_trace: int = 5):
        if max_batch < 1 or max_queue < 1 or batch_wait_s < 0:
            raise LmxError(f"need max_batch >= 1, max_queue >= 1, batch_wait_s >= 0; got {max_batch}, {max_queue}, "
                           f"{batch_wait_s}")
        self.mm, self.max_batch, self.batch_wait_s, self.top_k_trace = mm, max_batch, batch_wait_s, top_k_trace
        self._queue: queue.Queue[tuple[GenRequest, Done]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.counts = {"served": 0, "failed": 0, "cancelled": 0, "batches": 0, "running": 0}

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._work, name="lmx-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the running batch (its rows are cancelled); waiting requests get None."""
        self._stop.set()
        while True:
            try:
                req, done = self._queue.get_nowait()
            except queue.Empty:
                break
            req.cancelled.set()
            done(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, req: GenRequest, done: Done) -> None:
        if self._stop.is_set():
            raise QueueFull("the engine is stopping")
        try:
            self._queue.put_nowait((req, done))
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None

    def stats(self) -> dict:
        with self._lock:
            return {**self.counts, "queued": self._queue.qsize()}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _take(self) -> list[tuple[GenRequest, Done]]:
        """One tick: the oldest waiting request, then every request arriving within `batch_wait_s` of the previous
        one, up to `max_batch`. Concurrent clients' requests reach the server spread over tens of ms with gaps of
        up to ~13 ms (16 openai-client threads on 2 busy cores): a gap closes a tick, a fixed window would either
        split such a burst or make a lone request wait for nothing."""
        try:
            jobs = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get(timeout=self.batch_wait_s))
            except queue.Empty:
                break
        return jobs

    def _work(self) -> None:
        while not self._stop.is_set():
            groups: dict[tuple, list[tuple[GenRequest, Done]]] = {}
            for req, done in self._take():
                if req.cancelled.is_set():  # timed out or disconnected while waiting
                    self._count("cancelled")
                    done(None)
                else:
                    groups.setdefault(req.sampling.batch_key(id(req)), []).append((req, done))
            for jobs in groups.values():
                self._run(jobs)

    def _run(self, jobs: list[tuple[GenRequest, Done]]) -> None:
        self._count("batches")
        self._count("running", len(jobs))
        try:
            results: list = run_batch(self.mm, [r for r, _ in jobs], top_k_trace=self.top_k_trace)
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the worker
            log.exception("generation failed for a batch of %d", len(jobs))
            results = [e] * len(jobs)
        finally:
            self._count("running", -len(jobs))
        for (_, done), result in zip(jobs, results, strict=True):
            self._count("served" if isinstance(result, Completion) else
                        "cancelled" if result is None else "failed")
            try:
                done(result)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the other requests' replies
                log.exception("a completion callback failed")
