"""TOCs parsed in a worker process beside the daemon, not on the daemon's own core.

Parsing a TOC is pure Python: ~0.9 s for the 30,000 entries of a numpy/scipy/pandas layer
on the bench's VM. Inside the daemon that time holds the GIL the prefetch needs at the same
moment (a profile's chunks arrive while the next layer's TOC is parsed), and both slow
down: that parse took 1.5-2 s during a cold start, on the pull's critical path. A worker
process parses on the machine's other core instead. It reads the member the TOC store has
staged and writes the `Toc` pickled beside it (flat arrays: 3 ms to load for 30,000
entries); the daemon loads that file, so it never holds the member, a pickle and the Toc
at once.

Parses take turns in the worker (a thread would only take the daemon's GIL, the
contention the worker is there to avoid). The worker is an optimisation, never a
dependency: while it is not running or failing, the parse runs in a daemon thread as it
did before. Errors are the parser's own
(InvalidTOC, DataLoss, ...), raised here exactly as an in-thread parse raises them.

    parser = TocParser()
    await nursery.start(parser.run)           # one worker, restarted if it dies
    toc = await parser.add(store, digest, member, toc_offset, blob_size=n, ...)
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

import snapshotter
from snapshotter.digest import Digest
from snapshotter.format.toc import Toc
from snapshotter.remote._tocworker import HEADER, frame
from snapshotter.remote.tocstore import TocStore, parse_staged

__all__ = ["TocParser"]

log = logging.getLogger(__name__)

_WORKER = (sys.executable, "-m", "snapshotter.remote._tocworker")
_RESTART_DELAY = 1.0  # seconds after a worker died on its own
_MAX_DEATHS = 5  # in a row, without a parse between: then parse in the daemon for good


class TocParser:
    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        """`preload`: modules the worker imports when it starts (those of the `build`
        functions it will be given)."""
        self._command = (*_WORKER, *preload)
        self._proc: trio.Process | None = None
        self._turn = trio.Lock()  # one request at a time in the worker
        self._deaths = 0
        self.parsed_in_worker = 0  # parses answered by the worker
        self.parsed_in_daemon = 0  # parses that ran in a daemon thread instead

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:  # fmt: skip
        """Keep one worker running until cancelled (it is killed then). Started once the
        first worker is, or could not be."""
        started = False
        while self._deaths < _MAX_DEATHS:
            try:
                proc = await trio.lowlevel.open_process(
                    self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    env=_worker_env(),
                )
            except OSError as exc:
                log.warning("toc parser: cannot start a worker (%s); parsing in the daemon", exc)
                break
            self._proc = proc
            if not started:
                task_status.started()
                started = True
            try:
                await proc.wait()
            finally:
                self._proc = None
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
            if proc.returncode != -signal.SIGKILL:  # not killed by `_parse`
                self._deaths += 1
                log.warning("toc parser: worker exited with %s; starting another",
                            proc.returncode)  # fmt: skip
                await trio.sleep(_RESTART_DELAY)
        else:
            log.warning("toc parser: worker failed %d times in a row; parsing in the daemon",
                        _MAX_DEATHS)  # fmt: skip
        if not started:
            task_status.started()

    async def add(
        self, store: TocStore, digest: Digest, member: bytes, toc_offset: int, *,
        build: Callable[[Toc], Any] | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Verify and parse a fetched TOC member (`parse_toc_member`'s `kwargs` and
        errors), kept in `store` when both succeed; in the worker when it runs, else in a
        thread. Returns the `Toc`, or `build(toc)` made there too (a module-level function
        or classmethod, sent by name), so that the daemon only loads the result.

        The member is staged in the store first and parsed from the file: `member` should
        be the caller's last reference, dropped once staged (holding it through the parse
        would add its size, ~50 bytes per entry, to the daemon's peak)."""
        staged = await trio.to_thread.run_sync(store.stage, member, toc_offset)
        del member
        kwargs["toc_digest"], kwargs["toc_offset"] = digest, toc_offset
        try:
            result = await self._parse(staged, kwargs, build)
            store.keep(staged, digest)
        except BaseException:
            store.discard(staged)
            raise
        return result

    async def _parse(
        self, staged: Path, kwargs: dict[str, Any], build: Callable[[Toc], Any] | None
    ) -> Any:
        async with self._turn:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return await self._in_daemon(staged, kwargs, build)
            return await self._ask(proc, staged, kwargs, build)

    async def _ask(
        self, proc: trio.Process, staged: Path, kwargs: dict[str, Any],
        build: Callable[[Toc], Any] | None,
    ) -> Any:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        result = staged.with_name(staged.name + ".toc")
        try:
            try:
                request = (str(staged), str(result), kwargs, build)
                await proc.stdin.send_all(frame(pickle.dumps(request)))
                status, detail = pickle.loads(await _receive_frame(proc.stdout))
            except BaseException as exc:
                proc.kill()  # its late answer must not reach the next request
                if not isinstance(exc, Exception):
                    raise  # cancelled
                log.warning("toc parser: worker failed (%s); parsing in the daemon", exc)
                status, detail = "failed", str(exc)
            if status == "error":
                raise detail
            if status != "ok":
                return await self._in_daemon(staged, kwargs, build)
            self._deaths = 0
            self.parsed_in_worker += 1
            return await trio.to_thread.run_sync(_load, result, build is None)
        finally:
            result.unlink(missing_ok=True)

    async def _in_daemon(
        self, staged: Path, kwargs: dict[str, Any], build: Callable[[Toc], Any] | None
    ) -> Any:
        self.parsed_in_daemon += 1
        return await trio.to_thread.run_sync(partial(parse_staged, staged, build=build, **kwargs))

    def status(self) -> dict[str, Any]:
        """For `lazysnap status`: is the worker up, and where did the parses run."""
        proc = self._proc
        return {
            "worker_pid": proc.pid if proc is not None and proc.returncode is None else None,
            "parsed_in_worker": self.parsed_in_worker,
            "parsed_in_daemon": self.parsed_in_daemon,
        }


def _load(path: Path, a_toc: bool) -> Any:
    with open(path, "rb") as f:  # streamed: only one of the Toc's arrays is copied at a time
        result = pickle.load(f)
    if a_toc and not isinstance(result, Toc):
        raise TypeError(f"toc parser: {path} holds a {type(result).__name__}, not a Toc")
    return result


async def _receive_frame(stream: trio.abc.ReceiveStream) -> bytes:
    (size,) = HEADER.unpack(await _receive_exactly(stream, HEADER.size))
    return await _receive_exactly(stream, size)


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = await stream.receive_some(n - len(buf))
        if not piece:
            raise EOFError("toc parser: worker closed its output")
        buf += piece
    return bytes(buf)


def _worker_env() -> dict[str, str]:
    """The daemon's environment, with this package importable whatever the cwd."""
    env = dict(os.environ)
    here = str(Path(snapshotter.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env
