"""fs/tree.py: how a TOC becomes inodes, names and attributes (pure, no FUSE)."""

from __future__ import annotations

import os
import pickle
import stat
import sys
import tracemalloc

import pytest
from fslayers import MTIME_NS, LayerBuilder, lower_layer, upper_layer

from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import Entry, Toc
from snapshotter.format.whiteout import OVERLAY_OPAQUE_XATTR as OPAQUE_XATTR
from snapshotter.fs.tree import ROOT, InvalidTree, LayerTree


def walk(tree: LayerTree, ino: int = ROOT, prefix: str = "") -> dict[str, int]:
    found = {}
    for _, name, child in tree.children(ino):
        path = prefix + name
        found[path] = child
        if tree.node(child).is_dir:
            found.update(walk(tree, child, path + "/"))
    return found


def path_node(tree: LayerTree, path: str):  # type: ignore[no-untyped-def]
    ino = ROOT
    for part in path.split("/"):
        child = tree.lookup(ino, part)
        assert child is not None, path
        ino = child
    return tree.node(ino)


def test_paths_types_and_attributes() -> None:
    tree = LayerTree.from_toc(upper_layer().toc())
    assert sorted(walk(tree)) == [
        "bin", "bin/hard2", "dev", "dev/null", "dev/pipe", "dev/sda", "etc",
        "etc/hostname", "etc/motd-link", "gone", "motd", "motd-hard", "opq",
        "opq/kept-by-upper", "opq/new", "victim",
    ]  # fmt: skip
    host = path_node(tree, "etc/hostname")
    assert (host.mode, host.uid, host.gid, host.size) == (stat.S_IFREG | 0o640, 1, 2, 6)
    assert host.mtime_ns == MTIME_NS
    link = path_node(tree, "etc/motd-link")
    assert (link.mode, link.target, link.size) == (stat.S_IFLNK | 0o777, "../motd", 7)
    null = path_node(tree, "dev/null")
    assert null.mode == stat.S_IFCHR | 0o666 and null.rdev == os.makedev(1, 3)
    sda = path_node(tree, "dev/sda")
    assert sda.mode == stat.S_IFBLK | 0o660 and sda.rdev == os.makedev(8, 0)
    assert path_node(tree, "dev/pipe").mode == stat.S_IFIFO | 0o644
    opq = path_node(tree, "opq")
    assert (opq.mode, opq.uid, opq.gid) == (stat.S_IFDIR | 0o750, 1000, 1000)


def test_whiteouts_become_char_devices_0_0() -> None:
    tree = LayerTree.from_toc(upper_layer().toc())
    for name in ("victim", "gone"):
        node = path_node(tree, name)
        assert (node.mode, node.rdev, node.size) == (stat.S_IFCHR, 0, 0)
    assert tree.lookup(ROOT, ".wh.victim") is None


def test_opaque_marker_is_hidden_and_sets_the_xattr() -> None:
    tree = LayerTree.from_toc(upper_layer().toc())
    opq = tree.lookup(ROOT, "opq")
    assert opq is not None
    assert [n for _, n, _ in tree.children(opq)] == ["kept-by-upper", "new"]
    assert tree.xattrs(opq) == {OPAQUE_XATTR: b"y"}
    assert tree.xattrs(tree.lookup(ROOT, "etc") or 0) == {}


def test_opaque_layer_root() -> None:
    tree = LayerTree.from_toc(LayerBuilder().add(".wh..wh..opq", "reg").toc())
    assert tree.xattrs(ROOT) == {OPAQUE_XATTR: b"y"}
    assert list(tree.children(ROOT)) == []


def test_aufs_metadata_is_not_shown() -> None:
    b = LayerBuilder().dir(".wh..wh.plnk").file(".wh..wh.plnk/1.2", b"x").file("a", b"a")
    tree = LayerTree.from_toc(b.toc())
    assert [n for _, n, _ in tree.children(ROOT)] == ["a"]


def test_a_real_entry_beats_its_own_whiteout() -> None:
    b = LayerBuilder().add(".wh.x", "reg").file("x", b"data")
    tree = LayerTree.from_toc(b.toc())
    assert stat.S_ISREG(path_node(tree, "x").mode)


def test_hardlinks_share_an_inode_and_count_links() -> None:
    tree = LayerTree.from_toc(upper_layer().toc())
    motd = tree.lookup(ROOT, "motd")
    assert motd is not None
    bin_ = tree.lookup(ROOT, "bin") or 0
    assert tree.lookup(ROOT, "motd-hard") == motd == tree.lookup(bin_, "hard2")
    assert tree.node(motd).nlink == 3
    assert tree.xattrs(motd) == {"user.origin": b"upper", "security.x": b"\x00\x01"}
    assert path_node(tree, "etc/hostname").nlink == 1


def test_a_pickled_tree_answers_as_the_original() -> None:
    """Trees are built in the TOC parser's worker process and pickled to the daemon."""
    tree = LayerTree.from_toc(upper_layer().toc())
    copy = pickle.loads(pickle.dumps(tree, protocol=pickle.HIGHEST_PROTOCOL))
    for ino in range(1, len(tree) + 1):
        assert copy.node(ino) == tree.node(ino)
        assert copy.xattrs(ino) == tree.xattrs(ino)
        if tree.node(ino).is_dir:
            assert list(copy.listing(ino)) == list(tree.listing(ino))
    motd = tree.lookup(ROOT, "motd")
    assert motd is not None and copy.lookup(ROOT, "motd") == motd
    assert copy.total_size == tree.total_size


