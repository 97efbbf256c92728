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
TMPFS_MAGIC = 0x01021994
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not export it
MAP_NORESERVE = 0x4000  # Python's mmap module does not export it either
PREFAULT_CHUNK = 64 << 20
RESERVE_CHUNK = 1 << 30  # mkfs reserves a big region a GiB at a time (progress, and a ^C)

# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("@hhqqi4x")


class RegionError(Exception):
    """A region cannot be used; the message is one line meant for a person."""


class BackingFull(RegionError):
    """The backing (tmpfs, the huge page pool) cannot provide the memory asked for."""


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
    memory: bool = False  # tmpfs or hugetlbfs: the region's pages are memory, reserved by fallocate


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
        fstype = _statfs_type(parent)
        if fstype == HUGETLBFS_MAGIC:
            ps = _hugetlbfs_page_size(parent)
            return BackingInfo("hugetlbfs", 0, ps, ps, True)
        return BackingInfo("file", 0, mmap.PAGESIZE, mmap.PAGESIZE, fstype == TMPFS_MAGIC)
    except OSError as e:
        raise RegionError(f"{path}: {e.strerror}") from None
    if stat.S_ISCHR(st.st_mode):
        return _devdax_info(path, st)
    if stat.S_ISDIR(st.st_mode):
        raise RegionError(f"{path}: is a directory; a region is a file or a /dev/dax device")
    if not stat.S_ISREG(st.st_mode):
        raise RegionError(f"{path}: not a regular file or a /dev/dax device")
    fstype = _statfs_type(path)
    if fstype == HUGETLBFS_MAGIC:
        ps = _hugetlbfs_page_size(path)
        return BackingInfo("hugetlbfs", st.st_size, ps, ps, True)
    return BackingInfo("file", st.st_size, mmap.PAGESIZE, mmap.PAGESIZE, fstype == TMPFS_MAGIC)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# What the backing answers when it has no memory left: tmpfs at its size= limit and an
# empty huge page pool say ENOSPC, a memory cgroup at its limit ENOMEM.
_NO_MEMORY = (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT)


@functools.cache
def _fallocate_fn():
    import ctypes

    fn = libc().fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 or the errno (EINTR retried)."""
    import ctypes

    while True:
        if _fallocate_fn()(fd, mode, offset, length) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE); False when the filesystem cannot (then write zeros)."""
    return _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0


# ------------------------------------------------------------ what the backing can give
def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            fields = rest.split()
            if fields:
                out[name.decode()] = int(fields[0]) * 1024
    return out


@functools.cache
def _cgroup_limit_files() -> tuple[str, str] | None:
    """(limit, usage) files of this process's memory cgroup, v2 or v1; None if unlimited
    or not visible. Memory a process faults in or fallocates on tmpfs is charged to it."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = "/sys/fs/cgroup" + path.rstrip("/")
            pair = (base + "/memory.max", base + "/memory.current")
        elif "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + path.rstrip("/")
            pair = (base + "/memory.limit_in_bytes", base + "/memory.usage_in_bytes")
        else:
            continue
        if os.path.exists(pair[0]) and os.path.exists(pair[1]):
            return pair
    return None


def memory_available() -> int:
    """Bytes of memory that can still be had without pushing anything out: MemAvailable
    plus free swap (tmpfs pages can be swapped), within this process's memory cgroup."""
    info = _meminfo()
    avail = info.get("MemAvailable", info.get("MemFree", 0)) + info.get("SwapFree", 0)
    files = _cgroup_limit_files()
    if files:
        try:
            with open(files[0]) as f:
                limit = f.read().strip()
            if limit != "max" and int(limit) < 1 << 62:
                with open(files[1]) as f:
                    avail = min(avail, max(int(limit) - int(f.read()), 0))
        except (OSError, ValueError):
            pass
    return avail


