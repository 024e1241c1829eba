"""The multi-type memory store of the adrpo stage: core / episodic / semantic / procedural memory, the agents'
JSON operations on it, hybrid search, and the agents' prompts."""

from lightmem_exp.memory.ops import (
    ACTIONS,
    ApplyReport,
    Op,
    OpFormatError,
    ParsedReply,
    apply_ops,
    parse_reply,
    render_reply,
    reply_schema,
    tool_schemas,
)
from lightmem_exp.memory.prompts import SYSTEM_PROMPTS, agent_messages, render_turns
from lightmem_exp.memory.store import MEMORY_TYPES, Entry, Hit, MemoryOpError, MemoryStore, TextEmbedder, words

__all__ = [
    "ACTIONS", "MEMORY_TYPES", "SYSTEM_PROMPTS", "ApplyReport", "Entry", "Hit", "MemoryOpError", "MemoryStore", "Op",
    "OpFormatError", "ParsedReply", "TextEmbedder", "agent_messages", "apply_ops", "parse_reply", "render_reply",
    "render_turns", "reply_schema", "tool_schemas", "words",
]
