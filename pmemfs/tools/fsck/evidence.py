"""What the rest of the metadata says about one record: the cross-checks that judge
an explanation of a damaged record, or a damaged record no explanation restores."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import View
from ...media.format import (
    BLOB_SYMLINK,
    KIND_KOBJ,
    KIND_REG,
    PACK_CHUNKS,
    SMALL_CHUNKS,
    max_file_blocks,
)
from .repair import Repair


class Evidence:
    """What the rest of the metadata says about a record: for judging explanations of
    its damage and for cross-checking records that stay unexplained."""

    def __init__(self, r: Repair):
        v = r.view()
        self.r, self.v = r, v
        g = r.sb.geometry
        self.g, self.bs = g, g.block_size
        self.chunk = g.block_size // PACK_CHUNKS
        self.n = v.n
        self.live, self.kind = v.live, v.kind
        self.expect_nlink = check.expected_nlink(v)
        self.names = v.names_per_inode()
        self.up = check.dir_name_parent(v)
        ino = v.inodes
        self.size, self.nblocks, self.flags = ino["size"], ino["nblocks"], ino["flags"]
        blk = v.e_blk
        self.b_slot, self.b_owner = v.ext_used[blk], v.e_owner[blk]
        self.b_start, self.b_count, self.b_fb = v.e_start[blk], v.e_count[blk], v.e_fb[blk]
        self.sums = np.bincount(self.b_owner, weights=self.b_count, minlength=v.n).astype(np.int64)
        pk = v.e_ok & v.e_packed
        self.p_slot, self.p_owner, self.p_block = v.ext_used[pk], v.e_owner[pk], v.e_start[pk]
        self.p_c0, self.p_count = v.e_chunk0[pk], v.e_count[pk]
        self.pack_of = {int(b): int(s) for s, b in zip(v.pack_used.tolist(),
                                                       v.packs["block"][v.pack_used].tolist(), strict=True)}
        self.bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
        b, used = v.blobs, v.blob_used
        heads = used[b["kind"][used] == BLOB_SYMLINK]
        self.target_len = dict(zip(b["owner"][heads].tolist(), b["value_len"][heads].tolist(), strict=True))
        nxt = b["next"][used].astype(np.int64)
        self.linked_by = np.full(len(b), -1, np.int64)
        ok = (nxt > 0) & (nxt < len(b))
        self.linked_by[nxt[ok]] = used[ok]
        self.d_cookie = v.dirents["cookie"][v.dir_used].astype(np.uint64)

    def data_inode(self, o: int) -> bool:
        return 0 < o < self.n and bool(self.live[o]) and int(self.kind[o]) in (KIND_REG, KIND_KOBJ)

    def need(self, o: int) -> int:
        size = int(self.size[o])
        return -(-size // self.bs)

    def own(self, o: int, slot: int) -> int:
        """Blocks extent `slot` now adds to inode o's sum."""
        k = np.flatnonzero(self.b_slot == slot)
        return int(self.b_count[k[0]]) if len(k) and int(self.b_owner[k[0]]) == o else 0

    def marked(self, s: int, n: int) -> bool:
        return bool(self.bits[s:s + n].all())

    def claimed(self, s: int, n: int, exclude: int, among: np.ndarray | None = None) -> bool:
        """Does another whole-block extent (of `among` slots, default all) or a pack block
        claim a block of [s, s + n)?"""
        m = (self.b_start < s + n) & (self.b_start + self.b_count > s) & (self.b_slot != exclude)
        if among is not None:
            m &= np.isin(self.b_slot, among)
        return bool(m.any()) or any(s <= pb < s + n for pb in self.pack_of)

    def file_overlap(self, o: int, fb: int, n: int, exclude: int) -> bool:
        m = (self.b_owner == o) & (self.b_slot != exclude) & (self.b_fb < fb + n) & (self.b_fb + self.b_count > fb)
        return bool(m.any())

    def pack_bits(self, pslot: int) -> np.ndarray:
        raw = np.frombuffer(self.r.t.packs["bitmap"][pslot].tobytes(), np.uint8)
        return np.unpackbits(raw, bitorder="little").astype(bool)

    def short_files(self) -> list[tuple[int, int, int]]:
        """(file, file block, count): files whose block count says they have more blocks
        than their extents map, with a hole where those could go (at most 100 files)."""
        if not hasattr(self, "_short"):
            deficit = self.nblocks.astype(np.int64) - self.sums
            short = np.flatnonzero(self.live & np.isin(self.kind, (KIND_REG, KIND_KOBJ)) & (deficit > 0))[:100]
            self._short = []
            for o in short.tolist():
                mine = self.b_owner == o
                for fb, gap in gaps(self.b_fb[mine].tolist(), self.b_count[mine].tolist(), self.need(o))[:10]:
                    cnt = min(int(deficit[o]), gap)
                    if cnt <= self.g.block_count and fb + cnt <= max_file_blocks(self.bs):  # (damaged counts)
                        self._short.append((o, fb, cnt))
        return self._short

    def unowned(self, s: int, n: int) -> bool:
        """Are blocks [s, s + n) in the data area and owned by nobody? (Marked or not: for
        a record the checksum confirms whole, the bitmap, checksummed by nothing, is no
        evidence against it.)"""
        if not hasattr(self, "_unowned"):
            free = check.block_owners(self.v) == 0
            free[: self.g.data_start_block] = False
            self._unowned = free
        return n > 0 and s + n <= len(self._unowned) and bool(self._unowned[s:s + n].all())

    def orphan_chunks(self) -> list[tuple[int, int, int, int]]:
        if not hasattr(self, "_orphans"):
            self._orphans = _orphan_chunks(self)
        return self._orphans

    def chain_rest(self, slot: int) -> int:
        b = self.r.t.blobs
        total, steps = 0, 0
        while slot and 0 < slot < len(b) and steps < 300:
            total += int(b["value_len"][slot])
            slot = int(b["next"][slot])
            steps += 1
        return total


