"""Prompts of the four memory agents, rendered from the memory state and a piece of dialogue.

Every agent sees the state *before* the dialogue chunk (all four work from the same state, as independent calls)
and the chunk itself. Core memory is shown whole; of the other types, the agent's own entries are shown with
their ids (all of them when there are at most `shown`, else the `shown` most relevant to the chunk by BM25), so
UPDATE / MERGE can name them. The reply format is the one `memory.ops` parses. Rendering uses BM25 alone because
it runs for every agent call: embedding each chunk's dialogue with MiniLM cost ~40 s of the stage's expert phase
on 2 loaded cores (measured), while answering keeps the store's full hybrid search.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightmem_exp.memory.store import MemoryStore

_FORMAT = ('Reply with one JSON object and nothing else: {"operations": [...]}. Use {"operations": []} when '
           "nothing needs to change.")
SYSTEM_PROMPTS: dict[str, str] = {
    "core": (
        "You are the Core Memory Manager. Core memory is a short block of lasting facts about the people in the "
        "conversation (identity, work, family, home, long-term preferences), one fact per line. Operations: "
        '{"action": "APPEND", "content": "<new fact>"}, {"action": "REPLACE", "old": "<exact text in core memory>", '
        '"new": "<corrected text>"}, {"action": "REWRITE", "content": "<the whole condensed core memory>"}. '
        "Keep it short. " + _FORMAT),
    "episodic": (
        "You are the Episodic Memory Manager. Episodic memory holds time-stamped events: what happened, to whom and "
        'when. Operations: {"action": "ADD", "content": "<event>", "timestamp": "<YYYY-MM-DD>"}, '
        '{"action": "UPDATE", "id": "<id>", "content": "<event>"}, {"action": "MERGE", "ids": ["<id>", "<id>"], '
        '"content": "<merged event>"}. ' + _FORMAT),
    "semantic": (
        "You are the Semantic Memory Manager. Semantic memory holds knowledge about entities and concepts: people, "
        'places, things, topics and their properties. Operations: {"action": "ADD", "content": "<fact>"}, '
        '{"action": "UPDATE", "id": "<id>", "content": "<fact>"}, {"action": "SKIP"}. ' + _FORMAT),
    "procedural": (
        "You are the Procedural Memory Manager. Procedural memory holds routines, habits and how someone does "
        'things, step by step. Operations: {"action": "ADD", "content": "<routine>"}, {"action": "UPDATE", '
        '"id": "<id>", "content": "<routine>"}. ' + _FORMAT),
}
TITLES = {"episodic": "episodic memories", "semantic": "semantic memories", "procedural": "procedural memories"}


def render_turns(turns: Sequence[dict]) -> str:
    """`Speaker: text` per turn; a shared image appears as its caption."""
    lines = []
    for t in turns:
        text = t["text"]
        if t.get("image_caption"):
            text = f"{text} [shares a photo: {t['image_caption']}]"
        lines.append(f"{t['speaker']}: {text}")
    return "\n".join(lines)


def shown_entries(store: MemoryStore, type: str, dialogue: str, shown: int) -> list[str]:
    """Ids of the `type` entries the agent sees (see the module docstring)."""
    entries = store.of_type(type)
    if len(entries) <= shown:
        return [e.id for e in entries]
    return [h.id for h in store.search(dialogue, shown, types=[type], mode="bm25")]


def render_user_prompt(type: str, store: MemoryStore, turns: Sequence[dict], *, session: int | str,
                       timestamp: str | None, shown: int) -> tuple[str, list[str]]:
    """`(user prompt, ids of the entries shown)` for the `type` agent."""
    dialogue = render_turns(turns)
    when = (timestamp or "unknown date").replace("T", " ")[:16]
    ids = [t["dia_id"] for t in turns]
    parts = [f"Session {session}, {when} (turns {ids[0]} to {ids[-1]})." if ids else f"Session {session}, {when}."]
    if type == "core":
        parts.append("Current core memory:\n" + (store.core or "(empty)"))
        shown_ids: list[str] = []
    else:
        shown_ids = shown_entries(store, type, dialogue, shown)
        lines = []
        for eid in shown_ids:
            e = store.get(eid)
            stamp = e.meta.get("timestamp")
            lines.append(f"[{eid}] {stamp[:10] + ': ' if stamp else ''}{e.content}")
        parts.append(f"Current {TITLES[type]}:\n" + ("\n".join(lines) if lines else "(none)"))
    parts.append("New dialogue:\n" + dialogue)
    return "\n\n".join(parts), shown_ids


def agent_messages(type: str, store: MemoryStore, turns: Sequence[dict], *, session: int | str,
                   timestamp: str | None, shown: int) -> tuple[list[dict], list[str]]:
    """`(chat messages [system, user], shown ids)` of one agent call."""
    user, shown_ids = render_user_prompt(type, store, turns, session=session, timestamp=timestamp, shown=shown)
    return [{"role": "system", "content": SYSTEM_PROMPTS[type]}, {"role": "user", "content": user}], shown_ids
