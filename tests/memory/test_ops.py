"""Agent operations: each operation's effect on the state, failures that leave it alone, schemas and parsing."""

import json

import pytest

from lightmem_exp.memory.ops import (
    ACTIONS,
    Op,
    OpFormatError,
    apply_ops,
    check_schema,
    parse_reply,
    render_reply,
    reply_schema,
    tool_schemas,
    validate_reply,
)
from lightmem_exp.memory.store import MemoryStore


def store() -> MemoryStore:
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Jon is a banker.")
    s.insert("episodic", "Jon lost his job.", {"timestamp": "2023-01-19"})
    s.insert("episodic", "Jon started planning a dance studio.", {"timestamp": "2023-01-20"})
    s.insert("semantic", "Door Dash - Gina's former employer")
    s.insert("procedural", "Jon de-stresses by dancing.")
    return s


def test_core_append_replace_rewrite():
    s = store()
    r = apply_ops(s, "core", [Op("APPEND", {"content": "Jon loves contemporary dance."})])
    assert s.core == "Jon is a banker.\nJon loves contemporary dance." and (r.applied, r.written_words) == (1, 4)
    apply_ops(s, "core", [Op("REPLACE", {"old": "is a banker", "new": "was a banker until January 2023"})])
    assert s.core.startswith("Jon was a banker until January 2023.\n")
    r = apply_ops(s, "core", [Op("REWRITE", {"content": "Jon: former banker, dancer."})])
    assert s.core == "Jon: former banker, dancer." and r.written_words == 4


def test_core_failures_are_counted_and_change_nothing():
    s = MemoryStore(core_char_limit=30, search_mode="bm25")
    s.insert("core", "Jon is a banker.")
    r = apply_ops(s, "core", [Op("REPLACE", {"old": "is a dancer", "new": "x"}),
                              Op("APPEND", {"content": "a much longer line that does not fit"}),
                              Op("APPEND", {"content": "Jon dances."})])
    assert (r.applied, r.failed) == (1, 2) and s.core == "Jon is a banker.\nJon dances."
    assert "does not occur" in r.errors[0] and "over the limit" in r.errors[1]


def test_episodic_add_update_merge():
    s = store()
    apply_ops(s, "episodic", [Op("ADD", {"content": "Jon opened his studio.", "timestamp": "2023-06-20"}),
                              Op("ADD", {"content": "Gina joined a dance contest."})], timestamp="2023-07-01T10:00:00")
    assert s.get("ep-3").meta["timestamp"] == "2023-06-20"
    assert s.get("ep-4").meta["timestamp"] == "2023-07-01T10:00:00"  # the session's time when none is given
    apply_ops(s, "episodic", [Op("UPDATE", {"id": "ep-2", "content": "Jon planned a dance studio in January."})])
    assert s.get("ep-2").content == "Jon planned a dance studio in January."
    r = apply_ops(s, "episodic", [Op("MERGE", {"ids": ["ep-1", "ep-2"], "content": "Jon lost his job and "
                                                                                   "planned a studio."})])
    assert r.applied == 1 and "ep-1" not in s.entries and "ep-2" not in s.entries
    merged = s.get("ep-5")
    assert merged.content == "Jon lost his job and planned a studio."
    assert merged.meta == {"timestamp": "2023-01-20", "merged": ["ep-1", "ep-2"]}  # the latest merged timestamp


def test_episodic_merge_and_update_failures():
    s = store()
    before = s.snapshot()
    r = apply_ops(s, "episodic", [Op("MERGE", {"ids": ["ep-1", "ep-9"], "content": "x"}),
                                  Op("MERGE", {"ids": ["ep-1", "ep-1"], "content": "x"}),
                                  Op("MERGE", {"ids": ["ep-1", "sem-1"], "content": "x"}),
                                  Op("UPDATE", {"id": "sem-1", "content": "x"})])
    assert r.failed == 4 and r.applied == 0 and s.snapshot() == before
    assert "not episodic" in r.errors[2] and "distinct" in r.errors[1]


