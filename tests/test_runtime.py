"""Process settings: the model's device under DDP, and a console with each Lightning line once and no adverts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightmem_exp import runtime
from lightmem_exp.lit.resume import LastCheckpoint


@pytest.mark.parametrize(("accelerator", "cuda", "local_rank", "want"), [
    ("gpu", True, "1", "cuda:1"),  # a second DDP rank: its own GPU, not cuda:0 (what a bare "cuda" gives)
    ("auto", True, None, "cuda:0"),
    ("cpu", True, "1", None),
    ("gpu", False, None, None),
])
def test_model_device_is_this_ranks_gpu(monkeypatch, accelerator, cuda, local_rank, want):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: cuda)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    cfg = OmegaConf.create({"trainer": {"lightning": {"accelerator": accelerator}}})
    assert runtime.model_device(cfg) == want


def test_lightning_lines_print_once_through_the_root_handlers(tmp_path: Path):
    # As under Hydra: the root logger has its handler before Lightning is imported.
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[root] %(message)s")
        import lightning as L
        from lightmem_exp.logging_utils import quiet_console
        quiet_console()
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False)
        bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: (offline)")
        bnb.warning("another bitsandbytes warning")
        import warnings
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`another_property` is deprecated", FutureWarning)
        from lightning.pytorch.utilities._pytree import _tree_flatten
        _tree_flatten(3)  # Lightning builds torch's deprecated LeafSpec
        from transformers.utils import logging as hf_logging
        print("[hf] progress bars", hf_logging.is_progress_bar_enabled())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    console = (out.stdout + out.stderr).splitlines()
    gpu = [line for line in console if "GPU available" in line]
    assert gpu == ["[root] GPU available: False, used: False"], console
    assert not [line for line in console if "litlogger" in line], console
    assert [line for line in console if "bitsandbytes" in line or "gemm_4bit" in line] == \
        ["[root] another bitsandbytes warning"], console  # only the known-harmless line is dropped
    assert [line.split(": ", 1)[1] for line in console if "is deprecated" in line] == \
        ["FutureWarning: `another_property` is deprecated"], console
    assert "[hf] progress bars False" in console, console  # no "Loading weights" bar at every from_pretrained


class _Trainer:
    sanity_checking = fast_dev_run = False
    global_step = 3

    def __init__(self):
        self.saved: list[tuple[Path, bool | None]] = []

    def save_checkpoint(self, path: Path, weights_only: bool | None = None) -> None:
        self.saved.append((path, weights_only))


def test_last_checkpoint_asks_for_a_full_checkpoint(tmp_path: Path):
    # weights_only unset made Lightning log "`weights_only` was not set, defaulting to `False`." at every save.
    trainer = _Trainer()
    LastCheckpoint(tmp_path / "last.ckpt").on_train_epoch_end(trainer, None)
    assert trainer.saved == [(tmp_path / "last.ckpt", False)]
