"""Core POSIX semantics tested directly on the Engine, without FUSE.

The `engine` fixture closes the engine and runs the structural checks on the region
after each test, so every test here also proves it left the region consistent.
"""

from __future__ import annotations

import errno
import stat

import pytest
from conftest import assert_clean

from pmemfs.fs.engine import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Ctx,
    Engine,
    FsError,
)
from pmemfs.media.format import ROOT_INO

R = ROOT_INO
MB2 = 2 << 20
USER = Ctx(uid=1000, gid=1000)


def err(fn, *args, **kw) -> int:
    with pytest.raises(FsError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def mkfile(e: Engine, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644) -> int:
    ino = e.create(parent, name, mode).ino
    if data:
        assert e.write(ino, 0, data) == len(data)
    return ino


def read_all(e: Engine, ino: int) -> bytes:
    return bytes(e.read(ino, 0, e.stat(ino).size + 10))


def names(e: Engine, ino: int) -> list[bytes]:
    return [n for _, n, _ in e.readdir(ino) if n not in (b".", b"..")]


# ------------------------------------------------------------------ files
def test_create_write_read(engine):
    ino = mkfile(engine, R, b"f", b"hello")
    st = engine.stat(ino)
    assert stat.S_ISREG(st.mode) and stat.S_IMODE(st.mode) == 0o644
    assert st.size == 5 and st.nlink == 1
    assert read_all(engine, ino) == b"hello"
    assert engine.lookup(R, b"f") == ino
    assert err(engine.create, R, b"f", 0o644) == errno.EEXIST
    assert err(engine.lookup, R, b"nope") == errno.ENOENT


def test_block_spanning_write_and_read(engine):
    ino = mkfile(engine, R, b"f")
    data = bytes(range(256)) * (5 * MB2 // 256)
    engine.write(ino, 100, data)
    assert engine.stat(ino).size == 100 + len(data)
    got = read_all(engine, ino)
    assert got[:100] == b"\0" * 100 and got[100:] == data
    # a read spanning the boundary between two blocks
    assert bytes(engine.read(ino, MB2 - 10, 20)) == (b"\0" * 100 + data)[MB2 - 10:MB2 + 10]
    assert engine.stat(ino).blocks == 6 * (MB2 // 512)  # 5 * 2 MiB + 100 bytes


def test_sparse_reads_and_blocks(engine):
    ino = mkfile(engine, R, b"f")
    engine.write(ino, 5 * MB2 + 7, b"tail")
    st = engine.stat(ino)
    assert st.size == 5 * MB2 + 11
    assert st.blocks == MB2 // 512  # only the block holding "tail"
    assert bytes(engine.read(ino, 0, 4096)) == b"\0" * 4096
    assert bytes(engine.read(ino, MB2 - 3, 6)) == b"\0" * 6  # spans two holes
    got = bytes(engine.read(ino, 5 * MB2 - 5, 100))
    assert got == b"\0" * 12 + b"tail"
    # a read that starts in a hole and ends in data
    assert bytes(engine.read(ino, 4 * MB2, MB2 + 11))[-4:] == b"tail"


def test_write_past_eof_into_allocated_block_reads_zeros(engine):
    ino = mkfile(engine, R, b"f", b"x" * 100)
    engine.truncate(ino, 10)  # the block still holds 90 stale x's
    engine.write(ino, 50, b"y")
    assert read_all(engine, ino) == b"x" * 10 + b"\0" * 40 + b"y"


def test_truncate_down_up(engine):
    ino = mkfile(engine, R, b"f", b"a" * (3 * MB2))
    free0 = engine.statfs()["blocks_free"]
    engine.truncate(ino, MB2 + 5)
    assert engine.statfs()["blocks_free"] == free0 + 1
    assert engine.stat(ino).blocks == 2 * (MB2 // 512)
    engine.truncate(ino, 3 * MB2)
    got = read_all(engine, ino)
    assert got == b"a" * (MB2 + 5) + b"\0" * (2 * MB2 - 5)
    engine.truncate(ino, 0)
    assert engine.stat(ino).blocks == 0 and read_all(engine, ino) == b""
    assert engine.statfs()["blocks_free"] == free0 + 3


def test_truncate_to_a_petabyte_allocates_nothing(engine):
    ino = mkfile(engine, R, b"f", b"abc")
    free0 = engine.statfs()["blocks_free"]
    engine.truncate(ino, 1 << 50)
    st = engine.stat(ino)
    assert st.size == 1 << 50 and st.blocks == 4096 // 512  # 3 bytes: one packed 4 KiB chunk
    assert engine.statfs()["blocks_free"] == free0
    assert bytes(engine.read(ino, (1 << 50) - 4, 100)) == b"\0" * 4
    assert bytes(engine.read(ino, 0, 5)) == b"abc\0\0"
    assert err(engine.truncate, ino, -1) == errno.EINVAL


def test_setattr_times_mode_owner(engine):
    ino = mkfile(engine, R, b"f")
    c0 = engine.stat(ino).ctime_ns
    st = engine.setattr(ino, mode=0o4750, uid=5, gid=6, atime_ns=123456789, mtime_ns=987654321)
    assert stat.S_ISREG(st.mode) and stat.S_IMODE(st.mode) == 0o4750
    assert (st.uid, st.gid, st.atime_ns, st.mtime_ns) == (5, 6, 123456789, 987654321)
    assert st.ctime_ns >= c0


def test_ctime_changes(engine):
    ino = mkfile(engine, R, b"f")
    d = engine.mkdir(R, b"d", 0o755).ino

    def bumped(op) -> bool:
        before = engine.stat(ino).ctime_ns
        engine.setattr(ino, ctime_ns=1)  # make any later change visible
        op()
        return engine.stat(ino).ctime_ns not in (1, before)

    assert bumped(lambda: engine.link(ino, d, b"l"))
    assert bumped(lambda: engine.rename(R, b"f", R, b"g"))
    assert bumped(lambda: engine.setattr(ino, mode=0o600))
    assert bumped(lambda: engine.truncate(ino, 10))
    assert bumped(lambda: engine.unlink(d, b"l"))
    assert bumped(lambda: engine.setxattr(ino, b"user.a", b"1"))


def test_write_to_non_file(engine):
    d = engine.mkdir(R, b"d", 0o755).ino
    assert err(engine.write, d, 0, b"x") == errno.EISDIR
    assert err(engine.read, d, 0, 1) == errno.EISDIR


# ------------------------------------------------------------- names
def test_name_length(engine):
    mkfile(engine, R, b"n" * 255)
    assert err(engine.create, R, b"n" * 256, 0o644) == errno.ENAMETOOLONG
    assert err(engine.lookup, R, b"n" * 256) == errno.ENAMETOOLONG
    assert err(engine.mkdir, R, b"m" * 256, 0o755) == errno.ENAMETOOLONG
    assert engine.statfs()["namemax"] == 255


def test_hard_links(engine):
    ino = mkfile(engine, R, b"a", b"data")
    d = engine.mkdir(R, b"d", 0o755).ino
    assert engine.link(ino, d, b"b").nlink == 2
    assert engine.lookup(d, b"b") == ino
    assert err(engine.link, d, R, b"dl") == errno.EPERM
    assert err(engine.link, ino, R, b"a") == errno.EEXIST
    engine.unlink(R, b"a")
    assert engine.stat(ino).nlink == 1
    assert read_all(engine, ino) == b"data"


def test_symlink(engine):
    st = engine.symlink(R, b"s", b"/some/where/far")
    assert stat.S_ISLNK(st.mode) and st.size == len(b"/some/where/far")
    assert engine.readlink(st.ino) == b"/some/where/far"
    long = b"x/" * 2000
    assert engine.readlink(engine.symlink(R, b"long", long).ino) == long
    f = mkfile(engine, R, b"f")
    assert err(engine.readlink, f) == errno.EINVAL


def test_mkdir_rmdir_nlink(engine):
    assert engine.stat(R).nlink == 2
    d = engine.mkdir(R, b"d", 0o755).ino
    assert engine.stat(R).nlink == 3 and engine.stat(d).nlink == 2
    engine.mkdir(d, b"s1", 0o755)
    engine.mkdir(d, b"s2", 0o755)
    mkfile(engine, d, b"f")
    assert engine.stat(d).nlink == 4
    assert err(engine.rmdir, R, b"d") == errno.ENOTEMPTY
    assert err(engine.rmdir, d, b"f") == errno.ENOTDIR
    assert err(engine.unlink, d, b"s1") == errno.EISDIR
    engine.rmdir(d, b"s1")
    assert engine.stat(d).nlink == 3
    engine.rmdir(d, b"s2")
    engine.unlink(d, b"f")
    engine.rmdir(R, b"d")
    assert engine.stat(R).nlink == 2
    assert err(engine.stat, d) == errno.ENOENT


def test_mknod_kinds(engine):
    fifo = engine.mknod(R, b"fifo", stat.S_IFIFO | 0o644)
    sock = engine.mknod(R, b"sock", stat.S_IFSOCK | 0o755)
    chr_ = engine.mknod(R, b"chr", stat.S_IFCHR | 0o600, (1 << 8) | 3)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISSOCK(sock.mode) and stat.S_ISCHR(chr_.mode)
    assert chr_.rdev == (1 << 8) | 3 and fifo.rdev == 0
    kinds = {n: k for _, n, k in ((c, n, engine.kind(i)) for c, n, i in engine.readdir(R))}
    assert set(kinds) >= {b"fifo", b"sock", b"chr"}


def test_setgid_directory_inheritance(engine):
    d = engine.mkdir(R, b"d", 0o755, USER).ino
    engine.setattr(d, mode=0o2775, gid=4242)
    other = Ctx(uid=7, gid=77)
    f = engine.create(d, b"f", 0o644, other)
    assert (f.uid, f.gid) == (7, 4242)
    assert not f.mode & stat.S_ISGID
    sub = engine.mkdir(d, b"sub", 0o755, other)
    assert sub.gid == 4242 and sub.mode & stat.S_ISGID
    plain = engine.create(R, b"plain", 0o644, other)
    assert (plain.uid, plain.gid) == (7, 77)


# ------------------------------------------------------------- rename
def test_rename_basic_and_replace(engine):
    a = mkfile(engine, R, b"a", b"A")
    b = mkfile(engine, R, b"b", b"B")
    engine.rename(R, b"a", R, b"b")
    assert engine.lookup(R, b"b") == a
    assert err(engine.lookup, R, b"a") == errno.ENOENT
    assert err(engine.stat, b) == errno.ENOENT  # nobody holds it: freed
    assert err(engine.rename, R, b"missing", R, b"x") == errno.ENOENT


def test_rename_same_inode_is_a_noop(engine):
    a = mkfile(engine, R, b"a")
    engine.link(a, R, b"b")
    engine.rename(R, b"a", R, b"b")
    assert sorted(names(engine, R)) == [b"a", b"b"] and engine.stat(a).nlink == 2


def test_rename_noreplace_and_exchange(engine):
    a = mkfile(engine, R, b"a")
    d = engine.mkdir(R, b"d", 0o755).ino
    assert err(engine.rename, R, b"a", R, b"d", RENAME_NOREPLACE) == errno.EEXIST
    engine.rename(R, b"a", R, b"c", RENAME_NOREPLACE)
    assert engine.lookup(R, b"c") == a
    assert err(engine.rename, R, b"c", R, b"nope", RENAME_EXCHANGE) == errno.ENOENT
    assert err(engine.rename, R, b"c", R, b"d", RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL
    # exchange a file and a directory across parents: nlink and ".." follow
    sub = engine.mkdir(d, b"sub", 0o755).ino
    assert engine.stat(d).nlink == 3 and engine.stat(R).nlink == 3
    engine.rename(R, b"c", d, b"sub", RENAME_EXCHANGE)
    assert engine.lookup(R, b"c") == sub and engine.lookup(d, b"sub") == a
    assert engine.lookup(sub, b"..") == R
    assert engine.stat(d).nlink == 2 and engine.stat(R).nlink == 4
    # a directory cannot be exchanged into its own subtree
    engine.mkdir(sub, b"inner", 0o755)
    assert err(engine.rename, R, b"c", engine.lookup(R, b"c"), b"inner", RENAME_EXCHANGE) == errno.EINVAL


def test_rename_directories(engine):
    d = engine.mkdir(R, b"d", 0o755).ino
    empty = engine.mkdir(R, b"empty", 0o755).ino
    full = engine.mkdir(R, b"full", 0o755).ino
    mkfile(engine, full, b"x")
    f = mkfile(engine, R, b"f")
    assert err(engine.rename, R, b"d", R, b"full") == errno.ENOTEMPTY
    assert err(engine.rename, R, b"d", R, b"f") == errno.ENOTDIR
    assert err(engine.rename, R, b"f", R, b"empty") == errno.EISDIR
    engine.rename(R, b"d", R, b"empty")
    assert engine.lookup(R, b"empty") == d
    assert err(engine.stat, empty) == errno.ENOENT
    assert engine.stat(R).nlink == 4  # root, ., empty(=d), full
    # into its own subtree
    sub = engine.mkdir(d, b"sub", 0o755).ino
    assert err(engine.rename, R, b"empty", sub, b"loop") == errno.EINVAL
    assert err(engine.rename, R, b"empty", d, b"self") == errno.EINVAL
    # moving a directory keeps everything below it reachable
    leaf = mkfile(engine, sub, b"leaf", b"deep")
    engine.rename(R, b"empty", full, b"moved")
    assert engine.lookup(engine.lookup(engine.lookup(full, b"moved"), b"sub"), b"leaf") == leaf
    assert engine.lookup(d, b"..") == full
    assert engine.stat(full).nlink == 3 and engine.stat(R).nlink == 3
    # the file beside the moving directories was never touched by them
    assert engine.lookup(R, b"f") == f and engine.stat(f).nlink == 1
    assert sorted(names(engine, R)) == [b"f", b"full"]


# ------------------------------------------------------------- readdir
def test_readdir_cookies_are_stable(engine):
    d = engine.mkdir(R, b"d", 0o755).ino
    for i in range(300):
        mkfile(engine, d, b"f%03d" % i)
    listing = engine.readdir(d)
    assert [n for _, n, _ in listing[:2]] == [b".", b".."]
    cookies = [c for c, _, _ in listing]
    assert cookies == sorted(cookies) and len(set(cookies)) == len(cookies)
    # resume in the middle while entries around the resume point change
    mid = listing[2 + 149][0]  # f149 (after "." and "..")
    engine.unlink(d, b"f148")  # before the cookie
    engine.unlink(d, b"f151")  # after it
    mkfile(engine, d, b"new")
    rest = [n for _, n, _ in engine.readdir(d, mid)]
    expect = [b"f%03d" % i for i in range(150, 300) if i != 151] + [b"new"]
    assert rest == expect
    # cookies of unchanged entries stay what they were
    again = {n: c for c, n, _ in engine.readdir(d)}
    for c, n, _ in listing:
        if n in again:
            assert again[n] == c
    # a rename gives the entry a new cookie past every old one (seen once, at the end)
    engine.rename(d, b"f000", d, b"renamed")
    last = engine.readdir(d)[-1]
    assert last[1] == b"renamed" and last[0] > max(cookies)
    assert engine.readdir(d, last[0]) == []


def test_readdir_cookies_survive_reopen(region):
    e = Engine(region)
    try:
        d = e.mkdir(R, b"d", 0o755).ino
        for i in range(50):
            mkfile(e, d, b"%d" % i)
        e.unlink(d, b"10")
        before = e.readdir(d)
    finally:
        e.close()
    e = Engine(region)
    try:
        assert e.readdir(d) == before
        assert e.readdir(d, before[20][0]) == before[21:]
    finally:
        e.close()
    assert_clean(region)


# ------------------------------------------------- orphans and references
def test_unlink_while_referenced_keeps_inode(engine):
    ino = mkfile(engine, R, b"f", b"x" * (MB2 + 1))
    free0 = engine.statfs()["blocks_free"]
    engine.ref(ino, 2)
    engine.unlink(R, b"f")
    assert engine.stat(ino).nlink == 0
    assert read_all(engine, ino) == b"x" * (MB2 + 1)
    engine.write(ino, 0, b"still")
    assert engine.statfs()["blocks_free"] == free0
    engine.forget(ino, 1)
    assert engine.stat(ino).nlink == 0  # one reference left
    engine.forget(ino, 1)
    assert err(engine.stat, ino) == errno.ENOENT
    assert engine.statfs()["blocks_free"] == free0 + 2


def test_forget_of_linked_inode_keeps_it(engine):
    ino = mkfile(engine, R, b"f", b"abc")
    engine.ref(ino)
    engine.forget(ino)
    assert read_all(engine, ino) == b"abc"


def test_rmdir_while_referenced(engine):
    d = engine.mkdir(R, b"d", 0o755).ino
    engine.ref(d)
    engine.rmdir(R, b"d")
    assert engine.stat(d).nlink == 0
    assert err(engine.create, d, b"x", 0o644) == errno.ENOENT  # removed but open
    assert names(engine, d) == []
    engine.forget(d)
    assert err(engine.stat, d) == errno.ENOENT


def test_rename_over_referenced_file_keeps_it_until_forget(engine):
    a = mkfile(engine, R, b"a", b"new")
    b = mkfile(engine, R, b"b", b"old")
    engine.ref(b)
    engine.rename(R, b"a", R, b"b")
    assert read_all(engine, b) == b"old" and engine.stat(b).nlink == 0
    engine.forget(b)
    assert err(engine.stat, b) == errno.ENOENT
    assert read_all(engine, a) == b"new"


def test_orphan_left_at_kill_is_freed_at_next_open(region):
    e = Engine(region)
    ino = mkfile(e, R, b"f", b"z" * (3 * MB2))
    free_before = e.statfs()["blocks_free"]
    e.ref(ino)
    e.unlink(R, b"f")
    assert e.statfs()["blocks_free"] == free_before
    e.region.close()  # the process dies: no close(), no forget
    e2 = Engine(region)
    try:
        assert e2.reclaimed == 1
        assert err(e2.stat, ino) == errno.ENOENT
        assert e2.statfs()["blocks_free"] == free_before + 3
    finally:
        e2.close()
    assert_clean(region)


def test_close_frees_orphans(region):
    e = Engine(region)
    ino = mkfile(e, R, b"f", b"z")
    e.ref(ino)
    e.unlink(R, b"f")
    e.close()
    e2 = Engine(region, readonly=True)
    try:
        assert err(e2.stat, ino) == errno.ENOENT
    finally:
        e2.close()
    assert_clean(region)


def test_inode_numbers_stable_across_reopen(region):
    e = Engine(region)
    inos = {n: mkfile(e, R, n, n) for n in (b"a", b"b", b"c")}
    e.unlink(R, b"b")
    e.region.close()  # killed
    e = Engine(region)
    try:
        assert e.lookup(R, b"a") == inos[b"a"] and e.lookup(R, b"c") == inos[b"c"]
        assert read_all(e, inos[b"c"]) == b"c"
    finally:
        e.close()
    assert_clean(region)


# ------------------------------------------------------------- xattrs
def test_xattrs(engine):
    ino = mkfile(engine, R, b"f")
    big = bytes(range(256)) * 40  # 10 KiB
    engine.setxattr(ino, b"user.big", big)
    engine.setxattr(ino, b"trusted.t", b"t")
    engine.setxattr(ino, b"security.s", b"")
    assert engine.getxattr(ino, b"user.big") == big
    assert engine.getxattr(ino, b"security.s") == b""
    assert sorted(engine.listxattr(ino)) == [b"security.s", b"trusted.t", b"user.big"]
    assert err(engine.setxattr, ino, b"user.big", b"x", XATTR_CREATE) == errno.EEXIST
    assert err(engine.setxattr, ino, b"user.nope", b"x", XATTR_REPLACE) == errno.ENODATA
    engine.setxattr(ino, b"user.big", b"small", XATTR_REPLACE)
    assert engine.getxattr(ino, b"user.big") == b"small"
    engine.removexattr(ino, b"user.big")
    assert err(engine.getxattr, ino, b"user.big") == errno.ENODATA
    assert err(engine.removexattr, ino, b"user.big") == errno.ENODATA
    assert err(engine.setxattr, ino, b"trusted.x", b"1", 0, USER) == errno.EPERM
    assert err(engine.setxattr, ino, b"user.x", b"v" * 65537) == errno.E2BIG


def test_xattr_unknown_namespace_is_eopnotsupp(engine):
    # tmpfs answers EOPNOTSUPP for a name outside its namespaces whatever the call
    ino = mkfile(engine, R, b"f")
    assert err(engine.setxattr, ino, b"bogus.x", b"1") == errno.EOPNOTSUPP
    assert err(engine.getxattr, ino, b"bogus.x") == errno.EOPNOTSUPP
    assert err(engine.removexattr, ino, b"bogus.x") == errno.EOPNOTSUPP
    assert err(engine.getxattr, ino, b"user") == errno.EOPNOTSUPP
    # an empty name after the prefix is EINVAL; a trailing dot is an ordinary name
    assert err(engine.setxattr, ino, b"user.", b"1") == errno.EINVAL
    assert err(engine.getxattr, ino, b"user.") == errno.EINVAL
    engine.setxattr(ino, b"user.a.", b"dot")
    assert engine.getxattr(ino, b"user.a.") == b"dot"


def test_xattrs_survive_reopen_and_unlink_frees_them(region):
    e = Engine(region)
    ino = mkfile(e, R, b"f")
    val = b"v" * 10240
    e.setxattr(ino, b"user.a", val)
    e.setxattr(ino, b"user.b", b"b")
    e.region.close()
    e = Engine(region)
    try:
        assert e.getxattr(ino, b"user.a") == val
        assert sorted(e.listxattr(ino)) == [b"user.a", b"user.b"]
        e.unlink(R, b"f")
        assert not e.xattrs.get(ino)
    finally:
        e.close()
    assert_clean(region)


# ------------------------------------------------------------- space
def test_enospc_and_recovery(engine):
    total = engine.statfs()["blocks_free"]
    ino = mkfile(engine, R, b"big")
    engine.write(ino, 0, b"b" * (total * MB2))
    assert engine.statfs()["blocks_free"] == 0
    other = mkfile(engine, R, b"other")
    assert err(engine.write, other, 0, b"x") == errno.ENOSPC
    assert engine.stat(other).size == 0 and engine.stat(other).blocks == 0
    # writing inside allocated blocks still works
    engine.write(ino, 5, b"ok")
    engine.truncate(ino, 1 << 40)  # a hole costs nothing
    assert err(engine.write, ino, (1 << 40) - 1, b"xy") == errno.ENOSPC
    assert engine.stat(ino).size == 1 << 40
    engine.unlink(R, b"big")
    assert engine.statfs()["blocks_free"] == total
    assert engine.write(other, 0, b"x" * MB2) == MB2


def test_write_short_at_enospc(engine):
    """As tmpfs: a write that can store some bytes stores them and returns a short
    count; only a write that can store nothing fails with ENOSPC."""
    mib = 1 << 20
    total = engine.statfs()["blocks_free"]
    mkfile(engine, R, b"filler", b"f" * ((total - 1) * MB2))
    ino = mkfile(engine, R, b"f", b"a" * (mib // 2))  # takes the last free block
    assert engine.statfs()["blocks_free"] == 0
    data = b"b" * mib
    assert engine.write(ino, 3 * mib // 4, data) == mib  # inside the allocated block
    assert engine.write(ino, 3 * mib // 2, data) == mib // 2  # half of it fits
    assert engine.stat(ino).size == MB2
    assert read_all(engine, ino) == b"a" * (mib // 2) + bytes(mib // 4) + b"b" * (5 * mib // 4)
    assert err(engine.write, ino, MB2, b"x") == errno.ENOSPC
    assert engine.stat(ino).size == MB2
    engine.unlink(R, b"filler")
    assert engine.write(ino, MB2, b"x") == 1


def test_a_rolled_back_transaction_keeps_the_kernels_references(engine, monkeypatch):
    """A failure inside a transaction rolls the region back and rebuilds the in-memory
    state from it; the lookup counts the kernel holds are not in the region and must
    survive that, or an open, unlinked file would be freed under its reader."""
    f = engine.create(R, b"open", 0o644).ino
    engine.write(f, 0, b"still open")
    engine.ref(f, 2)  # the kernel holds two references (a lookup and an open, say)
    engine.unlink(R, b"open")  # an orphan now: kept while referenced
    g = engine.create(R, b"g", 0o644).ino
    free = engine.statfs()["blocks_free"]

    def broken(*args, **kwargs):  # fault injection: the allocator fails mid-transaction
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.alloc, "mark", broken)
    with pytest.raises(RuntimeError):
        engine.write(g, 0, b"x" * (3 << 20))
    assert engine.statfs()["blocks_free"] == free and engine.stat(g).size == 0  # rolled back
    assert bytes(engine.read(f, 0, 10)) == b"still open"
    engine.write(g, 0, b"y" * (3 << 20))  # the rebuilt state works
    engine.forget(f)  # one reference is left: the file must stay
    assert bytes(engine.read(f, 0, 10)) == b"still open"
    engine.forget(f)  # the last one: now it goes
    with pytest.raises(FsError):
        engine.stat(f)
