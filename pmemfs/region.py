"""The region: one large piece of memory, mapped MAP_SHARED, that holds the filesystem.

A region is a regular file (sparse, e.g. on /dev/shm), a file on hugetlbfs, or a
/dev/dax character device. This module knows how to open, size, lock, map and
prefault it; it knows nothing about what is stored inside.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

HUGETLBFS_MAGIC = 0x958458F6
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not export it
PREFAULT_CHUNK = 64 << 20

# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("@hhqqi4x")


class RegionError(Exception):
    """A region cannot be used; the message is one line meant for a person."""


class RegionLocked(RegionError):
    def __init__(self, path: str, holder: int | None):
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"{path}: region is in use by {who} (a mounted pmemfs daemon or a repairing fsck)")
        self.holder = holder


@dataclass(frozen=True)
class BackingInfo:
    kind: str  # "file", "hugetlbfs" or "devdax"
    size: int  # bytes the region may use (0 for a file that does not exist yet)
    page_size: int  # granularity that sizes and mapping offsets must respect
    alignment: int  # alignment the backing guarantees for mappings


@functools.cache
def libc():
    """glibc, loaded once (find_library runs ldconfig: tens of ms on a mount's path)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _statfs_type(path: str) -> int | None:
    """f_type of the filesystem holding path (os.statvfs does not expose it)."""
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    if libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def _hugetlbfs_page_size(path: str) -> int:
    # statvfs reports the huge page size as the block size on hugetlbfs.
    return os.statvfs(path).f_bsize


def _devdax_info(path: str, st: os.stat_result) -> BackingInfo:
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysdir = f"/sys/dev/char/{major}:{minor}"
    try:
        subsystem = os.path.basename(os.readlink(f"{sysdir}/subsystem"))
    except OSError:
        subsystem = ""
    if subsystem != "dax":
        raise RegionError(f"{path}: character device {major}:{minor} is not a /dev/dax device")
    try:
        with open(f"{sysdir}/size") as f:
            size = int(f.read().strip())
        with open(f"{sysdir}/align") as f:
            align = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise RegionError(f"{path}: cannot read the size of dax device from {sysdir}: {e}") from None
    return BackingInfo("devdax", size, align, align)


def probe(path: str) -> BackingInfo:
    """Say what kind of backing path is, without opening it for writing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise RegionError(f"{path}: directory {parent} does not exist") from None
        if _statfs_type(parent) == HUGETLBFS_MAGIC:
            ps = _hugetlbfs_page_size(parent)
            return BackingInfo("hugetlbfs", 0, ps, ps)
        return BackingInfo("file", 0, mmap.PAGESIZE, mmap.PAGESIZE)
    except OSError as e:
        raise RegionError(f"{path}: {e.strerror}") from None
    if stat.S_ISCHR(st.st_mode):
        return _devdax_info(path, st)
    if stat.S_ISDIR(st.st_mode):
        raise RegionError(f"{path}: is a directory; a region is a file or a /dev/dax device")
    if not stat.S_ISREG(st.st_mode):
        raise RegionError(f"{path}: not a regular file or a /dev/dax device")
    if _statfs_type(path) == HUGETLBFS_MAGIC:
        ps = _hugetlbfs_page_size(path)
        return BackingInfo("hugetlbfs", st.st_size, ps, ps)
    return BackingInfo("file", st.st_size, mmap.PAGESIZE, mmap.PAGESIZE)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE); False when the filesystem cannot (then write zeros)."""
    import ctypes

    fallocate = libc().fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0


def lock_holder(fd: int) -> int | None:
    """PID of the process holding a write lock on fd's file, or None when it is free."""
    req = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
    ltype, _, _, _, pid = _FLOCK.unpack(res)
    if ltype == fcntl.F_UNLCK:
        return None
    return pid or None


class Region:
    """An open, mapped region.

    `buf` is a writable memoryview over the whole mapping; numpy tables are built on
    it by the format layer. The lock is a POSIX record lock on the whole backing, so a
    second owner learns the holder's PID (F_GETLK). POSIX locks drop when the process
    closes *any* descriptor of the file, so nothing else in an owning process may open
    and close the region path.
    """

    def __init__(self, path: str, *, writable: bool = True, lock: bool = True, create_size: int = 0):
        self.path = path
        info = probe(path)
        self.kind = info.kind
        self.page_size = info.page_size
        self.prefaulted = False  # prefault() was asked for: zero() then keeps the pages
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create_size and info.size == 0 and info.kind != "devdax":
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise RegionError(f"{path}: no such region (pmemfs-mkfs --size creates one)") from None
        except OSError as e:
            raise RegionError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self.locked = False
            if lock:
                self._lock(writable)
            size = info.size
            if create_size and size == 0 and info.kind != "devdax":
                self._grow(create_size)
                size = create_size
            if size == 0:
                raise RegionError(f"{path}: region is empty (pmemfs-mkfs --size sizes it)")
            if size % self.page_size:
                raise RegionError(
                    f"{path}: size {size} is not a multiple of the {info.kind} page size {self.page_size}")
            self.size = size
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot)
            except OSError as e:
                hint = " (are enough huge pages reserved?)" if info.kind == "hugetlbfs" else ""
                raise RegionError(f"{path}: cannot map {size} bytes: {e.strerror}{hint}") from None
            self.buf = memoryview(self.mm)
            if not writable:
                self.buf = self.buf.toreadonly()
            self.writable = writable
        except BaseException:
            os.close(self.fd)
            raise

    def _lock(self, writable: bool) -> None:
        kind = fcntl.LOCK_EX if writable else fcntl.LOCK_SH
        try:
            fcntl.lockf(self.fd, kind | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise RegionError(f"{self.path}: cannot lock: {e.strerror}") from None
            raise RegionLocked(self.path, lock_holder(self.fd)) from None
        self.locked = True

    def _grow(self, size: int) -> None:
        if size % self.page_size:
            raise RegionError(
                f"{self.path}: size {size} is not a multiple of the {self.kind} page size {self.page_size}")
        try:
            os.ftruncate(self.fd, size)  # sparse: no data is touched
        except OSError as e:
            raise RegionError(f"{self.path}: cannot size region to {size} bytes: {e.strerror}") from None
        except OverflowError:  # larger than off_t: os.ftruncate cannot even ask
            raise RegionError(f"{self.path}: cannot size region to {size} bytes: too large") from None

    def zero(self, start: int, length: int) -> None:
        """Make [start, start+length) read as zeros without allocating memory for it.

        On a file (tmpfs, hugetlbfs, a disk) whole pages are punched out, so zeroing a
        large, still sparse table costs nothing; writing zeros instead would allocate
        every page. Partial pages, /dev/dax, filesystems without hole punching and a
        prefaulted region (its pages must stay populated) get zeros written.
        """
        end = min(self.size, start + length)
        if start >= end:
            return
        lo = min(-(-start // self.page_size) * self.page_size, end)
        hi = max(end // self.page_size * self.page_size, lo)
        if (self.kind != "devdax" and not self.prefaulted and hi > lo
                and _punch_hole(self.fd, lo, hi - lo)):
            self.buf[start:lo] = bytes(lo - start)
            self.buf[hi:end] = bytes(end - hi)
            return
        for pos in range(start, end, PREFAULT_CHUNK):
            n = min(PREFAULT_CHUNK, end - pos)
            self.buf[pos:pos + n] = bytes(n)

    def prefault(self, start: int, length: int, progress: Callable[[int], None] | None = None) -> None:
        """Populate pages of [start, start+length) writably so the data path never faults."""
        self.prefaulted = True
        end = min(self.size, start + length)
        pos = start - start % mmap.PAGESIZE
        while pos < end:
            n = min(PREFAULT_CHUNK, end - pos)
            try:
                self.mm.madvise(MADV_POPULATE_WRITE, pos, n)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS):
                    # Older kernels: touch one byte per page instead.
                    step = self.page_size
                    for off in range(pos, pos + n, step):
                        self.buf[off] = self.buf[off]
                else:
                    raise RegionError(f"{self.path}: prefault failed: {e.strerror}") from None
            pos += n
            if progress:
                progress(n)

    def sync(self) -> None:
        """Write dirty pages to the backing store (matters only for a region on a disk)."""
        self.mm.flush()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.buf.release()
            self.mm.close()
        except BufferError:
            pass  # numpy views still alive; the mapping goes with the process
        os.close(self.fd)  # also drops the POSIX lock
        self.fd = -1

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
