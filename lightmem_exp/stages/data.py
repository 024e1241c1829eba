"""Stage data: turn LoCoMo / LongMemEval dialogues and the SFT pool into the artifacts every later stage reads.

Row schemas are documented in `lightmem_exp.data.schema`; counts, quirks and length percentiles go
into the manifest's `stats`. The stage's knobs are the dataset's (`data.*`, `DataConfig`).
"""

from __future__ import annotations

from pathlib import Path

from lightmem_exp.artifacts import write_json, write_jsonl
from lightmem_exp.data import ARTIFACTS, build_dataset
from lightmem_exp.data.build import DataBuild
from lightmem_exp.logging_utils import make_logger
from lightmem_exp.models.chat import chat_token_ids
from lightmem_exp.models.loading import load_tokenizer
from lightmem_exp.stages.base import Recipe, StageResult


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class DataRecipe(Recipe):
    name = "data"

    def run(self) -> StageResult:
        built = self.build()
        self.export(built)
        return self.finish(self.metrics["headline"])

    def build(self) -> DataBuild:
        """Read the dialogues and the SFT pool, counting chat-template tokens with `model=`'s tokenizer."""
        d = self.cfg.data
        tokenizer = load_tokenizer(self.cfg.model, self.cfg.paths.data)
        return build_dataset(
            d.name, Path(d.path), Path(d.sft_dir), lambda messages: len(chat_token_ids(tokenizer, messages)),
            seed=self.cfg.seed, split_fractions=tuple(d.split_fractions), max_sft=d.max_sft,
            context_window=d.context_window, progress=self.cfg.progress)

    def export(self, built: DataBuild) -> None:
        """One JSONL per artifact plus splits.json; counts as metrics, the builder's stats in the manifest."""
        for name in ARTIFACTS:
            write_jsonl(self.dir / f"{name}.jsonl", built.artifacts[name])
            self.outputs[name] = f"{name}.jsonl"
        write_json(self.dir / "splits.json", built.splits)
        self.outputs["splits"] = "splits.json"
        self.metrics = {f"count/{k}": len(built.artifacts[k]) for k in ARTIFACTS}
        self.metrics["headline"] = float(len(built.artifacts["memories"]))
        self.stats = built.stats
        self.logger = make_logger(self.cfg, self.dir)
        if self.logger is not None:
            self.logger.log_hyperparams({"data": self.cfg.data.name, "seed": self.cfg.seed,
                                         "model": self.cfg.model.name})
            self.logger.log_metrics(_flat_numbers(built.stats, "stats/"))
