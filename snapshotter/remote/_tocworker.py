"""The TOC parser's worker process (see tocparse.py).

Requests arrive on stdin, one at a time, as length-prefixed pickles of
`(staged_member_path, result_path, parse_kwargs, build)`; for each, the worker parses the
staged TOC member, pickles the `Toc` (or `build(toc)`, when `build` is not None: a function
pickled by name) to `result_path` and answers on stdout with
`("ok", None)`, `("error", exception)` or `("failed", text)` (an error it cannot send, the
daemon then parses the member itself to raise it). It exits when stdin closes.

Its arguments name modules to import before the first request: what `build` needs,
which would otherwise be imported on the first Prepare's path (~15 ms).
"""

from __future__ import annotations

import importlib
import pickle
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from snapshotter.format.toc import Toc
from snapshotter.remote.tocstore import parse_staged

HEADER = struct.Struct("!I")


def read_frame(stream: BinaryIO) -> bytes | None:
    """One frame's payload, or None at a clean end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def answer(
    staged: str, result: str, kwargs: dict[str, object], build: Callable[[Toc], object] | None
) -> bytes:
    try:
        made = parse_staged(Path(staged), build=build, **kwargs)  # type: ignore[arg-type]
        with open(result, "wb") as f:
            pickle.dump(made, f, protocol=pickle.HIGHEST_PROTOCOL)
        reply: tuple[str, object] = ("ok", None)
    except Exception as exc:
        reply = ("error", exc)
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return pickle.dumps(("failed", repr(reply[1])), protocol=pickle.HIGHEST_PROTOCOL)


def main() -> int:
    # Its life is its pipe: it ends when the daemon closes stdin (or dies). A Ctrl-C in a
    # terminal or systemd's SIGTERM to the unit's cgroup is for the daemon, which would
    # otherwise log this process's death as a failure while it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for module in sys.argv[1:]:
        importlib.import_module(module)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames may reach the daemon's pipe
    while (request := read_frame(requests)) is not None:
        answers.write(frame(answer(*pickle.loads(request))))
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
