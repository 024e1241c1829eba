"""The one loading path for every model, the tiny default included: hub id or local dir, 4-bit, memory tokens, LoRA.

Order a trainer follows:
    tok = load_tokenizer(cfg.model, data_root)
    model = load_model(cfg.model, data_root, quant_cfg=cfg.quant, device=...)
    ids = ensure_memory_tokens(model, tok)            # adds <recall>/<|memory_pad|>/<think>/</think> when missing
    model = prepare_for_kbit_training(model)          # no-op unless 4-bit; freezes every base weight
    model = attach_lora(model, cfg.lora, token_ids=[ids.recall, ids.memory_pad])   # LoRA + only those token rows
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.models.tiny import MEMORY_PAD_TOKEN, RECALL_TOKEN, THINK_END_TOKEN, THINK_TOKEN, ensure_tiny_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MEMORY_TOKENS = (RECALL_TOKEN, MEMORY_PAD_TOKEN, THINK_TOKEN, THINK_END_TOKEN)
DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
EMBEDDING_MULTIPLE = 64  # resized embedding matrices are padded to this many rows


@dataclass
class MemoryTokenIds:
    """Ids of the memory-protocol tokens in one tokenizer; `added` lists the tokens this call had to add."""

    recall: int
    memory_pad: int
    think: int | None
    think_end: int | None
    added: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- paths


def resolve_model_path(model_cfg: Mapping[str, Any], data_root: str | Path) -> str:
    """The directory or hub id `from_pretrained` should read; builds it first when `model.build` names a builder."""
    name = _get(model_cfg, "name_or_path")
    if not name:
        raise ConfigError("model.name_or_path", "must be a hub id or a local directory")
    build = _get(model_cfg, "build")
    if build in (None, "", "none"):
        return str(name)
    if build not in BUILDERS:
        raise ConfigError("model.build", f"unknown builder {build!r}; expected one of {sorted(BUILDERS)} or null")
    spec = _get(model_cfg, build)
    if spec is None:
        raise ConfigError(f"model.{build}", f"required when model.build={build}")
    return str(BUILDERS[build](Path(str(name)), Path(data_root), spec))


def _build_gguf(out_dir: Path, data_root: Path, spec: Mapping[str, Any]) -> Path:
    from lightmem_exp.models.gguf import ensure_gguf_model

    return ensure_gguf_model(out_dir, spec)


# model.build: how a model that is not a hub id or a ready directory is built once into model.name_or_path
BUILDERS: dict[str, Callable[[Path, Path, Mapping[str, Any]], Path]] = {"tiny": ensure_tiny_model, "gguf": _build_gguf}


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _from_pretrained(loader: Callable[..., Any], path: str, what: str, **kwargs: Any) -> Any:
    """`loader(path)` with hub and missing-directory failures turned into an LmxError the user can act on."""
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise LmxError(f"model.name_or_path={path!r}: no such directory")
    try:
        return loader(path, **kwargs)
    except OSError as exc:
        from huggingface_hub import is_offline_mode

        hint = (
            "Set model.name_or_path to a local directory holding config.json, the weights and the tokenizer files, "
            "or use model.init=random for random weights of the same architecture."
        )
        if is_offline_mode() and not _looks_local(path):
            raise LmxError(
                f"cannot load the {what} for model.name_or_path={path!r}: it is not in the local Hugging Face cache "
                f"and cannot be downloaded offline (HF_HUB_OFFLINE=1). {hint}"
            ) from exc
        raise LmxError(f"cannot load the {what} from {path!r}: {exc}. {hint}") from exc


def pretrained_model_cfg(model_cfg: Mapping[str, Any], name_or_path: str | Path) -> dict:
    """`model_cfg` pointed at a ready model (a saved export such as step2's merged weights, or a hub id), loaded as
    is: no `build`, pretrained weights; dtype, attention and context length stay `model_cfg`'s."""
    return {**_plain(model_cfg), "name_or_path": str(name_or_path), "build": None, "init": "pretrained"}


# ------------------------------------------------------------------------------------------------------- loaders


def load_tokenizer(model_cfg: Mapping[str, Any], data_root: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` on the resolved path; gives the tokenizer a pad token when it ships none."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(model_cfg, data_root), "tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Llama 3 ships no pad token; collators must mask by attention_mask, never by comparing ids with pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parse_dtype(name: str | None) -> Any:
    """`model.torch_dtype` as a torch dtype (or "auto")."""
    key = str(name or "float32").removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError("model.torch_dtype", f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def bnb_config(quant_cfg: Mapping[str, Any] | None) -> BitsAndBytesConfig | None:
    """`quant.mode=nf4` as a BitsAndBytesConfig (None for `quant.mode=none` or no quant config)."""
    mode = _get(quant_cfg, "mode", "none") if quant_cfg is not None else "none"
    if mode in (None, "none"):
        return None
    if mode != "nf4":
        raise ConfigError("quant.mode", f"unknown mode {mode!r}; expected 'none' or 'nf4'")
    from transformers import BitsAndBytesConfig

    compute = parse_dtype(_get(quant_cfg, "compute_dtype", "bfloat16"))
    if compute == "auto":
        raise ConfigError("quant.compute_dtype", "must be a concrete dtype such as bfloat16")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=bool(_get(quant_cfg, "double_quant", True)),
    )


def load_model(
    model_cfg: Mapping[str, Any],
    data_root: str | Path,
    *,
    quant_cfg: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM: pretrained weights (optionally 4-bit NF4) or, with `model.init=random`, random weights.

    `device` is where the weights land (a `device_map`); pass the rank's device for 4-bit, since bitsandbytes
    quantises wherever the weights are loaded (CPU when None).
    """
    from transformers import AutoModelForCausalLM

    init = _get(model_cfg, "init", "pretrained")
    if init not in ("pretrained", "random"):
        raise ConfigError("model.init", f"expected 'pretrained' or 'random', got {init!r}")
    dtype = parse_dtype(_get(model_cfg, "torch_dtype"))
    attn = _get(model_cfg, "attn_implementation") or None
    quant = bnb_config(quant_cfg)
    if init == "random" and quant is not None:
        # bitsandbytes quantises while reading a checkpoint; there is none to read for random weights.
        raise ConfigError("quant.mode", "nf4 needs pretrained weights; use quant=none with model.init=random")
    path = resolve_model_path(model_cfg, data_root)

    if init == "random":
        config = random_init_config(model_cfg, path)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=attn
        )
        model.config._name_or_path = path  # adapters record this as their base
        model.name_or_path = path
        return model.to(device) if device is not None else model

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device is not None:
        kwargs["device_map"] = {"": str(device)}  # weights (and 4-bit quantisation) land directly on the device
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)
    if quant is not None:
        _disable_bnb_cpu_packing(model)
    return model


def random_init_config(model_cfg: Mapping[str, Any], path: str) -> PretrainedConfig:
    """The architecture for random weights: the checkpoint's own config when readable, else `model.arch`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        pass
    arch = _plain(_get(model_cfg, "arch"))
    if not arch:
        raise LmxError(
            f"model.init=random: the config of {path!r} is not available offline and model.arch is not set; "
            "add model.arch (model_type and sizes) or point model.name_or_path at a local directory"
        )
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.arch.model_type", "missing")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError("model.arch", str(exc)) from exc


def _disable_bnb_cpu_packing(model: nn.Module) -> None:
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first no-grad eval forward; a training forward
    # afterwards fails ("a view of a leaf Variable ... in-place"), which breaks Lightning's validate-then-train loop.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_kbit_training(model: PreTrainedModel, *, gradient_checkpointing: bool = True) -> PreTrainedModel:
    """PEFT's k-bit preparation for a 4-bit model (freezes the base, upcasts norms); a no-op for full precision."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs and LoRA
    )


# ------------------------------------------------------------------------------------------------- memory tokens


def _single_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` when the tokenizer keeps it as one piece, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token else None


def ensure_memory_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> MemoryTokenIds:
    """Add the memory-protocol tokens the tokenizer lacks, grow the embeddings only when needed, mean-init new rows.

    The same call runs for the tiny model (which already has them: nothing is added) and for hub models.
    Call it before `prepare_for_kbit_training` / `attach_lora`.
    """
    missing = [t for t in MEMORY_TOKENS if _single_id(tokenizer, t) is None]
    existing = len(tokenizer)
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        rows = model.get_input_embeddings().num_embeddings
        existing = min(existing, rows)
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE, mean_resizing=False)
    ids = {t: _single_id(tokenizer, t) for t in MEMORY_TOKENS}
    broken = [t for t, i in ids.items() if i is None]
    if broken:
        raise LmxError(f"tokenizer still splits {broken} after adding them as special tokens")
    if missing:
        _init_rows_to_mean(model, [ids[t] for t in missing], existing)
        log.info("added memory tokens %s (ids %s)", missing, [ids[t] for t in missing])
    check_tokenizer_matches(model, tokenizer)
    return MemoryTokenIds(
        recall=ids[RECALL_TOKEN],
        memory_pad=ids[MEMORY_PAD_TOKEN],
        think=ids[THINK_TOKEN],
        think_end=ids[THINK_END_TOKEN],
        added=missing,
    )


@torch.no_grad()
def _init_rows_to_mean(model: PreTrainedModel, row_ids: list[int], n_existing: int) -> None:
    # Rows for new tokens (including rows that existed as unused padding) start at the mean of the real tokens' rows,
    # so the new tokens do not perturb the output distribution before training.
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    for weight in weights:
        mean = weight[:n_existing].mean(dim=0, dtype=torch.float32)
        weight[row_ids] = mean.to(weight.dtype).expand(len(row_ids), -1)


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every token id must have an embedding row, else lookups fail deep inside the forward."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise LmxError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: they come from "
            "different checkpoints, or the tokens were added without resizing (use ensure_memory_tokens)"
        )


