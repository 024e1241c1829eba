"""General SFT pool: every `*.jsonl` / `*.json` file in `sft_dir`, normalised to plain chats.

Files are read in sorted name order; other files are ignored (counted as `sft_file_ignored`).

`*.jsonl` (LLaMA-Factory reasoning format, one `{"messages": [...], "tools": "<json>"}` per line;
a message's `content` is a str or a list of `{type, value}` parts) is rendered so that every
chat template accepts it:
- assistant: all `reasoning` parts joined by "\\n" become `<think>\\n...\\n</think>\\n\\n` at the start
  of the content, then the `text` parts, then each `tool_call` as
  `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, separated by "\\n";
- `tool` messages become a `user` message `<tool_response>\\n...\\n</tool_response>` (consecutive
  ones are merged), so roles stay system/user/assistant and keep alternating;
- a non-empty `tools` list is appended to the system message (one is created if absent) as
  `# Tools` + one JSON spec per line inside `<tools>...</tools>`.
`*.json` holds a list: Alpaca items (`user = instruction (+ "\\n" + input)`, `assistant = output`)
or items with a `messages` list (rendered as above).
A chat with no non-empty assistant message is skipped and counted (`sft_skipped_no_assistant`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lightmem_exp.artifacts import iter_jsonl, read_json
from lightmem_exp.data.schema import ChatMessage, expect
from lightmem_exp.errors import DataError

_ROLES = ("system", "user", "assistant", "tool")


def _parts(path: Path, content: object, where: str, line: int | None) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise DataError(path, f"content must be a str or a list of parts, got {type(content).__name__}",
                        line=line, field=where)
    parts = []
    for k, p in enumerate(content):
        if not (isinstance(p, dict) and isinstance(p.get("type"), str) and isinstance(p.get("value"), str)):
            raise DataError(path, "a content part must be {type: str, value: str}", line=line, field=f"{where}[{k}]")
        if p["type"] not in ("text", "reasoning", "tool_call"):
            raise DataError(path, f"unknown part type {p['type']!r}", line=line, field=f"{where}[{k}].type")
        parts.append((p["type"], p["value"]))
    return parts


def _tool_call(value: str, quirks: Counter) -> str:
    try:  # re-serialise compactly so equal calls render identically
        value = json.dumps(json.loads(value), ensure_ascii=False)
    except json.JSONDecodeError:
        quirks["sft_tool_call_not_json"] += 1
    return f"<tool_call>\n{value}\n</tool_call>"


def _render_assistant(parts: list[tuple[str, str]], quirks: Counter) -> str:
    thoughts = [v.strip() for t, v in parts if t == "reasoning" and v.strip()]
    body = [v.strip() if t == "text" else _tool_call(v, quirks) for t, v in parts if t != "reasoning"]
    head = f"<think>\n{chr(10).join(thoughts)}\n</think>\n\n" if thoughts else ""
    return head + "\n".join(b for b in body if b)


def _tools_block(path: Path, tools: object, where: str, line: int | None) -> str:
    if isinstance(tools, str):
        if not tools.strip():
            return ""
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(path, f"tools is not a JSON string: {e.msg}", line=line, field=where) from e
    if not tools:
        return ""
    if not isinstance(tools, list):
        raise DataError(path, "tools must be a list of function specs", line=line, field=where)
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\nYou may call one or more functions. Available tools:\n<tools>\n" + specs + "\n</tools>\n"
            'To call a function, reply with <tool_call>\n{"name": <function-name>, "arguments": <args-object>}\n'
            "</tool_call>")


def render_chat(path: Path, row: dict, where: str, quirks: Counter, line: int | None = None) -> list[ChatMessage]:
    """Render one `{"messages": [...], "tools"?: ...}` record as system/user/assistant messages."""
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise DataError(path, "expected a 'messages' list", line=line, field=f"{where}messages")
    out: list[ChatMessage] = []
    for k, m in enumerate(msgs):
        mw = f"{where}messages[{k}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise DataError(path, f"a message must have a role in {_ROLES}", line=line, field=f"{mw}.role")
        parts = _parts(path, m.get("content"), f"{mw}.content", line)
        if m["role"] == "assistant":
            out.append({"role": "assistant", "content": _render_assistant(parts, quirks)})
            continue
        text = "\n".join(v.strip() for _, v in parts)
        if m["role"] == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + text
                continue
            out.append({"role": "user", "content": text})
        else:
            out.append({"role": m["role"], "content": text})
    tools = _tools_block(path, row.get("tools", ""), f"{where}tools", line)
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{tools}".strip()
        else:
            out.insert(0, {"role": "system", "content": tools})
    return out


def alpaca_chat(path: Path, item: dict, where: str) -> list[ChatMessage]:
    """Alpaca `{instruction, input, output}` -> [user, assistant]."""
    for key in ("instruction", "output"):
        if key not in item:
            raise DataError(path, f"Alpaca item lacks '{key}'", field=f"{where}{key}")
    instruction = expect(item["instruction"], str, path, f"{where}instruction").strip()
    extra = expect(item.get("input") or "", str, path, f"{where}input").strip()
    output = expect(item["output"], str, path, f"{where}output").strip()
    user = f"{instruction}\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _read_file(path: Path, quirks: Counter) -> list[list[ChatMessage]]:
    chats: list[list[ChatMessage]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:  # line numbers for errors inside valid JSON lines
            lines = [n for n, text in enumerate(f, start=1) if text.strip()]
        for n, row in zip(lines, iter_jsonl(path), strict=True):
            chats.append(render_chat(path, row, "", quirks, line=n))
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(path, f"expected a JSON list of samples, got {type(data).__name__}", field="(top level)")
        for i, item in enumerate(data):
            expect(item, dict, path, f"[{i}]")
            where = f"[{i}]."
            chats.append(render_chat(path, item, where, quirks) if "messages" in item else alpaca_chat(path, item, where))
    usable = []
    for chat in chats:
        if any(m["role"] == "assistant" and m["content"].strip() for m in chat):
            usable.append(chat)
        else:
            quirks["sft_skipped_no_assistant"] += 1
    if not usable:
        raise DataError(path, "no usable SFT sample (every item lacks an assistant reply)")
    return usable


def _caps(sizes: list[int], max_total: int | None) -> list[int]:
    """Per-file caps summing to min(max_total, total), proportional to file size (largest remainder),
    so a cap keeps the mix of sources instead of filling up from the alphabetically first file."""
    total = sum(sizes)
    if max_total is None or max_total >= total:
        return sizes
    raw = [s * max_total / total for s in sizes]
    caps = [int(r) for r in raw]
    by_remainder = sorted(range(len(sizes)), key=lambda k: (-(raw[k] - caps[k]), k))
    for k in by_remainder[: max_total - sum(caps)]:
        caps[k] += 1
    return caps


def read_sft_pool(sft_dir: str | Path, max_sft: int | None = None) -> tuple[list[dict], Counter]:
    """Rows `{index, source, messages, has_think}` (no n_tokens yet) and the quirk counter.

    With `max_sft`, each file keeps its first rows, its share proportional to its size.
    """
    sft_dir = Path(sft_dir)
    if not sft_dir.is_dir():
        raise DataError(sft_dir, "SFT directory not found")
    if max_sft is not None and max_sft < 0:
        raise DataError(sft_dir, f"max_sft must be >= 0, got {max_sft}")
    quirks: Counter = Counter()
    files = []
    for p in sorted(sft_dir.iterdir()):
        if p.is_file() and p.suffix in (".json", ".jsonl"):
            files.append((p.name, _read_file(p, quirks)))
        elif p.is_file():
            quirks["sft_file_ignored"] += 1
    if not files:
        raise DataError(sft_dir, "no *.json or *.jsonl SFT file in the directory")
    rows: list[dict] = []
    for (name, chats), cap in zip(files, _caps([len(c) for _, c in files], max_sft), strict=True):
        for chat in chats[:cap]:
            has_think = any(m["role"] == "assistant" and m["content"].startswith("<think>") for m in chat)
            rows.append({"index": len(rows), "source": name, "messages": chat, "has_think": has_think})
    return rows, quirks
