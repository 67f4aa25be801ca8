"""The repository tells a layer's observer which chunks readers ask for (profile learning)."""

from __future__ import annotations

import random

from fslayers import LayerBuilder

from snapshotter.format.toc import Chunk, Entry
from snapshotter.fs.repository import Repository

CHUNK = 64 << 10
DATA = random.Random(5).randbytes(4 * CHUNK)


class DictReader:
    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks

    async def read_chunk(self, chunk: Chunk) -> bytes:
        return self.chunks[chunk.digest]


async def test_observer_sees_each_chunk_a_reader_asks_for_even_from_the_memo() -> None:
    b = LayerBuilder().dir("", mode=0o755).file("big", DATA, chunk_size=CHUNK)
    repo = Repository()
    repo.attach("1", b.toc(), DictReader(b.chunks))
    layer = repo.layer("1")
    assert layer is not None
    entry = next(layer.tree.entry(i) for i in range(1, len(layer.tree) + 1)
                 if layer.tree.entry(i).name == "big")
    seen: list[tuple[str, int]] = []

    def observe(e: Entry, chunk: Chunk) -> None:
        seen.append((e.name, chunk.chunk_offset))

    await repo.read(layer, entry, 0, 10)  # before an observer: not seen
    layer.observer = observe
    await repo.read(layer, entry, CHUNK - 5, 10)  # spans chunks 0 and 1
    await repo.read(layer, entry, 0, 10)  # memo hit, still an access
    assert seen == [("big", 0), ("big", CHUNK), ("big", 0)]
