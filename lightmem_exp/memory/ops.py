"""Agent operations on the memory store: their JSON schemas, parsing a model's reply, and applying them.

An agent replies with one JSON object `{"operations": [<op>, ...]}`; an empty list changes nothing. Operations
per memory type (fields besides `action`; all strings unless said otherwise):

| type       | action  | fields              | effect                                                              |
|------------|---------|---------------------|---------------------------------------------------------------------|
| core       | APPEND  | content             | adds `content` as a new line of the core block                     |
| core       | REPLACE | old, new            | replaces the first occurrence of `old` in the block by `new`        |
| core       | REWRITE | content             | the block becomes `content`                                         |
| episodic   | ADD     | content, timestamp? | a new event; timestamp defaults to the session's                    |
| episodic   | UPDATE  | id, content         | replaces the content of episodic entry `id`                         |
| episodic   | MERGE   | ids (>= 2), content | deletes entries `ids`, adds `content` (their latest timestamp)      |
| semantic   | ADD     | content             | a new entity/concept entry                                          |
| semantic   | UPDATE  | id, content         | replaces the content of semantic entry `id`                         |
| semantic   | SKIP    | -                   | nothing new (an explicit no-op)                                     |
| procedural | ADD     | content             | a new routine                                                       |
| procedural | UPDATE  | id, content         | replaces the content of procedural entry `id`                       |

`reply_schema(type)` is the JSON Schema of a whole reply and `tool_schemas(type)` the same operations as
OpenAI-style function tools; `validate_reply` checks a parsed object against `reply_schema` itself (one source of
truth). `parse_reply` = JSON extraction and repair (`backends.json_repair`) + that validation: a reply that fails
either is a *format* failure (the RL format penalty). An operation that is well-formed but cannot apply (an
unknown id, over the core limit, `old` not in the block) is skipped by `apply_ops` and counted as failed; the
rest of the reply still applies, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lightmem_exp.backends.json_repair import JsonRepairError, loads_object
from lightmem_exp.memory.store import CORE_ID, MEMORY_TYPES, MemoryOpError, MemoryStore, words

_STR = {"type": "string", "minLength": 1}
_CONTENT = {"content": _STR}
ACTIONS: dict[str, dict[str, dict[str, dict]]] = {
    "core": {"APPEND": _CONTENT, "REPLACE": {"old": _STR, "new": _STR}, "REWRITE": _CONTENT},
    "episodic": {"ADD": {**_CONTENT, "timestamp": {"type": ["string", "null"]}},
                 "UPDATE": {"id": _STR, **_CONTENT},
                 "MERGE": {"ids": {"type": "array", "items": _STR, "minItems": 2}, **_CONTENT}},
    "semantic": {"ADD": _CONTENT, "UPDATE": {"id": _STR, **_CONTENT}, "SKIP": {}},
    "procedural": {"ADD": _CONTENT, "UPDATE": {"id": _STR, **_CONTENT}},
}
OPTIONAL = {("episodic", "ADD"): {"timestamp"}}
DESCRIPTIONS = {
    "APPEND": "Append a new line of persistent user facts to the core memory block.",
    "REPLACE": "Replace an exact piece of text in the core memory block by new text.",
    "REWRITE": "Rewrite the whole core memory block (to condense it or fix it).",
    "ADD": "Add a new memory entry.",
    "UPDATE": "Replace the content of the existing entry with this id.",
    "MERGE": "Merge the entries with these ids into one entry with this content.",
    "SKIP": "Nothing new to store.",
}


class OpFormatError(ValueError):
    """A reply that is not a valid operations object for its agent."""


@dataclass(frozen=True)
class Op:
    action: str
    fields: dict

    def to_dict(self) -> dict:
        return {"action": self.action, **self.fields}


@dataclass
class ParsedReply:
    ok: bool
    ops: list[Op] = field(default_factory=list)
    error: str | None = None
    repaired: bool = False  # the JSON needed repair or the action's case was normalised


@dataclass
class ApplyReport:
    applied: int = 0
    failed: int = 0
    written_words: int = 0  # words of content written by the applied operations
    errors: list[str] = field(default_factory=list)


# ---- schemas ---------------------------------------------------------------------------------------------------


def action_schema(type: str, action: str) -> dict:
    """JSON Schema of one operation object (with its `action`)."""
    props = ACTIONS[type][action]
    optional = OPTIONAL.get((type, action), set())
    return {"type": "object", "properties": {"action": {"const": action}, **props},
            "required": ["action", *[k for k in props if k not in optional]], "additionalProperties": False}


def reply_schema(type: str) -> dict:
    """JSON Schema of a whole reply of the `type` agent."""
    _check(type)
    return {"type": "object", "required": ["operations"], "additionalProperties": False,
            "properties": {"operations": {"type": "array",
                                          "items": {"oneOf": [action_schema(type, a) for a in ACTIONS[type]]}}}}


def tool_schemas(type: str) -> list[dict]:
    """The operations of the `type` agent as OpenAI-style function tools (`<type>_<action>`)."""
    _check(type)
    tools = []
    for action in ACTIONS[type]:
        params = action_schema(type, action)
        params = {**params, "properties": {k: v for k, v in params["properties"].items() if k != "action"},
                  "required": [k for k in params["required"] if k != "action"]}
        tools.append({"type": "function", "function": {"name": f"{type}_{action.lower()}",
                                                        "description": DESCRIPTIONS[action], "parameters": params}})
    return tools


def check_schema(value: Any, schema: dict, where: str = "$") -> None:
    """Validate `value` against the JSON Schema subset the reply schemas use; OpFormatError names the path."""
    if "oneOf" in schema:
        errors = []
        for sub in schema["oneOf"]:
            try:
                check_schema(value, sub, where)
                return
            except OpFormatError as e:
                errors.append(str(e))
        action = value.get("action") if isinstance(value, dict) else None
        for sub, err in zip(schema["oneOf"], errors, strict=True):  # report the branch the action names
            if sub.get("properties", {}).get("action", {}).get("const") == action:
                raise OpFormatError(err)
        allowed = [s["properties"]["action"]["const"] for s in schema["oneOf"]]
        raise OpFormatError(f"{where}.action: {action!r} is not one of {allowed}")
    if "const" in schema and value != schema["const"]:
        raise OpFormatError(f"{where}: expected {schema['const']!r}, got {value!r}")
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        if not any(_is_type(value, t) for t in types):
            raise OpFormatError(f"{where}: expected {' or '.join(types)}, got {type(value).__name__}")
    if isinstance(value, str) and len(value.strip()) < schema.get("minLength", 0):
        raise OpFormatError(f"{where}: must be a non-empty string")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise OpFormatError(f"{where}: needs at least {schema['minItems']} items")
        for i, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise OpFormatError(f"{where}: missing {key!r}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise OpFormatError(f"{where}: unexpected keys {extra}")
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{where}.{key}")


def _is_type(value: Any, name: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "null": value is None}[name]


# ---- parsing -----------------------------------------------------------------------------------------------------


def validate_reply(type: str, obj: Any) -> tuple[list[Op], bool]:
    """`(ops, normalised)` of a parsed reply; actions match case-insensitively (`normalised` says one was
    re-cased). Raises OpFormatError."""
    _check(type)
    normalised = False
    if isinstance(obj, dict) and isinstance(obj.get("operations"), list):
        ops = []
        for op in obj["operations"]:
            if isinstance(op, dict) and isinstance(op.get("action"), str) and op["action"] != op["action"].upper():
                op = {**op, "action": op["action"].strip().upper()}
                normalised = True
            ops.append(op)
        obj = {**obj, "operations": ops}
    check_schema(obj, reply_schema(type))
    return [Op(o["action"], {k: v for k, v in o.items() if k != "action"}) for o in obj["operations"]], normalised


def parse_reply(type: str, text: str) -> ParsedReply:
    """A model's reply text -> operations; never raises (a failure is `ok=False` with the reason)."""
    try:
        obj, repaired = loads_object(text)
    except JsonRepairError as e:
        return ParsedReply(ok=False, error=f"invalid JSON: {e}")
    try:
        ops, normalised = validate_reply(type, obj)
    except OpFormatError as e:
        return ParsedReply(ok=False, error=f"schema: {e}", repaired=repaired)
    return ParsedReply(ok=True, ops=ops, repaired=repaired or normalised)


