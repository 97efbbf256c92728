"""Where data lives: preallocation, placement policy, carve-out and defragmentation.

Engine-level (no FUSE). Each operation is crash-safe: blocks are marked, data copied
into blocks nobody owns yet, and extents switched in one journal transaction, so a
kill at any point leaves the old layout or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import time
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from ..media.allocator import NoSpace
from ..media.format import FLAG_PINNED, KIND_REG
from ..media.journal import Transaction
from .engine import Engine, FileMap, FsError

ALIGN_XATTR = b"user.pmemfs.align"
ALIGNS = {b"2M": 2 << 20, b"1G": 1 << 30}
MAX_PIECES = 1024  # extents one operation may create or move (bounded journal use)


def parse_align(value: bytes) -> int:
    v = value.strip().upper()
    if v not in ALIGNS:
        raise FsError(errno.EINVAL, "alignment is 2M or 1G")
    return ALIGNS[v]


def file_align(e: Engine, ino: int) -> int:
    """The file's placement policy in bytes (0: none)."""
    slot = e.xattrs.get(ino, {}).get(ALIGN_XATTR)
    if slot is None:
        return 0
    try:
        return parse_align(e.read_blob(slot)[1])
    except FsError:
        return 0


def _regular(e: Engine, ino: int) -> None:
    e.check_ino(ino)
    if e.kind(ino) != KIND_REG:
        raise FsError(errno.EISDIR if e.kind(ino) == 2 else errno.EINVAL)
    if int(e.I["flags"][ino]) & FLAG_PINNED:
        raise FsError(errno.EBUSY)


def _check_leases(e: Engine, ino: int) -> None:
    leases = getattr(e, "leases", None)
    if leases is not None and leases.held(ino):
        raise FsError(errno.EBUSY, "the file is mapped directly")


