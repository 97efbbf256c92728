"""Writing a fresh filesystem into a region (the library behind pmemfs-mkfs)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .format import (
    BLOCK_2M,
    FEATURE_COMPAT_SPARSE,
    KIND_DIR,
    MAGIC,
    ROOT_INO,
    SB_SLOT,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    find_backup_superblock,
    seal,
)
from .journal import format_journal
from .region import BackingFull, Region, RegionError, backing_free, backing_name, probe

# Signatures of other filesystems, as (offset, bytes), so mkfs does not clobber them silently.
FOREIGN_SIGNATURES = [
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "swap space"),
    (0, b"PMEMPOOL", "a PMDK pool"),
]


@dataclass
class MkfsResult:
    superblock: Superblock
    created: bool
    sparse: bool = False  # overcommitted: only the metadata in use is reserved so far
    reserved: int = 0  # bytes of the backing the region holds now


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _size_arg(n: int) -> str:
    """n bytes as pmemfs-mkfs --size takes them, rounded down to whole MiB or GiB."""
    return f"{n >> 30}G" if n >= 1 << 30 else f"{n >> 20}M"


def _does_not_fit(path: str, size: int, block_size: int, page_size: int,
                  kind: str, allocated: int, free: int) -> RegionError:
    """A reserved region needs its whole size from the backing (less what the file holds
    already): the one line that says what fits."""
    fits = (free + allocated) // max(block_size, page_size) * max(block_size, page_size)
    where = backing_name(path)
    if kind == "hugetlbfs":
        have = f"{free // page_size} free huge pages of {_human(page_size)} ({_human(free)})"
        more = f"; /sys/kernel/mm/hugepages/hugepages-{page_size >> 10}kB/nr_hugepages reserves more"
    else:
        have = f"{_human(free)} free"
        more = ""
    if allocated and size:
        fit = f"a region of at most {_human(fits)} fits"
    else:
        fit = f"--size {_size_arg(fits)} fits" if fits else "no region fits"
    return RegionError(f"{path}: a {_human(size)} region does not fit in {where}: {have}{more}; "
                       f"{fit}, or --sparse overcommits it (blocks are then reserved as they are used)")


def detect_existing(buf: memoryview, size: int, fd: int | None = None) -> str | None:
    """Describe what the region already holds, or None when nothing is recognised.

    fd lets the backup-superblock search skip holes instead of faulting them in.
    """
    if bytes(buf[:8]) == MAGIC:
        return "a pmemfs filesystem"
    for offset, sig, what in FOREIGN_SIGNATURES:
        if offset + len(sig) <= size and bytes(buf[offset:offset + len(sig)]) == sig:
            return what
    if find_backup_superblock(buf, size, fd=fd) is not None:
        return "a pmemfs filesystem (its backup superblock)"
    return None


def make_filesystem(path: str, *, size: int = 0, block_size: int = BLOCK_2M,
                    inodes: int | None = None, label: str = "", force: bool = False,
                    prefault: bool = False, sparse: bool = False,
                    progress: Callable[[str, int], Callable[[int], None]] | None = None,
                    **tables: int | None) -> MkfsResult:
    """Format path; create it with `size` when it does not exist.

    On tmpfs or hugetlbfs the whole region is reserved from the backing (fallocate),
    and a region the backing cannot hold is refused with what fits; sparse=True
    overcommits it instead: only the metadata in use is reserved, and the daemon
    reserves each block when it allocates it (docs/DESIGN.md, "The backing").
    tables: extents=, dirents=, blobs=, packs= record counts (Geometry.plan).
    Raises RegionError or FormatError with a one-line reason.
    """
    existed = _check_request(path, size, block_size, inodes, label, prefault, sparse, tables)
    _check_backing(path, size, block_size, sparse, existed)
    region = _open_region(path, size, sparse, existed)
    try:
        geometry = Geometry.plan(region.size, block_size, inodes, **tables)
        if existed and not force:
            found = detect_existing(region.buf, region.size, region.fd)
            if found:
                raise FormatError(f"{path} already holds {found}; use --force to overwrite it")
        sb = Superblock.new(geometry, label)
        zero = existed
        if sparse:
            sb.feature_compat |= FEATURE_COMPAT_SPARSE
        if region.memory and not _reserve(region, sb, path, block_size, sparse, existed, progress):
            zero = False
        _write_metadata(region, sb, zero=zero)
        if prefault:
            length = region.size - geometry.data_start_block * geometry.block_size
            tick = progress("prefaulting", length) if progress else None
            region.prefault(geometry.data_start_block * geometry.block_size, length, tick)
        return MkfsResult(sb, not existed, sparse, region.allocated() if region.memory else 0)
    except BaseException:
        region.close()
        if not existed:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        region.close()


def _check_request(path: str, size: int, block_size: int, inodes: int | None, label: str,
                   prefault: bool, sparse: bool, tables: dict[str, int | None]) -> bool:
    """Refuse what cannot be made before touching anything; whether path exists."""
    unknown = set(tables) - {"extents", "dirents", "blobs", "packs"}
    if unknown:
        raise TypeError(f"unknown table(s): {', '.join(sorted(unknown))}")
    try:
        label_bytes = label.encode()
    except UnicodeEncodeError:  # undecodable bytes from argv arrive as surrogates
        raise FormatError(f"label {label!r} is not valid UTF-8") from None
    if len(label_bytes) > 64:
        raise FormatError(f"label is {len(label_bytes)} bytes, longer than 64 bytes")
    existed = os.path.exists(path)
    if existed and size and os.path.isfile(path) and os.path.getsize(path) not in (0, size):
        raise RegionError(f"{path}: exists with size {os.path.getsize(path)}; --size {size} "
                          "would not match (remove it or leave out --size)")
    if sparse and prefault:
        raise FormatError("--prefault populates every block, --sparse reserves them as they are used: "
                          "give one of them")
    if size:
        Geometry.plan(size, block_size, inodes, **tables)  # refuse before creating anything
    return existed


def _check_backing(path: str, size: int, block_size: int, sparse: bool, existed: bool) -> None:
    """Refuse a region its backing cannot be or cannot hold (unless overcommitted)."""
    info = probe(path)
    if sparse and info.kind == "devdax":
        raise RegionError(f"{path}: a /dev/dax device is its memory; --sparse is for a region file "
                          "on tmpfs or hugetlbfs")
    if size and size % info.page_size:
        raise RegionError(f"{path}: size {size} is not a multiple of the {info.kind} page size {info.page_size}")
    if info.memory and not sparse:
        free = backing_free(path) or 0
        allocated = os.stat(path).st_blocks * 512 if existed else 0
        if (size or info.size) - allocated > free:
            raise _does_not_fit(path, size or info.size, block_size, info.page_size, info.kind,
                                allocated, free)


def _open_region(path: str, size: int, sparse: bool, existed: bool) -> Region:
    try:
        return Region(path, create_size=size, noreserve=sparse)
    except BaseException:
        # Region may have created the file before failing (to size or map it).
        if not existed and os.path.exists(path):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _reserve(region: Region, sb: Superblock, path: str, block_size: int, sparse: bool,
             existed: bool, progress: Callable[[str, int], Callable[[int], None]] | None) -> bool:
    """Reserve the backing of a memory region: all of it, or (sparse) the metadata in
    use. False when the region must not be zeroed (a sparse reformat is one hole now)."""
    zero = True
    try:
        if sparse:
            if existed:
                region.release(0, region.size)  # every block is free: a hole
                zero = False
            for off, n in sb.geometry.metadata_in_use(sb.hwm):
                region.reserve(off, n)
        else:
            tick = progress("reserving", region.size) if progress else None
            region.reserve(0, region.size, tick)
    except BackingFull:
        free = backing_free(path) or 0
        if sparse:
            raise RegionError(f"{path}: {backing_name(path)} cannot hold even the metadata in "
                              f"use ({_human(free)} free)") from None
        # Someone else took the memory since it was counted.
        raise _does_not_fit(path, region.size, block_size, region.page_size, region.kind,
                            0, free) from None
    return zero


def _write_metadata(region: Region, sb: Superblock, zero: bool) -> None:
    g = sb.geometry
    buf = region.buf
    if zero:
        # A reformat must not inherit old records. A new sparse file is zero already.
        # Region.zero punches holes: writing zeros would allocate every table page
        # (hundreds of MiB for a 1 TiB region) that the fresh filesystem never uses.
        region.zero(0, g.data_start_block * g.block_size)
    format_journal(buf, g.journal_size)
    tables = Tables(buf, sb)
    # Metadata blocks and the bitmap's tail bits past the last block count as used.
    bits = np.zeros(len(tables.bitmap) * 8, bool)
    bits[:g.data_start_block] = True
    bits[g.block_count:] = True
    tables.bitmap[:] = np.packbits(bits, bitorder="little")
    tables.badmap[:] = 0
    now = time.time_ns()
    root = tables.inodes[ROOT_INO]
    root["kind"] = KIND_DIR
    root["mode"] = 0o040755
    root["uid"] = os.getuid()
    root["gid"] = os.getgid()
    root["nlink"] = 2
    root["generation"] = 1
    root["parent"] = ROOT_INO
    root["next_cookie"] = 3
    for t in ("atime_ns", "mtime_ns", "ctime_ns", "btime_ns"):
        root[t] = now
    seal(tables.inodes, ROOT_INO)
    del root, tables
    raw = sb.encode()
    buf[g.backup_offset:g.backup_offset + len(raw)] = raw
    buf[0:len(raw)] = raw  # the primary last: a half-made region has no valid primary
    assert len(raw) <= SB_SLOT

