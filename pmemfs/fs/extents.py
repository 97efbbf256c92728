"""The engine's block mapping: each file's extents (FileMap), where new blocks go
(allocation goals, aligned GiB runs, growth migration), and freeing blocks.
"""

from __future__ import annotations

import errno
from bisect import bisect_right

from ..media.allocator import NoSpace
from ..media.format import FLAG_TRUNCATING
from ..media.journal import Transaction
from .core import ALIGN_POLICY, FREE_BATCH, GROWTH_MIGRATE_BLOCKS, EngineCore, FileMap
from .ctx import FsError


class Extents(EngineCore):
    """Which region blocks hold a file's blocks, and getting or freeing them."""

    def file_map(self, ino: int) -> FileMap:
        fm = self.maps.get(ino)
        if fm is None:
            fm = self.maps[ino] = FileMap()
        return fm

    def extents(self, ino: int) -> list[tuple[int, int, int]]:
        """(file block, region block, count) of each extent, in file order."""
        self.check_ino(ino)
        fm = self.maps.get(ino)
        if fm is None:
            return []
        return list(zip(fm.fblk, fm.pblk, fm.cnt, strict=True))

    def extent_map(self, ino: int) -> list[tuple[int, int, int]]:
        """(file offset, region offset, length) in bytes of each piece of the file, a
        small file's chunks included."""
        self.check_ino(ino)
        if ino in self.packer.packed:
            return [(0, self.packer.address(ino), self.packer.covered(ino))]
        bs = self.block_size
        return [(fb * bs, pb * bs, n * bs) for fb, pb, n in self.extents(ino)]

    def unmapped(self, fm: FileMap, b0: int, b1: int) -> list[tuple[int, int]]:
        """Runs (file block, count) in [b0, b1) that have no block yet."""
        runs = []
        fb = b0
        # i: the first extent that ends after fb (extents are sorted and disjoint).
        i = bisect_right(fm.fblk, fb) - 1
        if i < 0:
            i = 0
        elif fb >= fm.fblk[i] + fm.cnt[i]:
            i += 1
        while fb < b1:
            if i < len(fm.fblk) and fm.fblk[i] <= fb:
                fb = fm.fblk[i] + fm.cnt[i]  # mapped: skip to the extent's end
                i += 1
                continue
            end = min(fm.fblk[i] if i < len(fm.fblk) else b1, b1)
            runs.append((fb, end - fb))
            fb = end
        return runs

    _unmapped = unmapped  # its name before the split (tests/test_fallocate.py uses it)

    def goal(self, fm: FileMap, fb: int) -> int | None:
        """The region block that would continue the extent ending just before fb."""
        i = bisect_right(fm.fblk, fb - 1) - 1
        if i >= 0 and fm.fblk[i] + fm.cnt[i] == fb:
            return fm.pblk[i] + fm.cnt[i]
        return None

    def allocate(self, tx: Transaction, ino: int, fm: FileMap, fb: int, count: int) -> list[tuple[int, int, int]]:
        """Give file blocks [fb, fb+count) region blocks; returns (fb, pb, n) pieces."""
        chunk = self.alloc.chunk_blocks
        goal = self.goal(fm, fb)
        if chunk > 1 and fb == GROWTH_MIGRATE_BLOCKS and goal is not None:
            goal = self._promote(tx, ino, fm, fb) or goal
        # A big file (by size, or past its first GiB) keeps each GiB of itself in one
        # aligned GiB run of the region, block i of the GiB at offset i of the run.
        big = chunk > 1 and (int(self.I["size"][ino]) >= chunk * self.block_size or fb >= chunk
                             or self._wants_gigantic(ino))
        if goal is None:
            goal = self._home(fm, fb) if big else self._beside(ino, fm, fb)
        try:
            runs = self.alloc.find(count, goal, aligned=big, phase=fb % chunk)
        except NoSpace:
            raise FsError(errno.ENOSPC) from None
        pieces = []
        for pb, n in runs:
            self.alloc.mark(tx, pb, n, True)
            self.add_extent(tx, ino, fm, fb, pb, n)
            pieces.append((fb, pb, n))
            fb += n
        self.save_inode(tx, ino)
        self.I["nblocks"][ino] += count
        return pieces

    def _wants_gigantic(self, ino: int) -> bool:
        slot = self.xattrs.get(ino, {}).get(ALIGN_POLICY)
        return slot is not None and self.read_blob(slot)[1] == b"1G"

    def _beside(self, ino: int, fm: FileMap, fb: int) -> int | None:
        """Keep a file written in random order in few extents: a block filling a hole
        goes in line with its nearest neighbour in the file, and a file's first block,
        if it is not file block 0, leaves room before it for the blocks that precede it.
        Blocks appended past the end take the ordinary path."""
        if not fm.fblk:
            if fb == 0:
                return None
            try:
                return self.alloc.find_contiguous(fb + 1) + fb
            except NoSpace:
                return None
        if fb >= self._blocks_for(int(self.I["size"][ino])):
            return None
        i = bisect_right(fm.fblk, fb) - 1
        if i >= 0:
            return fm.pblk[i] + (fb - fm.fblk[i])
        candidate = fm.pblk[0] - (fm.fblk[0] - fb)
        return candidate if candidate >= self.geometry.data_start_block else None

    def _home(self, fm: FileMap, fb: int) -> int | None:
        """Where fb goes if its GiB of the file already has blocks in an aligned run."""
        chunk = self.alloc.chunk_blocks
        g0 = fb - fb % chunk
        i = max(0, bisect_right(fm.fblk, fb) - 1)
        for j in (i, i + 1):
            if j >= len(fm.fblk):
                break
            lo, hi = max(fm.fblk[j], g0), min(fm.fblk[j] + fm.cnt[j], g0 + chunk)
            if lo >= hi:
                continue
            sibling = fm.pblk[j] + (lo - fm.fblk[j])
            candidate = sibling + (fb - lo)
            if candidate // chunk == sibling // chunk and candidate % chunk == fb % chunk:
                return candidate
        return None

    def _promote(self, tx: Transaction, ino: int, fm: FileMap, fb: int) -> int | None:
        """Move a sequentially growing file's first blocks to a free aligned GiB run.

        Its first blocks went where small files go (nobody knew it would grow); once it
        is GROWTH_MIGRATE_BLOCKS long with no holes, copying them (32 MiB at 2 MiB
        blocks) buys aligned GiB runs for the rest of it. Returns the new goal.
        """
        if self.leases.held(ino):
            return None  # mapped directly: its blocks must stay where they are
        chunk = self.alloc.chunk_blocks
        if fm.end() != fb or sum(fm.cnt) != fb or (len(fm) == 1 and fm.pblk[0] % chunk == 0):
            return None
        if self.alloc.free_chunk_count() == 0:
            return None
        ((start, _),) = self.alloc.find(chunk, None, aligned=True)[:1]
        if start % chunk:
            return None
        bs = self.block_size
        old = list(zip(fm.fblk, fm.pblk, fm.cnt, strict=True))
        try:
            self.alloc.mark(tx, start, fb, True)
        except NoSpace:
            return None  # the backing cannot hold a copy: the file stays where it is
        for f, p, n in old:
            self.u8[(start + f) * bs:(start + f + n) * bs] = self.u8[p * bs:(p + n) * bs]
        for slot in fm.slot[1:]:
            self.drop_extent_slot(tx, slot)
        first = fm.slot[0]
        self.save_extent(tx, first)
        self.t.extents[first] = (ino, fb, 0, start, 0, 0)
        fm.fblk[:], fm.pblk[:], fm.cnt[:], fm.slot[:] = [0], [start], [fb], [first]
        for _, p, n in old:
            self.alloc.mark(tx, p, n, False)
        return start + fb

    def save_extent(self, tx: Transaction, slot: int) -> None:
        tx.save_record(self.t.extents, self.offsets["extent"], slot)

    def add_extent(self, tx: Transaction, ino: int, fm: FileMap, fb: int, pb: int, n: int) -> None:
        i = bisect_right(fm.fblk, fb) - 1
        ext = self.t.extents
        if i >= 0 and fm.fblk[i] + fm.cnt[i] == fb and fm.pblk[i] + fm.cnt[i] == pb:
            fm.cnt[i] += n  # grow the previous extent: sequential files stay one extent
            self.save_extent(tx, fm.slot[i])
            ext["count"][fm.slot[i]] = fm.cnt[i]
        else:
            slot = self.take_slot(tx, "extent")
            self.save_extent(tx, slot)
            ext[slot] = (ino, n, fb, pb, 0, 0)
            i += 1
            fm.fblk.insert(i, fb)
            fm.pblk.insert(i, pb)
            fm.cnt.insert(i, n)
            fm.slot.insert(i, slot)
        j = i + 1  # merge with the next extent when they touch in both spaces
        if j < len(fm.fblk) and fm.fblk[i] + fm.cnt[i] == fm.fblk[j] and fm.pblk[i] + fm.cnt[i] == fm.pblk[j]:
            fm.cnt[i] += fm.cnt[j]
            self.save_extent(tx, fm.slot[i])
            ext["count"][fm.slot[i]] = fm.cnt[i]
            self.drop_extent_slot(tx, fm.slot[j])
            for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
                del lst[j]

    def drop_extent_slot(self, tx: Transaction, slot: int) -> None:
        self.save_extent(tx, slot)
        self.t.extents[slot] = (0, 0, 0, 0, 0, 0)
        self.free_slots["extent"].append(slot)

    def _free_beyond(self, ino: int, keep_blocks: int) -> None:
        """Free every block at file block >= keep_blocks, FREE_BATCH extents per transaction."""
        fm = self.maps.get(ino)
        while fm and fm.end() > keep_blocks:
            with self.transaction() as tx:
                self.save_inode(tx, ino)
                done = 0
                while fm.fblk and fm.end() > keep_blocks and done < FREE_BATCH:
                    i = len(fm.fblk) - 1
                    fb, pb, n, slot = fm.fblk[i], fm.pblk[i], fm.cnt[i], fm.slot[i]
                    keep = max(0, keep_blocks - fb)
                    self.alloc.mark(tx, pb + keep, n - keep, False)
                    self.I["nblocks"][ino] -= n - keep
                    if keep:
                        fm.cnt[i] = keep
                        self.save_extent(tx, slot)
                        self.t.extents["count"][slot] = keep
                    else:
                        self.drop_extent_slot(tx, slot)
                        for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
                            lst.pop()
                    done += 1
                if fm.end() <= keep_blocks:
                    self.I["flags"][ino] = int(self.I["flags"][ino]) & ~FLAG_TRUNCATING

    def zero_allocated(self, fm: FileMap, start: int, end: int) -> None:
        """Zero the bytes of [start, end) that lie in allocated blocks (holes stay holes)."""
        if start >= end or not fm.fblk:
            return
        bs = self.block_size
        i = max(0, bisect_right(fm.fblk, start // bs) - 1)
        while i < len(fm.fblk):
            e0 = fm.fblk[i] * bs
            e1 = e0 + fm.cnt[i] * bs
            if e0 >= end:
                break
            a, b = max(start, e0), min(end, e1)
            if a < b:
                base = fm.pblk[i] * bs - e0
                b0 = (base + a) // bs
                if not self.alloc.known_zero(b0, (base + b - 1) // bs + 1 - b0):
                    # (blocks this transaction reserved from holes read as zeros already)
                    self.region.zero(base + a, b - a)
            i += 1

    def wants_aligned(self, ino: int) -> bool:
        return ALIGN_POLICY in self.xattrs.get(ino, ())
