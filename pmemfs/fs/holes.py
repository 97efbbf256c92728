"""fallocate(2) and SEEK_DATA/SEEK_HOLE over the engine's extents.

The modes are those the FUSE kernel module passes on (it refuses the others with
EOPNOTSUPP itself) and that tmpfs has, plus ZERO_RANGE:

- 0 / KEEP_SIZE: every block of the range that has none gets one, zeroed; the size
  grows to the end of the range unless KEEP_SIZE. All or nothing: ENOSPC changes nothing.
- PUNCH_HOLE|KEEP_SIZE: whole blocks inside the range go back to the free map (and,
  on an overcommitted region, their memory back to the host: "The backing");
  the bytes of partial blocks at its ends become zeros. This is how a guest's freed
  memory (virtio-balloon, free page reporting) comes back: QEMU punches its RAM file.
- ZERO_RANGE (optionally with KEEP_SIZE): the range reads as zeros and is allocated,
  so later writes into it cannot fail with ENOSPC.

A hole is any file block without a region block; a small file packed in chunks is
data over the chunks it covers. See docs/DESIGN.md, "fallocate and holes".
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

from ..media.format import ATTR_APPEND, ATTR_IMMUTABLE, FLAG_PINNED, KIND_KOBJ
from .engine import FsError

if TYPE_CHECKING:
    from .engine import Engine, FileMap

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SUPPORTED = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE


def fallocate(e: Engine, ino: int, mode: int, offset: int, length: int) -> None:
    kind = e.check_file(ino)
    if mode & ~SUPPORTED:
        raise FsError(errno.EOPNOTSUPP)
    punch, zero = bool(mode & FALLOC_FL_PUNCH_HOLE), bool(mode & FALLOC_FL_ZERO_RANGE)
    if punch and (zero or not mode & FALLOC_FL_KEEP_SIZE):
        raise FsError(errno.EOPNOTSUPP)  # as the kernel: PUNCH_HOLE needs KEEP_SIZE, alone
    if offset < 0 or length <= 0:
        raise FsError(errno.EINVAL)
    attr = int(e.I["attr"][ino])  # chattr flags, as vfs_fallocate checks them
    if attr & ATTR_IMMUTABLE or (attr & ATTR_APPEND and mode & ~FALLOC_FL_KEEP_SIZE):
        raise FsError(errno.EPERM)
    if e.readonly:
        raise FsError(errno.EROFS)
    if kind == KIND_KOBJ or int(e.I["flags"][ino]) & FLAG_PINNED:
        raise FsError(errno.EPERM if kind == KIND_KOBJ else errno.EBUSY)
    end = offset + length
    if punch:
        end = min(end, e.max_file_size)
        if offset < end:
            _punch(e, ino, offset, end)
        return
    if end > e.max_file_size:
        raise FsError(errno.EFBIG)
    keep = bool(mode & FALLOC_FL_KEEP_SIZE)
    _allocate_range(e, ino, offset, end, keep_size=keep, zero=zero)


def _allocate_range(e: Engine, ino: int, start: int, end: int, keep_size: bool, zero: bool) -> None:
    bs = e.block_size
    old_size = int(e.I["size"][ino])
    new_size = old_size if keep_size else max(old_size, end)
    packed = ino in e.packer.packed
    if (packed or not e.maps.get(ino)) and e.packer.eligible(ino, max(end, old_size)):
        _allocate_packed(e, ino, start, end, new_size, zero)
        return
    fm = e.file_map(ino)
    holes = e.unmapped(fm, start // bs, -(-end // bs))
    need = sum(n for _, n in holes) + (1 if packed and start >= bs else 0)
    if need > e.blocks_available():  # an overcommitted region: what its backing can give
        raise FsError(errno.ENOSPC)
    slots = len(holes) + (1 if packed and start >= bs else 0)  # unpacking holds two for a moment
    if slots and not e.have_slots("extent", slots):
        raise FsError(errno.ENOSPC)
    if e.leases.held(ino) and packed:
        raise FsError(errno.EBUSY, "would move a directly mapped (leased) file")
    with e.transaction() as tx:
        e.save_inode(tx, ino)
        if packed:
            e.packer.unpack(tx, ino)
            holes = e.unmapped(fm, start // bs, -(-end // bs))
        if new_size > old_size:
            e.zero_allocated(fm, old_size, new_size)  # old blocks' bytes past the old end
            e.I["size"][ino] = new_size
        for fb, count in holes:
            for pfb, _, pn in e.allocate(tx, ino, fm, fb, count):
                e.zero_allocated(fm, pfb * bs, (pfb + pn) * bs)  # fresh blocks read as zeros
        if zero:
            e.zero_allocated(fm, start, end)
        _touch_times(e, ino, data=zero, size=new_size != old_size)


def _allocate_packed(e: Engine, ino: int, start: int, end: int, new_size: int, zero: bool) -> None:
    """A small file stays in its pack block: its chunks grow to cover the range."""
    packer = e.packer
    old_size = int(e.I["size"][ino])
    if packer.needs_space(ino, end) and (not e.blocks_available() or not e.have_slots("pack", 1)):
        raise FsError(errno.ENOSPC)
    if ino not in packer.packed and not e.have_slots("extent", 1):
        raise FsError(errno.ENOSPC)
    with e.transaction() as tx:
        e.save_inode(tx, ino)
        covered = packer.covered(ino)
        packer.cover(tx, ino, max(end, covered))
        base, now_covered = packer.address(ino), packer.covered(ino)
        # Zeros: the old chunks' bytes past the old end, the newly covered chunks, and
        # for ZERO_RANGE the range itself.
        e.u8[base + min(old_size, covered):base + now_covered] = 0
        if zero:
            e.u8[base + start:base + end] = 0
        if new_size > old_size:
            e.I["size"][ino] = new_size
        _touch_times(e, ino, data=zero, size=new_size != old_size)


def _punch(e: Engine, ino: int, start: int, end: int) -> None:
    bs = e.block_size
    if ino in e.packer.packed:
        covered, base = e.packer.covered(ino), e.packer.address(ino)
        with e.transaction() as tx:
            e.save_inode(tx, ino)
            if start < covered:
                e.u8[base + start:base + min(end, covered)] = 0
            _touch_times(e, ino, data=True)
        return
    fm = e.maps.get(ino)
    first, last = -(-start // bs), end // bs  # whole blocks: [first, last)
    whole = [(i, lo, hi) for i, lo, hi in _overlaps(fm, first, last)] if fm and first < last else []
    if whole and e.leases.held(ino):
        raise FsError(errno.EBUSY, "would free blocks of a directly mapped (leased) file")
    # A punch inside one extent splits it in two: that needs a slot.
    splits = sum(1 for i, lo, hi in whole if fm.fblk[i] < lo and hi < fm.fblk[i] + fm.cnt[i])
    if splits and not e.have_slots("extent", splits):
        raise FsError(errno.ENOSPC, "the extent table is full")
    freed: list[tuple[int, int]] = []
    with e.transaction() as tx:
        e.save_inode(tx, ino)
        if fm:
            # The partial blocks at the ends become zeros; blocks wholly inside go.
            e.zero_allocated(fm, start, min(end, first * bs))
            e.zero_allocated(fm, max(start, last * bs, first * bs), end)
            for i, lo, hi in reversed(whole):
                freed.append(_cut(e, tx, ino, fm, i, lo, hi))
        _touch_times(e, ino, data=True)
    for pb, n in freed:
        _give_back(e, pb, n)


def _overlaps(fm: FileMap, b0: int, b1: int) -> list[tuple[int, int, int]]:
    """(extent index, first, end) of each extent's part inside file blocks [b0, b1)."""
    out = []
    for i in range(len(fm.fblk)):
        lo, hi = max(b0, fm.fblk[i]), min(b1, fm.fblk[i] + fm.cnt[i])
        if lo < hi:
            out.append((i, lo, hi))
    return out


