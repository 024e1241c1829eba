"""`local_hf_lora`: a memory-manager backend that runs a local Hugging Face base model plus a LoRA adapter.

Two calls, as in the LightMem plan:

- `meta_text_extract(messages)`: for each message, a metadata dict
  `{"topic": str, "entities": [str, ...], "timestamp": str | null}` (prompt: `META_SYSTEM` + `meta_user_prompt`).
  `topic` is a short noun phrase, `entities` the people/places/organisations/products/events named in the
  message ([] when none), `timestamp` the ISO 8601 date or date-time the message was sent at or refers to (null
  when unknown). All messages go through the model in batches.
- `call_update_llm(system_prompt, user_prompt)`: the memory-update decision `{"action": "update" | "delete" |
  "ignore", "updated_text": str | null}` (the data stage's `update_decisions` schema; the caller's prompts are
  used as given, e.g. `lightmem_exp.data.build.UPDATE_SYSTEM`). `call_update_llm_batch` takes many at once.

Every reply goes through `json_repair.extract_json_object` (first object, repaired) and the schema check; a
reply that still fails is asked for again, with the error shown to the model, up to `max_retries` more times.
Each call returns a `CallOk` (`ok=True`, `value`, `raw_text`, `attempts`, `repaired`) or a `CallError` (`ok=False`,
`error`, `raw_text`, `attempts`): never a made-up default and never an exception from generation or parsing.

Configuration (a mapping, e.g. the `export/backend_config.json` the sft stage writes):

    base_model: hub id or local directory of the base model (becomes `model.name_or_path`)
    adapter_path: PEFT adapter directory, or null for the bare base model; refused if made for another base
    device_map: "auto" (the first CUDA device when there is one, else CPU), "cpu", or a device such as "cuda:1"
    torch_dtype: bfloat16 | float16 | float32 | auto
    max_seq_len: prompt + generated tokens; a longer prompt is a CallError, never silently cut
    gen_kwargs: passed to `generate`; defaults {"max_new_tokens": 256, "do_sample": false}. With
                do_sample=false, sampling knobs (temperature, top_p, top_k) are dropped: greedy ignores them.
    max_retries: extra attempts after the first for a reply that does not parse or validate (0 = one attempt)
    batch_size: prompts per `generate` call
    quant: optional `quant` config (e.g. {"mode": "nf4", "compute_dtype": "bfloat16"})
    attn_implementation: optional, e.g. "sdpa"
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightmem_exp.backends.json_repair import (
    JsonRepairError,
    SchemaError,
    loads_object,
    validate_decision,
    validate_metadata,
)
from lightmem_exp.config.checks import int_min
from lightmem_exp.errors import ConfigError
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.loading import (
    check_adapter_base,
    load_adapter,
    load_model,
    load_tokenizer,
    parse_dtype,
    pretrained_model_cfg,
)

log = logging.getLogger(__name__)

Chat = list[dict]
GenerateFn = Callable[[list[Chat]], list[str]]

META_SYSTEM = (
    "You extract metadata from one message of a conversation. Reply with one JSON object only, no other text:\n"
    '{"topic": "<a short noun phrase, at most 8 words>", '
    '"entities": ["<each person, place, organisation, product or event named in the message>"], '
    '"timestamp": "<ISO 8601 date or date-time the message was sent at or refers to>" or null}\n'
    "Use [] when no entity is named and null when no time is known."
)
RETRY_PROMPT = ("Your reply could not be used: {error}. Reply again with only the JSON object, "
                "exactly in the requested format.")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
DEFAULT_GEN_KWARGS = {"max_new_tokens": 256, "do_sample": False}


@dataclass(frozen=True)
class CallOk:
    value: dict
    raw_text: str
    attempts: int
    repaired: bool = False  # the accepted reply needed JSON repair or schema normalisation
    ok: bool = field(default=True, init=False)


@dataclass(frozen=True)
class CallError:
    error: str
    raw_text: str  # the last reply ("" when nothing was generated)
    attempts: int
    ok: bool = field(default=False, init=False)


CallResult = CallOk | CallError


@dataclass
class LocalHFLoraConfig:
    base_model: str
    adapter_path: str | None = None
    device_map: str | None = "auto"
    torch_dtype: str = "bfloat16"
    max_seq_len: int = 4096
    gen_kwargs: dict = field(default_factory=dict)
    max_retries: int = 2
    batch_size: int = 8
    quant: dict | None = None
    attn_implementation: str | None = None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], prefix: str = "backend") -> LocalHFLoraConfig:
        """Build and validate; a bad value raises ConfigError naming `<prefix>.<key>`."""
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key (known: {sorted(cls.__dataclass_fields__)})")
        if not isinstance(raw.get("base_model"), str) or not raw["base_model"]:
            raise ConfigError(f"{prefix}.base_model", "must be a hub id or a local directory")
        c = cls(**raw)
        try:
            int_min(c, "max_seq_len", 8)
            int_min(c, "max_retries", 0)
            int_min(c, "batch_size", 1)
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e.key}", e.detail) from None
        for key, ok, expect in (
            ("gen_kwargs", isinstance(c.gen_kwargs, dict), "a mapping of generate() arguments"),
            ("adapter_path", c.adapter_path is None or isinstance(c.adapter_path, str), "a directory or null"),
        ):
            if not ok:
                raise ConfigError(f"{prefix}.{key}", f"got {getattr(c, key)!r}, expected {expect}")
        try:
            parse_dtype(c.torch_dtype)
        except ConfigError as e:
            raise ConfigError(f"{prefix}.torch_dtype", str(e).split(": ", 1)[-1]) from None
        n_new = c.generation_kwargs()["max_new_tokens"]
        if not isinstance(n_new, int) or not 1 <= n_new < c.max_seq_len:
            raise ConfigError(f"{prefix}.gen_kwargs.max_new_tokens", f"got {n_new!r}, expected 1 <= n < max_seq_len")
        return c

    def generation_kwargs(self) -> dict:
        kw = {**DEFAULT_GEN_KWARGS, **(self.gen_kwargs or {})}
        if not kw.get("do_sample"):
            kw = {k: v for k, v in kw.items() if k not in SAMPLING_KEYS}
        return kw

    def model_cfg(self) -> dict:
        """The `model` config mapping `load_model`/`load_tokenizer`/`load_adapter` take."""
        return pretrained_model_cfg({"name": "local_hf_lora", "torch_dtype": self.torch_dtype,
                                     "attn_implementation": self.attn_implementation}, self.base_model)

    def device(self) -> str | None:
        if self.device_map in (None, "auto"):
            return "cuda" if torch.cuda.is_available() else None
        return None if self.device_map == "cpu" else str(self.device_map)


class HFChatGenerator:
    """`chats -> replies` with a Hugging Face causal LM: chat template with the generation prompt, left padding,
    batches of `batch_size`, only the new tokens decoded (special tokens skipped)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, gen_kwargs: Mapping[str, Any], batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.gen_kwargs = dict(gen_kwargs)

    def prompt_ids(self, chat: Chat) -> list[int]:
        return chat_token_ids(self.tokenizer, chat, add_generation_prompt=True)

    def __call__(self, chats: Sequence[Chat]) -> list[str]:
        decoded = self.tokenizer.batch_decode(self.generate_ids(chats), skip_special_tokens=True)
        return [t.strip() for t in decoded]

    @torch.no_grad()
    def generate_ids(self, chats: Sequence[Chat]) -> list[list[int]]:
        """The new token ids of each chat's reply (pads after an early end removed)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[list[int]] = []
            for i in range(0, len(chats), self.batch_size):
                out += self._batch([self.prompt_ids(c) for c in chats[i : i + self.batch_size]])
            return out
        finally:
            self.model.train(was_training)

    def _batch(self, prompts: list[list[int]]) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):  # left padding: every row's last prompt token sits at the same position
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        device = next(self.model.parameters()).device
        kwargs = dict(self.gen_kwargs)
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None and self.tokenizer.eos_token_id is not None:
            eos = kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                                  use_cache=True, **kwargs)
        replies = []
        for row in out[:, width:].tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))  # keep the end token itself
            replies.append(row[:end])
        return replies


class LocalHFLoraBackend:
    """See the module docstring. Build it from a config (loads base + adapter), from an in-memory model
    (`from_model`), or with any `generate_fn(chats) -> replies` (tests, other runtimes)."""

    def __init__(self, config: Mapping[str, Any] | LocalHFLoraConfig, *, data_root: str | Path = ".",
                 generate_fn: GenerateFn | None = None, count_tokens: Callable[[Chat], int] | None = None):
        self.config = config if isinstance(config, LocalHFLoraConfig) else LocalHFLoraConfig.from_mapping(config)
        self.model = self.tokenizer = None
        if generate_fn is None:
            generate_fn, count_tokens = self._load(data_root)
        self.generate_fn, self.count_tokens = generate_fn, count_tokens
        self.generate_calls = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, config: Mapping[str, Any] | LocalHFLoraConfig,
                   ) -> LocalHFLoraBackend:
        """Wrap a model already in memory (e.g. the one a stage just trained); nothing is loaded."""
        cfg = config if isinstance(config, LocalHFLoraConfig) else LocalHFLoraConfig.from_mapping(config)
        gen = HFChatGenerator(model, tokenizer, gen_kwargs=cfg.generation_kwargs(), batch_size=cfg.batch_size)
        backend = cls(cfg, generate_fn=gen, count_tokens=lambda chat: len(gen.prompt_ids(chat)))
        backend.model, backend.tokenizer = model, tokenizer
        return backend

    def _load(self, data_root: str | Path) -> tuple[GenerateFn, Callable[[Chat], int]]:
        c = self.config
        model_cfg = c.model_cfg()
        if c.adapter_path:  # refuse an adapter made for another base before loading anything big
            check_adapter_base(c.adapter_path, model_cfg)
        self.tokenizer = load_tokenizer(model_cfg, data_root)
        model = load_model(model_cfg, data_root, quant_cfg=c.quant, device=c.device())
        if c.adapter_path:
            model = load_adapter(model, c.adapter_path, model_cfg)
        self.model = model.eval()
        log.info("local_hf_lora: %s%s", c.base_model, f" + adapter {c.adapter_path}" if c.adapter_path else "")
        gen = HFChatGenerator(self.model, self.tokenizer, gen_kwargs=c.generation_kwargs(), batch_size=c.batch_size)
        return gen, lambda chat: len(gen.prompt_ids(chat))

    # ------------------------------------------------------------------------------------------------ public

    def meta_text_extract(self, messages: Sequence[Mapping[str, Any] | str]) -> list[CallResult]:
        """One metadata result per message (a chat message dict with `content`, optional `role` and
        `timestamp`/`time_stamp`, or a plain string)."""
        chats = [[{"role": "system", "content": META_SYSTEM}, {"role": "user", "content": meta_user_prompt(m)}]
                 for m in messages]
        return self._run(chats, validate_metadata)

    def call_update_llm(self, system_prompt: str, user_prompt: str) -> CallResult:
        return self.call_update_llm_batch([(system_prompt, user_prompt)])[0]

    def call_update_llm_batch(self, prompts: Sequence[tuple[str, str]]) -> list[CallResult]:
        chats = [[{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in prompts]
        return self._run(chats, validate_decision)

    # ------------------------------------------------------------------------------------------------ engine

    def _max_prompt_tokens(self) -> int:
        return self.config.max_seq_len - self.config.generation_kwargs()["max_new_tokens"]

    def _run(self, chats: list[Chat], validate: Callable[[Any], dict]) -> list[CallResult]:
        """Generate for every chat; re-ask the failures (error shown) up to max_retries times, in batches."""
        results: list[CallResult | None] = [None] * len(chats)
        pending = list(range(len(chats)))
        convo = {i: list(chats[i]) for i in pending}
        last_error: dict[int, tuple[str, str]] = {}
        for attempt in range(1, self.config.max_retries + 2):
            runnable = []
            for i in pending:
                n = self.count_tokens(convo[i]) if self.count_tokens else 0
                if n > self._max_prompt_tokens():
                    err = (f"prompt is {n} tokens, over max_seq_len - max_new_tokens = {self._max_prompt_tokens()}"
                           if i not in last_error else f"{last_error[i][0]}; the retry prompt is too long ({n} tokens)")
                    results[i] = CallError(err, last_error.get(i, ("", ""))[1], attempt - 1)
                else:
                    runnable.append(i)
            if not runnable:
                break
            gen_error = "generation failed: the generator returned no text"
            try:
                self.generate_calls += 1
                replies = self.generate_fn([convo[i] for i in runnable])
                if len(replies) != len(runnable):
                    raise RuntimeError(f"the generator returned {len(replies)} replies for {len(runnable)} prompts")
            except Exception as e:  # noqa: BLE001 - a backend call reports failures as CallError, never raises
                log.warning("local_hf_lora: generation failed (attempt %d): %s", attempt, e)
                replies = [None] * len(runnable)
                gen_error = f"generation failed: {type(e).__name__}: {e}"
            pending = []
            for i, raw in zip(runnable, replies, strict=True):
                if not isinstance(raw, str):
                    last_error[i] = (gen_error, "")
                    results[i] = CallError(gen_error, "", attempt)
                    pending.append(i)
                    continue
                try:
                    obj, repaired = loads_object(raw)
                    value = validate(obj)
                    results[i] = CallOk(value, raw, attempt, repaired or value != obj)
                except (JsonRepairError, SchemaError) as e:
                    last_error[i] = (str(e), raw)
                    results[i] = CallError(str(e), raw, attempt)
                    convo[i] = [*chats[i], {"role": "assistant", "content": raw},
                                {"role": "user", "content": RETRY_PROMPT.format(error=e)}]
                    pending.append(i)
            if not pending:
                break
        return results  # type: ignore[return-value]


def meta_user_prompt(message: Mapping[str, Any] | str) -> str:
    """The user turn of a metadata request: the message, with its role and timestamp when known."""
    if isinstance(message, str):
        return f"Message:\n{message}"
    role = message.get("role") or message.get("speaker")
    ts = message.get("timestamp") or message.get("time_stamp")
    head = "Message" + (f" from {role}" if role else "") + (f" sent at {ts}" if ts else "")
    return f"{head}:\n{message.get('content', '')}"
