"""Field checks for the typed configs: each raises ConfigError naming the field, relative to its block (the builder in
`lightmem_exp.config.typed` prefixes the block's address)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from lightmem_exp.errors import ConfigError


def _fail(name: str, value: object, expect: str) -> None:
    raise ConfigError(name, f"got {value!r}, expected {expect}")


def _pending(value: object) -> bool:
    """An interpolation not resolved yet: defaults are built once at import with `${...}` left as text."""
    return isinstance(value, str) and value.startswith("${")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def int_min(obj: object, name: str, lo: int, *, optional: bool = False) -> None:
    """`obj.name` is an integer >= lo (or null when `optional`)."""
    v = getattr(obj, name)
    if (v is None and optional) or _pending(v):
        return
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        _fail(name, v, f"{'null or ' if optional else ''}an integer >= {lo}")


def number(obj: object, name: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, optional: bool = False) -> None:
    """`obj.name` is a finite number within the given bounds (or null when `optional`)."""
    v = getattr(obj, name)
    if (v is None and optional) or _pending(v):
        return
    ok = _is_number(v) and (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) \
        and (le is None or v <= le)
    if not ok:
        lower = f"> {gt}" if gt is not None else f">= {ge}" if ge is not None else ""
        upper = f"< {lt}" if lt is not None else f"<= {le}" if le is not None else ""
        _fail(name, v, f"{'null or ' if optional else ''}a number {' and '.join(b for b in (lower, upper) if b)}")


def one_of(obj: object, name: str, choices: Collection[str]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        _fail(name, v, f"one of {list(choices)}")


def int_list(obj: object, name: str, lo: int) -> None:
    """A non-empty list of integers >= lo."""
    v = getattr(obj, name)
    if not (isinstance(v, Sequence) and v and all(isinstance(k, int) and not isinstance(k, bool) and k >= lo
                                                  for k in v)):
        _fail(name, v, f"a non-empty list of integers >= {lo}")


def subset(obj: object, name: str, choices: Collection[str]) -> None:
    """A non-empty list of distinct values from `choices`."""
    v = getattr(obj, name)
    if not (isinstance(v, Sequence) and v and len(set(v)) == len(v) and set(v) <= set(choices)):
        _fail(name, v, f"a non-empty list of distinct values from {list(choices)}")


def text(obj: object, name: str, *, optional: bool = False, url: bool = False) -> None:
    """A non-blank string (an http(s) URL when `url`)."""
    v = getattr(obj, name)
    if v is None and optional:
        return
    ok = isinstance(v, str) and v.strip() and (not url or v.startswith(("http://", "https://")))
    if not ok:
        _fail(name, v, f"{'null or ' if optional else ''}{'an http(s) URL' if url else 'a non-blank string'}")