def require_memory_tokens(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> MemoryTokenIds:
    """The memory token ids of a tokenizer that must already have them (e.g. one exported by step 1)."""
    ids = {t: _single_id(tokenizer, t) for t in MEMORY_TOKENS}
    missing = [t for t in (RECALL_TOKEN, MEMORY_PAD_TOKEN) if ids[t] is None]
    if missing:
        raise LmxError(
            f"{path}: the tokenizer lacks {', '.join(missing)}; it was saved before the memory tokens were added. "
            "Use the tokenizer exported with the trained model (the step that ran ensure_memory_tokens)."
        )
    return MemoryTokenIds(ids[RECALL_TOKEN], ids[MEMORY_PAD_TOKEN], ids[THINK_TOKEN], ids[THINK_END_TOKEN])


# ---------------------------------------------------------------------------------------------------------- LoRA


def validate_lora_cfg(lora_cfg: Mapping[str, Any], prefix: str = "lora.") -> None:
    """Reject bad `lora.*` values before any model is loaded, by the checks of the `lora=` schema
    (`config.schema.LoraConfig`); errors name `<prefix><key>`."""
    from lightmem_exp.config.schema import LoraConfig

    try:
        LoraConfig(r=_get(lora_cfg, "r"), alpha=_get(lora_cfg, "alpha"), dropout=_get(lora_cfg, "dropout", 0.0),
                   target_modules=_plain(_get(lora_cfg, "target_modules")))
    except ConfigError as e:
        raise ConfigError(prefix + e.key, e.detail) from None


def _row_ids(ids: MemoryTokenIds | list[int]) -> list[int]:
    if isinstance(ids, MemoryTokenIds):
        return [i for i in (ids.recall, ids.memory_pad, ids.think, ids.think_end) if i is not None]
    return [int(i) for i in ids]


def attach_lora(
    model: PreTrainedModel, lora_cfg: Mapping[str, Any], *, token_ids: MemoryTokenIds | list[int] | None = None
) -> PeftModel:
    """Wrap `model` with a LoRA adapter. `token_ids`: also train just these embedding (and untied lm_head) rows,
    stored in the adapter itself (PEFT trainable tokens), so no full embedding matrix is ever trained or saved."""
    from peft import LoraConfig, get_peft_model

    validate_lora_cfg(lora_cfg)
    targets = _plain(_get(lora_cfg, "target_modules"))
    if targets != "all-linear":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        absent = [t for t in targets if t not in present]
        if absent:
            raise ConfigError("lora.target_modules", f"{absent} not found in {type(model).__name__}")
    trainable_tokens = None
    if token_ids is not None:
        row_ids = _row_ids(token_ids)
        names = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        trainable_tokens = {names[id(inp)]: row_ids}
        if out is not None and out.weight is not inp.weight:
            trainable_tokens[names[id(out)]] = row_ids
    config = LoraConfig(
        r=_get(lora_cfg, "r"),
        lora_alpha=_get(lora_cfg, "alpha"),
        lora_dropout=float(_get(lora_cfg, "dropout", 0.0)),
        target_modules=targets,
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(model, config)


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """Save only the adapter (LoRA + trained token rows), never the full embedding matrices.

    PEFT would otherwise save whole embedding/lm_head matrices whenever the vocabulary was resized (multi-GB for 7B).
    Untrained new rows are not needed: `ensure_memory_tokens` re-creates them identically (mean init) on the base.
    """
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return Path(out_dir)


def load_adapter(
    model: PreTrainedModel, adapter_dir: str | Path, model_cfg: Mapping[str, Any], *, trainable: bool = False
) -> PeftModel:
    """Put a saved adapter on `model` (after `ensure_memory_tokens`), refusing one trained on another base."""
    from peft import PeftModel

    check_adapter_base(adapter_dir, model_cfg)
    check_adapter_shapes(adapter_dir, model, model_cfg)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def check_adapter_base(adapter_dir: str | Path, model_cfg: Mapping[str, Any]) -> None:
    """Refuse an adapter trained on another base than `model.name_or_path`."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except FileNotFoundError:
        raise LmxError(f"{config_path}: missing; {adapter_dir} is not a PEFT adapter directory") from None
    except (OSError, ValueError) as exc:
        raise LmxError(f"{config_path}: unreadable ({exc})") from exc
    expected = str(_get(model_cfg, "name_or_path"))
    if not _same_model(str(recorded), expected):
        raise LmxError(
            f"{config_path}: the adapter was trained on base {recorded!r} but model.name_or_path is {expected!r}; "
            "choose the model config of the adapter's base or an adapter trained on this base"
        )


def check_adapter_shapes(adapter_dir: str | Path, model: nn.Module, model_cfg: Mapping[str, Any]) -> None:
    """Refuse an adapter whose tensors do not fit `model`: the recorded base name can match while the weights differ
    (a base rebuilt at the same path, a checkpoint of another size), and PEFT then fails with a bare size mismatch."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # PEFT names a missing weights file itself
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            problem = _adapter_tensor_problem(key, tuple(f.get_slice(key).get_shape()), modules)
            if problem:
                problems.append(problem)
    tokens = config.get("trainable_token_indices")
    for name, ids in (tokens.items() if isinstance(tokens, dict) else ()):
        rows = getattr(modules.get(name), "num_embeddings", None)
        if rows is not None and ids and max(ids) >= rows:
            problems.append(f"trainable token id {max(ids)} is past the {rows} rows of {name}")
    if problems:
        raise LmxError(
            f"{adapter_dir}: the adapter (trained on base {config.get('base_model_name_or_path')!r}) does not fit the "
            f"model {_get(model_cfg, 'name_or_path')!r}: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + ". It was made for another base: use that base, or train an adapter on this one"
        )


def _adapter_tensor_problem(key: str, shape: tuple[int, ...], modules: Mapping[str, nn.Module]) -> str | None:
    """Why a saved LoRA / trainable-token tensor does not fit its base module, or None (other tensors: None)."""
    name = key.removeprefix("base_model.model.")
    for marker, dim, attrs in ((".lora_A.", 1, ("in_features",)), (".lora_B.", 0, ("out_features",)),
                               (".token_adapter.", 1, ("embedding_dim", "in_features"))):  # embedding or lm_head rows
        if marker in name:
            target = name.split(marker)[0]
            module = modules.get(target)
            if module is None:
                return f"{key} targets {target}, which the model does not have"
            attr = next((a for a in attrs if hasattr(module, a)), attrs[0])
            size = getattr(module, attr, None)
            if size is not None and len(shape) == 2 and shape[dim] != size:
                return f"{key} has shape {list(shape)} but {target}.{attr} is {size}"
            return None
    return None


def _same_model(a: str, b: str) -> bool:
    def norm(name: str) -> str:  # local paths compare by real location, hub ids by name
        path = Path(name).expanduser()
        return os.path.realpath(path) if path.is_absolute() or path.exists() else name.rstrip("/")

    return norm(a) == norm(b)


# ------------------------------------------------------------------------------------------------------ helpers


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for a dict, DictConfig or attribute object, `default` when absent."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain Python (dict/list), anything else unchanged (dicts copied)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value
