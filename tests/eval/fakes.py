"""Small upstream stage dirs made with the real writers (adapter, bank, export, manifest), and a two-question
conversation, for the eval tests. The weights are untrained: these dirs test the wiring, not what training does."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lightmem_exp.artifacts import Manifest, load_manifest, write_manifest
from lightmem_exp.eval.methods import Conversation
from lightmem_exp.models.loading import attach_lora, ensure_memory_tokens, load_model, load_tokenizer, save_adapter
from lightmem_exp.models.memory_bank import MemoryBank
from tests.conftest import SMALL_TINY_SPEC


def small_model_overrides(small_model_cfg: DictConfig) -> list[str]:
    # model=tiny first: the default model group has no `tiny` block to override
    return ["model=tiny", f"model.name_or_path={small_model_cfg.name_or_path}",
            *(f"model.tiny.{k}={v}" for k, v in SMALL_TINY_SPEC.items())]


def _turn(speaker: str, dia: str, text: str) -> dict:
    return {"speaker": speaker, "dia_id": dia, "text": text, "image_caption": None}


def conversation() -> Conversation:
    """Two sessions, four memories, two questions: a single-hop one (cat 4) and an adversarial one (cat 5)."""
    conv = "conv-t"
    sessions = [
        {"conv_id": conv, "session": 1, "date": "8 May, 2023", "timestamp": "2023-05-08T13:56:00", "turns": [
            _turn("Alice", "D1:1", "I adopted a puppy named Rex from the shelter in Boston."),
            _turn("Bob", "D1:2", "That's wonderful! What breed is Rex?"),
            _turn("Alice", "D1:3", "He is a golden retriever.")]},
        {"conv_id": conv, "session": 2, "date": "1 June, 2023", "timestamp": "2023-06-01T10:00:00", "turns": [
            _turn("Bob", "D2:1", "I started learning the violin last week."),
            _turn("Alice", "D2:2", "How is the violin going?"),
            _turn("Bob", "D2:3", "Slowly, but I practice every evening.")]},
    ]

    def mem(i: str, text: str, session: int, dia: str) -> dict:
        return {"id": f"{conv}:obs:{session}:{i}", "conv_id": conv, "text": text, "speaker": None,
                "timestamp": sessions[session - 1]["timestamp"], "session": session, "kind": "observation",
                "source_dia_ids": [dia], "merged_ids": []}

    memories = [mem("0", "Alice adopted a puppy named Rex from a shelter in Boston.", 1, "D1:1"),
                mem("1", "Rex is a golden retriever.", 1, "D1:3"),
                mem("0", "Bob started learning the violin.", 2, "D2:1"),
                mem("1", "Bob practices the violin every evening.", 2, "D2:3")]

    def qa(i: int, question: str, answer, cat: int, ev_mem: list[str], ev_sess: list[int]) -> dict:
        return {"id": f"{conv}:qa:{i}", "conv_id": conv, "question": question, "answer": answer, "category": cat,
                "adversarial_answer": "violin" if cat == 5 else None, "evidence_dia_ids": [],
                "evidence_memory_ids": ev_mem, "evidence_sessions": ev_sess, "abstention": cat == 5,
                "question_date": None, "question_timestamp": None}

    questions = [qa(0, "What is the name of Alice's puppy?", "Rex", 4, [memories[0]["id"]], [1]),
                 qa(1, "What instrument did Alice start learning?", None, 5, [memories[2]["id"]], [2])]
    return Conversation(conv, memories, sessions, questions)


def make_sft(sdir: Path, cfg: DictConfig) -> Manifest:
    """An sft stage dir: an (untrained) LoRA adapter on the configured base, saved as the sft stage saves it."""
    model = attach_lora(load_model(cfg.model, cfg.paths.data), cfg.lora)
    save_adapter(model, sdir / "export" / "adapter")
    write_manifest(sdir, Manifest(stage="sft", seed=0, outputs={"adapter": "export/adapter"}))
    return load_manifest(sdir, expect_stage="sft")


def make_step1_step2(root: Path, cfg: DictConfig, memories: list[dict], written: int = 2) -> tuple[Path, Path]:
    """step1 (a bank of every memory) and step2 (a merged-model export, its tokenizer, and the bank of the first
    `written` memories of every conversation) dirs; the step2 manifest names the step1 one, as the real stage's does."""
    tok = load_tokenizer(cfg.model, cfg.paths.data)
    model = load_model(cfg.model, cfg.paths.data)
    ensure_memory_tokens(model, tok)
    rows = [{"id": m["id"], "text": m["text"]} for m in memories]
    bank = MemoryBank.build(model, tok, rows, progress=False)
    step1, step2 = root / "step1", root / "step2"
    bank.save(step1 / "bank")
    m1 = Manifest(stage="step1", seed=0, outputs={"bank": "bank"})
    write_manifest(step1, m1)
    export = step2 / "export"
    model.save_pretrained(str(export / "model"))
    tok.save_pretrained(str(export / "model"))
    keep = [i for i, m in enumerate(memories) if sum(x["conv_id"] == m["conv_id"] for x in memories[:i]) < written]
    bank.subset(keep).save(export / "bank")
    write_manifest(step2, Manifest(stage="step2", seed=0, inputs={"step1": m1.ref()},
                                   outputs={"model": "export/model", "tokenizer": "export/model",
                                            "bank": "export/bank"}, stats={"end_marker": "</memory>"}))
    return step1, step2