# ------------------------------------------------------------------- prealloc
def prealloc(e: Engine, ino: int, size: int, align: int = 0) -> list[tuple[int, int, int]]:
    """Give [0, size) of the file blocks, contiguous and aligned, in one step.

    Like fallocate(2) mode 0: the file grows to `size` if shorter, new blocks read as
    zeros, existing data is kept. One transaction (a packed small file first moves to
    a block of its own inside it). Returns the file's extents afterwards.
    """
    _regular(e, ino)
    _check_leases(e, ino)  # its blocks may move
    if size <= 0:
        raise FsError(errno.EINVAL)
    if size > e.max_file_size:
        raise FsError(errno.EFBIG, f"larger than the largest file size {e.max_file_size}")
    bs = e.block_size
    align = align or file_align(e, ino) or bs
    align_blocks = max(1, align // bs)
    fm = e.file_map(ino)
    want = -(-size // bs)
    packed = ino in e.packer.packed
    need = sum(n for _, n in e.unmapped(fm, 0, want))
    if need > e.blocks_available():
        raise FsError(errno.ENOSPC)
    if len(fm) > MAX_PIECES or not e.have_slots("extent", 2):
        raise FsError(errno.ENOSPC, "free space too fragmented; try pmemfs defrag")
    old_size = int(e.I["size"][ino])
    with e.transaction() as tx:
        if packed:
            e.packer.unpack(tx, ino)
        if size > old_size:
            e.zero_allocated(fm, old_size, size)  # old blocks' bytes past EOF
        # Best: the whole file in one aligned run; blocks it already has are copied there.
        # The run holds every block the file has, also those past `size` (block f goes
        # to start + f): a shorter run would drop them and write past its own end.
        run = max(want, fm.end())
        old_blocks = sum(fm.cnt)
        try:
            start = e.alloc.find_contiguous(run, align_blocks)
        except NoSpace:
            start = None
        if start is not None:
            _move_into_run(e, tx, ino, fm, start, run)
            _grow(e, tx, ino, size, old_size, run - old_blocks)
        else:
            _grow(e, tx, ino, size, old_size, _fill_holes(e, tx, ino, fm, want, align_blocks))
    return e.extents(ino)


def _grow(e: Engine, tx: Transaction, ino: int, size: int, old_size: int, new_blocks: int) -> None:
    e.save_inode(tx, ino)
    e.I["nblocks"][ino] = int(e.I["nblocks"][ino]) + new_blocks
    if size > old_size:
        e.I["size"][ino] = size
    e.I["ctime_ns"][ino] = time.time_ns()


# --------------------------------------------------------------------- carve
def carve(e: Engine, src: int, offset: int, length: int, dst: int) -> None:
    """Move [offset, offset+length) of src into the empty file dst, without copying.

    src keeps a hole there and its size; dst gets the blocks at file offset 0 and
    size `length`. Block aligned. One transaction.
    """
    _regular(e, src)
    _regular(e, dst)
    _check_leases(e, src)
    bs = e.block_size
    if offset < 0 or length <= 0 or offset % bs or length % bs:
        raise FsError(errno.EINVAL, f"offset and length must be multiples of the block size {bs}")
    if src == dst:
        raise FsError(errno.EINVAL, "source and destination are the same file")
    if src in e.packer.packed:
        raise FsError(errno.EINVAL, "a small file packed with others has no whole blocks to carve")
    if int(e.I["size"][dst]) or int(e.I["nblocks"][dst]):
        raise FsError(errno.ENOTEMPTY, "the destination must be an empty file")
    if offset + length > int(e.I["size"][src]):
        raise FsError(errno.EINVAL, "the range runs past the end of the source")
    b0, b1 = offset // bs, (offset + length) // bs
    fm = e.file_map(src)
    pieces = _pieces(fm, b0, b1)
    if len(pieces) > MAX_PIECES or not e.have_slots("extent", len(pieces) + 2):
        raise FsError(errno.ENOSPC, "the range has too many extents to move at once")
    dm = e.file_map(dst)
    with e.transaction() as tx:
        moved = _cut(e, tx, src, fm, b0, b1)
        for fb, pb, n in moved:
            e.add_extent(tx, dst, dm, fb - b0, pb, n)
        total = sum(n for _, _, n in moved)
        now = time.time_ns()
        for ino, delta in ((src, -total), (dst, total)):
            e.save_inode(tx, ino)
            e.I["nblocks"][ino] = int(e.I["nblocks"][ino]) + delta
            e.I["mtime_ns"][ino] = now
            e.I["ctime_ns"][ino] = now
        e.I["size"][dst] = length


def _move_into_run(e: Engine, tx: Transaction, ino: int, fm: FileMap, start: int, run: int) -> None:
    """Copy the file's blocks to the free run at `start` (block f to start + f), zero the
    rest of the run, free the old blocks: the file is then one extent."""
    bs = e.block_size
    old = list(zip(fm.fblk, fm.pblk, fm.cnt, fm.slot, strict=True))
    e.alloc.mark(tx, start, run, True)
    kept = np.zeros(run, bool)
    for f, p, n, _ in old:
        e.u8[(start + f) * bs:(start + f + n) * bs] = e.u8[p * bs:(p + n) * bs]
        kept[f:f + n] = True
    if not e.alloc.known_zero(start, run):  # reserved from holes: zeros already
        for f in np.flatnonzero(~kept).tolist():  # fresh blocks read as zeros
            e.region.zero((start + f) * bs, bs)
    for _, p, n, slot in old:
        e.drop_extent_slot(tx, slot)
        e.alloc.mark(tx, p, n, False)
    for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
        lst.clear()
    e.add_extent(tx, ino, fm, 0, start, run)


def _fill_holes(e: Engine, tx: Transaction, ino: int, fm: FileMap, want: int, align_blocks: int) -> int:
    """No run holds the whole file: give each hole of [0, want) blocks, aligned where
    asked, zeroed. Returns the blocks given."""
    bs = e.block_size
    plan: list[tuple[int, int, int]] = []  # (file block, region block, count)
    try:
        for fb, n in e.unmapped(fm, 0, want):
            for pb, k in e.alloc.find(n, e.goal(fm, fb), aligned=align_blocks > 1,
                                      phase=fb % max(1, e.alloc.chunk_blocks)):
                plan.append((fb, pb, k))
                fb += k
    except NoSpace:
        raise FsError(errno.ENOSPC, "no free space that large") from None
    if len(plan) > MAX_PIECES or not e.have_slots("extent", len(plan)):
        raise FsError(errno.ENOSPC, "free space too fragmented; try pmemfs defrag")
    for fb, pb, n in plan:
        e.alloc.mark(tx, pb, n, True)
        e.add_extent(tx, ino, fm, fb, pb, n)
        if not e.alloc.known_zero(pb, n):
            e.region.zero(pb * bs, n * bs)
    return sum(n for _, _, n in plan)


def _pieces(fm: FileMap, b0: int, b1: int) -> list[tuple[int, int, int]]:
    """(file block, region block, count) of what fm maps inside [b0, b1)."""
    out = []
    i = max(0, bisect_right(fm.fblk, b0) - 1)
    while i < len(fm.fblk) and fm.fblk[i] < b1:
        lo, hi = max(b0, fm.fblk[i]), min(b1, fm.fblk[i] + fm.cnt[i])
        if lo < hi:
            out.append((lo, fm.pblk[i] + lo - fm.fblk[i], hi - lo))
        i += 1
    return out


def _cut(e: Engine, tx: Transaction, ino: int, fm: FileMap, b0: int, b1: int) -> list[tuple[int, int, int]]:
    """Unmap [b0, b1) from a file without freeing the blocks; returns what was mapped."""
    moved = _pieces(fm, b0, b1)
    ext = e.t.extents
    hit = [i for i in range(len(fm.fblk)) if fm.fblk[i] < b1 and fm.fblk[i] + fm.cnt[i] > b0]
    for i in reversed(hit):  # back to front, so earlier indices stay valid
        f, p, n, slot = fm.fblk[i], fm.pblk[i], fm.cnt[i], fm.slot[i]
        lo, hi = max(b0, f), min(b1, f + n)
        left, right = lo - f, f + n - hi  # blocks kept before and after the cut
        e.save_extent(tx, slot)
        if left:
            fm.cnt[i] = left
            ext["count"][slot] = left
        else:
            e.drop_extent_slot(tx, slot)
            for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
                del lst[i]
        if right:
            new = e.take_slot(tx, "extent")
            e.save_extent(tx, new)
            ext[new] = (ino, right, hi, p + (hi - f), 0, 0)
            j = i + 1 if left else i
            fm.fblk.insert(j, hi)
            fm.pblk.insert(j, p + (hi - f))
            fm.cnt.insert(j, right)
            fm.slot.insert(j, new)
    return moved


# -------------------------------------------------------------------- defrag
@dataclass
class DefragReport:
    aligned_runs_before: int
    aligned_runs_after: int
    blocks_moved: int
    files_moved: int
    skipped_pinned_or_mapped: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def defrag(e: Engine, max_blocks: int | None = None) -> DefragReport:
    """Empty the most nearly free GiB chunks by moving unpinned file blocks out of them.

    Each moved piece is one transaction: mark the destination, copy, switch the
    extent, free the source. Kernel objects (pinned) and directly mapped files stay.
    """
    chunk = e.alloc.chunk_blocks
    before = e.alloc.free_chunk_count()
    report = DefragReport(before, before, 0, 0, 0)
    if chunk <= 1:
        return report
    g = e.geometry
    nchunks = g.block_count // chunk
    owner_of = np.zeros(g.block_count, np.int64)  # region block -> owning inode (0 none)
    movable = {}
    for ino, fm in e.maps.items():
        pinned = bool(int(e.I["flags"][ino]) & FLAG_PINNED)
        leased = getattr(e, "leases", None) is not None and e.leases.held(ino)
        for pb, n in zip(fm.pblk, fm.cnt, strict=True):
            owner_of[pb:pb + n] = -ino if (pinned or leased) else ino
        movable[ino] = not (pinned or leased)
    used = e.alloc._unavailable()  # used, bad or metadata
    used_per_chunk = used[: nchunks * chunk].reshape(nchunks, chunk).sum(axis=1)
    blocked = np.zeros(nchunks, bool)
    blocked[: -(-g.data_start_block // chunk)] = True  # holds metadata
    blocked |= (owner_of[: nchunks * chunk].reshape(nchunks, chunk) < 0).any(axis=1)  # pinned
    bad = np.unpackbits(e.t.badmap, bitorder="little")[: nchunks * chunk].astype(bool)
    blocked |= bad.reshape(nchunks, chunk).any(axis=1)
    report.skipped_pinned_or_mapped = int(sum(1 for ok in movable.values() if not ok))
    # Candidates: partly used chunks we may empty, fewest used blocks first.
    candidates = [int(c) for c in np.argsort(used_per_chunk, kind="stable")
                  if not blocked[c] and 0 < used_per_chunk[c] < chunk]
    budget = max_blocks if max_blocks is not None else g.block_count
    files = set()
    for c in candidates:
        fragments = e.alloc.free - e.alloc.free_chunk_count() * chunk - (chunk - int(used_per_chunk[c]))
        if used_per_chunk[c] > fragments:
            break  # no room outside the free chunks: moving would break one to make one
        lo, hi = c * chunk, (c + 1) * chunk
        for ino in sorted(set(owner_of[lo:hi][owner_of[lo:hi] > 0].tolist())):
            fm = e.maps[ino]
            for fb, _, n in _region_pieces(fm, lo, hi):
                if n > budget:
                    return _finish(e, report, files)
                if not _move(e, ino, fm, fb, n, lo, hi):
                    return _finish(e, report, files)
                report.blocks_moved += n
                budget -= n
                files.add(ino)
    return _finish(e, report, files)


def _finish(e: Engine, report: DefragReport, files: set[int]) -> DefragReport:
    report.files_moved = len(files)
    report.aligned_runs_after = e.alloc.free_chunk_count()
    return report


def _region_pieces(fm: FileMap, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(file block, region block, count) of the file's blocks inside region [lo, hi)."""
    out = []
    for f, p, n in zip(fm.fblk, fm.pblk, fm.cnt, strict=True):
        a, b = max(lo, p), min(hi, p + n)
        if a < b:
            out.append((f + a - p, a, b - a))
    return out


def _move(e: Engine, ino: int, fm: FileMap, fb: int, n: int, lo: int, hi: int) -> bool:
    """Move file blocks [fb, fb+n) to free blocks outside region chunk [lo, hi)."""
    try:
        runs = e.alloc.find(n, None, aligned=False, avoid=(lo, hi))
    except NoSpace:
        return False
    if not e.have_slots("extent", len(runs) + 1):
        return False  # the extent table is full: stop here, what moved stays moved
    bs = e.block_size
    try:
        with e.transaction() as tx:
            old = _cut(e, tx, ino, fm, fb, fb + n)
            pos = fb
            for pb, k in runs:
                e.alloc.mark(tx, pb, k, True)
                for ofb, opb, on in old:  # copy the data of [pos, pos+k) from its old home
                    a, b = max(pos, ofb), min(pos + k, ofb + on)
                    if a < b:
                        src = (opb + a - ofb) * bs
                        dst = (pb + a - pos) * bs
                        e.u8[dst:dst + (b - a) * bs] = e.u8[src:src + (b - a) * bs]
                e.add_extent(tx, ino, fm, pos, pb, k)
                pos += k
            for _, opb, on in old:
                e.alloc.mark(tx, opb, on, False)
    except FsError as err:
        if err.errno != errno.ENOSPC:
            raise
        return False  # an overcommitted region's backing cannot hold the copy: stop here
    return True
