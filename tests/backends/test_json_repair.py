"""JSON extraction and repair on a corpus of broken model replies, and the two schema checks."""

import json

import pytest

from lightmem_exp.backends.json_repair import (
    JsonRepairError,
    SchemaError,
    extract_json_object,
    loads_object,
    normalise_action,
    validate_decision,
    validate_metadata,
)
from lightmem_exp.data.schema import parse_update_decision

# (broken reply, the object it must repair to)
CORPUS = [
    # already valid
    ('{"action": "update", "updated_text": "Alice moved to Paris."}',
     {"action": "update", "updated_text": "Alice moved to Paris."}),
    # extra prose and a code fence
    ('Sure! Here is the decision:\n```json\n{"action": "delete", "updated_text": null}\n```\nLet me know.',
     {"action": "delete", "updated_text": None}),
    ('The answer is {"action": "ignore", "updated_text": null} because they are unrelated. {"x": 1}',
     {"action": "ignore", "updated_text": None}),
    # single quotes, with an apostrophe inside a single-quoted string
    ("{'action': 'update', 'updated_text': 'Caroline's dog is named Rex.'}",
     {"action": "update", "updated_text": "Caroline's dog is named Rex."}),
    # trailing commas
    ('{"action": "ignore", "updated_text": null,}', {"action": "ignore", "updated_text": None}),
    ('{"entities": ["Rex", "Alice",], "topic": "pets",}', {"entities": ["Rex", "Alice"], "topic": "pets"}),
    # truncated: inside a string, after a colon, after a comma, inside a key, inside nested brackets
    ('{"action": "update", "updated_text": "Caroline is consid',
     {"action": "update", "updated_text": "Caroline is consid"}),
    ('{"action": "ignore", "updated_text":', {"action": "ignore", "updated_text": None}),
    ('{"action": "ignore",', {"action": "ignore"}),
    ('{"action": "delete", "upd', {"action": "delete"}),
    ('{"topic": "pets", "entities": ["Rex", "Ali', {"topic": "pets", "entities": ["Rex", "Ali"]}),
    # Python literals, bare keys and values, missing comma, an unescaped quote inside a value
    ("{action: UPDATE, updated_text: None}", {"action": "UPDATE", "updated_text": None}),
    ('{"action": "update" "updated_text": "She said "hi" to Bob"}',
     {"action": "update", "updated_text": 'She said "hi" to Bob'}),
    ('{"ok": True, "n": -1.5e3, "s": "tab\\there \\u00e9"}', {"ok": True, "n": -1500.0, "s": "tab\there é"}),
    # a raw newline inside a string
    ('{"action": "update", "updated_text": "line one\nline two"}',
     {"action": "update", "updated_text": "line one\nline two"}),
]


@pytest.mark.parametrize(("raw", "expected"), CORPUS)
def test_repair_corpus(raw, expected):
    obj, repaired = loads_object(raw)
    assert obj == expected
    assert repaired == (raw != CORPUS[0][0])
    assert json.loads(extract_json_object(raw)) == expected  # the repaired text is strict JSON


@pytest.mark.parametrize("raw", ["", "no JSON at all", "[1, 2, 3]", "```\n```"])
def test_no_object_is_an_error(raw):
    with pytest.raises(JsonRepairError):
        loads_object(raw)


def test_valid_json_is_unchanged():
    text = json.dumps({"a": [1, {"b": "x, y: z}"}], "c": "it's \"quoted\""})
    assert json.loads(extract_json_object(text)) == json.loads(text)


@pytest.mark.parametrize(
    ("name", "action"),
    [("update", "update"), ("UPDATE", "update"), ("Updated", "update"), (" replace. ", "update"),
     ("remove", "delete"), ("DELETED", "delete"), ("skip", "ignore"), ("no change", "ignore"),
     ("no-op", "ignore"), ("Ignore", "ignore")],
)
def test_near_miss_action_names(name, action):
    assert normalise_action(name) == action


@pytest.mark.parametrize("name", ["add", "merge_into_other", "", "upd", 3, None])
def test_unknown_actions_are_rejected(name):
    with pytest.raises(SchemaError):
        normalise_action(name)


def test_validate_decision():
    assert validate_decision({"Action": "UPDATED", "updatedText": " new text "}) == \
        {"action": "update", "updated_text": "new text"}
    assert validate_decision({"action": "remove", "updated_text": "ignored", "reason": "x"}) == \
        {"action": "delete", "updated_text": None}
    out = validate_decision({"action": "skip"})
    assert out == {"action": "ignore", "updated_text": None}
    assert parse_update_decision(json.dumps(out)) == out  # the data stage's own check agrees
    for bad, msg in (({"updated_text": "x"}, "missing"), ({"action": "update"}, "non-empty"),
                     ({"action": "update", "updated_text": "  "}, "non-empty"), ({"action": "add"}, "unknown"),
                     (["update"], "object")):
        with pytest.raises(SchemaError, match=msg):
            validate_decision(bad)


def test_validate_metadata():
    assert validate_metadata({"Topic": " pets ", "entities": "Rex", "timestamp": ""}) == \
        {"topic": "pets", "entities": ["Rex"], "timestamp": None}
    assert validate_metadata({"topic": "t", "entities": [" A ", "A", "B", ""], "timestamp": "2023-05-08"}) == \
        {"topic": "t", "entities": ["A", "B"], "timestamp": "2023-05-08"}
    for bad, msg in (({"topic": "t", "entities": []}, "missing"), ({"topic": "", "entities": [], "timestamp": None},
                     "topic"), ({"topic": "t", "entities": [1], "timestamp": None}, "entities"),
                     ({"topic": "t", "entities": [], "timestamp": 5}, "timestamp")):
        with pytest.raises(SchemaError, match=msg):
            validate_metadata(bad)