def test_hardlink_to_hardlink_resolves() -> None:
    b = LayerBuilder().add("b", "hardlink", link_name="a").file("a", b"x")
    b.add("c", "hardlink", link_name="b")
    tree = LayerTree.from_toc(b.toc())
    a = tree.lookup(ROOT, "a")
    assert tree.lookup(ROOT, "b") == a == tree.lookup(ROOT, "c")
    assert tree.node(a or 0).nlink == 3


def test_directory_nlink_is_two_plus_subdirectories() -> None:
    tree = LayerTree.from_toc(lower_layer().toc())
    assert tree.node(ROOT).nlink == 2 + 4  # etc gone opq data
    assert path_node(tree, "etc").nlink == 2


def test_implicit_root_and_dot_dot() -> None:
    tree = LayerTree.from_toc(Toc(entries=(Entry("a", "dir"), Entry("a/b", "dir"))))
    assert tree.node(ROOT).mode == stat.S_IFDIR | 0o755
    a = tree.lookup(ROOT, "a") or 0
    b = tree.lookup(a, "b") or 0
    assert (tree.parent(b), tree.parent(a), tree.parent(ROOT)) == (a, ROOT, 0)


def test_children_resume_at_a_position() -> None:
    b = LayerBuilder()
    for name in ("d", "a", "c", "b"):
        b.file(name, b"")
    tree = LayerTree.from_toc(b.toc())
    listing = list(tree.children(ROOT))
    assert [n for _, n, _ in listing] == ["a", "b", "c", "d"]
    pos = listing[1][0]
    assert [n for _, n, _ in tree.children(ROOT, pos + 1)] == ["c", "d"]
    assert tree.lookup(tree.lookup(ROOT, "a") or 0, "x") is None  # lookup in a file


@pytest.mark.parametrize("layer", [lower_layer, upper_layer, "odd"])
def test_stat_and_listing_agree_with_node_and_children(layer) -> None:  # type: ignore[no-untyped-def]
    """The fast paths readdir, lookup and getattr use say what `node` and `children` say."""
    if layer == "odd":  # values the TOC's columns cannot hold, between common rows
        b = LayerBuilder().dir("").file("a", b"1").file("b", b"22", mode=0o4755)
        b.file("c", b"3", uid=1 << 40).file("d", b"4", gid=7)
        b.add("e", "symlink", link_name="caf\udce9").add("f", "fifo", mode=0o600)
        toc = b.toc()
        assert toc.odd_rows
    else:
        toc = layer().toc()
    tree = LayerTree.from_toc(toc)
    for ino in range(1, len(tree) + 1):
        n = tree.node(ino)
        assert tree.stat(ino) == (n.mode, n.nlink, n.uid, n.gid, n.size, n.mtime_ns, n.rdev)
        if n.is_dir:
            for start in (0, 1):
                want = [(p, os.fsencode(name), c, tree.stat(c))
                        for p, name, c in tree.children(ino, start)]
                assert list(tree.listing(ino, start)) == want


def test_size_counts_file_content() -> None:
    tree = LayerTree.from_toc(upper_layer().toc())
    assert tree.total_size == len(b"upper\n") + len(b"hello\n") + len(b"new\n") + 13


@pytest.mark.parametrize(
    "entries",
    [
        [Entry("a/b", "reg")],  # missing parent
        [Entry("a", "reg"), Entry("a/b", "reg")],  # parent is a file
        [Entry("h", "hardlink", link_name="nowhere")],
        [Entry("d", "dir"), Entry("h", "hardlink", link_name="d")],
        [Entry("a", "reg"), Entry("a", "reg")],
        [Entry("a", "sock")],
        [Entry("", "reg")],
    ],
)
def test_trees_that_cannot_exist_are_refused(entries: list[Entry]) -> None:
    with pytest.raises(InvalidArgument):
        LayerTree.from_toc(Toc(entries=tuple(entries)))
    assert issubclass(InvalidTree, InvalidArgument)


def test_unknown_inode() -> None:
    tree = LayerTree.from_toc(Toc(entries=()))
    with pytest.raises(KeyError):
        tree.node(2)


def test_100k_entries_stay_compact() -> None:
    """The tree adds little to the TOC's own columns: a few array slots per inode."""
    entries = [Entry("", "dir", mode=0o755)]
    for d in range(1000):
        entries.append(Entry(f"dir{d:04}", "dir", mode=0o755))
        entries.extend(Entry(f"dir{d:04}/file{f:03}", "reg", mode=0o644) for f in range(100))
    toc = Toc(entries=tuple(entries))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tree = LayerTree.from_toc(toc)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_entry = (after - before) / len(entries)
    assert len(tree) == len(entries)
    assert per_entry < 48, f"{per_entry:.0f} bytes per entry"
    assert path_node(tree, "dir0999/file099").ino == len(entries)
    assert sys.getsizeof(tree) < 200
