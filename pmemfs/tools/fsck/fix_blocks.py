"""Repairs of whole-block extents and the allocation bitmap: dropping bad extents,
giving the later of two claims on a block its own copy, rebuilding the bitmap."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import EXTENT_PACKED, KIND_KOBJ
from .repair import Repair, finding_items

DROP_WHY = {"bad-extent": "it has a bad owner kind, length or place", "file-overlap":
            "it overlaps another extent of the file", "bad-owned": "it holds a bad block",
            "packed-mixed": "it is a packed extent beside other extents", "overlap": "another file owns its blocks",
            "packed-nowhere": "it lies in a block that is not a pack block",
            "chunk-twice": "another file owns its chunks"}


def drop_extent(r: Repair, slot: int, why: str) -> None:
    e = r.t.extents
    o = int(e["owner"][slot])
    if not o:
        return
    n, fb = int(e["count"][slot]), int(e["file_block"][slot])
    unit = "chunk" if int(e["flags"][slot]) & EXTENT_PACKED else "block"
    if 0 < o < r.hwm["inode"] and int(r.t.inodes["kind"][o]):
        r.note(o, "lost-blocks", f"its extent {slot} ({n} {unit}(s) at file block {fb}) was dropped: {why}; "
                                 "those bytes now read as zeros")
    r.zero("extent", slot)


def fix_drop_extents(r: Repair, fs: list[Finding]) -> None:
    why = {i: DROP_WHY.get(f.code, f.code) for f in fs for i in f.data.get("index", [])}
    for slot in finding_items(fs, "index"):
        drop_extent(r, slot, why[slot])


def free_block_mask(r: Repair, v: View) -> np.ndarray:
    """Blocks a clone may take: unowned, marked free, not bad, in the data area."""
    g = r.sb.geometry
    owners = check.block_owners(v)
    bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    free = (owners == 0) & ~bits & ~bad
    free[: g.data_start_block] = False
    return free


def take_runs(free: np.ndarray, n: int) -> list[tuple[int, int]] | None:
    """n free blocks as (start, length) runs, fewest runs first; marks them taken."""
    blocks = np.flatnonzero(free)
    if len(blocks) < n:
        return None
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    runs = sorted(((int(r[0]), len(r)) for r in np.split(blocks, breaks)), key=lambda x: -x[1])
    out, need = [], n
    for start, length in runs:
        take = min(length, need)
        out.append((start, take))
        free[start:start + take] = False
        need -= take
        if not need:
            break
    return out


def copy_data(r: Repair, dst: int, src: int, length: int) -> None:
    """Copy data bytes (not journaled: the destination is free until the extent that
    points at it commits, so a crash leaves only garbage in free blocks)."""
    u8 = np.frombuffer(r.buf, np.uint8)
    u8[dst:dst + length] = u8[src:src + length]


def _clone_extent(r: Repair, slot: int, free: np.ndarray) -> bool:
    e = r.t.extents
    n, fb, s = int(e["count"][slot]), int(e["file_block"][slot]), int(e["start_block"][slot])
    owner = int(e["owner"][slot])
    runs = take_runs(free, n)
    if runs is None:
        return False
    bs = r.sb.geometry.block_size
    k = 0
    for i, (start, length) in enumerate(runs):
        copy_data(r, start * bs, (s + k) * bs, length * bs)
        if i == 0:
            r.set("extent", slot, start_block=start, count=length)
        else:
            new = r.alloc("extent")
            r.save("extent", new)
            e[new] = (owner, length, fb + k, start, 0, 0)
        k += length
    return True


def _uid(r: Repair, ino: int) -> int:
    return int(r.t.inodes["uid"][ino])


def settle_shared(r: Repair, later: int, partners: set[int], cloned: bool, unit: str,
                   vouched: bool = False) -> None:
    """Name both sides of a doubly claimed block or chunk; quarantine them when the
    copy went to a file of another owner, or when no copy could be made. vouched: the
    partners' claim is a pack block, which its pack record, chunk bitmap and packed
    extents all confirm: only the later claim is then in doubt."""
    inodes = r.t.inodes
    kobj = {o for o in partners | {later} if int(inodes["kind"][o]) == KIND_KOBJ}
    others = ", ".join(sorted(r.was(p) for p in partners)) or "another of its own extents"
    if cloned:
        r.note(later, "cloned", f"it shared {unit}s with {others}: it was given its own copy of them; "
                                "fsck cannot tell which file the data belonged to")
        for p in partners:
            r.note(p, "shared-blocks", f"it shared {unit}s with {r.was(later)}, which was given its own copy; "
                                       "fsck cannot tell which file the data belonged to")
    else:
        r.note(later, "lost-blocks", f"it shared {unit}s with {others} and no free space was left for a "
                                     "copy: its claim was dropped, those bytes now read as zeros")
        for p in partners:
            r.note(p, "shared-blocks", f"it shared {unit}s with {r.was(later)}, whose claim was dropped")
    foreign = any(_uid(r, p) != _uid(r, later) for p in partners)
    if (foreign or not cloned) and not kobj:
        why = ("it shared data with a file of another owner" if foreign
               else "it shared data with another file and no copy could be made")
        for o in ({later} if vouched else partners | {later}):
            r.quarantine(o, f"taken out of its directories for the administrator to inspect: {why}")


def fix_overlap(r: Repair, fs: list[Finding]) -> None:
    """Two claims on one block: neither file silently gets the other's data. The later
    claim (block order, then slot order) gets its own copy of the blocks; a pack block
    keeps its blocks and the extent over it is copied. docs/FSCK.md has the rules."""
    v = r.view()
    fs = [f for f in check.run_check("extent-overlap", v) if f.code == "overlap"]  # ("double" says only blocks)
    free = free_block_mask(r, v)
    ok = v.e_blk
    slots, starts, counts, owners = v.ext_used[ok], v.e_start[ok], v.e_count[ok], v.e_owner[ok]
    pb = v.packs["block"][v.pack_used].astype(np.int64)
    done: set[int] = set()
    for f in fs:
        for c in f.data.get("index", []):
            if c < 0:  # a pack block overlapping an extent: copy the extent instead
                blk = int(r.t.packs["block"][-c])
                hit = slots[(starts <= blk) & (starts + counts > blk)]
                pairs = [(int(x), {int(o) for o in v.e_owner[v.e_packed & (v.e_start == blk)].tolist()}, True)
                         for x in hit.tolist()]
            else:
                k = np.flatnonzero(slots == c)
                if not len(k):
                    continue
                s, n = int(starts[k[0]]), int(counts[k[0]])
                m = (starts < s + n) & (starts + counts > s) & (slots != c)
                partners = set(owners[m].tolist())
                packed = set()
                for blk in pb[(pb >= s) & (pb < s + n)].tolist():
                    packed |= set(v.e_owner[v.e_packed & (v.e_start == blk)].tolist())
                pairs = [(int(c), {int(o) for o in partners | packed}, not partners)]
            for slot, partners, vouched in pairs:
                if slot in done or not r.t.extents["owner"][slot]:
                    continue
                done.add(slot)
                later = int(r.t.extents["owner"][slot])
                partners.discard(later)
                cloned = _clone_extent(r, slot, free)
                if not cloned:
                    r.zero("extent", slot)
                settle_shared(r, later, partners, cloned, "block", vouched)


def fix_bitmap(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    want = check.expected_bitmap(v, check.block_owners(v))
    have = r.t.bitmap
    diff = np.flatnonzero(want != have)
    if not len(diff):
        return
    base = r.sb.geometry.offsets["bitmap"]
    # Contiguous runs of changed bytes, each saved (in pieces that fit the journal) then written.
    breaks = np.flatnonzero(np.diff(diff) > 64) + 1
    for run in np.split(diff, breaks):
        a, b = int(run[0]), int(run[-1]) + 1
        for lo in range(a, b, 65536):
            hi = min(b, lo + 65536)
            r.save_bytes(base + lo, hi - lo)
            have[lo:hi] = want[lo:hi]
