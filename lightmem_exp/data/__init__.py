"""Data layer: benchmark readers (LoCoMo, LongMemEval), the SFT pool and `build_dataset`.

Pure Python (no torch, no Hydra). Row schemas of every artifact are documented in `schema.py`.
"""

from lightmem_exp.data.build import build_dataset, split_conversations
from lightmem_exp.data.schema import ARTIFACTS, SPLITS, DataBuild, parse_update_decision

__all__ = ["ARTIFACTS", "SPLITS", "DataBuild", "build_dataset", "parse_update_decision", "split_conversations"]
