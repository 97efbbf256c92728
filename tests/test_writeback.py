"""`-o writeback`: the kernel's writeback cache, through a real mount.

What it must keep (docs/DESIGN.md, "Writeback cache"): small writes coalesce into few
requests; fsync and close are durable, also across a kill -9 of everything; dirty pages
outlive a daemon crash under the supervisor; O_DIRECT and mappings stay coherent with
the cache; control commands that move or grow blocks are refused, not run behind the
kernel's back.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from conftest import assert_clean, drop_caches

MB = 1 << 20


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_small_writes_reach_the_daemon_as_few_large_ones(region, mount_factory):
    m = mount_factory(region, {"writeback"}, debug=True)
    data = os.urandom(4 * MB)
    fd = os.open(m.p("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for off in range(0, len(data), 4096):
            os.pwrite(fd, data[off:off + 4096], off)
    finally:
        os.close(fd)  # close flushes: the data is the daemon's now
    writes = m.log().count("pmemfs.fuse DEBUG write(")
    assert 1 <= writes <= 16, writes  # 1,024 write(2) calls
    drop_caches()
    assert _read(m.p("f")) == data
    m.unmount()
    m.start()
    assert _read(m.p("f")) == data


def test_fsync_and_close_survive_kill_9_of_everything(region, mount_factory):
    m = mount_factory(region, {"writeback"})
    a, b = _pattern(MB, 1), _pattern(MB, 2)
    fd = os.open(m.p("synced"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, a)
    os.fsync(fd)
    os.write(fd, b"not synced")  # may be lost
    with open(m.p("closed"), "wb") as g:
        g.write(b)
    m.kill()  # supervisor and daemon: the connection ends, dirty pages with it
    try:
        os.close(fd)
    except OSError:
        pass  # ENOTCONN: the mount is dead
    m.start()
    assert _read(m.p("synced"))[:MB] == a
    assert _read(m.p("closed")) == b
    m.unmount()
    assert_clean(m.region)


def test_dirty_pages_outlive_a_daemon_crash(region, mount_factory):
    """The supervisor keeps the connection, so the kernel keeps its dirty pages and
    writes them to the next daemon."""
    m = mount_factory(region, {"writeback"})
    data = _pattern(3 * MB, 3)
    fd = os.open(m.p("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, data, 0)  # in the page cache only
        m.crash()
        os.fsync(fd)
    finally:
        os.close(fd)
    m.unmount()
    m.start()
    assert _read(m.p("f")) == data


def test_o_direct_and_mappings_agree_with_the_cache(region, mount_factory):
    m = mount_factory(region, {"writeback"})
    path = m.p("f")
    with open(path, "wb") as f:
        f.write(b"a" * (2 * MB))
    with open(path, "r+b") as f:
        f.write(b"b" * 4096)  # dirty in the cache
        f.flush()
        buf = mmap.mmap(-1, 4096)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)  # the kernel writes the dirty range back first
            assert buf[:] == b"b" * 4096
            buf[:] = b"c" * 4096
            wfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            os.pwrite(wfd, buf, 8192)
            os.close(wfd)
        finally:
            os.close(fd)
        f.seek(8192)
        assert f.read(4096) == b"c" * 4096  # the cached copy was dropped
        with mmap.mmap(f.fileno(), 2 * MB) as mm:
            mm[MB:MB + 5] = b"mmapd"
            mm.flush()
    m.unmount()
    m.start()
    data = _read(path)
    assert data[:4096] == b"b" * 4096 and data[8192:12288] == b"c" * 4096
    assert data[MB:MB + 5] == b"mmapd" and len(data) == 2 * MB


@pytest.mark.parametrize("name, value", [
    ("user.pmemfs.prealloc", b"4M"),
    ("user.pmemfs.lease", b"rw"),
])
def test_commands_that_move_blocks_are_refused(region, mount_factory, name, value):
    m = mount_factory(region, {"writeback"})
    with open(m.p("f"), "wb") as f:
        f.write(b"x" * 4096)
    with pytest.raises(OSError) as e:
        os.setxattr(m.p("f"), name, value)
    assert e.value.errno == errno.EOPNOTSUPP
    os.setxattr(m.p("f"), "user.pmemfs.align", b"2M")  # a placement wish moves nothing
    assert os.stat(m.p("f")).st_size == 4096


def test_commands_are_refused_to_other_users_too(region, mount_factory):
    """The refusal is the mount's, not a permission: uid 65534 on its own file gets
    EOPNOTSUPP for prealloc, and its align still works."""
    m = mount_factory(region, {"writeback", "allow_other"})
    os.chmod(m.path, 0o777)
    dfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)  # pytest's tmp dirs are 0700
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.fchdir(dfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with open("mine", "wb") as f:
                f.write(b"x")
            try:
                os.setxattr("mine", "user.pmemfs.prealloc", b"4M")
                got = "ok"
            except OSError as e:
                got = str(e.errno)
            os.setxattr("mine", "user.pmemfs.align", b"2M")
            os.write(w, got.encode())
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(dfd)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert got == str(errno.EOPNOTSUPP), got
    assert os.stat(m.p("mine")).st_uid == 65534 and os.stat(m.p("mine")).st_size == 1