def _cut(e: Engine, tx, ino: int, fm: FileMap, i: int, lo: int, hi: int) -> tuple[int, int]:
    """Remove file blocks [lo, hi) from extent i; returns the region run freed."""
    ext = e.t.extents
    f, p, n, slot = fm.fblk[i], fm.pblk[i], fm.cnt[i], fm.slot[i]
    pb = p + (lo - f)
    e.alloc.mark(tx, pb, hi - lo, False)
    e.I["nblocks"][ino] -= hi - lo
    e.save_extent(tx, slot)
    if lo == f and hi == f + n:
        e.drop_extent_slot(tx, slot)
        for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
            del lst[i]
    elif lo == f:  # the front goes
        fm.fblk[i], fm.pblk[i], fm.cnt[i] = hi, p + (hi - f), f + n - hi
        ext["file_block"][slot], ext["start_block"][slot], ext["count"][slot] = fm.fblk[i], fm.pblk[i], fm.cnt[i]
    elif hi == f + n:  # the back goes
        fm.cnt[i] = lo - f
        ext["count"][slot] = fm.cnt[i]
    else:  # the middle goes: the tail becomes an extent of its own
        fm.cnt[i] = lo - f
        ext["count"][slot] = fm.cnt[i]
        tail = e.take_slot(tx, "extent")
        e.save_extent(tx, tail)
        ext[tail] = (ino, f + n - hi, hi, p + (hi - f), 0, 0)
        for lst, v in ((fm.fblk, hi), (fm.pblk, p + (hi - f)), (fm.cnt, f + n - hi), (fm.slot, tail)):
            lst.insert(i + 1, v)
    return pb, hi - lo


