"""pmemfs.direct: files mapped straight from the region, coherence with the mount, leases.

Real mounts only. Every test that takes a lease gives it back or lets its holder die,
and the fixtures check the region afterwards.
"""

from __future__ import annotations

import errno
import gc
import json
import mmap
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import drop_caches

from pmemfs import direct
from pmemfs.serve.control import CARVE, LEASE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, the region, drop_caches)")

BS = 2 << 20
MiB = 1 << 20


def pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write_file(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def holders(path: str) -> list[dict]:
    return json.loads(os.getxattr(path, LEASE))


def fragmented(m, name: str = "f", seed: int = 1) -> bytes:
    """A file of several extents: its blocks interleaved with another file's."""
    data = pattern(3 * BS + 12345, seed)
    p = m.p(name)
    for i in range(4):
        write_file(p, data[i * BS:(i + 1) * BS], i * BS)
        write_file(m.p(f"{name}.spacer{i}"), b"s" * BS)
    return data


def region_bytes(region: str, extents, size: int) -> bytes:
    """The file's bytes read from the region file at the extents' region offsets."""
    out = bytearray(size)
    fd = os.open(region, os.O_RDONLY)
    try:
        for foff, roff, length in extents:
            n = min(length, size - foff)
            if n > 0:
                out[foff:foff + n] = os.pread(fd, n, roff)
    finally:
        os.close(fd)
    return bytes(out)


def test_extent_map_matches_direct_both_ways(region, mount_factory):
    m = mount_factory(region)
    data = fragmented(m)
    p = m.p("f")
    drop_caches()
    with direct.open(p, writable=True) as d:
        assert d.region == os.path.realpath(region) or os.path.samefile(d.region, region)
        assert len(d.extents) >= 2 and len(d.arrays) == len(d.extents)
        assert [tuple(e) for e in json.loads(os.getxattr(p, "user.pmemfs.extents"))] == d.extents
        assert d.size == len(data)
        for foff, a in d.arrays:  # each array is its extent's slice of the file
            assert a.tobytes() == data[foff:foff + len(a)]
        assert d.read(0, len(data)).tobytes() == data
        assert d.read(BS - 10, 20).tobytes() == data[BS - 10:BS + 10]  # across extents: a copy
        assert region_bytes(region, d.extents, d.size) == data
        with pytest.raises(ValueError):
            d.view()  # not one extent
        new = pattern(len(data), 2)
        assert d.write(0, new) == len(new)
        # The mount sees the direct writes: opened after the lease, and after dropping caches.
        assert read_file(p) == new
        drop_caches()
        assert read_file(p) == new
        # And direct access sees writes through the mount at once.
        write_file(p, b"through the mount", BS + 7)
        assert d.read(BS + 7, 17).tobytes() == b"through the mount"
    drop_caches()
    expect = new[:BS + 7] + b"through the mount" + new[BS + 7 + 17:]
    assert read_file(p) == expect
    with direct.open(p) as d:  # read-only, after the release
        assert d.read(0, d.size).tobytes() == expect


def test_one_extent_view_and_read_only(region, mount_factory):
    m = mount_factory(region)
    p = m.p("one")
    data = pattern(3 * MiB, 3)
    write_file(p, data)
    with direct.open(p) as d:
        v = d.view()
        assert not v.flags.writeable
        assert v.tobytes() == data
        assert holders(p)[0]["mode"] == "ro"
        del v
        with pytest.raises(OSError) as ei:
            d.write(0, b"x")
        assert ei.value.errno == errno.EBADF
    with direct.open(p, writable=True) as d:
        v = d.view()
        v[:5] = np.frombuffer(b"HELLO", np.uint8)
        with pytest.raises(ValueError):
            d.write(len(data) - 2, b"past the end")
        del v  # a view kept after close would keep the mapping and the lease
    assert holders(p) == []
    assert read_file(p)[:5] == b"HELLO"


def test_direct_writes_visible_to_opens_after_the_lease(region, mount_factory):
    m = mount_factory(region)
    p = m.p("f")
    write_file(p, b"old " * (BS // 4))
    with open(p, "rb") as f:  # the kernel caches the old bytes
        assert f.read(4) == b"old "
    with direct.open(p, writable=True) as d:  # taking the lease drops them
        d.write(0, b"new!")
        with open(p, "rb") as f:
            assert f.read(8) == b"new!old "
            # While leased the file is not cached: a shared mmap through the mount fails.
            with pytest.raises(OSError) as ei:
                mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)
            assert ei.value.errno == errno.ENODEV
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        assert mm[:8] == b"new!old "  # released: mmap through the mount works again


def test_lease_refuses_unlink_truncate_rename_and_carve(region, mount_factory):
    m = mount_factory(region)
    p = m.p("f")
    write_file(p, b"x" * (2 * BS + 100))
    write_file(m.p("other"), b"o")
    os.close(os.open(m.p("dst"), os.O_CREAT | os.O_WRONLY, 0o644))
    d = direct.open(p, writable=True)
    try:
        assert [h["pid"] for h in holders(p)] == [os.getpid()]
        for fn in (lambda: os.unlink(p),
                   lambda: os.truncate(p, 0),
                   lambda: os.truncate(p, BS),  # frees the last block
                   lambda: os.rename(m.p("other"), p),
                   lambda: open(p, "wb").close(),  # O_TRUNC
                   lambda: os.setxattr(m.p("dst"), CARVE,
                                       json.dumps({"src": "f", "offset": 0, "length": BS}).encode())):
            with pytest.raises(OSError) as ei:
                fn()
            assert ei.value.errno == errno.EBUSY
        assert os.path.getsize(p) == 2 * BS + 100
        os.truncate(p, 2 * BS + 1)  # stays inside the allocated blocks: allowed
        os.truncate(p, 3 * BS)  # growing is allowed
        os.link(p, m.p("g"))
        os.unlink(m.p("g"))  # drops a link, frees nothing: allowed
        assert d.read(0, 3).tobytes() == b"xxx"
    finally:
        d.close()
    assert holders(p) == []
    os.truncate(p, BS)
    os.setxattr(m.p("dst"), CARVE, json.dumps({"src": "f", "offset": 0, "length": BS}).encode())
    os.unlink(p)
    os.rename(m.p("other"), m.p("dst"))


def test_a_killed_clients_lease_is_dropped(region, mount_factory):
    m = mount_factory(region)
    p = m.p("f")
    write_file(p, b"y" * BS)
    code = ("import sys, time, pmemfs.direct\n"
            "d = pmemfs.direct.open(sys.argv[1], writable=True)\n"
            "d.write(0, b'child')\n"
            "print('leased', flush=True)\n"
            "time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, p], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert child.stdout.readline().strip() == "leased"
        assert [h["pid"] for h in holders(p)] == [child.pid]
        with pytest.raises(OSError) as ei:
            os.unlink(p)
        assert ei.value.errno == errno.EBUSY
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert holders(p) == []
    assert read_file(p)[:5] == b"child"
    os.unlink(p)


def test_arrays_kept_after_close_keep_the_lease(region, mount_factory):
    m = mount_factory(region)
    p = m.p("f")
    write_file(p, b"z" * 100)
    d = direct.open(p, writable=True)
    a = d.view()
    d.close()
    assert d.closed and holders(p) != []  # a still maps the blocks
    with pytest.raises(OSError):
        os.unlink(p)
    a[0] = ord("Z")
    del a
    gc.collect()
    assert holders(p) == []
    assert read_file(p)[:2] == b"Zz"
    os.unlink(p)


def test_leases_survive_a_takeover_and_a_restart(region, mount_factory):
    """The mapping outlives the daemon, so the lease does too: a live takeover (kill -9
    of the daemon) and a cold restart (remount) both keep the file pinned."""
    m = mount_factory(region)
    p = m.p("f")
    write_file(p, b"before restart")
    d = direct.open(p, writable=True)
    try:
        for restart in (m.crash, m.restart):
            restart()
            assert [h["pid"] for h in holders(p)] == [os.getpid()]
            with pytest.raises(OSError) as ei:
                os.unlink(p)
            assert ei.value.errno == errno.EBUSY
        d.write(0, b"BEFORE")  # the mapping is still the file's blocks
        assert read_file(p) == b"BEFORE restart"
    finally:
        d.close()  # given back to the daemon that serves now
    assert holders(p) == []
    os.unlink(p)


def _as_nobody(directory: str, fn) -> int:
    """Run fn() in a child as uid/gid 65534 inside directory; its errno (0: success)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 255
        try:
            os.close(r)
            os.fchdir(dfd)  # pytest's tmp directories are 0700: reach the mount first
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                code = 0
            except OSError as e:
                code = e.errno
        finally:
            os.write(w, str(code).encode())
            os._exit(0)
    os.close(w)
    os.close(dfd)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(out)


def test_unprivileged_lease_is_refused(region, mount_factory):
    m = mount_factory(region, {"allow_other"})
    for name, mode in (("secret", 0o600), ("writeonly", 0o622), ("open", 0o666)):
        write_file(m.p(name), b"data")
        os.chmod(m.p(name), mode)
    # 0600: the kernel refuses the setxattr (no write permission).
    assert _as_nobody(m.path, lambda: os.setxattr("secret", LEASE, b"ro")) in (errno.EACCES, errno.EPERM)
    # 0622: the kernel lets a user.* setxattr through (write permission), the daemon
    # refuses a mapping the caller may not read.
    assert _as_nobody(m.path, lambda: os.setxattr("writeonly", LEASE, b"ro")) == errno.EACCES
    assert _as_nobody(m.path, lambda: os.setxattr("writeonly", LEASE, b"rw")) == errno.EACCES
    assert holders(m.p("secret")) == holders(m.p("writeonly")) == []

    def lease_and_release():
        os.setxattr("open", LEASE, b"rw")
        if not json.loads(os.getxattr("open", LEASE)):
            raise OSError(errno.ENOENT, "lease not recorded")
        os.setxattr("open", LEASE, b"release")

    assert _as_nobody(m.path, lease_and_release) == 0  # the permission check admits readers/writers
    # Mapping needs the region itself, which only root may open.
    assert _as_nobody(m.path, lambda: direct.open("open")) in (errno.EACCES, errno.EPERM)
    assert holders(m.p("open")) == []


def test_bad_lease_requests(region, mount_factory):
    m = mount_factory(region)
    write_file(m.p("f"), b"1")
    os.mkdir(m.p("d"))
    for path, value, err in ((m.p("f"), b"rwx", errno.EINVAL), (m.p("d"), b"ro", errno.EINVAL),
                             (m.p("f"), b"release", errno.ENOENT)):
        with pytest.raises(OSError) as ei:
            os.setxattr(path, LEASE, value)
        assert ei.value.errno == err
    with pytest.raises(direct.NotPmemfs):
        direct.open("/proc/self/status")
