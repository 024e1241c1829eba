"""Agent prompts: rendered from the memory state and the chunk, each agent seeing its own type."""

from lightmem_exp.memory.prompts import SYSTEM_PROMPTS, agent_messages, render_turns, shown_entries
from lightmem_exp.memory.store import MEMORY_TYPES, MemoryStore

TURNS = [{"speaker": "Jon", "dia_id": "D2:1", "text": "I opened my dance studio!", "image_caption": None},
         {"speaker": "Gina", "dia_id": "D2:2", "text": "Wow!", "image_caption": "a dance floor"}]


def test_render_turns_with_captions():
    assert render_turns(TURNS) == "Jon: I opened my dance studio!\nGina: Wow! [shares a photo: a dance floor]"


def test_each_agent_sees_its_own_memory_and_the_dialogue():
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Jon is a former banker.")
    s.insert("episodic", "Jon lost his job.", {"timestamp": "2023-01-19T10:00:00"})
    s.insert("semantic", "Door Dash - Gina's former employer")
    for t in MEMORY_TYPES:
        messages, shown = agent_messages(t, s, TURNS, session=2, timestamp="2023-01-29T16:04:00", shown=4)
        assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM_PROMPTS[t]
        user = messages[1]["content"]
        assert "Session 2, 2023-01-29 16:04 (turns D2:1 to D2:2)." in user and user.endswith(render_turns(TURNS))
        assert ("Jon is a former banker." in user) == (t == "core")
        assert ("[ep-1] 2023-01-19: Jon lost his job." in user) == (t == "episodic")
        assert ("[sem-1] Door Dash" in user) == (t == "semantic")
        assert shown == {"core": [], "episodic": ["ep-1"], "semantic": ["sem-1"], "procedural": []}[t]
    assert "(none)" in agent_messages("procedural", s, TURNS, session=2, timestamp=None, shown=4)[0][1]["content"]


def test_only_the_most_relevant_entries_are_shown_when_there_are_many():
    s = MemoryStore(search_mode="bm25")
    for text in ("Gina likes jazz.", "Jon runs a dance studio.", "Gina's dog is Max.", "Jon studied finance."):
        s.insert("semantic", text)
    assert shown_entries(s, "semantic", render_turns(TURNS), 1) == ["sem-2"]
    assert shown_entries(s, "semantic", "x", 4) == ["sem-1", "sem-2", "sem-3", "sem-4"]
