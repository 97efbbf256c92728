"""Every table can fill: inodes, extents, directory entries, blobs, packs, data blocks.

Each test makes a region whose table under test is small (pmemfs-mkfs --inodes,
--extents, --dirents, --blobs, --packs), fills it through a real mount, and checks:
ENOSPC comes at the call that needs the slot; the refused call changed nothing (the
tree, contents, xattrs, free space: conftest.snapshot); what needs no slot of that table
still works; freeing space makes the table usable again; a kill -9 and a new mount find
it all consistent, and fsck is clean at the end (the mount fixture checks).
"""

from __future__ import annotations

import errno
import os

import pytest
from conftest import snapshot, wait_for

from pmemfs.fs.engine import Engine, FsError
from pmemfs.media.format import ROOT_INO

MB2 = 2 << 20
SMALL = 64 << 10  # the largest packed file at 2 MiB blocks


def outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def pwrite(path: str, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def free_inodes(path: str, n: int = 1) -> None:
    """Wait until n inodes are free. An unlinked file's inode (and its blocks) is freed
    when the kernel forgets it, and the kernel sends FORGET asynchronously, after the
    last close is answered: milliseconds after the unlink returns."""
    assert wait_for(lambda: os.statvfs(path).f_ffree >= n), os.statvfs(path)


def fill(make, limit: int = 100_000) -> int:
    """Call make(i) for i = 0, 1, ... until ENOSPC; the number of calls that succeeded."""
    for i in range(limit):
        try:
            make(i)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return i
    raise AssertionError("the table never filled")


def refused_and_unchanged(root: str, *calls) -> None:
    """Each call answers ENOSPC and changes nothing."""
    for fn, *args in calls:
        before = snapshot(root)
        assert outcome(fn, *args) == "ENOSPC", (fn, args)
        assert snapshot(root) == before, (fn, args)


def test_inode_table(region_factory, mount_factory):
    m = mount_factory(region_factory(inodes=16, dirents=64))
    assert fill(lambda i: write_file(m.p(f"f{i}"), b"x")) == 15  # 16 records, one is the root
    assert os.statvfs(m.path).f_ffree == 0
    refused_and_unchanged(m.path, (write_file, m.p("new"), b""), (os.mkdir, m.p("d")),
                          (os.symlink, "f0", m.p("l")), (os.mkfifo, m.p("p")))
    os.link(m.p("f0"), m.p("f0.link"))  # a name needs no inode
    os.rename(m.p("f1"), m.p("f1.renamed"))
    os.setxattr(m.p("f2"), "user.x", b"1")
    os.unlink(m.p("f3"))
    free_inodes(m.path)
    os.mkdir(m.p("d"))
    m.restart()
    assert outcome(write_file, m.p("new"), b"") == "ENOSPC"
    os.rmdir(m.p("d"))
    free_inodes(m.path)
    write_file(m.p("new"), b"y")
    assert sorted(os.listdir(m.path)) == sorted(
        [f"f{i}" for i in range(15) if i not in (1, 3)] + ["f0.link", "f1.renamed", "new"])


def test_directory_entry_table(region_factory, mount_factory):
    m = mount_factory(region_factory(inodes=64, dirents=10))
    write_file(m.p("f"), b"data")
    write_file(m.p("g"), b"other")
    assert fill(lambda i: os.link(m.p("f"), m.p(f"l{i}"))) == 8
    refused_and_unchanged(m.path, (os.link, m.p("f"), m.p("more")), (write_file, m.p("new"), b""),
                          (os.mkdir, m.p("d")), (os.symlink, "f", m.p("s")))
    os.rename(m.p("l0"), m.p("renamed"))  # a rename reuses its entry
    os.rename(m.p("g"), m.p("l1"))  # and one over another name frees one
    os.link(m.p("f"), m.p("again"))
    assert os.stat(m.p("f")).st_nlink == 9
    m.restart()
    assert outcome(os.link, m.p("f"), m.p("more")) == "ENOSPC"
    os.unlink(m.p("l3"))
    os.mkdir(m.p("d"))
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"data"


def test_extent_table(region_factory, mount_factory):
    m = mount_factory(region_factory(extents=8))
    s = m.p("sparse")
    # One byte in every other block: each is an extent of its own.
    n = fill(lambda i: pwrite(s, b"%d" % i, 2 * i * MB2))
    assert n == 8 and os.statvfs(m.path).f_bfree > 0  # blocks are left, extents are not
    write_file(m.p("small"), b"")  # no extent needed
    refused_and_unchanged(m.path, (pwrite, s, b"more", 2 * n * MB2), (pwrite, m.p("small"), b"s", 0),
                          (os.setxattr, s, "user.pmemfs.prealloc", b"40M"))
    pwrite(s, b"inside", 5)  # into an existing extent: nothing new
    m.restart()
    os.truncate(s, 4 * MB2)  # frees the extents past 4 MiB
    write_file(m.p("small"), b"s")
    with open(s, "rb") as f:
        assert f.read(11) == b"0\0\0\0\0inside"


def test_blob_table(region_factory, mount_factory):
    m = mount_factory(region_factory(blobs=8))
    write_file(m.p("f"), b"")
    os.mkdir(m.p("d"))
    os.setxattr(m.p("d"), "user.pmemfs.align", b"1G")  # a stored policy: one blob
    assert outcome(os.setxattr, m.p("f"), "user.big", b"v" * 65536) == "ENOSPC"  # 135 blobs
    assert fill(lambda i: os.setxattr(m.p("f"), f"user.a{i}", b"%d" % i)) == 7
    refused_and_unchanged(m.path, (os.setxattr, m.p("f"), "user.more", b"1"),
                          (os.symlink, "f", m.p("link")),
                          (write_file, m.p("d", "inherits"), b""),  # the policy is copied
                          (os.mkdir, m.p("d", "sub")))
    write_file(m.p("plain"), b"")  # a file needs no blob
    os.mkfifo(m.p("d", "fifo"))  # nor does a FIFO, which inherits no policy
    os.setxattr(m.p("f"), "user.a0", b"X")  # replacing a value reuses its blob
    m.restart()
    assert os.getxattr(m.p("f"), "user.a0") == b"X"
    os.removexattr(m.p("f"), "user.a1")
    os.symlink("f", m.p("link"))
    os.removexattr(m.p("f"), "user.a2")
    write_file(m.p("d", "inherits"), b"")
    assert os.getxattr(m.p("d", "inherits"), "user.pmemfs.align") == b"1G"


def test_pack_table(region_factory, mount_factory):
    """A full pack table is not an error while a block is free: a small file then takes
    a whole block of its own, as a file with a placement policy does."""
    m = mount_factory(region_factory(packs=1))
    for i in range(32):  # 32 files of 16 chunks fill the one pack block
        write_file(m.p(f"s{i}"), bytes([i]) * SMALL)
    assert all(os.stat(m.p(f"s{i}")).st_blocks == SMALL // 512 for i in range(32))  # one pack block
    write_file(m.p("overflow"), b"o" * 100)
    assert os.stat(m.p("overflow")).st_blocks == MB2 // 512  # a whole block
    big = m.p("big")
    n = fill(lambda i: pwrite(big, b"b" * MB2, i * MB2))
    assert n > 0 and os.statvfs(m.path).f_bfree == 0
    write_file(m.p("tiny"), b"")
    refused_and_unchanged(m.path, (pwrite, m.p("tiny"), b"t", 0))
    os.unlink(m.p("s0"))  # chunks free in the pack block: small files fit again
    assert wait_for(lambda: os.statvfs(m.path).f_bfree > 0)
    write_file(m.p("tiny"), b"t")
    assert os.stat(m.p("tiny")).st_blocks == 4096 // 512
    m.restart()
    os.unlink(m.p("overflow"))  # its block comes back once the kernel forgets it
    assert wait_for(lambda: os.statvfs(m.path).f_bfree >= MB2 // 4096)  # a whole block's chunks
    write_file(m.p("tiny2"), b"t" * SMALL)  # 16 chunks: not in the pack, so in that block
    for i in range(1, 32):
        with open(m.p(f"s{i}"), "rb") as f:
            assert f.read() == bytes([i]) * SMALL


def test_data_blocks(region_factory, mount_factory):
    m = mount_factory(region_factory())
    big = m.p("big")
    n = fill(lambda i: pwrite(big, bytes([i % 251]) * MB2, i * MB2))
    assert os.statvfs(m.path).f_bfree == 0 and os.stat(big).st_size == n * MB2
    write_file(m.p("small"), b"")
    refused_and_unchanged(m.path, (pwrite, m.p("small"), b"s", 0), (pwrite, big, b"x", n * MB2 + 5),
                          (os.setxattr, big, "user.pmemfs.prealloc", b"%d" % ((n + 1) * MB2)))
    os.mkdir(m.p("d"))  # metadata needs no data block
    os.symlink("big", m.p("l"))
    m.restart()
    os.truncate(big, (n - 1) * MB2)
    write_file(m.p("small"), b"s")
    with open(big, "rb") as f:
        f.seek((n - 2) * MB2)
        assert f.read(1) == bytes([(n - 2) % 251])


def test_full_extent_table_inside_a_transaction_rolls_back(region_factory):
    """A write into fragmented free space needs more extents than its holes: the slot
    that is missing is found inside the transaction, which rolls back whole."""
    from conftest import assert_clean

    region = region_factory(extents=64)
    e = Engine(region)
    a = e.create(ROOT_INO, b"a", 0o644).ino
    b = e.create(ROOT_INO, b"b", 0o644).ino
    for i in range(6):  # a and b interleaved: a's blocks, once freed, are six free runs
        e.write(a, i * MB2, b"a" * MB2)
        e.write(b, i * MB2, b"b" * MB2)
    c = e.create(ROOT_INO, b"c", 0o644).ino
    e.write(c, 0, b"c" * 5000)  # packed: one extent, in a pack block of its own
    d = e.create(ROOT_INO, b"d", 0o644).ino
    while e.alloc.free:  # d takes every other block
        e.write(d, e.stat(d).size, b"d" * MB2)
    e.unlink(ROOT_INO, b"a")
    assert e.alloc.free == 6
    k = 0
    while e.have_slots("extent", 3):  # small files, packed with c, until two extents are left
        e.write(e.create(ROOT_INO, b"s%d" % k, 0o644).ino, 0, b"s")
        k += 1
    before = (e.stat(c).size, bytes(e.read(c, 0, 5000)), e.alloc.free, e.stat(d).size)
    with pytest.raises(FsError) as ei:
        e.write(c, 0, b"C" * (6 * MB2))  # one hole, six runs of one block: six extents
    assert ei.value.errno == errno.ENOSPC
    assert (e.stat(c).size, bytes(e.read(c, 0, 5000)), e.alloc.free, e.stat(d).size) == before
    assert e.write(c, 0, b"C" * MB2) == MB2  # one extent is fine
    e.close()
    assert_clean(region)
