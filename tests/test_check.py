"""Each named check, one damage at a time: it names the problem, fsck repairs it, mount agrees."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from pmemfs.fs.engine import Engine, MountError
from pmemfs.media import check
from pmemfs.media.format import (
    BLOB_CONT,
    FLAG_ORPHAN,
    ROOT_INO,
    SB_STRUCT,
    Superblock,
    Tables,
    seal,
)
from pmemfs.media.region import Region
from pmemfs.tools.fsck import fsck

BS = 2 << 20


@contextmanager
def tables(path: str):
    with Region(path) as r:
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        yield t, sb
        del t


def run(path: str, name: str) -> list[check.Finding]:
    with tables(path) as (t, sb):
        return check.run_check(name, check.View(t, sb, dict(sb.hwm)))


@pytest.fixture
def fs(region_factory):
    """/d/sub, /d/f (data over two blocks), /g, /s -> 'd/f', xattr with a continuation."""
    path = region_factory()
    e = Engine(path)
    ino = {}
    ino["d"] = e.mkdir(1, b"d", 0o755).ino
    ino["sub"] = e.mkdir(ino["d"], b"sub", 0o755).ino
    ino["f"] = e.create(ino["d"], b"f", 0o644).ino
    e.write(ino["f"], 0, b"a" * (BS + 10))
    ino["g"] = e.create(1, b"g", 0o644).ino
    e.write(ino["g"], 0, b"g" * 100)
    e.write(ino["g"], 64 << 10, b"!")  # past the small-file threshold: a block of its own
    ino["p"] = e.create(1, b"p", 0o644).ino  # a small file, packed with others
    e.write(ino["p"], 0, b"p" * 5000)
    ino["s"] = e.symlink(1, b"s", b"d/f").ino
    e.setxattr(ino["f"], b"user.big", b"x" * 1200)
    e.close()
    return path, ino


def slot_of(t, table: str, pred) -> int:
    arr = getattr(t, table + "s")
    for i in range(1, len(arr)):
        if pred(arr[i]):
            return i
    raise AssertionError("no such record")


def dirent(t, name: bytes) -> int:
    return slot_of(t, "dirent", lambda r: r["parent"] != 0 and bytes(r["name"]) == name)


def extent(t, owner: int) -> int:
    return slot_of(t, "extent", lambda r: r["owner"] == owner)


def _set(t, table: str, idx: int, **kw) -> None:
    arr = getattr(t, table + "s")
    for k, v in kw.items():
        arr[k][idx] = v
    seal(arr, idx)


DAMAGE = {
    # name: (check, code, mutate(t, sb, ino))
    "checksum": ("checksums", "checksum", lambda t, sb, i: t.inodes["checksum"].__setitem__(i["g"], 1)),
    "bad-kind": ("inodes", "bad-kind", lambda t, sb, i: _set(t, "inode", i["g"], kind=42)),
    "bad-mode": ("inodes", "bad-mode", lambda t, sb, i: _set(t, "inode", i["g"], mode=0o040644)),
    "bad-flags": ("inodes", "bad-flags", lambda t, sb, i: _set(t, "inode", i["g"], flags=0x80)),
    "bad-attr": ("inodes", "bad-attr", lambda t, sb, i: _set(t, "inode", i["g"], attr=0x01)),
    "root-orphan": ("inodes", "root-orphan", lambda t, sb, i: _set(t, "inode", ROOT_INO, flags=FLAG_ORPHAN)),
    "dir-size": ("sizes", "size-nonzero", lambda t, sb, i: _set(t, "inode", i["d"], size=4096)),
    "past-eof": ("sizes", "past-eof", lambda t, sb, i: _set(t, "inode", i["f"], size=10)),
    "dangling-extent": ("extents", "bad-extent", lambda t, sb, i: _set(
        t, "extent", extent(t, i["g"]), owner=999)),
    "extent-in-metadata": ("extents", "bad-extent", lambda t, sb, i: _set(
        t, "extent", extent(t, i["g"]), start_block=0)),
    "nblocks": ("extents", "nblocks", lambda t, sb, i: _set(t, "inode", i["g"], nblocks=7)),
    "file-overlap": ("extents", "file-overlap", lambda t, sb, i: _add_extent(t, sb, i["f"], fb=0)),
    "extent-overlap": ("extent-overlap", "overlap", lambda t, sb, i: _set(
        t, "extent", extent(t, i["g"]), start_block=int(t.extents["start_block"][extent(t, i["f"])]))),
    "leaked": ("bitmap", "leaked", lambda t, sb, i: t.bitmap.__setitem__(-1, 0xFF) or _leak(t, sb)),
    "unmarked": ("bitmap", "unmarked", lambda t, sb, i: _unmark(t, int(t.extents["start_block"][extent(t, i["g"])]))),
    "bad-owned": ("badblocks", "bad-owned", lambda t, sb, i: _bad(t, int(t.extents["start_block"][extent(t, i["g"])]))),
    "bad-dirent": ("dirents", "bad-dirent", lambda t, sb, i: _set(t, "dirent", dirent(t, b"g"), ino=999)),
    "dirent-kind": ("dirents", "dirent-kind", lambda t, sb, i: _set(t, "dirent", dirent(t, b"g"), kind=2)),
    "cookie": ("dirents", "cookie", lambda t, sb, i: _set(t, "dirent", dirent(t, b"g"), cookie=10**6)),
    # a cookie and counter that agree, but past what readdir's off_t offsets can carry
    # (found by tools/soak.py's damage phase: the mount's readdir then failed)
    "cookie-past-off_t": ("dirents", "cookie", lambda t, sb, i: (
        _set(t, "inode", int(t.dirents["parent"][dirent(t, b"g")]), next_cookie=2**63 + 6),
        _set(t, "dirent", dirent(t, b"g"), cookie=2**63 + 5))),
    "next-cookie": ("dirents", "next-cookie", lambda t, sb, i: _set(
        t, "inode", int(t.dirents["parent"][dirent(t, b"g")]), next_cookie=2**64 - 1)),
    "bad-name": ("names", "bad-name", lambda t, sb, i: _set(t, "dirent", dirent(t, b"g"), name=b"..", name_len=2)),
    "dup-name": ("names", "dup-name", lambda t, sb, i: _set(t, "dirent", dirent(t, b"s"), name=b"g", name_len=1)),
    "nlink": ("links", "nlink", lambda t, sb, i: _set(t, "inode", i["d"], nlink=9)),
    "named-orphan": ("links", "named-orphan", lambda t, sb, i: _set(t, "inode", i["g"], flags=FLAG_ORPHAN)),
    "unreachable": ("tree", "unreachable", lambda t, sb, i: _free(t.dirents, dirent(t, b"d"))),
    "cycle": ("tree", "unreachable", lambda t, sb, i: (_set(t, "dirent", dirent(t, b"d"), parent=i["sub"]),
                                                       _set(t, "inode", i["d"], parent=i["sub"]))),
    "dotdot": ("tree", "dotdot", lambda t, sb, i: _set(t, "inode", i["sub"], parent=ROOT_INO)),
    "dir-names": ("tree", "dir-names", lambda t, sb, i: _add_dirent(t, 1, b"again", i["sub"], 2)),
    "orphan-dir-with-entries": ("orphans", "orphan", lambda t, sb, i: (
        _free(t.dirents, dirent(t, b"d")), _set(t, "inode", i["d"], flags=FLAG_ORPHAN, nlink=0))),
    "dead-blob": ("blobs", "bad-blob", lambda t, sb, i: _set(
        t, "blob", slot_of(t, "blob", lambda r: r["owner"] == i["f"]), owner=999)),
    "bad-chain": ("blobs", "bad-chain", lambda t, sb, i: _set(
        t, "blob", slot_of(t, "blob", lambda r: r["owner"] == i["f"] and r["kind"] != BLOB_CONT), value_len=5000)),
    "stray-cont": ("blobs", "stray-cont", lambda t, sb, i: _set(
        t, "blob", slot_of(t, "blob", lambda r: r["owner"] == i["f"] and r["kind"] != BLOB_CONT), next=0,
        value_len=10)),
    "no-target": ("symlinks", "no-target", lambda t, sb, i: t.blobs.__setitem__(
        slot_of(t, "blob", lambda r: r["owner"] == i["s"]), np.zeros(1, t.blobs.dtype)[0])),
    "symlink-size": ("symlinks", "symlink-size", lambda t, sb, i: _set(t, "inode", i["s"], size=99)),
}


def _free(arr, idx: int) -> None:
    """Free a record as pmemfs does: all zero (assigning a scalar 0 would store the name "0")."""
    arr[idx] = np.zeros(1, arr.dtype)[0]


def _leak(t, sb) -> None:
    g = sb.geometry
    t.bitmap[(g.block_count - 1) // 8] |= 1 << ((g.block_count - 1) % 8)


def _unmark(t, blk: int) -> None:
    t.bitmap[blk // 8] &= ~(1 << (blk % 8)) & 0xFF


def _bad(t, blk: int) -> None:
    t.badmap[blk // 8] |= 1 << (blk % 8)


def _add_extent(t, sb, owner: int, fb: int) -> None:
    slot = slot_of(t, "extent", lambda r: r["owner"] == 0)
    free = np.flatnonzero(np.unpackbits(t.bitmap, bitorder="little") == 0)
    blk = int(free[0])
    t.extents[slot] = (owner, 1, fb, blk, 0, 0)
    seal(t.extents, slot)
    t.bitmap[blk // 8] |= 1 << (blk % 8)
    _set(t, "inode", owner, nblocks=int(t.inodes["nblocks"][owner]) + 1)


def _add_dirent(t, parent: int, name: bytes, ino: int, kind: int) -> None:
    slot = slot_of(t, "dirent", lambda r: r["parent"] == 0)
    cookie = int(t.inodes["next_cookie"][parent])
    t.dirents[slot] = (parent, ino, cookie, len(name), kind, 0, name, 0)
    seal(t.dirents, slot)
    _set(t, "inode", parent, next_cookie=cookie + 1)


def test_fresh_region_has_no_findings(fs):
    path, _ = fs
    for name in check.TABLE_CHECKS:
        assert run(path, name) == [], name


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_finds_and_fsck_repairs(fs, damage):
    path, ino = fs
    name, code, mutate = DAMAGE[damage]
    with tables(path) as (t, sb):
        mutate(t, sb, ino)
    found = run(path, name)
    assert code in {f.code for f in found}, [f.as_dict() for f in found]
    f = next(f for f in found if f.code == code)
    assert f.check == name and f.fix in ("p", "y") and f.message
    if f.severity == "error":
        with pytest.raises(MountError):
            Engine(path)  # mount refuses what the check calls an error
    rep = fsck(path, "y")
    assert rep.exit_code == 1, [x.as_dict() for x in rep.findings if not x.repaired]
    assert fsck(path, "n").exit_code == 0
    e = Engine(path)
    try:
        if damage not in ("past-eof", "unreachable", "cycle", "orphan-dir-with-entries", "extent-overlap"):
            assert bytes(e.read(ino["f"], 0, BS + 10)) == b"a" * (BS + 10)
        if damage not in ("no-target", "bad-kind", "extent-overlap", "bad-owned", "dangling-extent",
                          "extent-in-metadata", "bad-dirent", "named-orphan"):
            assert bytes(e.read(ino["g"], 0, 100)) == b"g" * 100
    finally:
        e.close()


def test_superblock_raw_checks():
    from pmemfs.media.format import Geometry

    g = Geometry.plan(64 << 20, BS)
    raw = Superblock.new(g).encode()
    sb, found = check.check_superblock_raw(raw, 64 << 20)
    assert sb is not None and found == []
    for mutate, name in ((lambda b: b.__setitem__(0, 0), "superblock"),
                         (lambda b: b.__setitem__(100, b[100] ^ 1), "superblock")):
        b = bytearray(raw)
        mutate(b)
        sb, found = check.check_superblock_raw(bytes(b), 64 << 20)
        assert sb is None and found[0].check == name
    # Geometry damage with a valid checksum is a layout finding.
    rec = np.frombuffer(bytearray(raw), check.SUPERBLOCK_DTYPE).copy()
    rec["inode_offset"] = rec["extent_offset"]
    b = bytearray(rec.tobytes())
    b[SB_STRUCT - 4:] = check.crc(b[:-4]).to_bytes(4, "little")
    sb, found = check.check_superblock_raw(bytes(b), 64 << 20)
    assert sb is None and found[0].check == "layout" and "overlap" in found[0].message
    # The region shrank under the superblock.
    sb, found = check.check_superblock_raw(raw, 32 << 20)
    assert sb is None and found[0].check == "layout"


def test_compare_backup_ignores_changing_fields():
    from pmemfs.media.format import Geometry

    sb = Superblock.new(Geometry.plan(64 << 20, BS))
    a = sb.encode()
    sb.mount_generation, sb.state, sb.hwm["inode"] = 5, 2, 2048
    assert check.compare_backup(a, sb.encode()) == []
    sb.label = "other"
    assert check.compare_backup(a, sb.encode()) == ["label"]


def test_reachability_deep_chain(region_factory):
    """Pointer jumping handles a deep directory chain and finds the cut below it."""
    path = region_factory()
    e = Engine(path)
    parent = 1
    chain = []
    for k in range(300):
        parent = e.mkdir(parent, b"d%d" % k, 0o755).ino
        chain.append(parent)
    e.close()
    with tables(path) as (t, sb):
        v = check.View(t, sb, dict(sb.hwm))
        reached, _, cyclic = check.reachability(v)
        assert reached[chain].all() and not cyclic.any()
        _free(t.dirents, dirent(t, b"d150"))
        v = check.View(t, sb, dict(sb.hwm))
        reached, _, _ = check.reachability(v)
        assert reached[chain[:150]].all() and not reached[chain[150:]].any()
    assert fsck(path, "p").exit_code == 1
    assert fsck(path).exit_code == 0
    Engine(path).close()
