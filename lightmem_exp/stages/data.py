"""Stage data: turn LoCoMo / LongMemEval dialogues and the SFT pool into the artifacts every later stage reads.

Row schemas are documented in `lightmem_exp.data.schema`; counts, quirks and length percentiles go
into the manifest's `stats`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lightmem_exp.artifacts import Manifest, write_json, write_jsonl, write_manifest
from lightmem_exp.config import require
from lightmem_exp.data import ARTIFACTS, build_dataset
from lightmem_exp.logging_utils import make_logger, run_id
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.loading import load_tokenizer
from lightmem_exp.stages.base import StageResult

UPSTREAM: tuple[str, ...] = ()


def validate(cfg: DictConfig) -> None:
    require(cfg, "data.name", lambda v: v in ("locomo", "longmemeval"), "'locomo' or 'longmemeval'")
    require(cfg, "data.context_window", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    require(cfg, "data.max_sft", lambda v: isinstance(v, int) and v >= 1, "null or an integer >= 1", allow_none=True)


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def run(cfg: DictConfig) -> StageResult:
    sdir = Path(cfg.runtime.stage_dir)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.data)
    built = build_dataset(
        cfg.data.name, Path(cfg.data.path), Path(cfg.data.sft_dir),
        lambda messages: len(chat_token_ids(tokenizer, messages)),
        seed=cfg.seed, split_fractions=tuple(cfg.data.split_fractions), max_sft=cfg.data.max_sft,
        context_window=cfg.data.context_window, progress=cfg.progress,
    )
    outputs = {}
    for name in ARTIFACTS:
        write_jsonl(sdir / f"{name}.jsonl", built.artifacts[name])
        outputs[name] = f"{name}.jsonl"
    write_json(sdir / "splits.json", built.splits)
    outputs["splits"] = "splits.json"

    metrics = {f"count/{k}": len(built.artifacts[k]) for k in ARTIFACTS}
    metrics["headline"] = float(len(built.artifacts["memories"]))
    logger = make_logger(cfg, sdir)
    if logger is not None:
        logger.log_hyperparams({"data": cfg.data.name, "seed": cfg.seed, "model": cfg.model.name})
        logger.log_metrics({**metrics, **_flat_numbers(built.stats, "stats/")})
        logger.save()
    manifest = Manifest(stage="data", seed=cfg.seed, outputs=outputs, metrics=metrics, stats=built.stats,
                        run_id=run_id(logger))
    write_manifest(sdir, manifest)
    return StageResult(stage="data", dir=sdir, manifest=manifest, metrics=metrics, headline=metrics["headline"])
