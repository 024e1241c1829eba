"""MemoryBank: unit-norm memory vectors [N, H] plus one metadata row per memory, saved as safetensors + JSONL.

A memory vector is the last-layer hidden state (``outputs.hidden_states[-1]``, the same tensor the `<recall>`
query is read from during generation) of the memory text, pooled (`KeySpace.pooling`: the last real token's, or the
mean over the text's tokens), optionally standardised per dimension, L2-normalised.

Key space (why standardising exists)
------------------------------------
A base model's pooled hidden states share one dominant direction and a few huge dimensions: on SmolLM2-135M the
mean-pooled vectors of LoCoMo's 2,813 memories have mean pairwise cosine 0.82. Cosine scores and injected vectors
then mostly carry what every memory has in common. `KeySpace.fit` centres each dimension on the bank's mean and divides
by its standard deviation (mean pairwise cosine ~0); the statistics are stored with the bank, and every query
(`MemoryHead`) and every text encoded later into the same bank goes through the same map.

Scale matching (why `embed_scale` exists)
-----------------------------------------
The chosen vector is fed as the input embedding of `<|memory_pad|>`. A unit vector is far from the norm of the
rows the model normally sees at its input, and the last hidden state is far from it in the other direction, so
neither is injected as is. We inject ``unit_vector * embed_scale`` with ``embed_scale`` = the median L2 norm of
the input-embedding lookups over the whole vocabulary (`measure_embed_scale`): the median ignores the few
untrained or freshly added rows (padded vocab tails, `<recall>`/`<|memory_pad|>`), and measuring the embedding
module's *output* covers models whose embedding module scales its lookups. The value is measured on the model
the bank is built with and stored in ``bank.json``, so training (step2) and inference inject identical inputs.

Measured (torch 2.13, transformers 5.23, seed 0): median / mean input-embedding row norm, and the median norm
of the last hidden state (what the unit vector was before normalisation) on random tokens:
  - random-init Qwen2, H=32 (test model, initializer_range 0.02):  0.112 / 0.112;  last hidden 5.65 (= sqrt(H))
  - random-init Qwen2, H=128 (conf/model/tiny.yaml shape):         0.226 / 0.226;  last hidden 11.3
  - random-init Qwen2, H=896 (Qwen2.5-0.5B shape):                 0.598 / 0.598;  last hidden 29.9
  - random-init Llama and Mistral, H=256:                          0.320 / 0.320;  last hidden 16.0
  - trained all-MiniLM-L6-v2 word embeddings (BERT, H=384, the only trained weights available offline):
    1.111 / 1.066, 5th-95th percentile 0.47-1.34 (the mean is pulled down by rare, little-trained rows)
Random init gives row norms of 0.02*sqrt(H); the final RMSNorm puts hidden states near sqrt(H). So a unit vector
is 1.7-9x too large for these untrained tables and the raw hidden state 50x too large, while a trained table can
sit near 1: the scale is measured per model, never assumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightmem_exp.artifacts import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from lightmem_exp.errors import DataError, LmxError
from lightmem_exp.models.inputs import logits_to_keep_kwargs, pad_batch
from lightmem_exp.models.memory_head import MemoryHead

VECTORS_FILE = "vectors.safetensors"
ENTRIES_FILE = "entries.jsonl"
META_FILE = "bank.json"
FORMAT_VERSION = 1
POOLINGS = ("last", "mean")  # how a text becomes its vector (`pooled_hidden`)
_NORM_TOL = 1e-3


def model_hidden_size(model: torch.nn.Module) -> int:
    """Hidden size of a HF causal LM (text config for multimodal ones), falling back to the embedding width."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "hidden_size", None)
    return int(size) if size is not None else int(model.get_input_embeddings().weight.shape[-1])


@torch.no_grad()
def measure_embed_scale(model: torch.nn.Module, chunk: int = 8192) -> float:
    """Median L2 norm of the input-embedding lookups over the vocabulary (see the module docstring)."""
    embed = model.get_input_embeddings()
    vocab = embed.weight.shape[0]
    device = embed.weight.device
    norms = [
        embed(torch.arange(start, min(start + chunk, vocab), device=device)).float().norm(dim=-1).cpu()
        for start in range(0, vocab, chunk)
    ]
    return float(torch.cat(norms).median())


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row; correct for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def _normalise(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.detach().to(torch.float32), dim=-1).contiguous()