def _give_back(e: Engine, pb: int, n: int) -> None:
    """On a disk filesystem the freed blocks' pages are punched out of the region file
    (a prefaulted region keeps its pages populated: it was asked to). On memory the
    allocator has done what is right already (docs/DESIGN.md, "The backing"): an
    overcommitted region gave the memory back to the host when the transaction
    committed, and a reserved region keeps it: it is the region's, for other files."""
    if not e.region.memory and not e.region.prefaulted:
        e.region.zero(pb * e.block_size, n * e.block_size)


def _touch_times(e: Engine, ino: int, data: bool, size: bool = False) -> None:
    """As tmpfs: changing bytes or the size sets mtime and ctime; a plain allocation
    within the size changes neither."""
    if data or size:
        now = time.time_ns()
        e.I["mtime_ns"][ino] = now
        e.I["ctime_ns"][ino] = now


def seek(e: Engine, ino: int, offset: int, whence: int) -> int:
    """SEEK_DATA / SEEK_HOLE from offset, as lseek(2): ENXIO at or past the end."""
    e.check_file(ino)
    size = int(e.I["size"][ino])
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise FsError(errno.EINVAL)
    if offset < 0:
        raise FsError(errno.EINVAL)
    if offset >= size:
        raise FsError(errno.ENXIO)
    runs = _data_runs(e, ino)
    if whence == os.SEEK_DATA:
        for a, b in runs:
            if b > offset:
                found = max(a, offset)
                if found < size:
                    return found
                break
        raise FsError(errno.ENXIO)
    pos = offset
    for a, b in runs:
        if b <= pos:
            continue
        if a > pos:
            break
        pos = b
    return min(pos, size)


def _data_runs(e: Engine, ino: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges that hold data, in order, adjacent ones merged."""
    if ino in e.packer.packed:
        covered = e.packer.covered(ino)
        return [(0, covered)] if covered else []
    fm = e.maps.get(ino)
    if not fm:
        return []
    bs = e.block_size
    runs: list[tuple[int, int]] = []
    for f, n in zip(fm.fblk, fm.cnt, strict=True):
        a, b = f * bs, (f + n) * bs
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs
