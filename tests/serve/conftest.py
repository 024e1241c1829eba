"""Fixtures of the ask/serve tests: a plain model and a step2-shaped export of it (the model + a bank it built: recall
works, the model is untrained), both loaded as `ask`/`serve` load them."""

from __future__ import annotations

import pytest

MEMORIES = ["Audrey adopted a dog named Max.", "Jon dances at his studio every day.",
            "Gina owns a clothing store in Paris.", "Caroline moved from Sweden four years ago.",
            "Melanie paints sunsets by the lake.", "John plays basketball on Sundays."]
QUESTIONS = ["What is Audrey's dog called?", "Where does Jon dance?", "Hi",
             "Which city is Gina's clothing store in, and what does she sell there these days?",
             "Where did Caroline move from?", "What does Melanie paint?"]


@pytest.fixture(scope="session")
def base_dir(small_model_cfg, data_root, tmp_path_factory):
    """The small tiny model with every weight matrix redrawn from N(0, 0.3), seeded: its built initialisation (std
    0.02) gives every prompt the same greedy reply, which would hide rows mixed up in a batch."""
    import torch

    from lightmem_exp.models.loading import load_model, load_tokenizer

    model, tok = load_model(small_model_cfg, data_root), load_tokenizer(small_model_cfg, data_root)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3, generator=g)
    out = tmp_path_factory.mktemp("serve") / "plain"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def export_dir(base_dir):
    """`<dir>/model` + `<dir>/bank`, the layout of a step2 `export/`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightmem_exp.models.memory_bank import MemoryBank

    out = base_dir.parent / "export"
    tok, model = AutoTokenizer.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(base_dir)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    MemoryBank.build(model, tok, [{"id": f"m{i}", "text": t} for i, t in enumerate(MEMORIES)],
                     progress=False).save(out / "bank")
    return out


@pytest.fixture(scope="session")
def recall_mm(export_dir):
    from lightmem_exp.serve.model import load_memory_model

    return load_memory_model(export_dir, device_map="cpu")


@pytest.fixture(scope="session")
def plain_mm(base_dir):
    from lightmem_exp.serve.model import load_memory_model

    # a long context (RoPE positions) so a reply can run long enough to be cancelled while it runs
    return load_memory_model(base_dir, name="plain", device_map="cpu", context_tokens=4096)
