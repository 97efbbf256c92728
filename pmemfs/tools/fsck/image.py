"""The region as fsck maps it (private copy-on-write for -n, shared and locked to
repair), the backup superblock when the primary is gone, and --backup's copy of the
metadata area."""

from __future__ import annotations

import mmap
import os

import numpy as np

from ...media import check
from ...media.format import (
    BLOCK_SIZES,
    MAGIC,
    SB_SLOT,
    SB_STRUCT,
    SUPERBLOCK_DTYPE,
    FormatError,
    Geometry,
    Superblock,
)
from ...media.region import Region, RegionError, lock_holder, probe

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux x86_64/aarch64; Python 3.11 lacks it


class Image:
    """The region mapped for fsck: private copy-on-write for -n, shared and locked to repair."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.region: Region | None = None
        self.mm = None
        if writable:
            self.region = Region(path, writable=True, lock=True)
            self.buf, self.size, self.fd = self.region.buf, self.region.size, self.region.fd
            self.private = False
            self.limit = self.size
            return
        info = probe(path)
        if info.kind == "devdax":  # no private mappings of device memory
            self.region = Region(path, writable=False, lock=False)
            self.buf, self.size, self.fd = self.region.buf, self.region.size, self.region.fd
            self.private = False
            self.limit = self.size
            return
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RegionError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise RegionError(f"{path}: region is empty")
            # Only the metadata area is mapped privately (writable, copy-on-write): a
            # private writable mapping of a huge region would be charged as memory.
            # On hugetlbfs a mapping reserves huge pages for what it might fault in (the
            # whole private copy): with none spare, -n could not even map. NORESERVE: the
            # checks only read, and a copy is made of the few pages a rollback writes.
            noreserve = MAP_NORESERVE if info.kind == "hugetlbfs" else 0
            ro = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED | noreserve, mmap.PROT_READ)
            try:
                meta_end = _metadata_end(memoryview(ro), self.size)
            finally:
                ro.close()
            self.mm = mmap.mmap(self.fd, meta_end, mmap.MAP_PRIVATE | noreserve,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise RegionError(f"{path}: cannot map: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self.mm)
        self.private = True
        self.limit = meta_end

    def holder(self) -> int | None:
        try:
            return lock_holder(self.fd)
        except OSError:
            return None

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            return
        try:
            self.buf.release()
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


def _metadata_end(buf: memoryview, size: int) -> int:
    """Bytes [0, data start) per the primary or backup superblock (everything fsck reads)."""
    sb, _ = check.check_superblock_raw(buf[:SB_STRUCT], size)
    if sb is None:
        sb, _ = find_backup(buf, size)
    if sb is None:
        return min(size, 64 << 20)
    g = sb.geometry
    return min(size, g.data_start_block * g.block_size)


def save_metadata(fd: int, length: int, dest: str) -> None:
    """Copy bytes [0, length) of the region to dest, keeping holes as holes."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(out, length)
        pos = 0
        chunk = 8 << 20
        while pos < length:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
            except OSError:  # no hole support (a device): copy everything
                start, end = pos, length
            if start >= length:
                break
            while start < end:
                n = min(chunk, end - start)
                data = os.pread(fd, n, start)
                if not data:
                    break
                if any(data):
                    os.pwrite(out, data, start)
                start += len(data)
            pos = end
        os.fsync(out)
    finally:
        os.close(out)


def _backup_candidates(buf: memoryview, size: int) -> list[int]:
    """Where the backup superblock probably is: the primary's own field, then mkfs defaults."""
    cands = []
    raw = np.frombuffer(bytes(buf[:SB_STRUCT]), SUPERBLOCK_DTYPE)[0]
    cands.append(int(raw["backup_offset"]))
    for bs in BLOCK_SIZES:
        if size % bs == 0:
            try:
                cands.append(Geometry.plan(size, bs).backup_offset)
            except FormatError:
                pass
    return cands


def find_backup(buf: memoryview, size: int) -> tuple[Superblock | None, int]:
    for off in _backup_candidates(buf, size):
        if 0 < off <= size - SB_SLOT and off % 4096 == 0 and bytes(buf[off:off + 8]) == MAGIC:
            sb, _ = check.check_superblock_raw(buf[off:off + SB_STRUCT], size)
            if sb is not None and sb.geometry.backup_offset == off:
                return sb, off
    for bs in BLOCK_SIZES:  # scan every block boundary, as read_superblock does
        for k in range(1, size // bs):
            off = k * bs - SB_SLOT
            if bytes(buf[off:off + 8]) != MAGIC:
                continue
            sb, _ = check.check_superblock_raw(buf[off:off + SB_STRUCT], size)
            if sb is not None and sb.geometry.backup_offset == off:
                return sb, off
    return None, 0
