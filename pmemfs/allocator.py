"""Block allocator over the region's allocation bitmap (one bit per block).

Bits are little-endian within a byte: block b is bit (b % 8) of byte b // 8. Bad
blocks (the bad-block bitmap) are never handed out. Searches are numpy over the
bitmap words, never a Python loop over blocks.
"""

from __future__ import annotations

import numpy as np

from .journal import Transaction


class NoSpace(Exception):
    pass


class BlockAllocator:
    def __init__(self, bitmap: np.ndarray, badmap: np.ndarray, bitmap_offset: int,
                 block_count: int, data_start: int):
        self.bitmap = bitmap
        self.badmap = badmap
        self.bitmap_offset = bitmap_offset
        self.block_count = block_count
        self.data_start = data_start
        self.free = int(np.count_nonzero(~self._unavailable()))

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
        edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        return starts, ends - starts

    def find(self, count: int, goal: int | None = None) -> list[tuple[int, int]]:
        """Choose free runs totalling `count` blocks; marks nothing.

        Prefers a run starting at `goal` (so a growing file stays one extent), then the
        first run that fits whole, then the largest runs.
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
        if need:
            starts, lengths = self.free_runs()
            if runs:  # do not hand out the goal run twice
                g0, gn = runs[0]
                keep = (starts + lengths <= g0) | (starts > g0 + gn - 1)
                inside = np.flatnonzero(~keep)
                starts, lengths = starts.copy(), lengths.copy()
                for i in inside:  # at most one run contains the goal run
                    end = starts[i] + lengths[i]
                    starts[i] = g0 + gn
                    lengths[i] = end - starts[i]
                ok = lengths > 0
                starts, lengths = starts[ok], lengths[ok]
            fit = np.flatnonzero(lengths >= need)
            if len(fit):
                runs.append((int(starts[fit[0]]), need))
                need = 0
            else:
                for i in np.argsort(-lengths, kind="stable"):
                    n = min(int(lengths[i]), need)
                    runs.append((int(starts[i]), n))
                    need -= n
                    if not need:
                        break
        if need:
            raise NoSpace
        return runs

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
        """Set or clear the bits of [start, start+count), journaled."""
        b0, b1 = start // 8, (start + count + 7) // 8
        tx.save(self.bitmap_offset + b0, b1 - b0)
        bits = np.unpackbits(self.bitmap[b0:b1], bitorder="little")
        lo = start - b0 * 8
        bits[lo:lo + count] = 1 if used else 0
        self.bitmap[b0:b1] = np.packbits(bits, bitorder="little")
        self.free += -count if used else count
