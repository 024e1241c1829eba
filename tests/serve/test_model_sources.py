"""What `ask`/`serve` make of a source path: step2 stage dir, its manifest or export; sft stage dir, export or
adapter; anything else a plain model (no model is loaded here)."""

from __future__ import annotations

import json

import pytest

from lightmem_exp.artifacts import Manifest, write_json, write_manifest
from lightmem_exp.errors import LmxError
from lightmem_exp.serve.model import DEFAULT_END_MARKER, _resolve


def stage(root, name: str, outputs: dict[str, str], stats: dict | None = None):
    for rel in outputs.values():  # a directory per output, unless the test wrote the file already
        if not (root / rel).exists():
            (root / rel).mkdir(parents=True)
    write_manifest(root, Manifest(stage=name, seed=0, outputs=outputs, stats=stats or {}))
    return root


def test_step2_sources(tmp_path):
    sdir = stage(tmp_path / "step2", "step2", {"model": "export/model", "bank": "export/bank"},
                 {"end_marker": "</m>"})
    want = ("step2", {"base_model": str(sdir / "export" / "model")}, sdir / "export" / "bank", "</m>")
    assert _resolve(sdir, str(sdir)) == want
    assert _resolve(sdir / "manifest.json", str(sdir)) == want
    assert _resolve(sdir / "export", "x")[2:] == (sdir / "export" / "bank", "</m>")  # the marker from the stage
    bare = tmp_path / "copied_export"
    (bare / "model").mkdir(parents=True)
    (bare / "bank").mkdir()
    assert _resolve(bare, "x")[0] == "step2" and _resolve(bare, "x")[3] == DEFAULT_END_MARKER


def test_sft_sources_and_the_rest(tmp_path):
    cfg = {"base_model": "/models/base", "adapter_path": "/runs/sft/export/adapter", "torch_dtype": "float32"}
    write_json(tmp_path / "sft" / "export" / "backend_config.json", cfg)
    sdir = stage(tmp_path / "sft", "sft", {"adapter": "export/adapter", "backend_config": "export/backend_config.json"})
    assert _resolve(sdir, "x") == ("sft", cfg, None, None)
    assert _resolve(sdir / "export", "x") == ("sft", cfg, None, None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert _resolve(adapter, "x") == ("sft", {"base_model": "/models/base", "adapter_path": str(adapter)}, None, None)
    assert _resolve(tmp_path / "nowhere", "HuggingFaceTB/SmolLM2-135M") == \
        ("base", {"base_model": "HuggingFaceTB/SmolLM2-135M"}, None, None)
    data = stage(tmp_path / "data", "data", {"qa": "qa"})
    with pytest.raises(LmxError, match="a data stage"):
        _resolve(data, "x")
