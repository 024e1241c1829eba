"""SFT pool: `<think>` wrapping, tool rendering, Alpaca joining, capping and errors."""

from __future__ import annotations

import json

import pytest

from lightmem_exp.data.sft_pool import read_sft_pool
from lightmem_exp.errors import DataError


def test_reasoning_is_wrapped_in_think(sft_dir):
    rows, _ = read_sft_pool(sft_dir)
    plain = next(r for r in rows if r["messages"][-1]["content"].endswith("Hello!"))
    assert plain["messages"][-1]["content"] == "<think>\nGreet back.\n</think>\n\nHello!"
    assert plain["has_think"] and plain["source"] == "reason.jsonl"
    assert [m["role"] for m in plain["messages"]] == ["system", "user", "assistant"]
    assert plain["messages"][0]["content"] == "Be brief."  # "tools": "[]" adds nothing


def test_tool_calls_and_results_render_as_text(sft_dir):
    rows, _ = read_sft_pool(sft_dir)
    chat = next(r for r in rows if "Oslo" in r["messages"][1]["content"])["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant"]
    assert chat[0]["content"].startswith("You use tools.\n\n# Tools\n") and '"get_weather"' in chat[0]["content"]
    call = chat[2]["content"]
    assert call.startswith("<think>\nI should call the tool.\n</think>\n\n<tool_call>\n")
    body = call.split("<tool_call>\n")[1].split("\n</tool_call>")[0]
    assert json.loads(body) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert chat[3]["content"] == '<tool_response>\n{"temp": 3}\n</tool_response>'
    assert chat[4]["content"] == "<think>\nIt is cold.\n</think>\n\nIt is 3 degrees in Oslo."


def test_alpaca_rows_and_skips(sft_dir):
    rows, quirks = read_sft_pool(sft_dir)
    alpaca = [r for r in rows if r["source"] == "alpaca.json"]
    assert alpaca[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n2 and 3"},
                                     {"role": "assistant", "content": "5"}]
    assert alpaca[1]["messages"][0]["content"] == "Say hi."
    assert not any(r["has_think"] for r in alpaca)
    assert quirks["sft_skipped_no_assistant"] == 1 and quirks["sft_file_ignored"] == 1
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) == 5


def test_max_sft_keeps_the_mix_of_sources(sft_dir):
    rows, _ = read_sft_pool(sft_dir, max_sft=3)
    assert [r["source"] for r in rows] == ["alpaca.json", "alpaca.json", "reason.jsonl"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert len(read_sft_pool(sft_dir, max_sft=0)[0]) == 0
    assert len(read_sft_pool(sft_dir, max_sft=100)[0]) == 5


def test_malformed_jsonl_line_is_named(sft_dir):
    path = sft_dir / "reason.jsonl"
    path.write_text(path.read_text() + '{"messages": [\n')
    with pytest.raises(DataError) as e:
        read_sft_pool(sft_dir)
    assert e.value.line == 4 and "reason.jsonl:4" in str(e.value)


def test_bad_part_type_names_line_and_field(sft_dir):
    bad = {"messages": [{"role": "user", "content": [{"type": "image", "value": "x"}]}]}
    (sft_dir / "reason.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_sft_pool(sft_dir)
    assert e.value.line == 1 and e.value.field == "messages[0].content[0].type"


def test_alpaca_missing_output_and_empty_dir(sft_dir, tmp_path):
    (sft_dir / "alpaca.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError) as e:
        read_sft_pool(sft_dir)
    assert e.value.field == "[0].output"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no \\*.json"):
        read_sft_pool(empty)
    with pytest.raises(DataError, match="not found"):
        read_sft_pool(tmp_path / "missing")
