"""Evaluation methods: one class per way of answering, one interface, one harness that runs them all.

Every method answers the same questions with the same pinned system prompt (`SYSTEM_PROMPT`) and greedy decoding
of at most `eval.max_new_tokens` tokens; they differ only in what goes into the prompt and which model answers:

  closed_book    the question alone, base model (`model=`)
  full_context   the whole conversation, oldest lines dropped until the prompt fits the model's context
                 (`eval.context_tokens`, default `model.max_seq_len`); how much was dropped is recorded per question
  rag_bm25 / rag_dense / rag_hybrid
                 the top `eval.rag.k` memories of the conversation (bm25s / MiniLM / reciprocal-rank fusion)
  session_rank   MemSifter-style: sessions pre-filtered by MiniLM (a session scores its best chunk of
                 `chunk_turns` turns), re-ranked by the answering model's own score -- the mean log-probability of
                 the question given the session (query likelihood) -- then answered from the top `top_sessions`
  sft_adapter    closed book with the sft stage's LoRA adapter on the base model
  recall         the step2 export: the prompt ends with `<recall>`, the Memory Head picks a memory from the
                 conversation's bank, its vector is injected at `<|memory_pad|>`, the model decodes the memory up to
                 the end marker and then answers (the prediction is the text after the marker)
  recall_rag     recall, with the dense top-k memories in the prompt as well

`Method.prepare(conv)` builds what a method needs for one conversation (cached on the shared `EvalContext`, so
indexes, embeddings and banks are built once per conversation for all methods) and is timed apart from answering;
`Method.answer(conv, questions)` answers one batch and returns an `Answer` per question with its cost inputs.
`run_method` is the harness: batches, progress, wall time and peak memory per batch.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig

from lightmem_exp.artifacts import Manifest, load_manifest
from lightmem_exp.errors import LmxError, UpstreamError
from lightmem_exp.eval.cost import BatchCost
from lightmem_exp.eval.metrics import exact_match, token_f1
from lightmem_exp.models.chat import chat_token_ids, text_token_ids, token_counts
from lightmem_exp.models.inputs import ModelHandle, logits_to_keep_kwargs, pad_batch
from lightmem_exp.runtime import model_device

if TYPE_CHECKING:
    from lightmem_exp.retrieval import TextEmbedder

log = logging.getLogger(__name__)

SYSTEM_PROMPT = 'Answer the question with a short phrase. If the answer is not available, reply "Not mentioned".'
MEMORY_HEADER = "Memories:"
CONVERSATION_HEADER = "Conversation:"
DEFAULT_END_MARKER = "</memory>"


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class Conversation:
    """One conversation's rows from the data stage, and the questions selected from it."""

    conv_id: str
    memories: list[dict]
    sessions: list[dict]  # in the data stage's (chronological) order
    questions: list[dict]


@dataclass
class Answer:
    prediction: str
    prompt_tokens: int
    generated_tokens: int  # every decode step through end-of-sequence (recall: the memory, its marker, the answer)
    truncated: bool = False
    context_tokens_dropped: int = 0
    retrieved_memory_ids: list[str] | None = None  # ranked, best first (memory-level retrieval)
    retrieved_sessions: list | None = None  # ranked, best first (session-level retrieval)
    scoring_tokens: int = 0  # tokens of extra forward passes of the answering model (session_rank's re-ranking)
    memory_tokens: int | None = None  # recall: the generated tokens spent decoding the memory, end marker included
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------- prompts


def memory_line(m: dict) -> str:
    date = (m.get("timestamp") or "")[:10]
    return f"- ({date}) {m['text']}" if date else f"- {m['text']}"


def session_lines(s: dict) -> list[str]:
    """A session as prompt lines: a dated header, then `Speaker: text` per turn (shared images by caption)."""
    lines = [f"[Session {s['session']}" + (f", {s['date']}]" if s.get("date") else "]")]
    for t in s["turns"]:
        caption = f" [shares an image: {t['image_caption']}]" if t.get("image_caption") else ""
        lines.append(f"{t['speaker']}: {t['text']}{caption}")
    return lines


