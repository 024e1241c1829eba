"""Getting one JSON object out of a language model's reply, and checking it against the two backend schemas.

`extract_json_object(text)` returns the first JSON object of a reply, repaired; `loads_object(text)` parses it.
What the repair handles (every case is in tests/backends/test_json_repair.py):

- prose or a Markdown code fence around the object: the first `{` starts it, its matching `}` ends it and
  anything after that is dropped;
- single-quoted strings (`{'action': 'update'}`), Python literals (`None`, `True`, `False`) and bare keys
  (`{action: "ignore"}`);
- trailing commas (`{"a": 1,}`), missing commas between members, raw newlines inside strings;
- a truncated reply: an open string is closed, a dangling key, colon or comma is dropped (`"k":` becomes
  `"k": null`), then every open bracket is closed in order.

A quote only ends a string when the next non-space character is one of `: , } ]` (or the text ends), so an
apostrophe inside a single-quoted string (`'Caroline's dog'`) or a stray quote inside a value stays text.
Valid JSON never meets that ambiguity, so it comes out unchanged.

`validate_decision` and `validate_metadata` take a parsed object and return the canonical dict or raise
`SchemaError` saying what is wrong; they never fill in a missing value.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lightmem_exp.data.schema import UPDATE_ACTIONS, parse_update_decision

_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*")
_LITERALS = {"true": "true", "false": "false", "null": "null", "True": "true", "False": "false", "None": "null",
             "none": "null", "NULL": "null", "Null": "null"}
_NUMBER_RE = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_STOP = set(",:{}[]")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"'}

# Near-miss action names a model produces, mapped to the three canonical actions; anything else is rejected.
ACTION_ALIASES: dict[str, str] = {
    **dict.fromkeys(("update", "updated", "updates", "updating", "modify", "modified", "replace", "replaced",
                     "revise", "revised", "edit", "edited", "merge", "merged", "overwrite"), "update"),
    **dict.fromkeys(("delete", "deleted", "deletes", "deleting", "remove", "removed", "removes", "drop", "dropped",
                     "discard", "discarded", "forget", "erase"), "delete"),
    **dict.fromkeys(("ignore", "ignored", "ignores", "ignoring", "skip", "skipped", "keep", "kept", "none", "noop",
                     "no_op", "no_change", "nochange", "unchanged", "pass"), "ignore"),
}
_KEY_ALIASES = {"updatedtext": "updated_text", "updated": "updated_text", "newtext": "updated_text",
                "updatedmemory": "updated_text", "text": "updated_text"}
META_KEYS = ("topic", "entities", "timestamp")


class JsonRepairError(ValueError):
    """No JSON object could be recovered from the text."""


class SchemaError(ValueError):
    """A parsed object does not fit the expected schema."""


# ------------------------------------------------------------------------------------------------- extraction


def extract_json_object(text: str) -> str:
    """The first JSON object in `text` as a repaired JSON string; raises JsonRepairError when there is none."""
    if not isinstance(text, str):
        raise JsonRepairError(f"expected text, got {type(text).__name__}")
    body = _FENCE_RE.sub(" ", text)
    start = body.find("{")
    if start < 0:
        raise JsonRepairError("no '{' in the reply")
    return _Repairer(body, start).run()


def loads_object(text: str) -> tuple[dict, bool]:
    """`(object, repaired)`: the first JSON object of `text`; `repaired` says whether the raw text was not
    already exactly one JSON object (after stripping whitespace)."""
    fixed = extract_json_object(text)
    try:
        obj = json.loads(fixed)
    except json.JSONDecodeError as e:  # the repairer's output should always parse; say so plainly if not
        raise JsonRepairError(f"could not repair the reply into JSON: {e.msg}") from e
    if not isinstance(obj, dict):
        raise JsonRepairError("the reply's first JSON value is not an object")
    try:
        repaired = json.loads(text.strip()) != obj
    except json.JSONDecodeError:
        repaired = True
    return obj, repaired


class _Repairer:
    """One pass over the text: lenient tokens in, strict JSON out, with a stack of open brackets."""

    def __init__(self, text: str, start: int):
        self.s, self.i, self.n = text, start, len(text)
        self.out: list[str] = []
        self.stack: list[str] = []  # '{' or '['
        # What the last emitted token was, per open container: 'open', 'key', 'colon', 'value', 'comma'.
        self.last: list[str] = []

    def run(self) -> str:
        while self.i < self.n:
            c = self.s[self.i]
            if c.isspace():
                self.i += 1
            elif c in "{[":
                self._value_start()
                self.out.append(c)
                self.stack.append(c)
                self.last.append("open")
                self.i += 1
            elif c in "}]":
                self.i += 1
                if not self.stack:
                    continue
                self._close()
                if not self.stack:
                    return "".join(self.out)
            elif c == ",":
                self.i += 1
                if self.stack and self.last[-1] in ("value",):
                    self.out.append(",")
                    self.last[-1] = "comma"
            elif c == ":":
                self.i += 1
                if self.stack and self.stack[-1] == "{" and self.last[-1] == "key":
                    self.out.append(":")
                    self.last[-1] = "colon"
            elif c in "\"'":
                self._emit_scalar(self._string(c))
            else:
                self._emit_scalar(self._bare())
        # Truncated: drop what cannot stand, then close everything still open.
        while self.stack:
            self._close()
        return "".join(self.out)

    # -- structure

    def _expecting_key(self) -> bool:
        return bool(self.stack) and self.stack[-1] == "{" and self.last[-1] in ("open", "comma", "value")

    def _value_start(self) -> None:
        """Before a value: insert a missing comma (array) or a missing colon is not guessed."""
        if not self.stack:
            return
        if self.stack[-1] == "[" and self.last[-1] == "value":
            self.out.append(",")
        elif self.stack[-1] == "{" and self.last[-1] in ("open", "comma", "value"):
            # A container where a key belongs: only possible in broken text; give it an empty key placeholder.
            if self.last[-1] == "value":
                self.out.append(",")
            self.out.append('"":')
        self.last[-1] = "value"

    def _emit_scalar(self, token: str) -> None:
        if self._expecting_key():
            if self.last[-1] == "value":
                self.out.append(",")
            if not token.startswith('"'):
                token = json.dumps(token)
            self.out.append(token)
            self.last[-1] = "key"
            return
        if self.stack and self.stack[-1] == "{" and self.last[-1] == "key":  # missing colon
            self.out.append(":")
        self._value_start()
        self.out.append(token)

    def _close(self) -> None:
        kind, state = self.stack[-1], self.last[-1]
        if state == "comma":
            self.out.pop()
        elif state == "colon":
            self.out.append("null")
        elif state == "key":
            self._drop_last_key()
        self.out.append("}" if kind == "{" else "]")
        self.stack.pop()
        self.last.pop()
        if self.last:
            self.last[-1] = "value"

    def _drop_last_key(self) -> None:
        self.out.pop()  # the key itself
        if self.out and self.out[-1] == ",":
            self.out.pop()

    # -- scalars

    def _string(self, quote: str) -> str:
        """A string opened by `quote`, returned as a JSON string literal (the text is read to its end quote)."""
        self.i += 1
        chars: list[str] = []
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < self.n:
                self.i += self._escape(chars)
                continue
            if c == quote and self._ends_string(self.i + 1):
                self.i += 1
                return json.dumps("".join(chars), ensure_ascii=False)
            chars.append(c)
            self.i += 1
        return json.dumps("".join(chars), ensure_ascii=False)  # truncated inside the string

    def _escape(self, chars: list[str]) -> int:
        """Decode the escape at `self.i` into `chars`; returns how many characters it used."""
        nxt = self.s[self.i + 1]
        if nxt in _ESCAPES:
            chars.append(_ESCAPES[nxt])
            return 2
        hexdigits = self.s[self.i + 2 : self.i + 6]
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", hexdigits):
            chars.append(chr(int(hexdigits, 16)))
            return 6
        chars.append(nxt)  # an escape JSON does not know (\' included): keep the character, drop the backslash
        return 2

    def _ends_string(self, j: int) -> bool:
        while j < self.n and self.s[j].isspace():
            j += 1
        if j >= self.n or self.s[j] in _STOP:
            return True
        # `"a" "b"` (a missing comma): a quote after whitespace also ends it.
        return self.s[j] in "\"'" and self.s[j - 1].isspace()

    def _bare(self) -> str:
        """An unquoted run: a number, a literal, or a bare word (quoted as a string)."""
        j = self.i
        while j < self.n and not self.s[j].isspace() and self.s[j] not in _STOP and self.s[j] not in "\"'":
            j += 1
        word = self.s[self.i : j]
        self.i = j
        if word in _LITERALS:
            return _LITERALS[word]
        if _NUMBER_RE.fullmatch(word):
            return word
        return json.dumps(word, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------- schemas


def normalise_action(value: Any) -> str:
    """One of `UPDATE_ACTIONS` from a near-miss name ("UPDATE", "updated", "remove", "skip"); SchemaError else."""
    if not isinstance(value, str):
        raise SchemaError(f"action must be a string, got {value!r}")
    key = re.sub(r"[\s\-]+", "_", value.strip().strip(".!\"'`").lower())
    if key in ACTION_ALIASES:
        return ACTION_ALIASES[key]
    raise SchemaError(f"unknown action {value!r}; expected one of {list(UPDATE_ACTIONS)}")


def validate_decision(obj: Any) -> dict:
    """`{"action", "updated_text"}` as the data stage's schema wants it (checked by `parse_update_decision`).

    Keys match case-insensitively and a few aliases of updated_text are accepted; other keys are dropped.
    "update" needs a non-empty updated_text (never invented); for "delete"/"ignore" any text is dropped.
    """
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
    fields: dict[str, Any] = {}
    for k, v in obj.items():
        key = re.sub(r"[\s\-]+", "_", str(k).strip().lower())
        key = _KEY_ALIASES.get(key.replace("_", ""), key)
        if key in ("action", "updated_text") and key not in fields:
            fields[key] = v
    if "action" not in fields:
        raise SchemaError('missing "action"')
    action = normalise_action(fields["action"])
    text = fields.get("updated_text")
    if action == "update":
        if not isinstance(text, str) or not text.strip():
            raise SchemaError('"update" needs a non-empty string updated_text')
        text = text.strip()
    else:
        text = None
    decision = {"action": action, "updated_text": text}
    try:
        return parse_update_decision(json.dumps(decision, ensure_ascii=False))
    except ValueError as e:  # pragma: no cover - the checks above mirror it; keep the two from drifting apart
        raise SchemaError(str(e)) from e


def validate_metadata(obj: Any) -> dict:
    """`{"topic": str, "entities": [str], "timestamp": str | null}` (see `local_hf_lora.META_SYSTEM`).

    All three keys are required. A single entity given as a string becomes a one-item list, entities are
    stripped and de-duplicated in order, and an empty timestamp string means null.
    """
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    missing = [k for k in META_KEYS if k not in lowered]
    if missing:
        raise SchemaError(f"missing {missing}")
    topic = lowered["topic"]
    if not isinstance(topic, str) or not topic.strip():
        raise SchemaError("topic must be a non-empty string")
    entities = lowered["entities"]
    if isinstance(entities, str):
        entities = [entities]
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise SchemaError("entities must be a list of strings")
    clean = list(dict.fromkeys(e.strip() for e in entities if e.strip()))
    ts = lowered["timestamp"]
    if isinstance(ts, str) and not ts.strip():
        ts = None
    if ts is not None and not isinstance(ts, str):
        raise SchemaError("timestamp must be a string or null")
    return {"topic": topic.strip(), "entities": clean, "timestamp": ts.strip() if ts else None}