def render_reply(ops: list[Op]) -> str:
    """The canonical reply text of `ops` (what expert calls are trained on)."""
    return json.dumps({"operations": [op.to_dict() for op in ops]}, ensure_ascii=False)


# ---- applying ----------------------------------------------------------------------------------------------------


def apply_ops(store: MemoryStore, type: str, ops: list[Op], *, timestamp: str | None = None) -> ApplyReport:
    """Apply the `type` agent's operations to `store` in order, in place; see the module docstring."""
    _check(type)
    report = ApplyReport()
    for i, op in enumerate(ops):
        try:
            report.written_words += _apply_one(store, type, op, timestamp)
            report.applied += 1
        except MemoryOpError as e:
            report.failed += 1
            report.errors.append(f"operation {i} ({op.action}): {e}")
    return report


def _apply_one(store: MemoryStore, type: str, op: Op, timestamp: str | None) -> int:
    f = op.fields
    if op.action not in ACTIONS[type]:
        raise MemoryOpError(f"{op.action} is not an operation of the {type} agent")
    if type == "core":
        if op.action == "APPEND":
            store.insert("core", f["content"])
            return words(f["content"])
        if op.action == "REPLACE":
            if f["old"] not in store.core:
                raise MemoryOpError(f"{f['old']!r} does not occur in the core block")
            store.update(CORE_ID, store.core.replace(f["old"], f["new"], 1))
            return words(f["new"])
        store.update(CORE_ID, f["content"])  # REWRITE
        return words(f["content"])
    if op.action == "SKIP":
        return 0
    if op.action == "ADD":
        meta = {"timestamp": f.get("timestamp") or timestamp} if type == "episodic" else {}
        store.insert(type, f["content"], meta)
        return words(f["content"])
    if op.action == "UPDATE":
        _same_type(store, f["id"], type)
        store.update(f["id"], f["content"])
        return words(f["content"])
    # MERGE (episodic)
    ids = list(dict.fromkeys(f["ids"]))
    if len(ids) < 2:
        raise MemoryOpError("MERGE needs at least two distinct ids")
    entries = [_same_type(store, i, type) for i in ids]
    stamps = sorted(s for s in (e.meta.get("timestamp") for e in entries) if s)
    for i in ids:
        store.delete(i)
    store.insert(type, f["content"], {"timestamp": stamps[-1] if stamps else timestamp, "merged": ids})
    return words(f["content"])


def _same_type(store: MemoryStore, id: str, type: str):
    entry = store.get(id)
    if entry.type != type:
        raise MemoryOpError(f"{id!r} is a {entry.type} memory, not {type}")
    return entry


def _check(type: str) -> None:
    if type not in MEMORY_TYPES:
        raise ValueError(f"unknown memory type {type!r}; expected one of {MEMORY_TYPES}")