def bare_small_files(v: View, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of small regular files with a size but no extent at all, chunks each needs)."""
    has_ext = np.zeros(v.n, bool)
    has_ext[v.e_owner[v.e_ok]] = True
    size = v.inodes["size"].astype(np.int64)
    bare = v.live & (v.kind == KIND_REG) & ~has_ext & (size > 0) & (size <= SMALL_CHUNKS * chunk)
    return bare, -(-size // chunk)


def chunk_runs(v: View, r: Repair) -> list[tuple[int, int, int]]:
    """(block, first chunk, count) of the runs of chunks a sound pack record marks and
    no packed extent claims."""
    ok = v.e_ok & v.e_packed
    out = []
    for slot in v.pack_used.tolist():
        if slot in r.suspect["pack"]:
            continue
        blk = int(v.packs["block"][slot])
        marked = np.unpackbits(np.frombuffer(v.packs["bitmap"][slot].tobytes(), np.uint8),
                               bitorder="little").astype(bool)
        sel = ok & (v.e_start == blk)
        for c0, n in zip(v.e_chunk0[sel].tolist(), v.e_count[sel].tolist(), strict=True):
            marked[c0:c0 + n] = False
        idx = np.flatnonzero(marked)
        if len(idx):
            for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
                out.append((blk, int(run[0]), len(run)))
    return out


def _orphan_chunks(ev: Evidence) -> list[tuple[int, int, int, int]]:
    """(block, first chunk, count, candidate owner) for every pairing of unclaimed chunks
    with a small file that has no data (a packed extent lost them)."""
    bare, need = bare_small_files(ev.v, ev.chunk)
    out: list[tuple[int, int, int, int]] = []
    for blk, c0, n in chunk_runs(ev.v, ev.r)[:100]:
        for o in np.flatnonzero(bare & (need <= n)).tolist()[:100]:
            for start in range(c0, c0 + n - int(need[o]) + 1):
                out.append((blk, start, int(need[o]), o))
                if len(out) >= 2000:
                    return out
    return out


def gaps(fbs: list[int], counts: list[int], need: int) -> list[tuple[int, int]]:
    """The unmapped file-block ranges of [0, need), given a file's extents."""
    out, at = [], 0
    for fb, n in sorted(zip(fbs, counts, strict=True)):
        if fb > at:
            out.append((at, fb - at))
        at = max(at, fb + n)
    if need > at:
        out.append((at, need - at))
    return out
