"""containerd's filter syntax for List/Walk, applied to snapshot `Info`.

Grammar (containerd/filters): a filter is selectors joined by `,` (AND); the request's
filters are OR'd. A selector is a field path (`name`, `labels."a.b"`, `labels.x`) alone
(presence) or followed by `==`, `!=` or `~=` (regexp) and a value, bare or quoted
("..." with Go escapes, or `/.../` for regexps).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter.core.types import Info, Kind
from snapshotter.errors import InvalidArgument

__all__ = ["Filter", "InvalidFilter", "parse_filters"]


class InvalidFilter(InvalidArgument):
    """A List filter that does not parse."""


@dataclass(frozen=True, slots=True)
class _Selector:
    path: tuple[str, ...]
    op: str  # "" for presence
    value: str
    regex: re.Pattern[str] | None = None

    def match(self, info: Info) -> bool:
        found, actual = _field(info, self.path)
        if self.op == "":
            return found
        if not found:
            return self.op == "!="
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        return self.regex.search(actual) is not None


def _field(info: Info, path: tuple[str, ...]) -> tuple[bool, str]:
    head = path[0]
    if head == "labels":
        key = ".".join(path[1:])
        if not key:
            return bool(info.labels), ""
        return (key in info.labels, info.labels.get(key, ""))
    if len(path) != 1:
        return False, ""
    if head == "name":
        return True, info.name
    if head == "parent":
        return True, info.parent
    if head == "kind":
        return True, _KIND_NAMES[info.kind]
    return False, ""


_KIND_NAMES = {
    Kind.UNKNOWN: "unknown",
    Kind.VIEW: "view",
    Kind.ACTIVE: "active",
    Kind.COMMITTED: "committed",
}

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<quoted>"(?:[^"\\]|\\.)*")
    | (?P<regexp>/(?:[^/\\]|\\.)*/)
    | (?P<op>==|!=|~=)
    | (?P<sep>[.,])
    | (?P<word>[^\s.,=!~"/]+)
    )""",
    re.X,
)

# After an operator, a bare value runs to the next ',' (it may hold '.', ':', '/', ...).
_VALUE = re.compile(
    r"""\s*(?:(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<regexp>/(?:[^/\\]|\\.)*/)|(?P<word>[^,\s"][^,]*))"""
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/"}


def _unquote(text: str, source: str) -> str:
    body = text[1:-1]
    out: list[str] = []
    it = iter(body)
    for ch in it:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(it, None)
        if nxt is None or nxt not in _ESCAPES:
            raise InvalidFilter(f"filter {source!r}: bad escape in {text}")
        out.append(_ESCAPES[nxt])
    return "".join(out)


def _tokens(source: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    while pos < len(source):
        if source[pos:].strip() == "":
            break
        pattern = _VALUE if out and out[-1][0] == "op" else _TOKEN
        m = pattern.match(source, pos)
        if m is None or m.end() == pos:
            raise InvalidFilter(f"filter {source!r}: unexpected input at offset {pos}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind).rstrip() if kind == "word" else m.group(kind)))
        pos = m.end()
    return out


def _parse_one(source: str) -> list[_Selector]:
    toks = _tokens(source)
    if not toks:
        raise InvalidFilter(f"filter {source!r}: empty filter")
    selectors: list[_Selector] = []
    i = 0
    while True:
        path: list[str] = []
        while True:
            if i >= len(toks) or toks[i][0] not in ("word", "quoted"):
                raise InvalidFilter(f"filter {source!r}: expected a field name")
            kind, text = toks[i]
            path.append(_unquote(text, source) if kind == "quoted" else text)
            i += 1
            if i < len(toks) and toks[i] == ("sep", "."):
                i += 1
                continue
            break
        op, value, regex = "", "", None
        if i < len(toks) and toks[i][0] == "op":
            op = toks[i][1]
            i += 1
            if i >= len(toks) or toks[i][0] not in ("word", "quoted", "regexp"):
                raise InvalidFilter(f"filter {source!r}: expected a value after {op}")
            kind, text = toks[i]
            i += 1
            value = text if kind == "word" else _unquote(text, source)
            if op == "~=":
                try:
                    regex = re.compile(value)
                except re.error as exc:
                    raise InvalidFilter(f"filter {source!r}: bad regexp: {exc}") from None
        selectors.append(_Selector(tuple(path), op, value, regex))
        if i == len(toks):
            return selectors
        if toks[i] != ("sep", ","):
            raise InvalidFilter(f"filter {source!r}: expected ',' at {toks[i][1]!r}")
        i += 1


Filter = Callable[[Info], bool]


def parse_filters(filters: Sequence[str]) -> Filter:
    """Compile List filters into one predicate; no filters (or only empty ones) match all."""
    alternatives = [_parse_one(f) for f in filters if f.strip()]
    if not alternatives:
        return lambda _info: True
    return lambda info: any(all(s.match(info) for s in alt) for alt in alternatives)
