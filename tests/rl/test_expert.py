"""Expert trajectories from annotations: chunking, classification, each decision rule, stored files, determinism."""

import json

from lightmem_exp.memory.ops import Op, apply_ops, parse_reply
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore
from lightmem_exp.rl.expert import (
    Annotations,
    ExpertConfig,
    chunk_questions,
    classify_observation,
    condense,
    derive,
    expert_ops,
    load_trajectory,
    locomo_events,
    parse_event_date,
    split_chunks,
    write_trajectory,
)

CFG = ExpertConfig(chunk_turns=2, search_mode="bm25")


def session(n: int, texts: list[str], ts: str) -> dict:
    return {"conv_id": "c1", "session": n, "date": None, "timestamp": ts,
            "turns": [{"speaker": "Jon" if i % 2 == 0 else "Gina", "dia_id": f"D{n}:{i + 1}", "text": t,
                       "image_caption": None} for i, t in enumerate(texts)]}


SESSIONS = [session(1, ["I lost my banking job.", "Oh no!", "I will open a dance studio.", "Great idea!",
                        "Dancing helps me relax every evening."], "2023-01-20T16:04:00"),
            session(2, ["The studio opened!", "Congrats on the studio!"], "2023-02-01T10:00:00")]
ANN = Annotations(
    observations=[
        {"session": 1, "text": "Jon is a former banker who lost his job.", "source_dia_ids": ["D1:1"]},
        {"session": 1, "text": "Jon plans to open a dance studio.", "source_dia_ids": ["D1:3"]},
        {"session": 1, "text": "Jon dances every evening to relax.", "source_dia_ids": ["D1:5"]},
        {"session": 1, "text": "Gina finds Jon's plan great.", "source_dia_ids": []},
        {"session": 2, "text": "Jon now plans to open a big dance studio in town.", "source_dia_ids": ["D2:1"]},
    ],
    summaries={1: "Jon told Gina he lost his job. He plans a dance studio. Gina cheered him on.",
               2: "Jon opened his studio."},
    events={1: [("Jon", "Jon loses his banking job.", "2023-01-19")],
            2: [("Jon", "Jon opens his dance studio.", "2023-02-01")]},
)
QA = [{"id": "q1", "question": "What was Jon's job?", "answer": "banker", "abstention": False,
       "evidence_dia_ids": ["D1:1"], "category": 4, "evidence_sessions": [1]},
      {"id": "q2", "question": "?", "answer": None, "abstention": True, "evidence_dia_ids": ["D1:1"],
       "category": 5, "evidence_sessions": [1]}]


def test_chunks_classification_dates_and_condensing():
    chunks = split_chunks(SESSIONS[0], 2)
    assert [c.dia_ids for c in chunks] == [["D1:1", "D1:2"], ["D1:3", "D1:4"], ["D1:5"]]
    assert [c.last for c in chunks] == [False, False, True] and chunks[0].key == "s1_c00"
    assert classify_observation("Jon dances every evening to relax.") == "procedural"
    assert classify_observation("Jon is a former banker.") == "core"
    assert classify_observation("Gina finds Jon's plan great.") == "semantic"
    assert parse_event_date("8 May, 2023") == "2023-05-08" and parse_event_date("May 8") is None
    assert condense("One two three. Four five six seven. Eight.", 5) == "One two three."
    assert condense("One two three four five six.", 4) == "One two three four"
    assert [q["id"] for q in chunk_questions(chunks[0], QA)] == ["q1"]  # abstentions never count
    assert chunk_questions(chunks[1], QA) == []
    raw = [{"sample_id": "c1", "event_summary": {"events_session_1": {"Jon": ["Jon loses his job."], "Gina": [],
                                                                     "date": "19 January, 2023"}}}]
    assert locomo_events(raw) == {"c1": {1: [("Jon", "Jon loses his job.", "2023-01-19")]}}


def test_decision_rules_add_update_skip_merge_replace_rewrite():
    s = MemoryStore(search_mode="bm25")
    s.insert("semantic", "Dance studio - Jon's planned business")
    s.insert("episodic", "Jon loses his banking job.", {"timestamp": "2023-01-19"})
    s.insert("episodic", "Jon loses his banking job again.", {"timestamp": "2023-01-19"})
    shown = ["sem-1"]
    ops, _ = expert_ops("semantic", s, shown, [{"content": "Dance studio - Jon's planned business"}], CFG)
    assert ops == [Op("SKIP", {})]  # a duplicate of a shown entry, nothing else: SKIP
    ops, _ = expert_ops("semantic", s, shown, [{"content": "Dance studio - Jon's business, opened in May"}], CFG)
    assert ops == [Op("UPDATE", {"id": "sem-1", "content": "Dance studio - Jon's business, opened in May"})]
    ops, _ = expert_ops("semantic", s, shown, [{"content": "Gina - works at Door Dash"}], CFG)
    assert ops == [Op("ADD", {"content": "Gina - works at Door Dash"})]
    ops, _ = expert_ops("episodic", s, ["ep-1", "ep-2"], [{"content": "Jon loses his job at the bank.",
                                                           "timestamp": "2023-01-20"}], CFG)
    assert ops[0].action == "MERGE" and sorted(ops[0].fields["ids"]) == ["ep-1", "ep-2"]
    ops, _ = expert_ops("episodic", s, [], [{"content": "Gina joins a contest.", "timestamp": "2023-02-02"}], CFG)
    assert ops == [Op("ADD", {"content": "Gina joins a contest.", "timestamp": "2023-02-02"})]
    s.insert("core", "Jon is a banker in Boston.")
    new = "Jon was a banker in Boston until 2023, now a dancer."
    ops, _ = expert_ops("core", s, [], [{"content": new}], CFG)
    assert ops == [Op("REPLACE", {"old": "Jon is a banker in Boston.", "new": new})]
    assert expert_ops("core", s, [], [{"content": "Jon is a former banker in Boston."}], CFG)[0] == []  # known
    long = ExpertConfig(core_max_words=8, search_mode="bm25")
    ops, _ = expert_ops("core", s, [], [{"content": "Jon has two dogs named Max and Rex."}], long)
    assert ops == [Op("REWRITE", {"content": "Jon has two dogs named Max and Rex."})]  # only the newest line fits
    many = [{"content": f"fact number {i} about something else entirely"} for i in range(6)]
    ops, dropped = expert_ops("procedural", s, [], many, CFG)
    assert len(ops) == CFG.max_ops_per_call and dropped == 6 - CFG.max_ops_per_call


