"""The engine's file data: read, write and truncate. The hot path (a write inside one
extent) is one undo record; the general path allocates, zeroes and copies in one
transaction; small files go to pack blocks (packing.py).
"""

from __future__ import annotations

import errno
import time
from bisect import bisect_right

from ..media.allocator import NoSpace
from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
)
from ..media.journal import Transaction
from .core import BackingShort, EngineCore, FileMap
from .ctx import FsError


class FileData(EngineCore):
    """Reading, writing and truncating a file's bytes."""

    def check_file(self, ino: int) -> int:
        self.check_ino(ino)
        k = self.kind(ino)
        if k == KIND_DIR:
            raise FsError(errno.EISDIR)
        if k not in (KIND_REG, KIND_KOBJ):
            raise FsError(errno.EINVAL)
        return k

    def write(self, ino: int, offset: int, data: bytes | memoryview) -> int:
        budget = None
        while True:
            try:
                return self._write(ino, offset, data, budget)
            except BackingShort as short:
                # The backing gave fewer blocks than it had said (another user of the
                # tmpfs took some): store what fits in those, as tmpfs would. Each try
                # asks for fewer blocks, so this ends (at ENOSPC if none can be had).
                budget = short.blocks if budget is None else min(short.blocks, budget - 1)

    def _write(self, ino: int, offset: int, data: bytes | memoryview, budget: int | None) -> int:
        kind = self.check_file(ino)
        n = len(data)
        if n == 0:
            return 0
        attr = int(self.I["attr"][ino])
        # Immutable: no write, even through a descriptor opened before (as ext4; tmpfs
        # lets those through). Append-only: bytes are only ever added, so a descriptor
        # that lost O_APPEND (fcntl) cannot overwrite either.
        if attr & ATTR_IMMUTABLE or (attr & ATTR_APPEND and offset < int(self.I["size"][ino])):
            raise FsError(errno.EPERM, "the file is immutable or append-only (chattr)")
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset + n > self.max_file_size:
            # As the kernel's generic_write_checks: a write that starts below the
            # limit stores what fits; one starting at or past it is EFBIG.
            if offset >= self.max_file_size:
                raise FsError(errno.EFBIG)
            data = memoryview(data).cast("B")[:self.max_file_size - offset]
            n = len(data)
        if kind == KIND_KOBJ:
            self.kernel.check_write(ino, offset, n)  # fixed size, immutable while frozen
        elif (ino in self.packer.packed or not self.maps.get(ino)) and self.packer.eligible(ino, offset + n):
            done = self._write_packed(ino, offset, data)
            if done is not None:
                return done
            # The pack table is full: the file takes a whole block of its own.
        if kind == KIND_REG and not self.readonly:
            done = self._write_in_place(ino, offset, data)
            if done is not None:
                return done
        return self._write_allocating(ino, offset, data, budget)

    def _write_allocating(self, ino: int, offset: int, data: bytes | memoryview, budget: int | None) -> int:
        """The general path: give the blocks the write covers that have none a block,
        zero what the write does not cover, copy, in one transaction."""
        # A packed file this write makes too big moves to a block of its own, in the
        # same transaction as the write.
        unpack = ino in self.packer.packed
        bs = self.block_size
        fm = self.file_map(ino)
        old_size = int(self.I["size"][ino])
        n = len(data)
        end = offset + n
        holes = self.unmapped(fm, offset // bs, (end + bs - 1) // bs)
        need = sum(c for _, c in holes)
        avail = self.blocks_available() if need or unpack else 0
        if budget is not None:
            avail = min(avail, budget)
        if unpack and offset >= bs:
            need += 1  # block 0, for the bytes the packed file had
            if need > avail:
                raise FsError(errno.ENOSPC)
        if need > avail:
            data = self._what_fits(fm, offset, data, holes, avail)
            n, end = len(data), offset + len(data)
            holes = self.unmapped(fm, offset // bs, (end + bs - 1) // bs)
        new_size = max(old_size, end)
        # (Unpacking takes block 0's extent slot while the packed one is still held.)
        slots = len(holes) + (1 if unpack and offset >= bs else 0)
        if slots and not self.have_slots("extent", slots):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if unpack:
                self.packer.unpack(tx, ino)
                holes = self.unmapped(fm, offset // bs, (end + bs - 1) // bs)
            if offset > old_size:
                # Bytes past the old end of file are undefined: expose only zeros.
                self.zero_allocated(fm, old_size, offset)
            for fb, count in holes:
                self._fill_hole(tx, ino, fm, fb, count, need, (offset, end, new_size))
            self._copy_in(fm, offset, data)
            self.save_inode(tx, ino)
            if new_size != old_size:
                self.I["size"][ino] = new_size
            now = time.time_ns()
            self.I["mtime_ns"][ino] = now
            self.I["ctime_ns"][ino] = now
        return n

    def _what_fits(self, fm: FileMap, offset: int, data: bytes | memoryview,
                   holes: list[tuple[int, int]], avail: int) -> memoryview:
        """As tmpfs: store what fits, up to the first block that cannot be had, and
        return a short count; only a write that can store nothing is ENOSPC."""
        bs = self.block_size
        budget = avail
        cut = offset + len(data)
        for fb, count in holes:
            if count > budget:
                cut = (fb + budget) * bs
                break
            budget -= count
        if cut <= offset:
            raise FsError(errno.ENOSPC)
        return memoryview(data).cast("B")[:cut - offset]

    def _fill_hole(self, tx: Transaction, ino: int, fm: FileMap, fb: int, count: int, need: int,
                   span: tuple[int, int, int]) -> None:
        """Give file blocks [fb, fb+count) region blocks, and zero the parts of them the
        write (offset, end) does not cover below the new size."""
        offset, end, new_size = span
        bs = self.block_size
        try:
            pieces = self.allocate(tx, ino, fm, fb, count)
        except NoSpace:
            got = self.alloc.reserved_blocks  # what the backing did give
            if got and need > 1:
                raise BackingShort(got) from None
            raise
        for pfb, ppb, pn in pieces:
            if self.alloc.known_zero(ppb, pn):
                continue  # reserved from holes: reads as zeros already
            # A fresh block holds old bytes: zero what this write does not cover
            # below the new size; above it stays undefined until the size grows.
            s, e = pfb * bs, (pfb + pn) * bs
            self.zero_allocated(fm, s, min(offset, e))
            self.zero_allocated(fm, max(s, end), min(e, new_size))

    def _write_in_place(self, ino: int, offset: int, data: bytes | memoryview) -> int | None:
        """The hot path: a write inside one extent that starts at or before the end of
        file. Nothing to allocate or zero; only the inode's size and times change, in one
        undo record (Journal.update_record). None when the write needs the general path."""
        fm = self.maps.get(ino)
        if not fm or ino in self.packer.packed:
            return None
        bs = self.block_size
        old_size = int(self.I["size"][ino])
        i = fm.find(offset // bs)
        n = len(data)
        end = offset + n
        if offset > old_size or i < 0 or end > (fm.fblk[i] + fm.cnt[i]) * bs:
            return None
        at = fm.pblk[i] * bs + offset - fm.fblk[i] * bs
        self.region.buf[at:at + n] = memoryview(data).cast("B")
        inodes = self.I

        def change() -> None:
            if end > old_size:
                inodes["size"][ino] = end
            now = time.time_ns()
            inodes["mtime_ns"][ino] = now
            inodes["ctime_ns"][ino] = now

        self.journal.update_record(self.t.inodes, self.offsets["inode"], ino, change)
        return n

    def _write_packed(self, ino: int, offset: int, data: bytes | memoryview) -> int | None:
        """A small file's write: its bytes live in chunks of a shared pack block.
        None (nothing done) when that needs a new pack block and the pack table is full."""
        packer = self.packer
        n = len(data)
        end = offset + n
        old_size = int(self.I["size"][ino])
        if packer.needs_space(ino, end):
            if not self.blocks_available():
                raise FsError(errno.ENOSPC)
            if not self.have_slots("pack", 1):
                return None
        if ino not in packer.packed and not self.have_slots("extent", 1):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            packer.cover(tx, ino, end)
            base = packer.address(ino)
            if offset > old_size:
                self.u8[base + old_size:base + offset] = 0  # past the old end: zeros only
            self.region.buf[base + offset:base + end] = memoryview(data).cast("B")
            self.save_inode(tx, ino)
            if end > old_size:
                self.I["size"][ino] = end
            now = time.time_ns()
            self.I["mtime_ns"][ino] = now
            self.I["ctime_ns"][ino] = now
        return n

    def _copy_in(self, fm: FileMap, offset: int, data: bytes | memoryview) -> None:
        bs = self.block_size
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        buf = self.region.buf
        while pos < n:
            fb = (offset + pos) // bs
            i = fm.find(fb)
            run_end = (fm.fblk[i] + fm.cnt[i]) * bs
            a = offset + pos
            take = min(n - pos, run_end - a)
            at = fm.pblk[i] * bs + (a - fm.fblk[i] * bs)
            buf[at:at + take] = mv[pos:pos + take]
            pos += take

    def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """Up to size bytes at offset; a memoryview of the region when they are contiguous."""
        self.check_file(ino)
        fsize = int(self.I["size"][ino])
        if offset >= fsize or size <= 0:
            return b""
        end = min(fsize, offset + size)
        self.touch_atime(ino)
        if ino in self.packer.packed:
            covered, base = self.packer.covered(ino), self.packer.address(ino)
            if end <= covered:
                return self.region.buf[base + offset:base + end]  # zero copy
            out = bytearray(end - offset)
            if offset < covered:
                out[:covered - offset] = self.region.buf[base + offset:base + covered]
            return bytes(out)
        fm = self.maps.get(ino)
        bs = self.block_size
        if fm:
            i = fm.find(offset // bs)
            if i >= 0:
                run_end = (fm.fblk[i] + fm.cnt[i]) * bs
                at = fm.pblk[i] * bs + (offset - fm.fblk[i] * bs)
                if end <= run_end:
                    return self.region.buf[at:at + end - offset]  # zero copy
        out = bytearray(end - offset)
        if fm:
            pos = offset
            while pos < end:
                i = fm.find(pos // bs)
                if i < 0:
                    nxt = bisect_right(fm.fblk, pos // bs)
                    pos = min(end, fm.fblk[nxt] * bs) if nxt < len(fm.fblk) else end
                    continue
                run_end = min(end, (fm.fblk[i] + fm.cnt[i]) * bs)
                at = fm.pblk[i] * bs + (pos - fm.fblk[i] * bs)
                out[pos - offset:run_end - offset] = self.region.buf[at:at + run_end - pos]
                pos = run_end
        return bytes(out)

    def truncate(self, ino: int, size: int) -> None:
        self._check_truncate(ino, size)
        with self.transaction() as tx:
            self._truncate(tx, ino, size)
        self._finish_truncate(ino)

    def _check_truncate(self, ino: int, size: int) -> None:
        self.check_file(ino)
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > self.max_file_size:
            raise FsError(errno.EFBIG)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)  # as do_truncate (ext4 also for old descriptors)
        if int(self.I["flags"][ino]) & FLAG_PINNED:
            raise FsError(errno.EBUSY)
        fm = self.maps.get(ino)
        if fm and fm.end() > self._blocks_for(size) and self.leases.held(ino):
            raise FsError(errno.EBUSY, "would free blocks of a directly mapped (leased) file")

    def _truncate(self, tx: Transaction, ino: int, size: int) -> None:
        old = int(self.I["size"][ino])
        fm = self.file_map(ino)
        self.save_inode(tx, ino)
        if ino in self.packer.packed:
            covered, base = self.packer.covered(ino), self.packer.address(ino)
            if size > old:
                self.u8[base + min(old, covered):base + min(size, covered)] = 0
            else:
                self.packer.shrink(tx, ino, size)
        if size > old:
            self.zero_allocated(fm, old, size)
        elif fm.end() > self._blocks_for(size):
            self.I["flags"][ino] |= FLAG_TRUNCATING
        self.I["size"][ino] = size
        now = time.time_ns()
        self.I["mtime_ns"][ino] = now
        self.I["ctime_ns"][ino] = now

    def _finish_truncate(self, ino: int) -> None:
        if int(self.I["flags"][ino]) & FLAG_TRUNCATING:
            self._free_beyond(ino, self._blocks_for(int(self.I["size"][ino])))

    def fsync(self, ino: int) -> None:
        """Data and metadata are in the region already; with sync=True push them to disk."""
        self.check_ino(ino)
        if self.sync:
            self.region.sync()
