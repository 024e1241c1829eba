"""`python -m lightmem_exp.ask` on a step2-shaped export, a sft adapter and a plain model: the answer and recall trace
are the server's, and each kind says what it is."""

from __future__ import annotations

import io
import json

import openai
import pytest

from lightmem_exp import ask
from lightmem_exp.serve.app import serving
from tests.serve.conftest import QUESTIONS


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A LoRA adapter saved by PEFT on the plain model (what the sft stage's export/adapter is)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # PEFT starts B at zero: make the adapter change the replies
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def run_ask(capsys, *args: str) -> str:
    ask.main([str(a) for a in args])
    return capsys.readouterr().out


def test_json_reply_equals_the_servers(capsys, export_dir, recall_mm):
    got = json.loads(run_ask(capsys, export_dir, QUESTIONS[0], "--json", "--max-tokens", "8"))
    with serving(recall_mm) as (url, _):
        r = openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
            model="lightmem-step2", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8, temperature=0)
    assert got["answer"] == r.choices[0].message.content
    assert got["recall_trace"] == r.choices[0].recall_trace and len(got["recall_trace"]) == 1
    assert got["usage"] == r.usage.model_dump(exclude_none=True)


def test_printed_trace_and_the_three_kinds(capsys, export_dir, base_dir, adapter_dir, monkeypatch):
    out = run_ask(capsys, export_dir, QUESTIONS[1], "--max-tokens", "6")
    assert out.startswith(f"Q: {QUESTIONS[1]}\nA: ")
    for line in ("recall 1: memory m", "  decoded: ", "  memory:  ", "  top:     m", "[lightmem-step2: prompt "):
        assert line in out, line
    plain = run_ask(capsys, base_dir, QUESTIONS[1], "--max-tokens", "6")
    assert "recall: none (base model, no memory bank)" in plain
    sft = run_ask(capsys, adapter_dir, QUESTIONS[1], "--max-tokens", "6")
    assert "recall: none (sft model, no memory bank)" in sft
    answer = [line for line in (plain, sft) for line in line.splitlines() if line.startswith("A: ")]
    assert answer[0] != answer[1]  # the adapter is applied

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[2]}\n\n{QUESTIONS[3]}\n"))
    lines = run_ask(capsys, export_dir, "--json", "--max-tokens", "4").splitlines()
    assert [json.loads(x)["question"] for x in lines] == [QUESTIONS[2], QUESTIONS[3]]


def test_bank_only_with_a_step2_export(base_dir, export_dir):
    with pytest.raises(SystemExit, match="a bank needs a step2 export"):
        ask.main([str(base_dir), "hi", "--bank", str(export_dir / "bank")])