def _hugepage_pool_free(page_size: int) -> int:
    """Free, unreserved huge pages of this size in the kernel's pool, in bytes."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{page_size >> 10}kB"
    try:
        with open(base + "/free_hugepages") as f:
            free = int(f.read())
        with open(base + "/resv_hugepages") as f:
            resv = int(f.read())
    except (OSError, ValueError):
        return 0
    return max(free - resv, 0) * page_size


def backing_free(path: str) -> int | None:
    """Bytes the memory behind a region at path (a file, or where one is to be made) can
    still provide: for tmpfs what statvfs says is free (none when mounted without a
    size limit) and what memory is available, whichever is less; for hugetlbfs the free
    huge pages of its size, within the mount's size= limit. None for backings that are
    not memory (a disk filesystem, /dev/dax): there is nothing to reserve."""
    info = probe(path)
    if not info.memory:
        return None
    where = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    st = os.statvfs(where)
    fs_free = st.f_bavail * st.f_frsize if st.f_blocks else None  # f_blocks 0: no size= limit
    if info.kind == "hugetlbfs":
        pool = _hugepage_pool_free(info.page_size)
        return pool if fs_free is None else min(pool, fs_free)
    mem = memory_available()
    return mem if fs_free is None else min(mem, fs_free)


def backing_name(path: str) -> str:
    """How to name the backing of path in a message: "tmpfs /dev/shm", "hugetlbfs /mnt/huge"."""
    where = os.path.dirname(os.path.abspath(path))
    mnt = where
    while not os.path.ismount(mnt) and mnt != "/":
        mnt = os.path.dirname(mnt)
    fstype = _statfs_type(where)
    kind = {HUGETLBFS_MAGIC: "hugetlbfs", TMPFS_MAGIC: "tmpfs"}.get(fstype or 0, "filesystem")
    return f"{kind} {mnt}"


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

    def __init__(self, path: str, *, writable: bool = True, lock: bool = True, create_size: int = 0,
                 noreserve: bool | Callable[[bytes], bool] = False):
        """noreserve: on hugetlbfs, map with MAP_NORESERVE, so that the mapping does not
        take the whole region's huge pages from the pool (an overcommitted region takes
        them block by block, with reserve()). A callable is given the region's first 4096
        bytes and decides; read-only mappings never reserve."""
        self.path = path
        info = probe(path)
        self.kind = info.kind
        self.page_size = info.page_size
        self.memory = info.memory
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
            flags = mmap.MAP_SHARED
            if info.kind == "hugetlbfs":
                if callable(noreserve):
                    noreserve = noreserve(os.pread(self.fd, 4096, 0))
                # A reader (info, check) only reads what is already there: it must not
                # need the huge pages of the holes of an overcommitted region.
                if noreserve or not writable:
                    flags |= MAP_NORESERVE
            try:
                self.mm = mmap.mmap(self.fd, size, flags, prot)
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

    # ------------------------------------------------------------ the backing's memory
    def allocated(self) -> int:
        """Bytes of the region the backing holds memory (or disk) for."""
        return os.fstat(self.fd).st_blocks * 512

    def _pages_out(self, start: int, length: int) -> tuple[int, int]:
        """Whole pages covering [start, start+length), within the region."""
        lo = start // self.page_size * self.page_size
        hi = min(-(-(start + length) // self.page_size) * self.page_size, self.size)
        return lo, hi

    def _pages_in(self, start: int, length: int) -> tuple[int, int]:
        """Whole pages inside [start, start+length)."""
        end = min(self.size, start + length)
        lo = min(-(-start // self.page_size) * self.page_size, end)
        return lo, max(end // self.page_size * self.page_size, lo)

    def reserve(self, start: int, length: int, progress: Callable[[int], None] | None = None) -> bool:
        """Make the backing hold memory for [start, start+length) (whole pages), so that
        no store or load there can fault for want of it: fallocate(KEEP_SIZE), which
        keeps what the pages hold. Raises BackingFull when the backing cannot; a
        backing that cannot fallocate (a disk filesystem without it) is left alone.

        Returns True when every page was a hole before: the range then reads as zeros
        (the kernel gives fresh pages zeroed), which lets a caller skip zeroing it.
        """
        lo, hi = self._pages_out(start, length)
        if hi <= lo or self.kind == "devdax":
            return False
        before = os.fstat(self.fd).st_blocks
        for pos in range(lo, hi, RESERVE_CHUNK):
            n = min(RESERVE_CHUNK, hi - pos)
            err = _fallocate(self.fd, FALLOC_FL_KEEP_SIZE, pos, n)
            if err in _NO_MEMORY:
                raise BackingFull(f"{self.path}: the backing cannot hold {hi - lo} more bytes: "
                                  f"{os.strerror(err)}")
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            if err:
                raise RegionError(f"{self.path}: cannot reserve memory: {os.strerror(err)}")
            if progress:
                progress(n)
        return (os.fstat(self.fd).st_blocks - before) * 512 == hi - lo

    def release(self, start: int, length: int) -> None:
        """Give the memory of the whole pages inside [start, start+length) back to the
        backing (PUNCH_HOLE | KEEP_SIZE): they read as zeros afterwards. Only for ranges
        nobody uses; a page shared with bytes outside the range is kept."""
        lo, hi = self._pages_in(start, length)
        if hi > lo and self.kind != "devdax":
            _punch_hole(self.fd, lo, hi - lo)

    def zero(self, start: int, length: int) -> None:
        """Make [start, start+length) read as zeros.

        On memory (tmpfs, hugetlbfs), /dev/dax and a prefaulted region the zeros are
        stored (libc memset): the pages must stay the region's, reserved and mapped, and
        a store is also the cheapest way (docs/BENCHMARKS.md, "Zeroing a block": 0.07 ms
        for 2 MiB on tmpfs, where punching and reserving again costs 1.5 ms and the
        faults after it as much again). A file on a disk filesystem has its whole pages
        punched out instead, so zeroing a large, still sparse table costs no disk.

        (Storing only into pages ever written was tried: SEEK_DATA on tmpfs walks page
        by page to the next boundary, 9 ms a call after a written GiB and seconds in a
        large reserved region, and mincore calls a swapped-out page absent. Callers
        skip what they know reads as zeros instead: BlockAllocator.known_zero.)
        """
        end = min(self.size, start + length)
        if start >= end:
            return
        lo, hi = self._pages_in(start, end - start)
        if (not self.memory and self.kind != "devdax" and not self.prefaulted and hi > lo
                and _punch_hole(self.fd, lo, hi - lo)):
            self._memset(start, lo - start)
            self._memset(hi, end - hi)
            return
        self._memset(start, end - start)

    def _memset(self, start: int, length: int) -> None:
        import ctypes

        if length <= 0:
            return
        view = (ctypes.c_char * length).from_buffer(self.mm, start)
        ctypes.memset(ctypes.addressof(view), 0, length)
        del view  # the export would keep mmap.close() from unmapping

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
