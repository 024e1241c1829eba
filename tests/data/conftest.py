"""Tiny hand-made inputs shaped like the real files, each carrying the quirks the readers must handle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _turn(speaker: str, dia: str, text: str, **extra) -> dict:
    return {"speaker": speaker, "dia_id": dia, "text": text, **extra}


def locomo_conv_a() -> dict:
    """Alice/Bob: a duplicate observation, list and comma evidence, a date without session, QA quirks."""
    return {
        "sample_id": "conv-a",
        "conversation": {
            "speaker_a": "Alice", "speaker_b": "Bob",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                _turn("Alice", "D1:1", "I adopted a dog named Rex last week!"),
                _turn("Bob", "D1:2", "Cool! I play guitar in a band now."),
                _turn("Alice", "D1:3", "Look at this photo.", blip_caption="a photo of a brown dog", img_url=["x"]),
                _turn("Bob", "D1:4", "Cute dog."),
            ],
            "session_2_date_time": "10:05 am on 2 June, 2023",
            "session_2": [
                _turn("Alice", "D2:1", "Rex learned to fetch at the park."),
                _turn("Bob", "D2:2", "I quit the band, no more guitar for me."),
                _turn("Alice", "D2:3", "I started pottery classes."),
            ],
            "session_3_date_time": "9:00 am on 1 July, 2023",  # a date with no session_3 dialogue
        },
        "observation": {
            "session_1_observation": {
                "Alice": [["Alice adopted a dog named Rex.", "D1:1"], ["  alice adopted a DOG named Rex ", "D1:3"]],
                "Bob": [["Bob plays guitar in a band.", "D1:2"]],
            },
            "session_2_observation": {
                "Alice": [["Alice's dog Rex, the one she adopted, learned to fetch.", ["D2:1", "D1:1"]],
                          ["Alice started pottery classes.", "D2:3, D2:1"]],
                "Bob": [["Bob quit the band and no longer plays guitar.", "D2:2"]],
            },
        },
        "session_summary": {"session_1_summary": "Alice adopted Rex; Bob plays guitar.",
                            "session_2_summary": "Rex fetches; Bob quit the band; Alice does pottery."},
        "event_summary": {},
        "qa": [
            {"question": "What is the name of Alice's dog?", "answer": "Rex", "evidence": ["D1:1", "D1:3"], "category": 4},
            {"question": "When did Bob quit the band?", "answer": 2023, "evidence": ["D2:2; D1:2"], "category": 2},
            {"question": "What does Alice do now?", "answer": "pottery", "evidence": ["D2:3 D2:1"], "category": 1},
            {"question": "What did Bob adopt?", "adversarial_answer": "a dog", "evidence": ["D1:1"], "category": 5},
            {"question": "What is Alice's hobby?", "answer": "pottery", "evidence": ["D:2:3"], "category": 4},
            {"question": "Which pet learned to fetch?", "answer": "Rex", "evidence": ["D2:01", "D"], "category": 3},
            {"question": "Unknown turn?", "answer": "n/a", "evidence": ["D9:9"], "category": 3},
            {"question": "No evidence?", "answer": "n/a", "evidence": [], "category": 3},
            {"question": "What did Bob say about the photo?", "answer": "Cute dog", "evidence": ["D1:4"], "category": 4},
        ],
    }


def locomo_conv_b(conv_id: str = "conv-b") -> dict:
    return {
        "sample_id": conv_id,
        "conversation": {
            "speaker_a": "Carol", "speaker_b": "Dan",
            "session_1_date_time": "7:00 pm on 15 August, 2023",
            "session_1": [_turn("Carol", "D1:1", "I moved to Lisbon."), _turn("Dan", "D1:2", "I run marathons.")],
        },
        "observation": {"session_1_observation": {"Carol": [["Carol moved to Lisbon.", "D1:1"]],
                                                  "Dan": [["Dan runs marathons.", "D1:2"]]}},
        "session_summary": {"session_1_summary": "Carol moved; Dan runs."},
        "qa": [{"question": "Where does Carol live?", "answer": "Lisbon", "evidence": ["D1:1"], "category": 4}],
    }


def longmemeval_items() -> list[dict]:
    return [
        {
            "question_id": "q1", "question_type": "single-session-user", "question": "What is my cat's name?",
            "question_date": "2023/05/30 (Tue) 23:40", "answer": "Milo", "answer_session_ids": ["s_b"],
            "haystack_session_ids": ["s_a", "s_b"],
            "haystack_dates": ["2023/05/20 (Sat) 02:21", "2023/05/21 (Sun) 10:00"],
            "haystack_sessions": [
                [{"role": "user", "content": "Recommend a book."}, {"role": "assistant", "content": "Try Dune."}],
                [{"role": "user", "content": "My cat Milo loves boxes.", "has_answer": True},
                 {"role": "assistant", "content": "Cats do love boxes!", "has_answer": False},
                 {"role": "user", "content": "Any toy ideas?"}],
            ],
        },
        {
            "question_id": "q2_abs", "question_type": "temporal-reasoning", "question": "When did I visit Rome?",
            "question_date": "2023/06/01 (Thu) 08:00", "answer": "You did not mention visiting Rome.",
            "answer_session_ids": [], "haystack_session_ids": ["s_c"], "haystack_dates": ["2023/05/25 (Thu) 12:00"],
            "haystack_sessions": [[{"role": "user", "content": "I like pasta."},
                                   {"role": "assistant", "content": "Pasta is great."}]],
        },
    ]


def reasoning_rows() -> list[dict]:
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    with_tool = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "You use tools."}]},
        {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "I should call the tool."},
                                          {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": '{"temp": 3}'}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "It is cold."},
                                          {"type": "text", "value": "It is 3 degrees in Oslo."}]},
    ], "tools": tools}
    plain = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "value": "Hi"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Greet back."}, {"type": "text", "value": "Hello!"}]},
    ], "tools": "[]"}
    return [with_tool, plain]


def alpaca_items() -> list[dict]:
    return [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Empty answer.", "input": "", "output": ""},  # no assistant reply: skipped and counted
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
    ]


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def write_sft_dir(root: Path) -> Path:
    d = root / "sft"
    d.mkdir(parents=True, exist_ok=True)
    (d / "reason.jsonl").write_text("\n".join(json.dumps(r) for r in reasoning_rows()) + "\n\n", encoding="utf-8")
    write_json(d / "alpaca.json", alpaca_items())
    (d / "README.txt").write_text("not data", encoding="utf-8")
    return d


def word_count(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


@pytest.fixture
def locomo_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "locomo.json", [locomo_conv_a(), locomo_conv_b()])


@pytest.fixture
def longmemeval_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "lme.json", longmemeval_items())


@pytest.fixture
def sft_dir(tmp_path: Path) -> Path:
    return write_sft_dir(tmp_path)


@pytest.fixture
def count_tokens():
    return word_count


@pytest.fixture
def locomo_samples() -> list[dict]:
    """Fresh copies, so a test may corrupt them."""
    return [locomo_conv_a(), locomo_conv_b()]


@pytest.fixture
def lme_items() -> list[dict]:
    return longmemeval_items()


@pytest.fixture
def make_conv():
    """Another clean LoCoMo sample with the given id."""
    return locomo_conv_b


@pytest.fixture
def dump(tmp_path: Path):
    """dump(obj, name) writes JSON under tmp_path and returns the path."""
    return lambda obj, name="data.json": write_json(tmp_path / name, obj)
