"""Block allocator over the region's allocation bitmap (one bit per block).

Bits are little-endian within a byte: block b is bit (b % 8) of byte b // 8. Bad
blocks (the bad-block bitmap) are never handed out. Searches are numpy over the
bitmap words, never a Python loop over blocks.

With a backing (an overcommitted region on tmpfs or hugetlbfs, docs/DESIGN.md "The
backing"), a block is reserved from it when it is marked used, so a full backing is
NoSpace at the allocation and never a fault later, and a block marked free gives its
memory back once the transaction that freed it has committed: until then a rollback
(or a crash and recovery) may make it the file's again, with its bytes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .journal import Transaction


class NoSpace(Exception):
    pass


class Backing(Protocol):
    """What the allocator needs of the memory behind the region (region.Region)."""

    def reserve(self, start: int, length: int) -> bool: ...  # True: was all holes, reads as zeros
    def release(self, start: int, length: int) -> None: ...


Runs = list[tuple[int, int]]  # (first block, count)


def _subtract(runs: Runs, start: int, count: int) -> tuple[Runs, Runs]:
    """(runs without [start, start+count), the parts of runs inside it)."""
    keep, cut = [], []
    end = start + count
    for s, n in runs:
        e = s + n
        if e <= start or s >= end:
            keep.append((s, n))
            continue
        if s < start:
            keep.append((s, start - s))
        if e > end:
            keep.append((end, e - end))
        cut.append((max(s, start), min(e, end) - max(s, start)))
    return keep, cut


def _merged(runs: Runs) -> Runs:
    out: Runs = []
    for s, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], s + n - out[-1][0]))
        else:
            out.append((s, n))
    return out


class BlockAllocator:
    def __init__(self, bitmap: np.ndarray, badmap: np.ndarray, bitmap_offset: int,
                 block_count: int, data_start: int, block_size: int = 2 << 20,
                 backing: Backing | None = None):
        self.bitmap = bitmap
        self.badmap = badmap
        self.bitmap_offset = bitmap_offset
        self.block_count = block_count
        self.data_start = data_start
        self.block_size = block_size
        self.free = int(np.count_nonzero(~self._unavailable()))
        self._chunk = max(1, (1 << 30) // block_size)
        self.backing = backing
        # Of the open transaction (reset at its end):
        self._freed: Runs = []  # marked free: released at commit
        self._reserved: Runs = []  # reserved from free blocks: released again at rollback
        self._zeroed: Runs = []  # reserved from holes, untouched since: they read as zeros
        self.reserved_blocks = 0  # blocks reserved by the open transaction (a retry's budget)

    def _unavailable(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Boolean array: block unusable (used or bad), for blocks [start, end)."""
        end = self.block_count if end is None else end
        b0, b1 = start // 8, (end + 7) // 8
        bits = np.unpackbits(self.bitmap[b0:b1] | self.badmap[b0:b1], bitorder="little")
        return bits[start - b0 * 8:end - b0 * 8].astype(bool)

    def is_used(self, block: int) -> bool:
        return bool(self.bitmap[block >> 3] & (1 << (block & 7)))

    def free_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of all free runs, in block order."""
        free = ~self._unavailable()
        free[: self.data_start] = False
        return _runs(free)

    def find(self, count: int, goal: int | None = None, aligned: bool = False,
             phase: int = 0, avoid: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Choose free runs totalling `count` blocks; marks nothing.

        1. A run starting at `goal` (so a growing file stays one extent).
        2. With `aligned` (a big file) or `count` of a GiB or more: whole free GiB-aligned
           chunks, so VMMs can map them with PUD entries; the first at offset `phase`
           (the file block's offset inside its GiB) so the file and region GiBs line up.
        3. Otherwise fragments first: free blocks outside wholly free aligned chunks,
           the first run that fits whole, else the largest runs, so small files do not
           break up the aligned runs big files need.
        4. Whatever is left, from the aligned chunks.
        Blocks in [avoid[0], avoid[1]) are never chosen.
        """
        if count > self.free:
            raise NoSpace
        runs: list[tuple[int, int]] = []
        need = count
        if goal is not None and self.data_start <= goal < self.block_count:
            span = self._unavailable(goal, min(goal + need, self.block_count))
            taken = int(np.argmax(span)) if span.any() else len(span)
            if taken:
                runs.append((goal, taken))
                need -= taken
        if not need:
            return runs
        if not aligned and not avoid and need < self._chunk and not runs:
            hit = self._fragment_near_cursor(need)
            if hit is not None:
                return [(hit, need)]
        return self._find_in_bitmap(runs, need, aligned, phase, avoid)

    def _find_in_bitmap(self, runs: list[tuple[int, int]], need: int, aligned: bool, phase: int,
                        avoid: tuple[int, int] | None) -> list[tuple[int, int]]:
        """find's steps 2 to 4, over the whole bitmap: runs (the goal's, if any) extended
        by `need` more blocks. Off the small-allocation fast path: no cost to it."""
        free = ~self._unavailable()
        free[: self.data_start] = False
        if avoid:
            free[avoid[0]:avoid[1]] = False
        for pb, n in runs:
            free[pb:pb + n] = False
        chunk = self.chunk_blocks
        chunk_free = self._free_chunks(free)
        if chunk > 1 and (aligned or need >= chunk):
            need = self._take_chunks(runs, free, chunk_free, need, phase)
            if not need:
                return runs
        fragments = free.copy()
        if chunk > 1:
            fragments[: len(chunk_free) * chunk].reshape(-1, chunk)[chunk_free] = False
        for mask in (fragments, free):
            starts, lengths = _runs(mask)
            fit = np.flatnonzero(lengths >= need)
            if len(fit):
                runs.append((int(starts[fit[0]]), need))
                return runs
            for i in np.argsort(-lengths, kind="stable").tolist():
                n = min(int(lengths[i]), need)
                runs.append((int(starts[i]), n))
                free[starts[i]:starts[i] + n] = False
                need -= n
                if not need:
                    return runs
            # What the fragments could not give comes from the aligned chunks.
        raise NoSpace

    def _take_chunks(self, runs: list[tuple[int, int]], free: np.ndarray, chunk_free: np.ndarray,
                     need: int, phase: int) -> int:
        """Step 2: whole free aligned chunks onto runs (the first at `phase`), taken out
        of `free`; the blocks still needed."""
        chunk = self.chunk_blocks
        phase %= chunk
        for c in np.flatnonzero(chunk_free).tolist():
            n = min(chunk - phase, need)
            runs.append((c * chunk + phase, n))
            free[c * chunk + phase:c * chunk + phase + n] = False
            need -= n
            phase = 0
            if not need:
                break
        return need

    WINDOW = 1 << 16  # blocks looked at per step of the small-allocation scan (8 KiB of bitmap)

    def _fragment_near_cursor(self, need: int) -> int | None:
        """A small allocation's fast path: a fragment that fits whole, found by scanning
        the bitmap a window at a time from where the last one was found, so creating
        many small files costs O(window) each, not O(bitmap).
        """
        window = max(self.WINDOW // self._chunk, 1) * self._chunk
        first = self.data_start - self.data_start % window
        span = self.block_count - first
        if span <= 0:
            return None
        start = getattr(self, "_cursor", first)
        for step in range(-(-span // window)):
            lo = first + (start - first + step * window) % (-(-span // window) * window)
            hi = min(lo + window, self.block_count)
            if lo >= hi:
                continue
            free = ~self._unavailable(lo, hi)
            free[: max(0, self.data_start - lo)] = False
            if self._chunk > 1:
                n = (hi - lo) // self._chunk
                chunks = self._free_chunks(free)
                free[: n * self._chunk].reshape(n, self._chunk)[chunks[:n]] = False
            starts, lengths = _runs(free)
            fit = np.flatnonzero(lengths >= need)
            if len(fit):
                self._cursor = lo
                return lo + int(starts[fit[0]])
        return None

    @property
    def chunk_blocks(self) -> int:
        """Blocks in a GiB-aligned chunk (1 when blocks are 1 GiB already)."""
        return self._chunk

    def _free_chunks(self, free: np.ndarray) -> np.ndarray:
        """Per aligned chunk: True when every block of it is free."""
        chunk = self._chunk
        n = len(free) // chunk
        if chunk <= 1 or not n:
            return np.zeros(0, bool)
        return free[: n * chunk].reshape(n, chunk).all(axis=1)

    def used_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of the runs of data blocks in use, in block order."""
        used = np.unpackbits(self.bitmap, bitorder="little")[: self.block_count].astype(bool)
        used[: self.data_start] = False
        return _runs(used)

    def free_chunk_count(self) -> int:
        free = ~self._unavailable()
        free[: self.data_start] = False
        return int(self._free_chunks(free).sum())

    def find_contiguous(self, count: int, align: int = 1) -> int:
        """Start of a free run of `count` blocks whose start is a multiple of `align`."""
        if count > self.free:
            raise NoSpace
        starts, lengths = self.free_runs()
        aligned = (starts + align - 1) // align * align
        fits = np.flatnonzero(aligned + count <= starts + lengths)
        if not len(fits):
            raise NoSpace
        return int(aligned[fits[0]])

    def mark(self, tx: Transaction, start: int, count: int, used: bool) -> None:
        """Set or clear the bits of [start, start+count), journaled.

        With a backing, blocks marked used are reserved first (NoSpace when the backing
        cannot hold them, with nothing marked and nothing kept), and blocks marked free
        are released when the transaction commits (committed())."""
        if self.backing is not None and count:
            if used:
                self._reserve(start, count)
            else:
                self._freed.append((start, count))
                self._zeroed, _ = _subtract(self._zeroed, start, count)
        b0, b1 = start // 8, (start + count + 7) // 8
        tx.save(self.bitmap_offset + b0, b1 - b0)
        bits = np.unpackbits(self.bitmap[b0:b1], bitorder="little")
        lo = start - b0 * 8
        bits[lo:lo + count] = 1 if used else 0
        self.bitmap[b0:b1] = np.packbits(bits, bitorder="little")
        self.free += -count if used else count


    # ------------------------------------------------------------ the backing
    def _reserve(self, start: int, count: int) -> None:
        # Blocks this transaction freed are still the memory they were (a rollback may
        # give them back to their file): used again, they need no reservation.
        freed, again = _subtract(self._freed, start, count)
        fresh = [(start, count)]
        for s, n in again:
            fresh, _ = _subtract(fresh, s, n)
        bs = self.block_size
        done: Runs = []
        zeroed: Runs = []
        try:
            for s, n in fresh:
                if self.backing.reserve(s * bs, n * bs):
                    zeroed.append((s, n))
                done.append((s, n))
        except Exception as e:
            from .region import BackingFull

            # Free blocks only: what this call took (hugetlbfs keeps the huge pages a
            # failed fallocate got before it failed) goes back.
            for s, n in [*done, *fresh[len(done):len(done) + 1]]:
                self.backing.release(s * bs, n * bs)
            if isinstance(e, BackingFull):
                raise NoSpace from None
            raise
        self._freed = freed
        self._reserved += done
        self._zeroed += zeroed
        self.reserved_blocks += sum(n for _, n in done)

    def known_zero(self, start: int, count: int) -> bool:
        """Do blocks [start, start+count), reserved by this transaction, read as zeros?"""
        rest = [(start, count)]
        for s, n in self._zeroed:
            rest, _ = _subtract(rest, s, n)
        return not rest

    def committed(self) -> None:
        """The transaction committed: the blocks it freed are nobody's; their memory
        goes back to the backing. (A crash before this leaves memory with free blocks
        only; the next mount gives it back, release_free().)"""
        if self.backing is None:
            return
        freed = _merged(self._freed)
        self._reset()
        bs = self.block_size
        for s, n in freed:
            self.backing.release(s * bs, n * bs)

    def rolled_back(self) -> None:
        """The transaction was rolled back: blocks it reserved are free again."""
        if self.backing is None:
            return
        reserved = _merged(self._reserved)
        self._reset()
        bs = self.block_size
        for s, n in reserved:
            self.backing.release(s * bs, n * bs)

    def _reset(self) -> None:
        self._freed, self._reserved, self._zeroed = [], [], []
        self.reserved_blocks = 0

    def release_free(self) -> int:
        """Give the memory of every free block back to the backing (after a crash, the
        last transaction's may still hold some). Returns the runs punched."""
        starts, lengths = self.free_runs()
        bs = self.block_size
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            self.backing.release(s * bs, n * bs)
        return len(starts)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of True in a boolean array."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts
