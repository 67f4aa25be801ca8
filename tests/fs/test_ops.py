"""fs/ops.py and fs/repository.py: FUSE handlers awaited directly, without a mount."""

from __future__ import annotations

import copy
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from fslayers import (
    BIG,
    BIG_CHUNK,
    MTIME_NS,
    FakeChunkReader,
    LayerBuilder,
    lower_layer,
    upper_layer,
)

from snapshotter import errors
from snapshotter.errors import InvalidArgument
from snapshotter.format.whiteout import OVERLAY_OPAQUE_XATTR as OPAQUE_XATTR
from snapshotter.fs.ops import ATTR_TIMEOUT, LISTING_ENTRIES, RepositoryOperations, errno_for
from snapshotter.fs.repository import (
    REPOSITORY_ROOT,
    LayerExists,
    LayerNotFound,
    Repository,
)
from snapshotter.fs.tree import LayerTree

ROOT = pyfuse3.ROOT_INODE


@dataclass
class StubContext:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


CTX: Any = StubContext()


@pytest.fixture
def setup() -> tuple[RepositoryOperations, Repository, FakeChunkReader, FakeChunkReader]:
    repo = Repository()
    lower, upper = lower_layer(), upper_layer()
    lower_reader, upper_reader = lower.reader(), upper.reader()
    repo.attach("1", lower.toc(), lower_reader)
    repo.attach("2", LayerTree.from_toc(upper.toc()), upper_reader)
    return RepositoryOperations(repo, read_timeout=30), repo, lower_reader, upper_reader


async def walk(ops: RepositoryOperations, path: str) -> pyfuse3.EntryAttributes:
    attrs = await ops.getattr(ROOT, CTX)
    for part in path.split("/"):
        attrs = await ops.lookup(attrs.st_ino, os.fsencode(part), CTX)
    return attrs


