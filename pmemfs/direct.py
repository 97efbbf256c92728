"""Direct access to files on a mounted pmemfs (the DAX analog).

    import pmemfs.direct
    with pmemfs.direct.open("/mnt/pmem/data", writable=True) as d:
        for offset, a in d.arrays:      # one numpy uint8 array per extent, at its file offset
            a[:4096] = 7                # a store into the region: no copy, no FUSE request
        d.write(0, b"header")           # convenience: copy into the file's blocks
        d.read(0, 6)                    # an array (a view of the region when in one extent)
        d.view()                        # the whole file as one array, when it is one extent

How: the file is opened through the mount (the descriptor keeps the inode alive and
carries the control requests), a lease is taken with
setxattr(file, "user.pmemfs.lease", "rw" or "ro"), the extents are read from
getxattr(file, "user.pmemfs.extents"), and each extent is mapped MAP_SHARED from the
region file, whose path is the mount's source in /proc/self/mounts. Closing gives the
lease back (setxattr "release").

What it needs: the caller must be allowed to open the region file itself (normally
root only: the region is 0600), and the daemon checks the caller's permission on the
file (read for "ro", read and write for "rw"; the kernel also asks for write
permission before any user.* setxattr, so an "ro" lease needs it too).

What the lease promises while it is held: the mapped blocks stay the file's. Truncate
that would free blocks and the unlink (or rename over) that would free the file fail
with EBUSY; carve gets EBUSY; defrag and the growth migration leave the file alone.
Opens of the file through the mount are direct_io with no page cache, so reads and
writes through the mount and through the mapping see each other at once (a shared
mmap of the file through the mount fails with ENODEV meanwhile). A lease whose holder
died is dropped. Leases live in the daemon's memory: after a daemon restart a mapping
stays valid but is unprotected until the file is opened again.

The arrays cover the file's size at open time and its allocated blocks only: holes
read as zeros through read() and cannot be written (write through the mount, or
preallocate, first); direct access never changes a file's size or times. Arrays kept
after close() keep their mapping, and the lease, until they are garbage.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import threading
import weakref

import numpy as np

from .serve.control import EXTENTS, LEASE, PREALLOC
from .serve.mounting import mounts

MADV_POPULATE_READ = 22  # Linux 5.14; Python 3.11 has no constant for these
MADV_POPULATE_WRITE = 23


class NotPmemfs(OSError):
    pass


def find_mount(path: str) -> tuple[str, str]:
    """(mountpoint, region path) of the pmemfs mount that holds path."""
    real = os.path.realpath(path)
    best = None
    for m in mounts():  # the last, longest mountpoint above path is the one that serves it
        mp = m.mountpoint.rstrip("/") or "/"
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/")):
            best = m
    if best is None or best.fstype != "fuse.pmemfs":
        raise NotPmemfs(errno.EINVAL, "not on a mounted pmemfs", path)
    return best.mountpoint, best.source


class _Lease:
    """The lease and the descriptor it was taken through; given back when the last
    mapping is unmapped (by close() or by garbage collection of kept arrays)."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.maps = 1  # the Direct object's own reference, plus one per mapping
        self.lock = threading.Lock()

    def unref(self) -> None:
        with self.lock:
            self.maps -= 1
            if self.maps > 0 or self.fd < 0:
                return
            fd, self.fd = self.fd, -1
        try:
            os.setxattr(fd, LEASE, b"release")
        except OSError:
            # The mount was remounted under us (the descriptor is dead): the new daemon
            # kept the lease (leases.py), so give it back by name.
            try:
                os.setxattr(self.path, LEASE, b"release")
            except OSError:
                pass  # the mount is gone, or the file: nothing left to give back
        try:
            os.close(fd)
        except OSError:
            pass  # ENOTCONN from a mount whose daemon died


