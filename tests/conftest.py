"""Shared fixtures: real configs composed with Hydra into tmp_path, the real bundled data, the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightmem_exp.config import CONF_DIR, PROJECT_ROOT

# Before torch loads (as `python -m lightmem_exp` does): busy-waiting OpenMP threads made the in-process training of
# the tests ~2.5x slower on the shared 2-core machine (a tiny pipeline: 48 s -> 18 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_ROOT = Path(os.environ.get("LMX_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def on_tiny(args: list[str] | tuple[str, ...]) -> list[str]:
    """Command-line overrides with `model=tiny` added unless they choose a model or an experiment preset (which
    chooses its own): the default model (smollm2) is the real run's, the tests run on the tiny one."""
    chosen = any(a.startswith(("model=", "experiment=")) for a in args)
    return list(args) if chosen else [*args, "model=tiny"]  # last: leading flags such as -m stay first


def compose_config(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose the real conf/ tree as the CLI would (on the tiny model), with outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=on_tiny([f"paths.outputs={tmp_path / 'outputs'}", f"paths.multirun={tmp_path / 'multirun'}",
                               *overrides]),
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path, list(overrides))

    return _make


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "locomo" / "locomo10.json").exists():
        pytest.skip(f"bundled data not found at {DATA_ROOT} (set LMX_DATA)")
    return DATA_ROOT


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m lightmem_exp` as a user would, from `cwd` (on the tiny model unless `args` choose one)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightmem_exp", *on_tiny(args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


SMALL_TINY_SPEC = {
    "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": True, "seed": 0,
}


@pytest.fixture(scope="session")
def small_model_cfg(tmp_path_factory, data_root) -> DictConfig:
    """A model config for a very small tiny-family model (same build and loading path as model=tiny)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "name": "tiny", "name_or_path": str(tmp_path_factory.mktemp("cache") / "tiny-small"), "build": "tiny",
        "init": "pretrained", "torch_dtype": "float32", "attn_implementation": "sdpa", "tiny": SMALL_TINY_SPEC,
    })


@pytest.fixture(scope="session")
def small_locomo(tmp_path_factory, data_root) -> Path:
    """Five real LoCoMo conversations cut to their first three sessions (all annotations kept for those)."""
    import json

    src = json.loads((data_root / "locomo" / "locomo10.json").read_text())
    keep_sessions = 3
    out = []
    for sample in src[:5]:
        s = json.loads(json.dumps(sample))
        conv = s["conversation"]
        for key in list(conv):
            if key.startswith("session_") and int(key.split("_")[1]) > keep_sessions:
                del conv[key]
        for group in ("observation", "session_summary", "event_summary"):
            s[group] = {k: v for k, v in s[group].items()
                        if int("".join(c for c in k.split("session_")[1] if c.isdigit()) or 0) <= keep_sessions}
        s["qa"] = [q for q in s["qa"] if all(_session_of(e) <= keep_sessions for e in q.get("evidence", []))
                   and q.get("evidence")]
        out.append(s)
    path = tmp_path_factory.mktemp("small_locomo") / "locomo_small.json"
    path.write_text(json.dumps(out))
    return path


def _session_of(dia_id: str) -> int:
    digits = dia_id.split(":")[0].lstrip("D")
    return int(digits) if digits.isdigit() else 10**6


def random_qwen2(vocab_size: int = 300):
    """A 2-layer random Qwen2 in eval mode, seeded: the shared model of the models/ unit tests."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def serve():
    """Start RewardServers on free loopback ports (`serve(answerer, **kw) -> url`); shut down after the test."""
    from lightmem_exp.reward_server import RewardServer

    servers: list[RewardServer] = []

    def _serve(answerer, **kw) -> str:
        server = RewardServer(("127.0.0.1", 0), answerer, search_mode="bm25", **kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield _serve
    for s in servers:
        s.shutdown()
        s.server_close()