async def fuse_errno(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def open_file(ops: RepositoryOperations, path: str) -> int:
    attrs = await walk(ops, path)
    fi = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
    assert fi.keep_cache
    return fi.fh


class Listing:
    """Stands in for pyfuse3.readdir_reply (which needs a kernel request buffer)."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.names: list[bytes] = []
        self.next_ids: list[int] = []
        self.attrs: list[pyfuse3.EntryAttributes] = []

    def __call__(self, token: object, name: bytes, attrs: Any, next_id: int) -> bool:
        if len(self.names) >= self.room:
            return False
        self.names.append(name)
        self.attrs.append(copy.copy(attrs))  # the real one copies them into the reply
        self.next_ids.append(next_id)
        return True


async def listdir(
    ops: RepositoryOperations, ino: int, monkeypatch: pytest.MonkeyPatch, page: int = 2
) -> list[bytes]:
    fh = await ops.opendir(ino, CTX)
    names: list[bytes] = []
    start = 0
    while True:
        listing = Listing(page)
        monkeypatch.setattr(pyfuse3, "readdir_reply", listing)
        await ops.readdir(fh, start, None)  # type: ignore[arg-type]
        names += listing.names
        if len(listing.names) < page:
            break
        start = listing.next_ids[-1]
    await ops.releasedir(fh)
    return names


async def test_root_lists_layers_and_revalidates_always(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    assert REPOSITORY_ROOT == ROOT
    root = await ops.getattr(ROOT, CTX)
    assert (root.st_mode, root.st_nlink, root.entry_timeout) == (stat.S_IFDIR | 0o755, 4, 0)
    assert root.attr_timeout <= 1
    assert await listdir(ops, ROOT, monkeypatch, page=1) == [b"1", b"2"]
    layer = await ops.lookup(ROOT, b"2", CTX)
    assert (layer.entry_timeout, layer.attr_timeout) == (0, ATTR_TIMEOUT)
    assert layer.st_ino == 2 << 32 | 1
    assert (await ops.lookup(layer.st_ino, b"..", CTX)).st_ino == ROOT
    assert (await ops.lookup(ROOT, b".", CTX)).st_ino == ROOT
    assert await fuse_errno(ops.lookup(ROOT, b"3", CTX)) == errno.ENOENT


async def test_attributes_inside_a_layer(setup) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    host = await walk(ops, "2/etc/hostname")
    assert (host.st_mode, host.st_uid, host.st_gid, host.st_size, host.st_nlink) == (
        stat.S_IFREG | 0o640, 1, 2, 6, 1,
    )  # fmt: skip
    assert host.st_mtime_ns == MTIME_NS and host.entry_timeout == ATTR_TIMEOUT
    assert (await ops.getattr(host.st_ino, CTX)).st_size == 6
    null = await walk(ops, "2/dev/null")
    assert null.st_rdev == os.makedev(1, 3) and stat.S_ISCHR(null.st_mode)
    whiteout = await walk(ops, "2/victim")
    assert (whiteout.st_mode, whiteout.st_rdev) == (stat.S_IFCHR, 0)
    motd = await walk(ops, "2/motd")
    assert motd.st_nlink == 3 and (await walk(ops, "2/bin/hard2")).st_ino == motd.st_ino
    etc = await walk(ops, "2/etc")
    assert (await ops.lookup(etc.st_ino, b"..", CTX)).st_ino == (await walk(ops, "2")).st_ino
    assert (await ops.lookup(etc.st_ino, b".", CTX)).st_ino == etc.st_ino
    # A name the layer lacks: a negative entry the kernel may keep (layers never change).
    missing = await ops.lookup(etc.st_ino, b"nope", CTX)
    assert missing.st_ino == 0 and missing.entry_timeout >= 3600


async def test_readdir_pages_with_attributes(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    opq = await walk(ops, "2/opq")
    assert await listdir(ops, opq.st_ino, monkeypatch, page=1) == [b"kept-by-upper", b"new"]
    top = await walk(ops, "2")
    names = await listdir(ops, top.st_ino, monkeypatch, page=3)
    assert names == [b"bin", b"dev", b"etc", b"gone", b"motd", b"motd-hard", b"opq", b"victim"]
    listing = Listing()
    monkeypatch.setattr(pyfuse3, "readdir_reply", listing)
    fh = await ops.opendir(top.st_ino, CTX)
    await ops.readdir(fh, 0, None)
    motd = listing.attrs[listing.names.index(b"motd")]
    assert motd.st_nlink == 3 and motd.st_size == 6
    file = await walk(ops, "2/motd")
    assert await fuse_errno(ops.opendir(file.st_ino, CTX)) == errno.ENOTDIR


async def test_readdir_attributes_equal_lookup_attributes(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """readdirplus fills the kernel's cache: each entry must say what lookup would say,
    including the rare rows (whiteouts, hardlinks, devices, symlinks) between common ones."""
    ops, repo, _, upper_reader = setup
    repo.detach("2")
    repo.attach("2", upper_layer().toc(), upper_reader, generation=7)
    pending = [ROOT]
    seen = 0
    while pending:
        ino = pending.pop()
        listing = Listing()
        monkeypatch.setattr(pyfuse3, "readdir_reply", listing)
        fh = await ops.opendir(ino, CTX)
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        await ops.releasedir(fh)
        for name, listed in zip(listing.names, listing.attrs, strict=True):
            looked_up = await ops.lookup(ino, name, CTX)
            assert listed.__getstate__() == looked_up.__getstate__(), name
            assert listed.generation == (0 if listed.st_ino >> 32 == 1 else 7)  # layer "1": 0
            assert (await ops.getattr(listed.st_ino, CTX)).__getstate__() == listed.__getstate__()
            if stat.S_ISDIR(listed.st_mode):
                pending.append(listed.st_ino)
            seen += 1
    assert seen == 2 + 13 + 16  # layers, then every name in the lower and upper layer


async def listing_of(ops: RepositoryOperations, ino: int, monkeypatch: pytest.MonkeyPatch,
                     ) -> list[tuple[bytes, dict[str, Any]]]:
    listing = Listing()
    monkeypatch.setattr(pyfuse3, "readdir_reply", listing)
    fh = await ops.opendir(ino, CTX)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    return [(n, a.__getstate__()) for n, a in zip(listing.names, listing.attrs, strict=True)]


@pytest.mark.parametrize("budget", [0, 16, LISTING_ENTRIES])
async def test_kept_listings_answer_as_fresh_ones_within_their_budget(
    setup, monkeypatch, budget  # type: ignore[no-untyped-def]
) -> None:
    ops, repo, *_ = setup
    fresh = RepositoryOperations(repo, listing_entries=0)
    ops.listing_entries = budget
    dirs = [(await walk(ops, p)).st_ino for p in ("2", "2/etc", "2/opq", "2/dev", "1/data", "1")]
    for _ in range(3):  # first listed, then kept (or dropped and listed again)
        for ino in dirs:
            assert await listing_of(ops, ino, monkeypatch) == await listing_of(
                fresh, ino, monkeypatch
            )
            assert await listdir(ops, ino, monkeypatch, page=1) == [
                n for n, _ in await listing_of(fresh, ino, monkeypatch)
            ]
            assert ops._listed <= budget and fresh._listed == 0
    assert len(ops._listings) == {0: 0, 16: 2, LISTING_ENTRIES: 6}[budget]


async def test_the_least_recently_listed_directories_are_dropped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    b = LayerBuilder().dir("")
    for d in range(10):
        b.dir(f"d{d}").file(f"d{d}/a", b"a").file(f"d{d}/b", b"bb").file(f"d{d}/c", b"")
    repo = Repository()
    repo.attach("5", b.toc(), b.reader())
    ops = RepositoryOperations(repo, listing_entries=24)  # 8 directories of 3
    fresh = RepositoryOperations(repo, listing_entries=0)
    dirs = [(await walk(ops, f"5/d{d}")).st_ino for d in range(10)]
    for ino in [*dirs, dirs[2], dirs[0]]:  # d2 listed again: d3 is the stalest then
        assert await listing_of(ops, ino, monkeypatch) == await listing_of(
            fresh, ino, monkeypatch
        )
        assert ops._listed == 3 * len(ops._listings) <= 24
    assert list(ops._listings) == [*dirs[4:], dirs[2], dirs[0]]


async def test_a_reattached_layer_id_never_lists_what_was_kept(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ops, repo, _, upper_reader = setup
    before = await listing_of(ops, (await walk(ops, "1")).st_ino, monkeypatch)
    repo.detach("1")
    repo.attach("1", upper_layer().toc(), upper_reader)
    after = await listing_of(ops, (await walk(ops, "1")).st_ino, monkeypatch)
    assert [n for n, _ in after] == [n for n, _ in await listing_of(
        ops, (await walk(ops, "2")).st_ino, monkeypatch)]
    assert {a["st_ino"] for _, a in after}.isdisjoint(a["st_ino"] for _, a in before)


async def test_readlink_and_xattrs(setup) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    link = await walk(ops, "2/etc/motd-link")
    assert await ops.readlink(link.st_ino, CTX) == b"../motd"
    motd = await walk(ops, "2/motd")
    assert await fuse_errno(ops.readlink(motd.st_ino, CTX)) == errno.EINVAL
    assert sorted(await ops.listxattr(motd.st_ino, CTX)) == [b"security.x", b"user.origin"]
    assert await ops.getxattr(motd.st_ino, b"security.x", CTX) == b"\x00\x01"
    assert await fuse_errno(ops.getxattr(motd.st_ino, b"user.no", CTX)) == pyfuse3.ENOATTR
    opq = await walk(ops, "2/opq")
    assert await ops.getxattr(opq.st_ino, OPAQUE_XATTR.encode(), CTX) == b"y"
    assert await ops.listxattr(ROOT, CTX) == []


async def test_read_maps_ranges_onto_chunks(setup) -> None:  # type: ignore[no-untyped-def]
    ops, repo, lower_reader, _ = setup
    fh = await open_file(ops, "1/data/big")
    assert await ops.read(fh, 0, 10) == BIG[:10]
    assert len(lower_reader.calls) == 1  # only the first chunk
    across = BIG_CHUNK - 5
    assert await ops.read(fh, across, BIG_CHUNK + 10) == BIG[across : across + BIG_CHUNK + 10]
    assert len(lower_reader.calls) == 3  # chunks 2 and 3; chunk 1 came from the memo
    assert await ops.read(fh, len(BIG) - 3, 100) == BIG[-3:]
    assert await ops.read(fh, len(BIG), 100) == b""
    assert len(lower_reader.calls) == 3
    stats = repo.statistics("1")
    assert (stats.chunks_read, stats.open_files, stats.read_errors) == (3, 1, 0)
    assert stats.bytes_read == 10 + BIG_CHUNK + 10 + 3
    await ops.release(fh)
    assert repo.statistics("1").open_files == 0


async def test_empty_file_and_hardlink_content(setup) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    assert await ops.read(await open_file(ops, "1/data/empty"), 0, 4096) == b""
    assert await ops.read(await open_file(ops, "2/bin/hard2"), 0, 4096) == b"hello\n"


async def test_concurrent_readers_of_one_chunk_both_get_it(setup) -> None:  # type: ignore[no-untyped-def]
    ops, _, lower_reader, _ = setup
    fh = await open_file(ops, "1/data/big")
    lower_reader.set_mode("hang")
    got: list[bytes] = []

    async def read(off: int) -> None:
        got.append(await ops.read(fh, off, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, 0)
        nursery.start_soon(read, 4096)
        await trio.testing.wait_all_tasks_blocked()
        lower_reader.set_mode("ok")
    assert sorted(got) == sorted([BIG[:4096], BIG[4096:8192]])


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("mode", ["fail", "unavailable"])
async def test_failing_reader_gives_eio(setup, mode) -> None:  # type: ignore[no-untyped-def]
    ops, repo, lower_reader, _ = setup
    fh = await open_file(ops, "1/data/big")
    lower_reader.set_mode(mode)
    assert await fuse_errno(ops.read(fh, 0, 4096)) == errno.EIO
    assert await fuse_errno(ops.read(fh, BIG_CHUNK - 1, 2)) == errno.EIO  # two chunks
    assert repo.statistics("1").read_errors == 2
    lower_reader.set_mode("ok")
    assert await ops.read(fh, 0, 4096) == BIG[:4096]


@pytest.mark.allow_log_errors
async def test_hanging_reader_gives_eio_after_the_timeout(setup, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    ops, _, lower_reader, _ = setup
    fh = await open_file(ops, "1/data/big")
    lower_reader.set_mode("hang")
    start = trio.current_time()
    assert await fuse_errno(ops.read(fh, 0, 4096)) == errno.EIO
    assert trio.current_time() - start == pytest.approx(30)


@pytest.mark.allow_log_errors
async def test_unexpected_errors_become_eio(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    ops, _, lower_reader, _ = setup
    fh = await open_file(ops, "1/data/big")
    lower_reader.chunks.clear()  # KeyError inside the reader: a bug, not a category
    assert await fuse_errno(ops.read(fh, 0, 1)) == errno.EIO
    assert any(r.exc_info for r in caplog.records if r.levelname == "ERROR")


async def test_writes_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    ops, *_ = setup
    motd = await walk(ops, "2/motd")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
        assert await fuse_errno(ops.open(motd.st_ino, flags, CTX)) == errno.EROFS
    assert await fuse_errno(ops.mkdir(ROOT, b"x", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(ops.unlink(ROOT, b"1", CTX)) == errno.EROFS
    assert await fuse_errno(ops.setxattr(motd.st_ino, b"user.a", b"", CTX)) == errno.EROFS
    assert await fuse_errno(ops.write(1, 0, b"x")) == errno.EROFS
    top = await walk(ops, "2")
    assert await fuse_errno(ops.open(top.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR


async def test_attach_detach_and_stale_inodes(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ops, repo, lower_reader, _ = setup
    old = await walk(ops, "1/etc/hostname")
    fh = await open_file(ops, "1/etc/passwd")
    repo.detach("1")
    assert repo.layer_ids() == ["2"]
    assert await fuse_errno(ops.getattr(old.st_ino, CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"1", CTX)) == errno.ENOENT
    assert await ops.read(fh, 0, 4) == b"root"  # open files keep working
    repo.attach("1", lower_layer().toc(), lower_reader)
    new = await walk(ops, "1/etc/hostname")
    assert new.st_ino != old.st_ino  # a new slot: the old inode never comes back
    assert await listdir(ops, ROOT, monkeypatch) == [b"2", b"1"]
    with pytest.raises(LayerExists):
        repo.attach("1", lower_layer().toc(), lower_reader)
    with pytest.raises(LayerNotFound):
        repo.detach("nope")
    for bad in ("", "a/b", ".", ".."):
        with pytest.raises(InvalidArgument):
            repo.attach(bad, lower_layer().toc(), lower_reader)


async def test_root_listing_survives_detach_between_pages(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ops, repo, reader, _ = setup
    repo.attach("3", lower_layer().toc(), reader)
    fh = await ops.opendir(ROOT, CTX)
    first = Listing(1)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, None)
    repo.detach("1")
    rest = Listing()
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, first.next_ids[-1], None)
    assert first.names + rest.names == [b"1", b"2", b"3"]


async def test_statfs(setup) -> None:  # type: ignore[no-untyped-def]
    ops, repo, *_ = setup
    s = await ops.statfs(CTX)
    assert s.f_namemax == 255 and s.f_bfree == 0
    assert s.f_blocks >= len(BIG) // 4096
    assert s.f_files == 1 + sum(repo.statistics(i).inodes for i in repo.layer_ids())


def test_every_category_has_an_errno() -> None:
    for cat in errors.CATEGORIES:
        assert errno_for(cat("x")) > 0
        assert errno_for(cat("x"), read=True) == errno.EIO
    assert errno_for(errors.NotFound("x")) == errno.ENOENT
    assert errno_for(RuntimeError("x")) == errno.EIO
