"""The recall test (seed 001 §4.3 "test_memory_recall"): decode text from REAL bank vectors and compare it with the
memory text. The memory is given, not chosen: the prompt ends with `<recall><|memory_pad|>`, the vector is injected
at the last input position (`len(prompt) - 1`), and greedy decoding runs until the end marker.

`recall_eval` scores a list of memories (exact match and token F1); `RecallTestCallback` runs it on a fixed sample
at the end of every epoch and logs `recall_test/exact_match` and `recall_test/token_f1`.
Exact match is verbatim (whitespace-normalised only); token F1 is the shared SQuAD-style `eval.metrics.token_f1`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch

from lightmem_exp.eval.metrics import token_f1
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.injection import decode_from_memories

log = logging.getLogger(__name__)

def normalise_ws(text: str) -> str:
    return " ".join(text.split())


def verbatim_match(pred: str, ref: str) -> float:
    """Verbatim up to surrounding/repeated whitespace: case and punctuation count (stricter than SQuAD EM)."""
    return float(normalise_ws(pred) == normalise_ws(ref))


def recall_prompt_ids(tokenizer, prompt: str, recall_id: int, memory_pad_id: int) -> list[int]:
    """A user turn with `prompt`, the assistant header, then `<recall><|memory_pad|>` (pad = last position)."""
    return [*chat_token_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True),
            recall_id, memory_pad_id]


def strip_marker(ids: list[int], marker_ids: Sequence[int], eos_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Generated ids without the trailing end marker / EOS; also whether the marker was produced."""
    marker = list(marker_ids)
    if marker and ids[-len(marker):] == marker:
        return ids[: -len(marker)], True
    if ids and ids[-1] in set(eos_ids):
        return ids[:-1], False
    return ids, False


def recall_eval(model: torch.nn.Module, tokenizer, memories: Sequence[dict], vectors: torch.Tensor, *,
                prompt_ids: Sequence[int], memory_pad_id: int, marker_ids: Sequence[int], max_new_tokens: int,
                batch_size: int = 32) -> tuple[dict[str, float], list[dict]]:
    """Decode every memory from its vector (`vectors[i]` for `memories[i]`); metrics and one row per memory."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for start in range(0, len(memories), batch_size):
        outs = decode_from_memories(model, prompt_ids, vectors[start : start + batch_size],
                                    memory_pad_id=memory_pad_id, max_new_tokens=max_new_tokens,
                                    stop_ids=marker_ids, eos_ids=eos)
        for mem, out in zip(memories[start : start + batch_size], outs, strict=True):
            ids, ended = strip_marker(out, marker_ids, eos)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            rows.append({"id": mem["id"], "text": mem["text"], "recalled": text, "ended": ended,
                         "exact_match": verbatim_match(text, mem["text"]), "token_f1": token_f1(text, mem["text"])})
    n = max(1, len(rows))
    metrics = {"exact_match": sum(r["exact_match"] for r in rows) / n, "token_f1": sum(r["token_f1"] for r in rows) / n}
    return metrics, rows


class RecallTestCallback(L.Callback):
    """At the end of every `every_n_epochs`-th epoch, decode a fixed memory sample from its bank vectors.

    Runs on rank 0 only (the model is replicated under DDP); skipped under FSDP, where the sharded weights would
    need every rank. Reads the vectors from the LightningModule's `memory_vectors` table (`rows` index it).
    """

    def __init__(self, tokenizer, memories: Sequence[dict], rows: Sequence[int], *, prompt_ids: Sequence[int],
                 memory_pad_id: int, marker_ids: Sequence[int], max_new_tokens: int, every_n_epochs: int = 1,
                 batch_size: int = 32):
        self.tokenizer, self.memories, self.rows = tokenizer, list(memories), list(rows)
        self.prompt_ids, self.memory_pad_id, self.marker_ids = list(prompt_ids), memory_pad_id, list(marker_ids)
        self.max_new_tokens, self.every_n_epochs, self.batch_size = max_new_tokens, every_n_epochs, batch_size
        self.history: list[dict] = []

    # The history goes into checkpoints, so a resumed run reports the epochs before the kill too.
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.memories or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            return
        if not trainer.is_global_zero:
            return
        vectors = pl_module.memory_vectors[torch.as_tensor(self.rows, device=pl_module.memory_vectors.device)]
        metrics, rows = recall_eval(pl_module.model, self.tokenizer, self.memories, vectors,
                                    prompt_ids=self.prompt_ids, memory_pad_id=self.memory_pad_id,
                                    marker_ids=self.marker_ids, max_new_tokens=self.max_new_tokens,
                                    batch_size=self.batch_size)
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        for k, v in metrics.items():
            pl_module.log(f"recall_test/{k}", v, rank_zero_only=True, on_step=False, on_epoch=True)
        log.info("epoch %d recall test: exact_match %.3f token_f1 %.3f | %r -> %r", trainer.current_epoch,
                 metrics["exact_match"], metrics["token_f1"], rows[0]["text"][:60], rows[0]["recalled"][:60])
