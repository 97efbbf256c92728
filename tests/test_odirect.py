"""O_DIRECT and the page cache: a direct write must never leave old bytes cached.

Buffers for O_DIRECT are anonymous mmaps (page aligned). Where Linux defines the
outcome the same steps run on tmpfs (/dev/shm) and the results are compared. The AIO
case uses the kernel's aio syscalls through ctypes (no libaio needed): the daemon is
stopped (SIGSTOP) at a point read from the kernel's own state, so the order of events is
forced, not timed.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
from conftest import wait_for

from pmemfs.serve.pagecache import DirectWriters

PAGE = mmap.PAGESIZE
MiB = 1 << 20


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def direct_write(fd: int, data: bytes, offset: int) -> int:
    return os.pwritev(fd, [aligned(data)], offset)


def direct_read(fd: int, n: int, offset: int) -> bytes:
    buf = mmap.mmap(-1, n)
    got = os.preadv(fd, [buf], offset)
    return buf[:got]


@pytest.fixture
def shm_dir():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="pmemfs-test-") as d:
        yield d


def coherence(root: str) -> dict[str, str]:
    """Direct and buffered I/O of one file through several descriptors, in both orders."""
    out = {}
    path = os.path.join(root, "f")
    n = 4 * MiB
    with open(path, "wb") as f:
        f.write(b"A" * n)
    buffered = os.open(path, os.O_RDWR)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    view = mmap.mmap(buffered, n, mmap.MAP_SHARED)
    try:
        # 1. Pages cached by a buffered read and by a mapping; then a direct write.
        assert os.pread(buffered, n, 0) == b"A" * n and view[n - 1:n] == b"A"
        direct_write(direct, b"B" * MiB, 0)
        direct_write(direct, b"C" * MiB, n - MiB)
        out["buffered_after_direct"] = (os.pread(buffered, 1, 0) + os.pread(buffered, 1, n - 1)).decode()
        out["mapped_after_direct"] = (view[0:1] + view[n - 1:n]).decode()
        other = os.open(path, os.O_RDONLY)
        out["new_fd_after_direct"] = (os.pread(other, 1, 0) + os.pread(other, 1, n - 1)).decode()
        os.close(other)
        # 2. A buffered write (through the cache), then a direct read.
        os.pwrite(buffered, b"D" * PAGE, MiB)
        out["direct_after_buffered"] = direct_read(direct, PAGE, MiB)[:1].decode()
        # 3. A store into the shared mapping (dirty, not synced), then a direct read.
        view[2 * MiB:2 * MiB + PAGE] = b"E" * PAGE
        out["direct_after_mmap_store"] = direct_read(direct, PAGE, 2 * MiB)[:1].decode()
        # 4. A store into the mapping, then a direct write over it: the direct write is
        # the later one and must win, in the mapping and for every reader.
        view[3 * MiB:3 * MiB + PAGE] = b"F" * PAGE
        direct_write(direct, b"G" * PAGE, 3 * MiB)
        out["after_mmap_then_direct"] = (view[3 * MiB:3 * MiB + 1] + os.pread(buffered, 1, 3 * MiB)).decode()
        # 5. Direct writes that extend the file.
        direct_write(direct, b"H" * PAGE, n)
        out["size_after_extend"] = str(os.fstat(buffered).st_size)
        out["buffered_after_extend"] = os.pread(buffered, 1, n).decode()
    finally:
        view.close()
        os.close(buffered)
        os.close(direct)
    with open(path, "rb") as f:
        data = f.read()
    out["final"] = "".join(sorted(set(data.decode())))
    return out


def test_direct_and_buffered_agree_as_on_tmpfs(mounted, shm_dir):
    theirs = coherence(shm_dir)
    ours = coherence(mounted.path)
    assert theirs == {"buffered_after_direct": "BC", "mapped_after_direct": "BC",
                      "new_fd_after_direct": "BC", "direct_after_buffered": "D",
                      "direct_after_mmap_store": "E", "after_mmap_then_direct": "GG",
                      "size_after_extend": str(4 * MiB + PAGE), "buffered_after_extend": "H",
                      "final": "ABCDEGH"}
    assert ours == theirs


def test_shared_mapping_of_an_o_direct_descriptor(mounted, shm_dir):
    """The one difference from tmpfs: a MAP_SHARED mapping made through an O_DIRECT
    descriptor is refused (ENODEV, the kernel's rule for FOPEN_DIRECT_IO); a private one,
    or a shared one through any other descriptor, is fine."""
    got = []
    for root in (shm_dir, mounted.path):
        path = os.path.join(root, "m")
        with open(path, "wb") as f:
            f.write(b"m" * MiB)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            try:
                mmap.mmap(fd, MiB, mmap.MAP_SHARED).close()
                got.append("ok")
            except OSError as e:
                got.append(os.strerror(e.errno))
            private = mmap.mmap(fd, MiB, mmap.MAP_PRIVATE)
            got.append(private[:1].decode())
            private.close()
        finally:
            os.close(fd)
    assert got == ["ok", "m", "No such device", "m"]


# --------------------------------------------------------------------------- AIO
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_io_setup, SYS_io_destroy, SYS_io_getevents, SYS_io_submit = 206, 207, 208, 209
IOCB_CMD_PWRITE = 1


class IoCb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class Aio:
    """One io_submit'ed write (the kernel's native AIO, as libaio/fio/QEMU use it)."""

    def __init__(self) -> None:
        if os.uname().machine != "x86_64":
            pytest.skip("syscall numbers are x86_64's")
        self.ctx = ctypes.c_ulong(0)
        if libc.syscall(SYS_io_setup, 8, ctypes.byref(self.ctx)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup")

    def submit_write(self, fd: int, buf: mmap.mmap, offset: int) -> int:
        self.cb = IoCb(opcode=IOCB_CMD_PWRITE, fildes=fd, buf=ctypes.addressof(ctypes.c_char.from_buffer(buf)),
                       nbytes=len(buf), offset=offset)
        self.ptrs = (ctypes.POINTER(IoCb) * 1)(ctypes.pointer(self.cb))
        return libc.syscall(SYS_io_submit, self.ctx, 1, self.ptrs)

    def wait(self) -> int:
        ev = IoEvent()
        if libc.syscall(SYS_io_getevents, self.ctx, 1, 1, ctypes.byref(ev), None) != 1:
            raise OSError(ctypes.get_errno(), "io_getevents")
        return ev.res

    def close(self) -> None:
        libc.syscall(SYS_io_destroy, self.ctx)


@contextlib.contextmanager
def fuse_connection(mountpoint: str):
    """The mount's directory in fusectl (mounted for the test if it is not)."""
    base = "/sys/fs/fuse/connections"
    with open("/proc/self/mounts") as f:
        have = any(line.split()[1:3] == [base, "fusectl"] for line in f)
    if not have:
        subprocess.run(["mount", "-t", "fusectl", "none", base], check=True, capture_output=True)
    try:
        path = os.path.join(base, str(os.minor(os.stat(mountpoint).st_dev)))
        assert os.path.isdir(path), path
        yield path
    finally:
        if not have:
            subprocess.run(["umount", base], capture_output=True)


def kernel_stack(task: str) -> str:
    try:
        with open(f"/proc/{task}/stack") as f:
            return f.read()
    except OSError:
        return ""


READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = int(sys.argv[2])
view = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ)
view.madvise(mmap.MADV_RANDOM)  # a fault reads one page, synchronously: a foreground request
print("ready", flush=True)
for line in sys.stdin:
    print(view[n - 1:n].decode(), flush=True)
"""


def aio_round(mounted, n: int) -> tuple[str, int] | None:
    """An AIO O_DIRECT write of n bytes of "B" over "A", with a buffered reader that
    caches the last page (old bytes) while the write is in flight. Returns (what the
    reader sees once the write has completed, the write's result), or None when the
    order could not be forced (the write got past the stop first)."""
    path = mounted.p("aio")
    with open(path, "wb") as f:
        f.write(b"A" * n)
    reader = subprocess.Popen([sys.executable, "-c", READER, path, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    aio = Aio()
    stopped = False
    try:
        assert reader.stdout.readline().strip() == "ready"  # forked and mapped while the daemon runs
        buf = aligned(b"B" * n)
        tid: list[int] = []
        result: list[int] = []

        def submit() -> None:
            tid.append(threading.get_native_id())
            result.append(aio.submit_write(direct, buf, 0))

        submitter = threading.Thread(target=submit)
        submitter.start()
        wait_for(lambda: bool(tid))
        # With one background request at a time, the submitter waits for a slot after each
        # chunk: stop the daemon there, with the rest of the write not yet sent.
        while submitter.is_alive():
            if "fuse_get_req" in kernel_stack(f"self/task/{tid[0]}"):
                os.kill(mounted.pid, signal.SIGSTOP)
                stopped = True
                break
        if not stopped:
            submitter.join()
            aio.wait()
            return None
        reader.stdin.write("read\n")
        reader.stdin.flush()  # its page fault is queued ahead of the chunks still to come
        assert wait_for(lambda: "fuse_read_folio" in kernel_stack(str(reader.pid)))
        os.kill(mounted.pid, signal.SIGCONT)
        stopped = False
        during = reader.stdout.readline().strip()
        submitter.join()
        res = aio.wait()
        assert result == [1]
        if during != "A":
            return None  # the page was read after the write reached it: nothing stale to test
        reader.stdin.write("read\n")
        reader.stdin.flush()
        after = reader.stdout.readline().strip()
        return after, res
    finally:
        if stopped:
            os.kill(mounted.pid, signal.SIGCONT)
        reader.stdin.close()
        reader.wait(timeout=60)
        aio.close()
        os.close(direct)


def test_aio_direct_write_drops_pages_cached_while_in_flight(mounted):
    n = 32 * MiB  # 32 write requests of 1 MiB
    with fuse_connection(mounted.path) as conn:
        with open(os.path.join(conn, "max_background")) as f:
            old = f.read().strip()
        with open(os.path.join(conn, "max_background"), "w") as f:
            f.write("1")
        try:
            outcome = None
            for _ in range(5):  # again only if the order could not be forced (not seen here)
                outcome = aio_round(mounted, n)
                if outcome is not None:
                    break
            assert outcome is not None, "could not force a read of old bytes into the write"
        finally:
            with open(os.path.join(conn, "max_background"), "w") as f:
                f.write(old)
    after, res = outcome
    assert res == n
    assert after == "B"  # the old bytes cached mid-write did not outlive the write
    with open(mounted.p("aio"), "rb") as f:
        assert set(f.read()) == {ord("B")}


def test_many_direct_writes_beside_buffered_readers(mounted):
    """Direct writes while other descriptors read through the cache and a mapping: no
    hang (each direct write may wait for an invalidation) and every write is seen."""
    path = mounted.p("mixed")
    n = 2 * MiB
    with open(path, "wb") as f:
        f.write(b"\0" * n)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    buffered = os.open(path, os.O_RDONLY)
    view = mmap.mmap(buffered, n, mmap.MAP_SHARED, mmap.PROT_READ)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read_loop() -> None:
        try:
            while not stop.is_set():
                os.pread(buffered, n, 0)
                _ = view[::PAGE]
        except BaseException as e:  # reported below
            errors.append(e)

    readers = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(200):
            value = bytes([i % 251 + 1])
            off = (i * 7 % (n // PAGE)) * PAGE
            assert direct_write(direct, value * PAGE, off) == PAGE
            assert os.pread(buffered, 1, off) == value and view[off:off + 1] == value
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
        view.close()
        os.close(buffered)
        os.close(direct)
    assert not errors


# ------------------------------------------------------------ the bookkeeping alone
def test_direct_writers_bookkeeping():
    d = DirectWriters()
    d.buffered_io(5)  # no O_DIRECT handle: not tracked
    assert 5 not in d.touched
    d.opened(5)
    assert d.may_be_cached(5)  # nothing known yet: assume pages
    mark = d.begin(5)
    d.done(5, mark)
    assert not d.may_be_cached(5)  # dropped, nothing read since
    d.buffered_io(5)
    assert d.may_be_cached(5)
    mark = d.begin(5)
    d.buffered_io(5)  # served while the invalidation ran: not covered by it
    d.done(5, mark)
    assert d.may_be_cached(5)
    d.opened(5)
    d.released(5)
    assert 5 in d.opens  # one handle left
    d.released(5)
    assert not (d.opens or d.touched or d.clean)  # forgotten with the last handle
