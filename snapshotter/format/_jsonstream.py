"""JSON tokens read from UTF-8 bytes with one window of text decoded at a time.

Only `format/_tocjson.py` uses it: a TOC decoded to one str at once would cost as much
memory again as its bytes (tens of MB for a large layer) at the daemon's peak.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["JsonStream"]

WINDOW = 64 * 1024  # bytes decoded per step: see _OUT_STEP in estargz.py
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonStream:
    """Values and punctuation of a JSON document, left to right.

    The document is `bytes`, or an iterable of byte pieces (as they are inflated), so
    that the whole document need never be in memory at once.

    `peek()` is the next non-blank char ("" at the end), `expect(chars)` consumes it if
    it is one of `chars`, `value()` decodes the next complete value. Errors are
    ValueError (UnicodeDecodeError for bad UTF-8, JSONDecodeError for bad JSON) or
    RecursionError; `offset` is the char position reached, for messages.

    A value cut by the window is decoded again once the window has grown (doubling, so
    a huge value costs linear time); an object, array or string that decodes is whole,
    and a number or literal counts only if something follows it.
    """

    def __init__(self, data: bytes | Iterable[bytes], *, window: int | None = None) -> None:
        self._window = max(1, window or WINDOW)
        self._pieces: Iterator[bytes | memoryview]
        if isinstance(data, bytes | bytearray | memoryview):
            view, step = memoryview(data), self._window
            self._pieces = (view[k : k + step] for k in range(0, len(view), step))
        else:
            self._pieces = iter(data)
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._ended = False  # every piece decoded
        self._text = ""  # decoded, not yet consumed (from _i on)
        self._i = 0
        self._dropped = 0  # chars consumed and dropped before _text

    @property
    def offset(self) -> int:
        return self._dropped + self._i

    def _more(self) -> bool:
        """Decode more pieces onto the text (at least as many bytes as the text still
        holds, so retries double); False when there were none left."""
        if self._ended:
            return False
        want = max(self._window, len(self._text) - self._i)
        texts = [self._text[self._i :]]
        got = 0
        while got < want:
            piece = next(self._pieces, None)
            if piece is None:
                self._ended = True
                texts.append(self._decoder.decode(b"", True))
                break
            got += len(piece)
            texts.append(self._decoder.decode(piece))
        self._dropped += self._i
        self._text = "".join(texts)
        self._i = 0
        return True

    def peek(self) -> str:
        while True:
            self._i = _WS.match(self._text, self._i).end()  # type: ignore[union-attr]
            if self._i < len(self._text) or not self._more():
                return self._text[self._i : self._i + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise ValueError(f"expected one of {chars!r} at char {self.offset}")
        self._i += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._i)
            except ValueError:
                if self._more():  # perhaps only cut short by the window
                    continue
                raise
            if end < len(self._text) or not self._more():
                self._i = end
                return value