@dataclass(frozen=True, eq=False)
class KeySpace:
    """How a pooled hidden state becomes a unit key or query: `(h - center) / scale`, L2-normalised (plain
    normalisation when `center` is None). `pooling` is how a memory text is pooled into `h`; a `<recall>` query is
    always its last token's state. Statistics are fitted once on a bank (`fit`) and travel with it."""

    pooling: str = "last"
    center: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise LmxError(f"bank pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if (self.center is None) != (self.scale is None):
            raise LmxError("a key space needs both center and scale, or neither")

    @property
    def standardised(self) -> bool:
        return self.center is not None

    @classmethod
    def fit(cls, hidden: torch.Tensor, pooling: str) -> KeySpace:
        """Per-dimension mean and standard deviation of pooled states `[N, H]` (N >= 2)."""
        if hidden.shape[0] < 2:
            raise LmxError(f"standardised keys need at least 2 memories to fit on, got {hidden.shape[0]}")
        hidden = hidden.detach().cpu().to(torch.float32)
        return cls(pooling, hidden.mean(0).contiguous(), hidden.std(0).clamp_min(1e-6).contiguous())

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit vectors `[..., H]` float32; differentiable (step1 trains queries through it)."""
        h = hidden.float()
        if self.center is not None:
            h = (h - self.center.to(h.device)) / self.scale.to(h.device)
        return F.normalize(h, dim=-1)


def _check_entries(entries: Sequence[dict], where: str, taken: set[str] = frozenset()) -> list[dict]:
    """Copy entries into metadata rows: `id` (str) and `text` required, `timestamp`/`source` defaulted to None."""
    rows, seen = [], set(taken)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("text"), str):
            raise LmxError(f"{where}: entry {i} needs an 'id' and a string 'text', got {entry!r:.200}")
        row = {"id": None, "text": None, "timestamp": None, "source": None} | entry
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise LmxError(f"{where}: duplicate memory id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    return rows


class MemoryBank:
    """Unit-norm vectors `[N, H]` (float32, CPU, contiguous) and their metadata rows, in the same order."""

    def __init__(
        self,
        vectors: torch.Tensor,
        entries: Sequence[dict],
        *,
        embed_scale: float,
        model_name: str | None = None,
        path: str | Path | None = None,
        normalize: bool = True,
        key_space: KeySpace | None = None,
    ):
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise LmxError(f"bank vectors {tuple(vectors.shape)} do not match {len(entries)} entries")
        # `normalize=False` is for vectors already checked unit-norm (load): a save/load round trip is bit-exact.
        self.vectors = _normalise(vectors.cpu()) if normalize else vectors.cpu().to(torch.float32).contiguous()
        self.entries = _check_entries(entries, str(path or "memory bank"))
        self.embed_scale = float(embed_scale)
        self.model_name = model_name
        self.key_space = key_space or KeySpace()  # how texts and queries map to keys: more texts must use the same
        self.path = Path(path) if path is not None else None
        self._heads: dict[torch.device, MemoryHead] = {}

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    @property
    def pooling(self) -> str:
        return self.key_space.pooling

    def __repr__(self) -> str:
        return f"MemoryBank(n={len(self)}, hidden_size={self.hidden_size}, embed_scale={self.embed_scale:.4g})"

    def subset(self, rows: Sequence[int]) -> MemoryBank:
        """These rows as a bank of their own, in the same key space (a conversation's bank, step2's export)."""
        rows = list(rows)
        return MemoryBank(self.vectors[rows], [self.entries[i] for i in rows], embed_scale=self.embed_scale,
                          model_name=self.model_name, normalize=False, key_space=self.key_space)

    # ---- building -------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        entries: Sequence[dict],
        *,
        batch_size: int = 32,
        max_length: int = 512,
        progress: bool = True,
        padding_side: str | None = None,
        pooling: str = "last",
        standardise: bool = False,
        key_space: KeySpace | None = None,
    ) -> MemoryBank:
        """Encode each entry's `text` with `model`; the vector is the last-layer hidden state pooled by `pooling`
        (`pooled_hidden`: the last real token's, or the mean over the text's tokens), standardised on these texts'
        statistics when `standardise` (`KeySpace.fit`). `key_space` instead encodes into an existing bank's space.

        Texts are batched in length order (less padding) and padded on `padding_side` (default: the tokenizer's);
        position ids follow the attention mask, so a text gets the same vector alone or in any padded batch.
        """
        rows = _check_entries(entries, "MemoryBank.build")
        ids = bank_token_ids(tokenizer, [r["text"] for r in rows], max_length)
        for row, toks in zip(rows, ids, strict=True):
            if not toks:
                raise LmxError(f"MemoryBank.build: memory {row['id']!r} has an empty text")
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
        device = next(model.parameters()).device
        if key_space is not None:
            pooling = key_space.pooling
        hidden = torch.empty(len(rows), model_hidden_size(model))
        order = sorted(range(len(rows)), key=lambda i: len(ids[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        was_training = model.training
        model.eval()
        try:
            for batch in _progress(batches, progress):
                input_ids, mask = pad_batch([ids[i] for i in batch], pad_id, side)
                pooled = pooled_hidden(model, input_ids.to(device), mask.to(device), pooling)
                hidden[batch] = pooled.float().cpu()
        finally:
            model.train(was_training)
        if key_space is None:
            key_space = KeySpace.fit(hidden, pooling) if standardise else KeySpace(pooling)
        return cls(key_space(hidden), rows, embed_scale=measure_embed_scale(model), model_name=_model_name(model),
                   key_space=key_space)

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write vectors, entries, then bank.json (each atomically); bank.json last marks the bank complete."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / VECTORS_FILE) as tmp:
            tensors = {"vectors": self.vectors}
            if self.key_space.standardised:
                tensors |= {"key_center": self.key_space.center, "key_scale": self.key_space.scale}
            save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)})
        write_jsonl(directory / ENTRIES_FILE, self.entries)
        write_json(directory / META_FILE, self.meta())
        self.path = directory
        return directory

    def meta(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "count": len(self),
            "hidden_size": self.hidden_size,
            "embed_scale": self.embed_scale,
            "model_name": self.model_name,
            "pooling": self.pooling,
            "standardised": self.key_space.standardised,
            "vectors": VECTORS_FILE,
            "entries": ENTRIES_FILE,
        }

    @classmethod
    def load(cls, directory: str | Path) -> MemoryBank:
        """Load a saved bank, checking that bank.json, the vectors and the entries agree (errors name the file)."""
        directory = Path(directory)
        meta_path, vec_path, ent_path = directory / META_FILE, directory / VECTORS_FILE, directory / ENTRIES_FILE
        meta = read_json(meta_path)
        for key in ("count", "hidden_size", "embed_scale"):
            if not isinstance(meta, dict) or key not in meta:
                raise DataError(meta_path, "missing field (not a memory bank?)", field=key)
        if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise DataError(meta_path, f"format {meta['format']} is not the supported {FORMAT_VERSION}", field="format")
        if not vec_path.is_file():
            raise DataError(vec_path, "file not found")
        try:
            tensors = load_file(str(vec_path))
        except (SafetensorError, OSError) as e:
            raise DataError(vec_path, f"unreadable safetensors file: {e}") from e
        vectors = tensors.get("vectors")
        expected = (meta["count"], meta["hidden_size"])
        if vectors is None:
            raise DataError(vec_path, f"no 'vectors' tensor (has {sorted(tensors)})")
        if tuple(vectors.shape) != expected:
            raise DataError(vec_path, f"vectors have shape {tuple(vectors.shape)}, {meta_path.name} says {expected}")
        if vectors.dtype != torch.float32 or not torch.isfinite(vectors).all():
            raise DataError(vec_path, f"vectors must be finite float32, got {vectors.dtype}")
        if len(vectors) and ((vectors.norm(dim=-1) - 1).abs().max() > _NORM_TOL):
            raise DataError(vec_path, "vectors are not unit-norm")
        entries = read_jsonl(ent_path)
        if len(entries) != meta["count"]:
            raise DataError(ent_path, f"{len(entries)} entries, but {meta_path.name} says count={meta['count']}")
        for lineno, row in enumerate(entries, start=1):
            if "id" not in row or not isinstance(row.get("text"), str):
                raise DataError(ent_path, "each entry needs an 'id' and a string 'text'", line=lineno)
        try:
            key_space = _load_key_space(meta, tensors, meta_path, vec_path)
            return cls(vectors, entries, embed_scale=meta["embed_scale"], model_name=meta.get("model_name"),
                       path=directory, normalize=False, key_space=key_space)
        except DataError:
            raise
        except LmxError as e:  # e.g. duplicate ids
            raise DataError(ent_path, str(e)) from e

    # ---- editing --------------------------------------------------------------------------------------------

    def add(self, entries: Sequence[dict], vectors: torch.Tensor) -> None:
        """Append entries with their key vectors (already in this bank's key space; normalised here); ids must be
        new."""
        rows = _check_entries(entries, self._where(), taken=set(self.ids))
        if vectors.ndim != 2 or tuple(vectors.shape) != (len(rows), self.hidden_size):
            raise LmxError(f"{self._where()}: add() got vectors {tuple(vectors.shape)}, "
                           f"expected ({len(rows)}, {self.hidden_size})")
        self.vectors = torch.cat([self.vectors, _normalise(vectors.cpu())]).contiguous()
        self.entries.extend(rows)
        self._heads.clear()

    def remove(self, ids: Iterable[str]) -> None:
        """Drop the memories with these ids; unknown ids are an error (nothing is removed then)."""
        drop = {str(i) for i in ids}
        unknown = drop - set(self.ids)
        if unknown:
            raise LmxError(f"{self._where()}: cannot remove unknown memory ids {sorted(unknown)[:10]}")
        keep = [i for i, e in enumerate(self.entries) if e["id"] not in drop]
        self.vectors = self.vectors[keep].contiguous()
        self.entries = [self.entries[i] for i in keep]
        self._heads.clear()

    # ---- use ------------------------------------------------------------------------------------------------

    def head(self, device: torch.device | str | None = None) -> MemoryHead:
        """The MemoryHead over this bank on `device`, cached until the bank changes (no copy on CPU)."""
        device = torch.device(device or "cpu")
        if device not in self._heads:
            ks = self.key_space
            self._heads[device] = MemoryHead(self.vectors, center=ks.center, scale=ks.scale).to(device)
        return self._heads[device]

    def topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k cosine similarity of raw query hidden states (mapped into the key space by the head):
        `(scores [B, k'], indices [B, k'])` with k' = min(k, N)."""
        return self.head(queries.device).topk(queries, k)

    def injection_vectors(
        self,
        indices: torch.Tensor | Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Exactly what is fed as `inputs_embeds` at `<|memory_pad|>`: unit vector * embed_scale, `[len, H]`."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        out = self.vectors[idx] * self.embed_scale
        return out.to(device=device or out.device, dtype=dtype or out.dtype)

    def check_compatible(self, model: torch.nn.Module) -> None:
        """Raise if the bank's vector size differs from the model's hidden size."""
        size = model_hidden_size(model)
        if size != self.hidden_size:
            message = (f"memory vectors have size {self.hidden_size} but the model "
                       f"({_model_name(model) or type(model).__name__}) has hidden size {size}; "
                       "rebuild the bank with this model")
            if self.path is not None:
                raise DataError(self.path / META_FILE, message, field="hidden_size")
            raise LmxError(f"in-memory bank (built with {self.model_name}): {message}")

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "memory bank"


def bank_token_ids(tokenizer: Any, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
    """How a memory text is tokenised for its vector (plain text, the tokenizer's own special tokens)."""
    return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def _final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states `[B, T, H]`; position ids follow the mask, so left/right padding agree."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False, return_dict=True, **logits_to_keep_kwargs(model))
    return out.hidden_states[-1]


def last_token_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden state at each row's last real token, `[B, H]`, differentiable (step1 trains through it):
    step1's queries, the `<recall>` query in `generate_with_recall` (`hidden_states[-1]`) and `last`-pooled keys."""
    hidden = _final_hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def pooled_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  pooling: str = "last") -> torch.Tensor:
    """A text's vector `[B, H]`, differentiable: `last_token_hidden` (`last`), or the last-layer hidden states
    averaged over the real tokens (`mean`: a base model's last token mostly predicts the next word, its mean over a
    sentence is the better description of it)."""
    if pooling == "last":
        return last_token_hidden(model, input_ids, attention_mask)
    hidden = _final_hidden_states(model, input_ids, attention_mask)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def bank_key_space(directory: str | Path) -> KeySpace:
    """The key space of a saved bank (plain last-token keys when there is no bank), for encoding more texts the same
    way."""
    return MemoryBank.load(directory).key_space if (Path(directory) / META_FILE).is_file() else KeySpace()


def export_key_space(step2: Any) -> KeySpace:
    """The key space of a step2 manifest's exported bank; plain last-token keys for an export without a bank (a plain
    model standing in for one)."""
    return bank_key_space(step2.path("bank")) if "bank" in step2.outputs else KeySpace()


def _load_key_space(meta: dict, tensors: dict, meta_path: Path, vec_path: Path) -> KeySpace:
    pooling = meta.get("pooling", "last")  # banks saved before pooling was a choice: last token
    if pooling not in POOLINGS:
        raise DataError(meta_path, f"got {pooling!r}, expected one of {POOLINGS}", field="pooling")
    if not meta.get("standardised", False):
        return KeySpace(pooling)
    stats = [tensors.get(k) for k in ("key_center", "key_scale")]
    if any(t is None or tuple(t.shape) != (meta["hidden_size"],) for t in stats):
        raise DataError(vec_path, f"{meta_path.name} says standardised, so key_center and key_scale of shape "
                                  f"({meta['hidden_size']},) are needed (has {sorted(tensors)})")
    return KeySpace(pooling, *stats)


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but progress must never be the reason a build fails
        return items
    return tqdm(items, desc="memory bank", unit="batch")


def _model_name(model: torch.nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