class Direct:
    """A file's blocks mapped from the region. Use pmemfs.direct.open()."""

    def __init__(self, path: str, writable: bool = False, populate: bool = True):
        self.path = path
        self.writable = writable
        self.mountpoint, self.region = find_mount(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if os.stat(self.mountpoint).st_dev != st.st_dev:
                raise NotPmemfs(errno.EINVAL, "not on a mounted pmemfs", path)
            os.setxattr(fd, LEASE, b"rw" if writable else b"ro")
        except BaseException:
            os.close(fd)
            raise
        self._lease = _Lease(fd, os.path.abspath(path))
        self._maps: list[tuple[mmap.mmap, weakref.finalize]] = []
        try:
            # Taken after the lease: from now on the extents can grow, never move.
            self.extents = [tuple(e) for e in json.loads(os.getxattr(fd, EXTENTS))]
            self.size = os.fstat(fd).st_size
            self.arrays = self._map(populate)
        except BaseException:
            self._unmap_all()
            raise
        self._starts = [off for off, _ in self.arrays]
        self.closed = False

    def _map(self, populate: bool) -> list[tuple[int, np.ndarray]]:
        rfd = os.open(self.region, (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        arrays = []
        try:
            for foff, roff, length in self.extents:
                n = min(length, self.size - foff)
                if n <= 0:
                    continue  # blocks past the end of file: not part of the file's bytes
                mm = mmap.mmap(rfd, length, mmap.MAP_SHARED, prot, offset=roff)
                self._lease.maps += 1
                self._maps.append((mm, weakref.finalize(mm, self._lease.unref)))
                if populate:  # page tables now, not a fault per 4 KiB page later
                    try:
                        mm.madvise(MADV_POPULATE_WRITE if self.writable else MADV_POPULATE_READ, 0, n)
                    except OSError:
                        pass
                a = np.frombuffer(mm, np.uint8, n)
                arrays.append((foff, a))
        finally:
            os.close(rfd)
        return arrays

    # ----------------------------------------------------------------- access
    def view(self) -> np.ndarray:
        """The whole file as one array; ValueError unless it is one extent from 0."""
        if len(self.arrays) == 1 and self.arrays[0][0] == 0 and len(self.arrays[0][1]) == self.size:
            return self.arrays[0][1]
        if self.size == 0:
            return np.zeros(0, np.uint8)
        raise ValueError(f"{self.path}: not one extent ({len(self.arrays)} pieces); use .arrays")

    def _pieces(self, offset: int, n: int):
        """(array, start, stop, position in the range) covering [offset, offset+n), holes skipped."""
        from bisect import bisect_right

        end = offset + n
        i = max(0, bisect_right(self._starts, offset) - 1)
        while i < len(self.arrays):
            foff, a = self.arrays[i]
            if foff >= end:
                break
            lo, hi = max(offset, foff), min(end, foff + len(a))
            if lo < hi:
                yield a, lo - foff, hi - foff, lo - offset
            i += 1

    def read(self, offset: int, n: int) -> np.ndarray:
        """Up to n bytes at offset: a read-only view of the region when they lie in one
        extent, else a copy (holes as zeros). Stops at the end of file."""
        self._check_open()
        n = max(0, min(n, self.size - offset))
        pieces = list(self._pieces(offset, n))
        if len(pieces) == 1 and pieces[0][2] - pieces[0][1] == n:
            a, s, e, _ = pieces[0]
            v = a[s:e]
            v.flags.writeable = False
            return v
        out = np.zeros(n, np.uint8)
        for a, s, e, pos in pieces:
            out[pos:pos + e - s] = a[s:e]
        return out

    def write(self, offset: int, data) -> int:
        """Copy data into the file at offset (one copy, no FUSE request). The range must
        lie inside the file and in allocated blocks: direct access never allocates."""
        self._check_open()
        if not self.writable:
            raise OSError(errno.EBADF, "opened read-only", self.path)
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8) if not isinstance(data, np.ndarray) \
            else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        n = len(src)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write of {n} bytes at {offset} runs past the end of file ({self.size}); "
                             "direct access cannot grow a file")
        pieces = list(self._pieces(offset, n))
        if sum(e - s for _, s, e, _ in pieces) != n:
            raise ValueError("the range has holes; write them through the mount (or preallocate) first")
        for a, s, e, pos in pieces:
            a[s:e] = src[pos:pos + e - s]
        return n

    def flush(self) -> None:
        """msync the mappings (matters only for a region on a disk file)."""
        for mm, _ in self._maps:
            if not mm.closed:
                mm.flush()

    # ---------------------------------------------------------------- lifetime
    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("direct mapping is closed")

    def _unmap_all(self) -> None:
        maps, self._maps = self._maps, []
        for mm, fin in maps:
            try:
                mm.close()
            except BufferError:
                continue  # arrays still use it: unmapped (and unref'd) when they are garbage
            fin()  # unmapped now: give back this mapping's share of the lease
        self._lease.unref()  # and the Direct object's own

    def close(self) -> None:
        """Unmap and give back the lease (at once, unless arrays handed out live on)."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        self.arrays = []
        self._starts = []
        self._unmap_all()

    def __enter__(self) -> Direct:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self.writable else "ro")
        return f"<pmemfs.direct {self.path!r} {state} size={self.size} extents={len(self.extents)}>"


def open(path: str, writable: bool = False, populate: bool = True) -> Direct:
    """Map path's blocks from the region; see the module docstring."""
    return Direct(path, writable=writable, populate=populate)


def create(path: str, size: int, mode: int = 0o600) -> None:
    """Make path a file of `size` bytes in one contiguous extent, ready to map.

    Uses the prealloc control (user.pmemfs.prealloc) when the daemon has it, else
    writes zeros through the mount.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.setxattr(fd, PREALLOC, str(size).encode())
            return
        except OSError:
            pass
        chunk = bytes(1 << 20)
        pos = 0
        while pos < size:
            pos += os.pwrite(fd, chunk[:min(len(chunk), size - pos)], pos)
    finally:
        os.close(fd)


__all__ = ["Direct", "NotPmemfs", "create", "find_mount", "open"]
