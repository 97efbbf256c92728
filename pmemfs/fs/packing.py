"""Small files share blocks: "pack" blocks cut into 512 chunks.

A regular file whose data fits in SMALL_CHUNKS chunks (64 KiB with 2 MiB blocks)
and that has no placement policy lives in a run of contiguous chunks of one pack
block, described by one extent flagged PACKED (count = chunks, first chunk in the
flags' high half). Each pack block has one 128-byte record in the pack table with
its 512-bit chunk bitmap: 64 bytes of allocation metadata per 2 MiB, nothing per
4 KiB. When such a file outgrows the threshold it moves to a whole block in the
same transaction as the write that made it grow. A pack block whose last chunk is
freed goes back to the block allocator.

Engine-level (no FUSE); every change is inside the caller's journal transaction.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from ..media.allocator import NoSpace
from ..media.format import EXTENT_PACKED, PACK_CHUNKS, SMALL_CHUNKS
from ..media.journal import Transaction
from .ctx import FsError

if TYPE_CHECKING:  # the engine imports this module; Engine is only a type here
    from .engine import Engine


class Packer:
    def __init__(self, e: Engine):
        self.e = e
        self.chunk = e.block_size // PACK_CHUNKS
        self.limit = SMALL_CHUNKS * self.chunk  # bytes a packed file may cover
        self.packed: dict[int, tuple[int, int, int, int]] = {}  # ino -> (extent slot, block, chunk0, n)
        self.pack_of_block: dict[int, int] = {}  # region block -> pack slot
        self.cursor = 0  # pack slot tried first

    # --------------------------------------------------------------- mount
    def load(self, slots: list[int], owners: list[int], blocks: list[int], counts: list[int],
             flags: list[int]) -> None:
        """Adopt the PACKED extents (engine._load hands them over) and the pack table."""
        for slot, owner, block, n, fl in zip(slots, owners, blocks, counts, flags, strict=True):
            self.packed[owner] = (slot, block, fl >> 16, n)
        t = self.e.t.packs[: self.e.hwm["pack"]]
        for slot in np.flatnonzero(t["block"] != 0).tolist():
            if slot:
                self.pack_of_block[int(t["block"][slot])] = slot

    # --------------------------------------------------------------- queries
    def covered(self, ino: int) -> int:
        """Bytes from offset 0 that the file's chunks hold (0 when not packed)."""
        p = self.packed.get(ino)
        return p[3] * self.chunk if p else 0

    def chunks(self, ino: int) -> int:
        p = self.packed.get(ino)
        return p[3] if p else 0

    def address(self, ino: int) -> int:
        """Region offset of the file's first byte."""
        _, block, c0, _ = self.packed[ino]
        return block * self.e.block_size + c0 * self.chunk

    def eligible(self, ino: int, end: int) -> bool:
        """May a write ending at `end` keep (or put) the file in a pack block?"""
        e = self.e
        if end > self.limit or e.maps.get(ino):
            return False
        return not e.wants_aligned(ino)

    def free_chunks(self) -> int:
        t = self.e.t.packs
        return sum(PACK_CHUNKS - int(t["used"][s]) for s in self.pack_of_block.values())

    # ------------------------------------------------------------ allocation
    def _bits(self, slot: int) -> np.ndarray:
        return np.unpackbits(np.frombuffer(self.e.t.packs["bitmap"][slot].tobytes(), np.uint8),
                             bitorder="little").astype(bool)

    def _find(self, n: int, avoid: int = -1) -> tuple[int, int] | None:
        """(pack slot, first chunk) of n free contiguous chunks in an existing pack block."""
        slots = list(self.pack_of_block.values())
        if not slots:
            return None
        start = slots.index(self.cursor) if self.cursor in slots else 0
        used = self.e.t.packs["used"]
        for slot in slots[start:] + slots[:start]:
            if slot == avoid or PACK_CHUNKS - int(used[slot]) < n:
                continue
            free = ~self._bits(slot)
            run = np.convolve(free.view(np.int8), np.ones(n, np.int8), "valid") == n
            hit = np.flatnonzero(run)
            if len(hit):
                self.cursor = slot
                return slot, int(hit[0])
        return None

    def _mark(self, tx: Transaction, slot: int, c0: int, n: int, used: bool) -> None:
        e = self.e
        tx.save_record(e.t.packs, e.offsets["pack"], slot)
        bits = self._bits(slot)
        bits[c0:c0 + n] = used
        e.t.packs["bitmap"][slot] = np.packbits(bits, bitorder="little").tobytes()
        e.t.packs["used"][slot] = int(e.t.packs["used"][slot]) + (n if used else -n)

    def _new_pack(self, tx: Transaction) -> int:
        e = self.e
        try:
            ((block, _),) = e.alloc.find(1, None)
        except NoSpace:
            raise FsError(errno.ENOSPC) from None
        slot = e.take_slot(tx, "pack")
        tx.save_record(e.t.packs, e.offsets["pack"], slot)
        e.alloc.mark(tx, block, 1, True)
        e.t.packs[slot] = (block, 0, 0, bytes(64), bytes(44), 0)
        self.pack_of_block[block] = slot
        return slot

    def _release_pack_if_empty(self, tx: Transaction, slot: int) -> None:
        e = self.e
        if int(e.t.packs["used"][slot]):
            return
        block = int(e.t.packs["block"][slot])
        tx.save_record(e.t.packs, e.offsets["pack"], slot)
        e.t.packs[slot] = (0, 0, 0, bytes(64), bytes(44), 0)
        e.free_slots["pack"].append(slot)
        del self.pack_of_block[block]
        e.alloc.mark(tx, block, 1, False)

    def needs_space(self, ino: int, end: int) -> bool:
        """Would growing the file's coverage to `end` need a new pack block?"""
        n = -(-end // self.chunk)
        return n > self.chunks(ino) and self._find(n) is None and self._extend_room(ino) < n

    def _extend_room(self, ino: int) -> int:
        p = self.packed.get(ino)
        if not p:
            return 0
        _, block, c0, n = p
        bits = self._bits(self.pack_of_block[block])
        room = n
        while c0 + room < PACK_CHUNKS and not bits[c0 + room]:
            room += 1
        return room

    # ------------------------------------------------------------- changes
    def cover(self, tx: Transaction, ino: int, end: int) -> None:
        """Make the file's chunks cover [0, end): grow in place, or move within packs."""
        e = self.e
        need = -(-end // self.chunk)
        p = self.packed.get(ino)
        have = p[3] if p else 0
        if need <= have:
            return
        bs, ch = e.block_size, self.chunk
        if p and self._extend_room(ino) >= need:  # grow in place
            slot, block, c0, n = p
            self._mark(tx, self.pack_of_block[block], c0 + n, need - n, True)
            at = block * bs + (c0 + n) * ch
            e.region.zero(at, (need - n) * ch)  # fresh chunks hold old bytes
            self._set_extent(tx, ino, slot, block, c0, need)
            return
        found = self._find(need, avoid=-1)
        pslot, c0 = found if found else (self._new_pack(tx), 0)
        block = int(e.t.packs["block"][pslot])
        self._mark(tx, pslot, c0, need, True)
        at = block * bs + c0 * ch
        if not (found is None and e.alloc.known_zero(block, 1)):  # a new pack block from holes: zeros
            e.region.zero(at, need * ch)
        if p:  # move the old chunks' bytes, then let them go
            old = self.address(ino)
            e.u8[at:at + have * ch] = e.u8[old:old + have * ch]
            slot = p[0]
            self._drop(tx, ino, keep_extent=True)
        else:
            slot = e.take_slot(tx, "extent")
        self._set_extent(tx, ino, slot, block, c0, need)

    def _set_extent(self, tx: Transaction, ino: int, slot: int, block: int, c0: int, n: int) -> None:
        e = self.e
        e.save_extent(tx, slot)
        e.t.extents[slot] = (ino, n, 0, block, EXTENT_PACKED | (c0 << 16), 0)
        self.packed[ino] = (slot, block, c0, n)

    def _drop(self, tx: Transaction, ino: int, keep_extent: bool = False) -> None:
        slot, block, c0, n = self.packed.pop(ino)
        pslot = self.pack_of_block[block]
        self._mark(tx, pslot, c0, n, False)
        if not keep_extent:
            self.e.drop_extent_slot(tx, slot)
        self._release_pack_if_empty(tx, pslot)

    def free(self, tx: Transaction, ino: int) -> None:
        if ino in self.packed:
            self._drop(tx, ino)

    def shrink(self, tx: Transaction, ino: int, size: int) -> None:
        """Truncate: give back whole chunks past the new size."""
        p = self.packed.get(ino)
        if not p:
            return
        keep = -(-size // self.chunk)
        if keep == 0:
            self._drop(tx, ino)
        elif keep < p[3]:
            slot, block, c0, n = p
            self._mark(tx, self.pack_of_block[block], c0 + keep, n - keep, False)
            self._set_extent(tx, ino, slot, block, c0, keep)

    def unpack(self, tx: Transaction, ino: int) -> None:
        """Move a packed file to a whole block of its own (it outgrew the threshold)."""
        e = self.e
        if ino not in self.packed:
            return
        have = self.covered(ino)
        fm = e.file_map(ino)
        if e.alloc.backing is None:
            # Reserved (or not memory): any block must be zeroed, so the pack block this
            # file may have been alone in is as good as any and is taken again.
            data = bytes(e.u8[self.address(ino):self.address(ino) + have])
            self._drop(tx, ino)
            ((_, pb, _), *_) = e.allocate(tx, ino, fm, 0, 1)
            at = pb * e.block_size
            e.region.zero(at + have, e.block_size - have)
            e.u8[at:at + have] = np.frombuffer(data, np.uint8)
            return
        # Overcommitted: the new block is taken while the pack block is still in use, so
        # that it is a fresh one, reserved from holes, which needs no zeroing (with 1 GiB
        # blocks a GiB of stores); the pack block is freed, and punched, after. (The
        # write that unpacks counted this block and its extent slot already.)
        src = self.address(ino)
        ((_, pb, _), *_) = e.allocate(tx, ino, fm, 0, 1)
        at = pb * e.block_size
        if not e.alloc.known_zero(pb, 1):
            e.region.zero(at + have, e.block_size - have)
        e.u8[at:at + have] = e.u8[src:src + have]
        self._drop(tx, ino)
