"""What `ask` and `serve` talk to: a step2 export with its memory bank, a sft adapter, or a plain model.

`load_memory_model(source)` tells them apart by what `source` holds:

  step2   a step2 stage dir (or its manifest.json): `export/model` + `export/bank`, the manifest's end marker;
          or an export dir holding `model/` and `bank/`
  sft     a sft stage dir (or its `export/`): `export/backend_config.json`, the `local_hf_lora` config of the
          adapter; or a PEFT adapter dir (base from its `adapter_config.json`)
  base    anything else: a model directory or a hub id

Every kind loads through the `local_hf_lora` backend (base model, optional adapter), so the three answer with the
same loading path and can be compared side by side; only a step2 export gets a bank and recalls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lightmem_exp.artifacts import load_manifest, read_json
from lightmem_exp.errors import LmxError
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.inputs import ModelHandle
from lightmem_exp.models.memory_bank import MemoryBank

DEFAULT_END_MARKER = "</memory>"  # step2's default `step2.end_marker`, for an export without its manifest
RECALL_MODES = ("force", "model", "off")


@dataclass
class MemoryModel(ModelHandle):
    """A loaded model ready to answer chats. `recall`: force (every prompt ends with `<recall>`, as eval's `recall`
    method does), model (only when the model emits `<recall>` itself) or off; only a model with a bank recalls."""

    name: str
    kind: str  # step2 | sft | base
    source: str
    model: Any
    tokenizer: Any
    context_tokens: int
    bank: MemoryBank | None = None
    recall: str = "off"
    recall_id: int | None = None
    memory_pad_id: int | None = None
    end_marker: str | None = None
    memory_tokens: int = 0  # extra new tokens a recall row may spend decoding the memory before its answer

    @property
    def recalls(self) -> bool:
        return self.bank is not None and self.recall != "off"

    @property
    def eos_ids(self) -> list[int]:
        """The tokenizer's end token and the generation config's (chat models often end a turn with another)."""
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    @cached_property
    def marker_end_ids(self) -> frozenset[int]:
        """Ids of the tokens whose text holds the end marker's last character: a decoded memory can only end on one
        of them, so rows look for the marker only after them (decoding every row at every step cost ~7% of a
        batch's time). Computed once per model."""
        last = (self.end_marker or "")[-1:]
        if not self.recalls or not last:
            return frozenset()
        pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return frozenset(i for i, piece in enumerate(pieces) if last in piece)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat template with the assistant header; `<recall>` appended when recall is forced."""
        ids = chat_token_ids(self.tokenizer, messages, add_generation_prompt=True)
        return [*ids, self.recall_id] if self.recalls and self.recall == "force" else ids


def load_memory_model(
    source: str | Path,
    *,
    name: str | None = None,
    bank: str | Path | None = None,
    recall: str = "force",
    memory_tokens: int = 48,
    context_tokens: int | None = None,
    device_map: str = "auto",
    torch_dtype: str | None = None,
) -> MemoryModel:
    """Load `source` (see the module docstring). `bank` replaces a step2 export's own bank (e.g. the step1 bank);
    `torch_dtype` None keeps the sft config's dtype, else the checkpoint's ("auto")."""
    from lightmem_exp.backends.local_hf_lora import LocalHFLoraBackend, LocalHFLoraConfig
    from lightmem_exp.models.loading import require_memory_tokens

    if recall not in RECALL_MODES:
        raise LmxError(f"recall must be one of {RECALL_MODES}, got {recall!r}")
    kind, backend_cfg, bank_dir, marker = _resolve(Path(source), str(source))
    backend_cfg = {"torch_dtype": "auto", **backend_cfg, "device_map": device_map}
    if torch_dtype is not None:
        backend_cfg["torch_dtype"] = torch_dtype
    backend = LocalHFLoraBackend(LocalHFLoraConfig.from_mapping(backend_cfg, prefix=str(source)))
    model, tokenizer = backend.model.eval(), backend.tokenizer
    limit = getattr(model.config, "max_position_embeddings", None)
    context = context_tokens or limit
    if not context:
        raise LmxError(f"{source}: the model config has no max_position_embeddings; pass the context length")
    mm = MemoryModel(name or _default_name(kind, source), kind, str(source), model, tokenizer, int(context))
    if bank is not None and kind != "step2":
        raise LmxError(f"{source}: a bank needs a step2 export (a {kind} model has no <recall> trained)")
    if kind == "step2":
        ids = require_memory_tokens(tokenizer, backend_cfg["base_model"])
        mm.bank = MemoryBank.load(bank if bank is not None else bank_dir)
        mm.bank.check_compatible(model)
        mm.recall, mm.recall_id, mm.memory_pad_id = recall, ids.recall, ids.memory_pad
        mm.end_marker, mm.memory_tokens = marker, memory_tokens if recall != "off" else 0
    return mm


def _resolve(path: Path, source: str) -> tuple[str, dict, Path | None, str | None]:
    """(kind, local_hf_lora config, bank dir, end marker) of `source`."""
    if path.is_file() and path.name == "manifest.json":
        path = path.parent
    if (path / "manifest.json").is_file():
        m = load_manifest(path)
        if m.stage == "step2":
            return "step2", {"base_model": str(m.path("model"))}, m.path("bank"), m.stats.get("end_marker") or \
                DEFAULT_END_MARKER
        if m.stage == "sft":
            return "sft", read_json(m.path("backend_config")), None, None
        raise LmxError(f"{path}: a {m.stage} stage; ask/serve take a step2 or sft stage, an export or a model")
    if (path / "model").is_dir() and (path / "bank").is_dir():
        stage = path.parent / "manifest.json"
        marker = load_manifest(stage).stats.get("end_marker") if stage.is_file() else None
        return "step2", {"base_model": str(path / "model")}, path / "bank", marker or DEFAULT_END_MARKER
    if (path / "backend_config.json").is_file():
        return "sft", read_json(path / "backend_config.json"), None, None
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise LmxError(f"{path / 'adapter_config.json'}: no base_model_name_or_path")
        return "sft", {"base_model": str(base), "adapter_path": str(path)}, None, None
    return "base", {"base_model": source}, None, None


def _default_name(kind: str, source: str | Path) -> str:
    return {"step2": "lightmem-step2", "sft": "lightmem-sft"}.get(kind) or Path(str(source)).name or str(source)
