"""Answerers that turn a built memory and a chunk's questions into the QA accuracy of the ADRPO reward.

Every answerer returns, per question, whether it was answered correctly and which memory type served it (the
attribution). Gold answers are compared after SQuAD normalisation (`eval.metrics.normalize_answer`).

- `local` (default; deterministic, in-process, no model): the memory's `top_k` units most relevant to the question
  (the store's hybrid search) are the context. A unit's *containment* of the gold answer is the fraction of the
  answer's normalised tokens (as a multiset) found in it; the question is correct when the best unit reaches
  `threshold` (1.0: every answer token in one unit). It is served by the highest-ranked unit with the best
  containment. `f1` reports the best token F1 between a unit and the answer.
- `recall`: the step2 model with a memory bank built from the memory's units (vectors by the same model, cached per
  text). The question goes in as a user turn followed by `<recall>`; the model recalls one unit and continues. The
  context is the recalled unit plus the generated text, scored like `local`; it is served by the recalled unit.
- `api`: an OpenAI-compatible chat model answers from the `top_k` retrieved units (pinned `ANSWER_PROMPT`) and a
  judge model grades the answer against the gold one (pinned `JUDGE_PROMPT`, a JSON verdict). Every verdict is
  appended to `verdicts_path`. A correct answer is served by the highest-ranked unit with the best containment.
  A failed call raises `RewardError`; nothing is ever scored by default.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lightmem_exp.eval.metrics import normalize_answer, token_f1
from lightmem_exp.memory.store import Hit, MemoryStore
from lightmem_exp.rl.api_client import ApiError, ChatClient


class RewardError(RuntimeError):
    """A reward that could not be computed (server down, timeout, API failure): counted, never replaced."""


@dataclass
class QAScore:
    correct: list[bool] = field(default_factory=list)
    containment: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    served_by: list[str | None] = field(default_factory=list)

    @property
    def acc(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    def to_dict(self) -> dict:
        return {"correct": self.correct, "containment": self.containment, "f1": self.f1, "served_by": self.served_by}

    @classmethod
    def from_dict(cls, d: dict) -> QAScore:
        n = len(d["correct"])
        for key in ("containment", "f1", "served_by"):
            if len(d[key]) != n:
                raise ValueError(f"QAScore: {key} has {len(d[key])} values for {n} questions")
        return cls([bool(x) for x in d["correct"]], [float(x) for x in d["containment"]], [float(x) for x in d["f1"]],
                   [None if x is None else str(x) for x in d["served_by"]])


class Answerer(Protocol):
    name: str

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        """One QAScore per (memory, questions) item; questions are dicts with `question` and `answer`."""
        ...


def containment(answer: str, text: str) -> float:
    """Fraction of the normalised answer tokens (multiset) that occur in `text` (1.0 for an empty answer)."""
    gold = Counter(normalize_answer(answer).split())
    if not gold:
        return 1.0
    have = Counter(normalize_answer(text).split())
    return sum((gold & have).values()) / sum(gold.values())


def _best(hits: Sequence[Hit], answer: str) -> tuple[float, float, str | None]:
    """(best containment, best F1, type of the first unit reaching the best containment)."""
    best_c, best_f, served = 0.0, 0.0, None
    for h in hits:
        c = containment(answer, h.content)
        if c > best_c:
            best_c, served = c, h.type
        best_f = max(best_f, token_f1(h.content, answer))
    return best_c, best_f, served


def prefetch_embeddings(items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> None:
    """Encode every unit and question of a batch in one call (per-call overhead dominates small encodes)."""
    by_embedder: dict[int, tuple[Any, list[str]]] = {}
    for store, questions in items:
        if store.search_mode == "bm25" or store.embedder is None:
            continue
        texts = by_embedder.setdefault(id(store.embedder), (store.embedder, []))[1]
        texts += [u.content for u in store.units()] + [q["question"] for q in questions]
    for embedder, texts in by_embedder.values():
        embedder(texts)


class LocalAnswerer:
    name = "local"
    searches_store = True  # answers from the store's search: a batch's embeddings can be computed up front

    def __init__(self, top_k: int = 5, threshold: float = 1.0):
        if top_k < 1 or not 0 < threshold <= 1:
            raise ValueError(f"need top_k >= 1 and 0 < threshold <= 1, got {top_k}, {threshold}")
        self.top_k, self.threshold = top_k, threshold

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        prefetch_embeddings(items)
        out = []
        for store, questions in items:
            hits = store.search_many([q["question"] for q in questions], self.top_k)
            s = QAScore()
            for q, h in zip(questions, hits, strict=True):
                c, f, served = _best(h, q["answer"])
                ok = c >= self.threshold
                s.correct.append(ok)
                s.containment.append(c)
                s.f1.append(f)
                s.served_by.append(served if ok else None)
            out.append(s)
        return out


class RecallAnswerer:
    """See the module docstring. `model` is the step2 export (merged weights) with its tokenizer."""

    name = "recall"

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 32, threshold: float = 1.0,
                 batch_size: int = 16, key_space: Any = None):
        from lightmem_exp.models.loading import require_memory_tokens
        from lightmem_exp.models.memory_bank import measure_embed_scale

        self.model, self.tokenizer = model.eval(), tokenizer
        self.ids = require_memory_tokens(tokenizer, getattr(model, "name_or_path", "recall model"))
        self.embed_scale = measure_embed_scale(model)
        self.max_new_tokens, self.threshold, self.batch_size = max_new_tokens, threshold, batch_size
        self.key_space = key_space  # the step2 bank's KeySpace: units are encoded as its memories were
        self.vectors: dict[str, Any] = {}  # unit text -> bank vector
        self.lock = threading.Lock()  # one generation at a time (the reward server is threaded)

    def _encode(self, texts: list[str]) -> None:
        from lightmem_exp.models.memory_bank import MemoryBank

        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            bank = MemoryBank.build(self.model, self.tokenizer, [{"id": str(i), "text": t}
                                                                 for i, t in enumerate(missing)], progress=False,
                                   key_space=self.key_space)
            for t, v in zip(missing, bank.vectors, strict=True):
                self.vectors[t] = v.clone()

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        with self.lock:
            return [self._score_one(store, questions) for store, questions in items]

    def _score_one(self, store: MemoryStore, questions: Sequence[dict]) -> QAScore:
        import torch

        from lightmem_exp.models.chat import chat_token_ids
        from lightmem_exp.models.generation import generate_with_recall
        from lightmem_exp.models.inputs import pad_batch
        from lightmem_exp.models.memory_bank import MemoryBank

        units = store.units()
        s = QAScore()
        if not units:
            n = len(questions)
            return QAScore([False] * n, [0.0] * n, [0.0] * n, [None] * n)
        self._encode([u.content for u in units])
        bank = MemoryBank(torch.stack([self.vectors[u.content] for u in units]),
                          [{"id": u.id, "text": u.content} for u in units], embed_scale=self.embed_scale,
                          key_space=self.key_space)
        by_id = {u.id: u for u in units}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(questions), self.batch_size):
            batch = questions[start : start + self.batch_size]
            prompts = [[*chat_token_ids(self.tokenizer, [{"role": "user", "content": q["question"]}],
                                        add_generation_prompt=True), self.ids.recall] for q in batch]
            # left padding (generate_with_recall needs it), on the model's device
            ids, mask = pad_batch(prompts, pad, device=next(self.model.parameters()).device)
            out = generate_with_recall(self.model, ids, mask, bank=bank, recall_token_id=self.ids.recall,
                                       memory_pad_token_id=self.ids.memory_pad, max_new_tokens=self.max_new_tokens,
                                       pad_token_id=pad, use_sampling=False)
            texts = self.tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
            for q, text, trace in zip(batch, texts, out.recall_trace, strict=True):
                recalled = [by_id[t["memory_id"]] for t in trace]
                hits = [Hit(u.id, u.type, u.content, 0.0, r) for r, u in enumerate(recalled)]
                c, f, _ = _best([*hits, Hit("generated", "generated", text, 0.0, len(hits))], q["answer"])
                ok = c >= self.threshold
                s.correct.append(ok)
                s.containment.append(c)
                s.f1.append(f)
                s.served_by.append(recalled[0].type if ok and recalled else None)
        return s


ANSWER_PROMPT = ("Answer the question using only these memories. Reply with the short answer only (a few words); "
                 "if the memories do not contain it, reply \"unknown\".\n\nMemories:\n{memories}\n\n"
                 "Question: {question}")
JUDGE_PROMPT = ("You grade an answer to a question against the gold answer. The answer is correct when it states "
                "the same fact as the gold answer (wording, format and extra detail may differ; dates may be "
                "written differently). Reply with one JSON object only: {{\"correct\": true}} or "
                "{{\"correct\": false}}.\n\nQuestion: {question}\nGold answer: {gold}\nAnswer: {answer}")


class ApiAnswerer:
    """See the module docstring. `client` answers, `judge` (default: the same client) grades."""

    name = "api"
    searches_store = True

    def __init__(self, client: ChatClient, *, judge: ChatClient | None = None, top_k: int = 5,
                 verdicts_path: str | Path | None = None):
        self.client, self.judge, self.top_k = client, judge or client, top_k
        self.verdicts_path = Path(verdicts_path) if verdicts_path else None
        self.lock = threading.Lock()

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        out, records = [], []
        prefetch_embeddings(items)
        try:
            for store, questions in items:
                hits = store.search_many([q["question"] for q in questions], self.top_k)
                s = QAScore()
                for q, h in zip(questions, hits, strict=True):
                    memories = "\n".join(f"- {x.content}" for x in h) or "(no memories)"
                    answer = self.client.chat([{"role": "user", "content": ANSWER_PROMPT.format(
                        memories=memories, question=q["question"])}])
                    verdict_text = self.judge.chat([{"role": "user", "content": JUDGE_PROMPT.format(
                        question=q["question"], gold=q["answer"], answer=answer)}])
                    ok = _verdict(verdict_text)
                    c, f, served = _best(h, q["answer"])
                    s.correct.append(ok)
                    s.containment.append(c)
                    s.f1.append(token_f1(answer, q["answer"]))
                    s.served_by.append((served or (h[0].type if h else None)) if ok else None)
                    records.append({"question_id": q.get("id"), "question": q["question"], "gold": q["answer"],
                                    "answer": answer, "verdict": verdict_text, "correct": ok,
                                    "model": self.client.model, "judge": self.judge.model})
                out.append(s)
        except ApiError as e:
            raise RewardError(f"api answerer: {e}") from e
        finally:
            self._save(records)
        return out

    def _save(self, records: list[dict]) -> None:
        if self.verdicts_path is None or not records:
            return
        with self.lock:
            self.verdicts_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.verdicts_path, "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _verdict(text: str) -> bool:
    """The judge's JSON verdict; an unreadable verdict is an error, never a guess."""
    from lightmem_exp.backends.json_repair import JsonRepairError, loads_object

    try:
        obj, _ = loads_object(text)
    except JsonRepairError as e:
        raise ApiError(f"unreadable judge verdict {text[:200]!r}: {e}") from e
    if not isinstance(obj.get("correct"), bool):
        raise ApiError(f"judge verdict without a boolean 'correct': {text[:200]!r}")
    return obj["correct"]