def test_semantic_add_update_skip_and_procedural_add_update():
    s = store()
    r = apply_ops(s, "semantic", [Op("ADD", {"content": "Contemporary - Jon's favourite dance style"}),
                                  Op("UPDATE", {"id": "sem-1", "content": "Door Dash - delivery company"}),
                                  Op("SKIP", {})])
    assert r.applied == 3 and s.get("sem-2").type == "semantic" and s.get("sem-1").content.endswith("company")
    assert r.written_words == 6 + 5
    r = apply_ops(s, "procedural", [Op("ADD", {"content": "Studio plan: 1. find a place 2. hire teachers"}),
                                    Op("UPDATE", {"id": "proc-1", "content": "Jon dances to de-stress."})])
    assert r.applied == 2 and s.get("proc-2").content.startswith("Studio plan")
    r = apply_ops(s, "procedural", [Op("SKIP", {})])  # not a procedural operation
    assert r.failed == 1


def test_parse_reply_valid_repaired_and_invalid():
    ok = parse_reply("semantic", '{"operations": [{"action": "ADD", "content": "Rust - a language"}]}')
    assert ok.ok and ok.ops == [Op("ADD", {"content": "Rust - a language"})] and not ok.repaired
    fenced = parse_reply("core", 'Sure!\n```json\n{"operations": [{"action": "append", "content": "x y",}]}\n```')
    assert fenced.ok and fenced.repaired and fenced.ops[0].action == "APPEND"
    truncated = parse_reply("episodic", '{"operations": [{"action": "ADD", "content": "Jon opened')
    assert truncated.ok and truncated.ops[0].fields == {"content": "Jon opened"}
    assert parse_reply("core", '{"operations": []}').ok
    for text, why in [("no json here", "invalid JSON"), ("", "invalid JSON"),
                      ('{"ops": []}', "missing 'operations'"),
                      ('{"operations": [{"action": "DELETE", "id": "ep-1"}]}', "is not one of"),
                      ('{"operations": [{"action": "SKIP"}]}', "is not one of"),  # core has no SKIP
                      ('{"operations": [{"action": "APPEND"}]}', "missing 'content'"),
                      ('{"operations": [{"action": "APPEND", "content": "  "}]}', "non-empty"),
                      ('{"operations": [{"action": "APPEND", "content": "x", "id": "a"}]}', "unexpected keys"),
                      ('{"operations": {"action": "APPEND"}}', "expected array")]:
        p = parse_reply("core", text)
        assert not p.ok and why in p.error, (text, p.error)
    merge = parse_reply("episodic", '{"operations": [{"action": "MERGE", "ids": ["ep-1"], "content": "x"}]}')
    assert not merge.ok and "at least 2" in merge.error


def test_schemas_are_json_and_tools_mirror_them():
    for t, actions in ACTIONS.items():
        schema = reply_schema(t)
        json.dumps(schema)
        branches = schema["properties"]["operations"]["items"]["oneOf"]
        assert [b["properties"]["action"]["const"] for b in branches] == list(actions)
        tools = tool_schemas(t)
        assert [x["function"]["name"] for x in tools] == [f"{t}_{a.lower()}" for a in actions]
        for tool, branch in zip(tools, branches, strict=True):
            params = tool["function"]["parameters"]
            assert "action" not in params["properties"]
            assert params["required"] == [k for k in branch["required"] if k != "action"]
    ep_add = reply_schema("episodic")["properties"]["operations"]["items"]["oneOf"][0]
    assert ep_add["required"] == ["action", "content"]  # timestamp is optional
    check_schema({"action": "ADD", "content": "x", "timestamp": None}, ep_add)
    with pytest.raises(OpFormatError):
        check_schema({"action": "ADD", "content": "x", "timestamp": 3}, ep_add)


def test_render_reply_round_trips():
    ops = [Op("MERGE", {"ids": ["ep-1", "ep-2"], "content": "merged"}), Op("ADD", {"content": "x", "timestamp": None})]
    assert validate_reply("episodic", json.loads(render_reply(ops)))[0] == ops