def question_text(q: dict) -> str:
    return f"Question: {q['question']}" + (f"\n(Asked on {q['question_date']}.)" if q.get("question_date") else "")


@dataclass
class Prompt:
    ids: list[int]
    truncated: bool = False
    dropped_tokens: int = 0  # context tokens left out (line token counts; approximate at a cut line's edge)


def line_token_counts(tokenizer: Any, lines: Sequence[str]) -> list[int]:
    if not lines:
        return []
    return token_counts(tokenizer, [line + "\n" for line in lines])


def build_prompt(tokenizer: Any, question: str, *, header: str = "", lines: Sequence[str] = (),
                 max_tokens: int, suffix_ids: Sequence[int] = (), counts: Sequence[int] | None = None) -> Prompt:
    """Chat-templated prompt (system + user turn + assistant header + `suffix_ids`) of at most `max_tokens` tokens.

    Context `lines` that do not fit are dropped oldest first (the question is never cut); when not even the newest
    line fits whole, its tail is kept. Raises when the question alone does not fit.
    """

    def render(kept: Sequence[str]) -> list[int]:
        context = f"{header}\n" + "\n".join(kept) + "\n\n" if kept else ""
        chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": context + question}]
        return [*chat_token_ids(tokenizer, chat, add_generation_prompt=True), *suffix_ids]

    if counts is None or sum(counts) <= max_tokens:  # a prompt that may fit is rendered whole first
        ids = render(lines)
        if len(ids) <= max_tokens:
            return Prompt(ids)
    bare = render([])
    if len(bare) > max_tokens:
        raise LmxError(f"the question alone takes {len(bare)} prompt tokens, over the {max_tokens} available; "
                       "raise eval.context_tokens or lower eval.max_new_tokens")
    counts = list(counts) if counts is not None else line_token_counts(tokenizer, lines)
    budget = max_tokens - len(bare) - len(tokenizer(f"{header}\n\n", add_special_tokens=False)["input_ids"])
    keep, total = 0, 0
    for c in reversed(counts):
        if total + c > budget:
            break
        total, keep = total + c, keep + 1
    while keep > 0:  # token counts of lines are not exactly additive: verify and drop more while too long
        ids = render(lines[len(lines) - keep:])
        if len(ids) <= max_tokens:
            return Prompt(ids, True, sum(counts[: len(lines) - keep]))
        keep -= 1
    # Not even the newest line fits: keep as much of its tail as fits.
    last = text_token_ids(tokenizer, lines[-1])
    n = min(budget, len(last))
    while n > 0:
        ids = render([tokenizer.decode(last[-n:])])
        if len(ids) <= max_tokens:
            return Prompt(ids, True, sum(counts[:-1]) + len(last) - n)
        n -= max(1, n // 8)
    return Prompt(bare, True, sum(counts))


# ------------------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel(ModelHandle):
    """A model ready to answer: weights, tokenizer, its context length and the token ids decoding needs."""

    name: str
    model: Any
    tokenizer: Any
    context_tokens: int
    source: str
    recall_id: int | None = None
    memory_pad_id: int | None = None
    end_marker: str | None = None

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def _new_tokens(rows: list[list[int]], eos: int | None) -> list[list[int]]:
    """Generated ids per row through the first end-of-sequence token (pads after it removed)."""
    out = []
    for row in rows:
        end = next((k + 1 for k, t in enumerate(row) if t == eos), len(row)) if eos is not None else len(row)
        out.append(row[:end])
    return out


@torch.no_grad()
def generate_greedy(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy `model.generate` over a left-padded batch; the new ids of each row."""
    ids, mask = pad_batch(prompts, lm.pad_id, device=lm.device)
    out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=lm.eos_id, pad_token_id=lm.pad_id, use_cache=True)
    return _new_tokens(out[:, ids.shape[1]:].tolist(), lm.eos_id)


def decode(lm: LoadedModel, ids: Sequence[int]) -> str:
    return lm.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def tokens_through(lm: LoadedModel, ids: Sequence[int], marker: str) -> int:
    """The shortest prefix of `ids` whose text contains `marker` (0 when the whole does not): the marker is cut in
    the decoded text, and its token boundaries depend on the text before it, so the prefix is found by bisection."""
    if marker not in decode(lm, ids):
        return 0
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if marker in decode(lm, ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@torch.no_grad()
def question_loglik(lm: LoadedModel, contexts: Sequence[Sequence[int]], question_ids: Sequence[int]) -> list[float]:
    """Mean log-probability of `question_ids` after each context (left-padded, so the question ends every row and
    only its logits are computed where the model supports `logits_to_keep`)."""
    q = list(question_ids)
    ids, mask = pad_batch([[*c, *q] for c in contexts], lm.pad_id, device=lm.device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                      **logits_to_keep_kwargs(lm.model, len(q) + 1)).logits
    logits = logits[:, -(len(q) + 1):-1].float()
    target = torch.tensor(q, device=logits.device).expand(len(contexts), -1)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)
    return lp.mean(dim=-1).tolist()


# ------------------------------------------------------------------------------------------------------- context


class ConversationIndex:
    """Retrieval structures of one conversation, built on first use and shared by every method."""

    def __init__(self, conv: Conversation, hybrid_depth: int, embed: TextEmbedder | None = None):
        from lightmem_exp.retrieval import TextEmbedder

        self.conv = conv
        self.embed = embed or TextEmbedder()
        self.ids = [m["id"] for m in conv.memories]
        self.texts = [m["text"] for m in conv.memories]
        self.hybrid_depth = hybrid_depth
        self._retrievers: dict[str, Any] = {}
        self._embeddings: np.ndarray | None = None
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lines: dict[int, tuple[list[str], list[int]]] = {}
        self.banks: dict[str, Any] = {}

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = self.embed(self.texts)
        return self._embeddings

    def retriever(self, kind: str) -> Any:
        from lightmem_exp.retrieval import BM25Retriever, DenseRetriever, HybridRetriever

        if not self.texts:
            raise LmxError(f"conversation {self.conv.conv_id} has no memories to retrieve from")
        if kind not in self._retrievers:
            if kind == "bm25":
                self._retrievers[kind] = BM25Retriever(self.texts)
            elif kind == "dense":
                self._retrievers[kind] = DenseRetriever(self.texts, self.embeddings)
            elif kind == "hybrid":
                self._retrievers[kind] = HybridRetriever(self.texts, self.embeddings, depth=self.hybrid_depth)
            else:
                raise LmxError(f"unknown retriever {kind!r}")
        return self._retrievers[kind]

    def search(self, kind: str, queries: Sequence[str], k: int) -> list[list[str]]:
        idx, _ = self.retriever(kind).search(list(queries), k)
        return [[self.ids[int(i)] for i in row] for row in idx]

    def session_chunks(self, chunk_turns: int) -> tuple[np.ndarray, np.ndarray]:
        """(session position of each chunk, chunk embeddings): each session cut into runs of `chunk_turns` turns,
        so a long session is not judged by the first 256 word pieces MiniLM reads."""
        if chunk_turns not in self._chunks:
            owner, texts = [], []
            for si, s in enumerate(self.conv.sessions):
                lines = session_lines(s)
                body = lines[1:] or lines
                for start in range(0, len(body), chunk_turns):
                    owner.append(si)
                    texts.append("\n".join([lines[0], *body[start:start + chunk_turns]]))
            self._chunks[chunk_turns] = (np.asarray(owner, dtype=np.int64), self.embed(texts))
        return self._chunks[chunk_turns]

    def conversation_lines(self, tokenizer: Any) -> tuple[list[str], list[int]]:
        """Every session's lines and their token counts (per tokenizer), for full-context prompts."""
        key = id(tokenizer)
        if key not in self._lines:
            lines = [line for s in self.conv.sessions for line in session_lines(s)]
            self._lines[key] = (lines, line_token_counts(tokenizer, lines))
        return self._lines[key]


class EvalContext:
    """What methods share: the stage config, upstream manifests, models (loaded once per group) and per-conversation
    indexes and banks."""

    def __init__(self, cfg: DictConfig, upstream: dict[str, Manifest]):
        from lightmem_exp.retrieval import TextEmbedder

        self.cfg, self.st = cfg, cfg.eval
        self.upstream = upstream
        self.device = torch.device(model_device(cfg) or "cpu")
        self._lms: dict[str, LoadedModel] = {}
        self._indexes: dict[str, ConversationIndex] = {}
        self._full_banks: dict[str, Any] = {}  # recall.bank source -> the loaded bank, sliced per conversation
        self.embed = TextEmbedder()  # shared by every conversation: LongMemEval haystacks reuse sessions
        self.ks = sorted({int(k) for k in self.st.ks})
        self.context_tokens: dict[str, int] = {}  # per model group, kept after release for the report's settings

    # ---- indexes
    def index(self, conv: Conversation) -> ConversationIndex:
        if conv.conv_id not in self._indexes:
            self._indexes[conv.conv_id] = ConversationIndex(conv, int(self.st.rag.hybrid_depth), self.embed)
        return self._indexes[conv.conv_id]

    # ---- models
    def lm(self, group: str) -> LoadedModel:
        if group not in self._lms:
            loader = {"base": self._load_base, "sft": self._load_sft, "step2": self._load_step2}[group]
            self._lms[group] = loader()
            self.context_tokens[group] = self._lms[group].context_tokens
            log.info("eval: %s model from %s (context %d tokens)", group, self._lms[group].source,
                     self._lms[group].context_tokens)
        return self._lms[group]

    def release(self, group: str) -> None:
        self._lms.pop(group, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _context_tokens(self, model: Any, model_cfg: Any) -> int:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        want = self.st.context_tokens or model_cfg.get("max_seq_len") or limit
        if want is None:
            raise LmxError("cannot tell the model's context length: set eval.context_tokens")
        return int(min(want, limit) if limit else want)

    def _load_base(self) -> LoadedModel:
        from lightmem_exp.models.loading import load_model, load_tokenizer

        mc = self.cfg.model
        tok = load_tokenizer(mc, self.cfg.paths.data)
        device = None if self.device.type == "cpu" else str(self.device)
        model = load_model(mc, self.cfg.paths.data, quant_cfg=self.cfg.quant, device=device).eval()
        return LoadedModel("base", model, tok, self._context_tokens(model, mc), str(mc.name_or_path))

    def _load_sft(self) -> LoadedModel:
        """Base + the sft adapter. It wraps the base model in place, so the base group is given up first (the
        stage runs base methods before sft ones)."""
        from lightmem_exp.models.loading import load_adapter

        base = self._lms.pop("base", None) or self._load_base()
        adapter = self.upstream["sft"].path("adapter")
        model = load_adapter(base.model, adapter, self.cfg.model).eval()
        return LoadedModel("sft", model, base.tokenizer, base.context_tokens, f"{base.source} + {adapter}")

    def _load_step2(self) -> LoadedModel:
        from lightmem_exp.models.loading import load_model, load_tokenizer, pretrained_model_cfg, require_memory_tokens

        step2 = self.upstream["step2"]
        mc = pretrained_model_cfg(self.cfg.model, step2.path("model"))
        tok = load_tokenizer({**mc, "name_or_path": str(step2.path("tokenizer"))}, self.cfg.paths.data)
        ids = require_memory_tokens(tok, step2.path("tokenizer"))
        device = None if self.device.type == "cpu" else str(self.device)
        model = load_model(mc, self.cfg.paths.data, quant_cfg=self.cfg.quant, device=device).eval()
        marker = step2.stats.get("end_marker") or DEFAULT_END_MARKER
        return LoadedModel("step2", model, tok, self._context_tokens(model, mc), mc["name_or_path"],
                           recall_id=ids.recall, memory_pad_id=ids.memory_pad, end_marker=marker)

    # ---- banks
    def step1_manifest(self) -> Manifest:
        """The step1 run behind the step2 export (its manifest names it), else `eval.inputs.step1`."""
        if "step1" in self.upstream:
            return self.upstream["step1"]
        ref = self.upstream["step2"].inputs.get("step1", {}).get("manifest")
        if ref and Path(ref).exists():
            self.upstream["step1"] = load_manifest(ref, expect_stage="step1")
            return self.upstream["step1"]
        raise UpstreamError(f"recall.bank=step1: the step2 manifest names step1 at {ref!r}, which does not exist; "
                            "set eval.inputs.step1 or use eval.recall.bank=encode")

    def conversation_bank(self, conv: Conversation) -> Any:
        """The memory bank `recall` searches for `conv`, per `eval.recall.bank`:
        export this conversation's memories in the step2 export/bank: the memories step2 wrote into the model
               (data.write_splits; with data.max_memories a sample of them, so the others cannot be recalled);
        step1  the step1 bank's vectors of every memory of this conversation, written or not;
        encode this conversation's memories encoded by the step2 model itself (data that step1 never saw)."""
        from lightmem_exp.models.memory_bank import MemoryBank, export_key_space

        index = self.index(conv)
        source = str(self.st.recall.bank)
        if source in index.banks:
            return index.banks[source]
        if source == "encode":
            lm = self.lm("step2")
            bank = MemoryBank.build(lm.model, lm.tokenizer, [{"id": m["id"], "text": m["text"]} for m in conv.memories],
                                    progress=False, key_space=export_key_space(self.upstream["step2"]))
        else:
            if source not in self._full_banks:
                path = self.upstream["step2"].path("bank") if source == "export" else self.step1_manifest().path("bank")
                self._full_banks[source] = MemoryBank.load(path)
                # checked on the loaded file: the per-conversation slices below no longer know their path
                self._full_banks[source].check_compatible(self.lm("step2").model)
            full = self._full_banks[source]
            row = {mid: i for i, mid in enumerate(full.ids)}
            missing = [m["id"] for m in conv.memories if m["id"] not in row]
            if source == "step1" and missing:
                raise UpstreamError(f"{full.path}: the step1 bank lacks {len(missing)} memories of {conv.conv_id} "
                                    f"(e.g. {missing[:3]}); it was built on other data. Use eval.recall.bank=encode")
            if source == "export" and len(missing) == len(conv.memories):
                raise UpstreamError(f"{full.path}: step2 wrote no memory of {conv.conv_id}; add its split to "
                                    "data.write_splits of the step1/step2 run, or use eval.recall.bank=step1|encode")
            bank = full.subset([row[m["id"]] for m in conv.memories if m["id"] in row])
        if len(bank) == 0:
            raise LmxError(f"recall.bank={source}: the bank for {conv.conv_id} is empty")
        index.banks[source] = bank
        return bank


# ------------------------------------------------------------------------------------------------------- methods


class Method(ABC):
    """One way of answering. `group`: which model answers (base | sft | step2); `retrieves`: memory | session | None
    (what evidence recall@k is computed on)."""

    name: ClassVar[str]
    group: ClassVar[str] = "base"
    retrieves: ClassVar[str | None] = None
    uses_minilm: ClassVar[bool] = False  # the stage loads MiniLM once, before timing, when any method needs it

    def __init__(self, ctx: EvalContext):
        self.ctx, self.st = ctx, ctx.st

    def requires(self) -> tuple[str, ...]:
        """Upstream stages (besides data) this method needs."""
        return ()

    def prepare(self, conv: Conversation) -> None:  # noqa: B027 (optional hook)
        """Build what this method needs for `conv` (indexes, banks), cached across methods; timed apart."""

    @abstractmethod
    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        """Answer one batch of `conv`'s questions."""

    # shared by the generating methods
    def max_prompt_tokens(self, lm: LoadedModel, extra_new: int = 0) -> int:
        return lm.context_tokens - int(self.st.max_new_tokens) - extra_new

    def generate_answers(self, lm: LoadedModel, prompts: list[Prompt], answers: list[Answer]) -> list[Answer]:
        outs = generate_greedy(lm, [p.ids for p in prompts], int(self.st.max_new_tokens))
        for a, p, out in zip(answers, prompts, outs, strict=True):
            a.prediction, a.prompt_tokens, a.generated_tokens = decode(lm, out), len(p.ids), len(out)
            a.truncated, a.context_tokens_dropped = p.truncated, p.dropped_tokens
        return answers


class ClosedBook(Method):
    name = "closed_book"

    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        lm = self.ctx.lm(self.group)
        prompts = [build_prompt(lm.tokenizer, question_text(q), max_tokens=self.max_prompt_tokens(lm))
                   for q in questions]
        return self.generate_answers(lm, prompts, [Answer("", 0, 0) for _ in questions])


class SftAdapter(ClosedBook):
    name = "sft_adapter"
    group = "sft"

    def requires(self) -> tuple[str, ...]:
        return ("sft",)


class FullContext(Method):
    name = "full_context"

    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        lm = self.ctx.lm(self.group)
        lines, counts = self.ctx.index(conv).conversation_lines(lm.tokenizer)
        prompts = [build_prompt(lm.tokenizer, question_text(q), header=CONVERSATION_HEADER, lines=lines,
                                counts=counts, max_tokens=self.max_prompt_tokens(lm)) for q in questions]
        answers = [Answer("", 0, 0, extra={"context_tokens_full": sum(counts)}) for _ in questions]
        return self.generate_answers(lm, prompts, answers)


class _Rag(Method):
    kind: ClassVar[str]
    retrieves = "memory"

    def prepare(self, conv: Conversation) -> None:
        self.ctx.index(conv).retriever(self.kind)

    def retrieve(self, conv: Conversation, questions: list[dict]) -> list[list[str]]:
        depth = max(int(self.st.rag.k), *self.ctx.ks)
        return self.ctx.index(conv).search(self.kind, [q["question"] for q in questions], depth)

    def rag_lines(self, conv: Conversation, ranked: list[str]) -> list[str]:
        by_id = {m["id"]: m for m in conv.memories}
        # Best first would put the best memory farthest from the question; oldest-first truncation would drop it
        # first. So the top k go in reverse rank order: the best memory sits next to the question.
        return [memory_line(by_id[mid]) for mid in reversed(ranked[: int(self.st.rag.k)])]

    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        lm = self.ctx.lm(self.group)
        ranked = self.retrieve(conv, questions)
        prompts = [build_prompt(lm.tokenizer, question_text(q), header=MEMORY_HEADER, lines=self.rag_lines(conv, r),
                                max_tokens=self.max_prompt_tokens(lm)) for q, r in zip(questions, ranked, strict=True)]
        answers = [Answer("", 0, 0, retrieved_memory_ids=r) for r in ranked]
        return self.generate_answers(lm, prompts, answers)


class RagBM25(_Rag):
    name, kind = "rag_bm25", "bm25"


class RagDense(_Rag):
    name, kind = "rag_dense", "dense"
    uses_minilm = True


class RagHybrid(_Rag):
    name, kind = "rag_hybrid", "hybrid"
    uses_minilm = True


class SessionRank(Method):
    name = "session_rank"
    retrieves = "session"
    uses_minilm = True

    def prepare(self, conv: Conversation) -> None:
        self.ctx.index(conv).session_chunks(int(self.st.session_rank.chunk_turns))

    def _session_ids(self, lm: LoadedModel, conv: Conversation, si: int) -> list[int]:
        lines = session_lines(conv.sessions[si])
        return lm.tokenizer("\n".join(lines) + "\n", add_special_tokens=False, truncation=True,
                            max_length=int(self.st.session_rank.session_tokens))["input_ids"]

    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        from lightmem_exp.retrieval import embed_texts

        sr = self.st.session_rank
        lm = self.ctx.lm(self.group)
        owner, chunk_emb = self.ctx.index(conv).session_chunks(int(sr.chunk_turns))
        n_sessions = len(conv.sessions)
        sims = embed_texts([q["question"] for q in questions]) @ chunk_emb.T if len(owner) else None
        answers, prompts = [], []
        for qi, q in enumerate(questions):
            # 1. dense pre-filter: a session scores its best chunk
            score = np.full(n_sessions, -np.inf)
            if sims is not None:
                np.maximum.at(score, owner, sims[qi])
            pre = [int(i) for i in np.argsort(-score, kind="stable")[: int(sr.prefilter)] if np.isfinite(score[i])]
            # 2. re-rank by the answering model: mean log p(question | session)
            q_ids = lm.tokenizer(f"\n{question_text(q)}", add_special_tokens=False)["input_ids"]
            room = max(lm.context_tokens - len(q_ids), 1)
            contexts = [self._session_ids(lm, conv, si)[:room] for si in pre]
            ll = question_loglik(lm, contexts, q_ids) if contexts else []
            scored = sum(len(c) + len(q_ids) for c in contexts)  # real tokens of the scoring pass (pads left out)
            order = [pre[i] for i in sorted(range(len(pre)), key=lambda i: (-ll[i], i))]
            # 3. answer from the top sessions, in conversation order
            top = sorted(order[: int(sr.top_sessions)])
            lines = [line for si in top for line in session_lines(conv.sessions[si])]
            prompts.append(build_prompt(lm.tokenizer, question_text(q), header=CONVERSATION_HEADER, lines=lines,
                                        max_tokens=self.max_prompt_tokens(lm)))
            sess = [conv.sessions[si]["session"] for si in order]
            answers.append(Answer("", 0, 0, retrieved_sessions=sess, scoring_tokens=scored, extra={
                "prefilter_sessions": [conv.sessions[si]["session"] for si in pre],
                "rerank_loglik": [round(ll[pre.index(si)], 4) for si in order]}))
        return self.generate_answers(lm, prompts, answers)


def split_recall_output(text: str, end_marker: str) -> tuple[str, str, bool]:
    """(recalled memory text, answer, marker seen): the answer is what follows the first end marker; without a
    marker the model never closed the memory, and the whole output is taken as the answer (counted by
    `end_marker_rate`)."""
    cut = text.find(end_marker)
    if cut < 0:
        return "", text.strip(), False
    return text[:cut].strip(), text[cut + len(end_marker):].strip(), True


class Recall(Method):
    name = "recall"
    group = "step2"
    retrieves = "memory"

    def requires(self) -> tuple[str, ...]:
        return ("step2", "step1") if self.st.recall.bank == "step1" else ("step2",)

    def prepare(self, conv: Conversation) -> None:
        self.ctx.conversation_bank(conv)

    def context_lines(self, conv: Conversation, questions: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
        return [[] for _ in questions], [[] for _ in questions]

    def answer(self, conv: Conversation, questions: list[dict]) -> list[Answer]:
        from lightmem_exp.models.generation import generate_with_recall

        lm = self.ctx.lm(self.group)
        bank = self.ctx.conversation_bank(conv)
        memory_tokens = int(self.st.recall.memory_tokens)
        suffix = [lm.recall_id] if self.st.recall.force else []
        lines, ranked = self.context_lines(conv, questions)
        prompts = [build_prompt(lm.tokenizer, question_text(q), header=MEMORY_HEADER if ls else "", lines=ls,
                                suffix_ids=suffix, max_tokens=self.max_prompt_tokens(lm, memory_tokens))
                   for q, ls in zip(questions, lines, strict=True)]
        ids, mask = pad_batch([p.ids for p in prompts], lm.pad_id, device=lm.device)
        out = generate_with_recall(lm.model, ids, mask, bank=bank, recall_token_id=lm.recall_id,
                                   memory_pad_token_id=lm.memory_pad_id,
                                   max_new_tokens=int(self.st.max_new_tokens) + memory_tokens,
                                   eos_token_id=lm.eos_id, pad_token_id=lm.pad_id, use_sampling=False,
                                   top_k_trace=max(self.ctx.ks))
        news = _new_tokens(out.sequences[:, ids.shape[1]:].tolist(), lm.eos_id)
        answers = []
        in_bank = set(bank.ids)
        for q, p, new, trace, rag in zip(questions, prompts, news, out.recall_trace, ranked, strict=True):
            text = decode(lm, new)
            recalled, reply, seen = split_recall_output(text, lm.end_marker)
            first = trace[0] if trace else None
            candidates = [mid for mid, _ in first["candidates"]] if first else []
            # Fidelity: does the decoded memory say what the chosen memory says? (A model decodes only what
            # step2 wrote into it; a memory it never saw comes back as some other text.)
            chosen = bank.entries[first["index"]]["text"] if first else ""
            answers.append(Answer(
                reply, len(p.ids), len(new), p.truncated, p.dropped_tokens,
                retrieved_memory_ids=rag or candidates,
                # without a marker the whole output is the answer (split_recall_output), so no memory tokens
                memory_tokens=tokens_through(lm, new, lm.end_marker) if seen else 0,
                extra={"recalled_memory_id": first["memory_id"] if first else None,
                       "recall_candidates": candidates, "recalls": len(trace), "end_marker_seen": seen,
                       "evidence_in_bank": any(m in in_bank for m in q["evidence_memory_ids"]),
                       "recalled_text": recalled, "recalled_text_f1": token_f1(recalled, chosen) if first else 0.0,
                       "recalled_text_exact": exact_match(recalled, chosen) if first else 0.0,
                       "raw_output": text}))
        return answers


class RecallRag(Recall):
    name = "recall_rag"
    uses_minilm = True

    def prepare(self, conv: Conversation) -> None:
        super().prepare(conv)
        self.ctx.index(conv).retriever("dense")

    def context_lines(self, conv: Conversation, questions: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
        depth = max(int(self.st.rag.k), *self.ctx.ks)
        ranked = self.ctx.index(conv).search("dense", [q["question"] for q in questions], depth)
        by_id = {m["id"]: m for m in conv.memories}
        lines = [[memory_line(by_id[mid]) for mid in reversed(r[: int(self.st.rag.k)])] for r in ranked]
        return lines, ranked


METHODS: dict[str, type[Method]] = {m.name: m for m in (
    ClosedBook, FullContext, RagBM25, RagDense, RagHybrid, SessionRank, SftAdapter, Recall, RecallRag)}
GROUP_ORDER = ("base", "sft", "step2")  # base methods first: the sft adapter then wraps the same base in place


# ------------------------------------------------------------------------------------------------------- harness


def _batches(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def run_method(method: Method, conversations: Sequence[Conversation], *, batch_size: int,
               progress: bool = False) -> tuple[list[dict], dict]:
    """Answer every question of every conversation; one record per question (cost included) and run stats."""
    from tqdm.auto import tqdm

    records: list[dict] = []
    stats = {"prepare_seconds": 0.0, "answer_seconds": 0.0, "peak_memory_kind": None}
    total = sum(len(c.questions) for c in conversations)
    with tqdm(total=total, desc=f"eval {method.name}", unit="q", disable=not progress) as bar:
        for conv in conversations:
            if not conv.questions:
                continue
            t0 = time.perf_counter()
            method.prepare(conv)
            stats["prepare_seconds"] += time.perf_counter() - t0
            for batch in _batches(conv.questions, batch_size):
                with BatchCost(method.ctx.device) as cost:
                    answers = method.answer(conv, batch)
                stats["answer_seconds"] += cost.seconds
                stats["peak_memory_kind"] = cost.kind
                for q, a in zip(batch, answers, strict=True):
                    records.append({
                        "method": method.name, "id": q["id"], "conv_id": q["conv_id"], "category": q["category"],
                        "question": q["question"], "answer": q["answer"], "abstention": bool(q["abstention"]),
                        "prediction": a.prediction, "prompt_tokens": a.prompt_tokens,
                        "generated_tokens": a.generated_tokens, "scoring_tokens": a.scoring_tokens,
                        "memory_tokens": a.memory_tokens,
                        # everything the answering model runs over for this question: prefill, decode, scoring
                        "processed_tokens": a.prompt_tokens + a.generated_tokens + a.scoring_tokens,
                        "latency_s": cost.seconds / len(batch),
                        "peak_mem_mb": cost.peak_mb, "truncated": a.truncated,
                        "context_tokens_dropped": a.context_tokens_dropped,
                        "retrieved_memory_ids": a.retrieved_memory_ids, "retrieved_sessions": a.retrieved_sessions,
                        "evidence_memory_ids": q["evidence_memory_ids"], "evidence_sessions": q["evidence_sessions"],
                        **({"extra": a.extra} if a.extra else {}),
                    })
                bar.update(len(batch))
    return records, stats