def test_derive_replays_exactly_and_round_trips_through_files(tmp_path):
    traj = derive("c1", SESSIONS, ANN, QA, CFG, split="train")
    keys = [c["key"] for c in traj.metadata["chunks"]]
    assert keys == ["s1_c00", "s1_c01", "s1_c02", "s2_c00"]
    assert len(traj.calls) == 4 * len(keys) and traj.metadata["chunks"][0]["question_ids"] == ["q1"]
    assert set(traj.metadata["questions"]) == {"q1"}
    # Replaying every chunk's four expert calls on its snapshot gives the next snapshot.
    nexts = [*keys[1:], "final"]
    for i, key in enumerate(keys):
        store = MemoryStore.from_snapshot(traj.states[key], search_mode="bm25")
        for call in traj.calls[4 * i : 4 * i + 4]:
            parsed = parse_reply(call["agent"], call["reply"])
            assert parsed.ok and [o.to_dict() for o in parsed.ops] == call["ops"]
            apply_ops(store, call["agent"], parsed.ops, timestamp=call["timestamp"])
        assert store.snapshot() == traj.states[nexts[i]], key
    final = MemoryStore.from_snapshot(traj.states["final"], search_mode="bm25")
    assert "Jon is a former banker who lost his job." in final.core
    assert any("dance studio" in e.content for e in final.of_type("semantic"))
    assert any("every evening" in e.content for e in final.of_type("procedural"))
    stamps = {e.content: e.meta["timestamp"] for e in final.of_type("episodic")}
    assert stamps["Jon loses his banking job."] == "2023-01-19"
    # the second session restates the plan: an UPDATE of the semantic entry, not a second entry
    assert sum("dance studio" in e.content for e in final.of_type("semantic")) == 1
    assert traj.metadata["counts"]["ops/semantic/UPDATE"] == 1
    d = write_trajectory(tmp_path, traj)
    assert (d / "metadata.json").exists() and (d / "states" / "s1_c00.json").exists()
    assert len((d / "agent_calls.jsonl").read_text().splitlines()) == len(traj.calls)
    back = load_trajectory(d)
    assert back.states == traj.states and back.calls == json.loads(json.dumps(traj.calls))
    again = derive("c1", SESSIONS, ANN, QA, CFG, split="train")
    assert again.calls == traj.calls and again.states == traj.states  # deterministic
    assert {c["agent"] for c in traj.calls} == set(MEMORY_TYPES)


class FakeClient:
    model = "fake"

    def __init__(self, replies):
        self.replies = iter(replies)

    def chat(self, messages):
        return next(self.replies)


def test_api_expert_uses_valid_replies_and_counts_invalid_ones():
    replies = ['{"operations": [{"action": "APPEND", "content": "Jon was a banker."}]}', "not json",
               '{"operations": [{"action": "SKIP"}]}', '{"operations": []}'] * 2
    one = [session(1, ["I lost my banking job.", "Oh no!", "I will open a studio.", "Nice"], "2023-01-20T16:04:00")]
    traj = derive("c1", one, ANN, QA, CFG, client=FakeClient(replies))
    assert traj.metadata["source"] == "api" and traj.metadata["counts"]["api_invalid"] == 2
    invalid = [c for c in traj.calls if not c["valid"]]
    assert [c["agent"] for c in invalid] == ["episodic", "episodic"] and invalid[0]["ops"] == []
    assert "invalid JSON" in invalid[0]["error"]
    assert MemoryStore.from_snapshot(traj.states["final"]).core == "Jon was a banker.\nJon was a banker."


def test_real_locomo_conversation(small_locomo):
    """Derived from real annotations (5 conversations cut to 3 sessions): every agent acts, replay holds."""
    from lightmem_exp.data.locomo import read_locomo

    src = read_locomo(small_locomo)
    raw = json.loads(small_locomo.read_text())
    conv = raw[0]["sample_id"]
    events = locomo_events(raw)[conv]
    ann = Annotations([m for m in src.memories if m["conv_id"] == conv and m["kind"] == "observation"],
                      {m["session"]: m["text"] for m in src.memories
                       if m["conv_id"] == conv and m["kind"] == "session_summary"}, events)
    sessions = [s for s in src.sessions if s["conv_id"] == conv]
    qa = [q for q in src.qa if q["conv_id"] == conv]
    traj = derive(conv, sessions, ann, qa, ExpertConfig(search_mode="bm25"))
    counts = traj.metadata["counts"]
    for agent in ("core", "episodic", "semantic"):
        assert sum(v for k, v in counts.items() if k.startswith(f"ops/{agent}/")) > 0, agent
    assert traj.metadata["questions"] and all(parse_reply(c["agent"], c["reply"]).ok for c in traj.calls)
    assert counts.get("failed_ops", 0) == 0
