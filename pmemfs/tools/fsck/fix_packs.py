"""Repairs of pack blocks (small files' chunks): pack records that point nowhere or
twice, packed extents without a pack record, chunks claimed twice, chunk bitmaps."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import EXTENT_PACKED, PACK_CHUNKS
from .evidence import bare_small_files, chunk_runs
from .fix_blocks import DROP_WHY, copy_data, drop_extent, free_block_mask, settle_shared, take_runs
from .repair import Repair, finding_items


def fix_drop_packs(r: Repair, fs: list[Finding]) -> None:
    """Pack records that point nowhere or repeat a block: drop them (their files' packed
    extents are then rebuilt a pack record, or dropped, as lying nowhere)."""
    for slot in finding_items(fs, "index"):
        if r.t.packs["block"][slot]:
            r.zero("pack", slot)


def fix_packed_nowhere(r: Repair, fs: list[Finding]) -> None:
    """Packed extents in a block with no pack record: when nothing else owns that block,
    the pack record is rebuilt (its chunk bitmap from the extents); otherwise they go."""
    v = r.view()
    g = r.sb.geometry
    owners = check.block_owners(v)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    e = r.t.extents
    by_block: dict[int, list[int]] = {}
    for slot in finding_items(fs, "index"):
        if e["owner"][slot]:
            by_block.setdefault(int(e["start_block"][slot]), []).append(slot)
    for blk, slots in sorted(by_block.items()):
        if g.data_start_block <= blk < g.block_count and owners[blk] == 0 and not bad[blk]:
            p = r.alloc("pack")
            r.save("pack", p)
            r.t.packs[p] = (blk, 0, 0, bytes(64), bytes(44), 0)  # the bitmap is rebuilt from the extents
            owners[blk] = 1
        else:
            for slot in slots:
                drop_extent(r, slot, DROP_WHY["packed-nowhere"])


def _chunk_room(v: View, n: int, avoid: int) -> tuple[int, int] | None:
    """A pack block with n chunks in a row that are free by its packed extents and by
    its chunk bitmap (a chunk only the bitmap marks may hold a file's lost data)."""
    ok = v.e_ok & v.e_packed & (v.ext_used != avoid)
    for slot, blk in sorted(zip(v.pack_used.tolist(), v.packs["block"][v.pack_used].tolist(), strict=True),
                            key=lambda x: x[1]):
        used = np.zeros(PACK_CHUNKS + 1, bool)
        used[:PACK_CHUNKS] = np.unpackbits(np.frombuffer(v.packs["bitmap"][slot].tobytes(), np.uint8),
                                           bitorder="little").astype(bool)
        used[PACK_CHUNKS] = True
        sel = ok & (v.e_start == blk)
        for c0, cnt in zip(v.e_chunk0[sel].tolist(), v.e_count[sel].tolist(), strict=True):
            used[c0:c0 + cnt] = True
        run = 0
        for c in range(PACK_CHUNKS):
            run = 0 if used[c] else run + 1
            if run == n:
                return int(blk), c - n + 1
    return None


def fix_chunk_twice(r: Repair, fs: list[Finding]) -> None:
    """Two packed extents claim one chunk: the later one is given a copy (in free chunks
    of a pack block, or a new pack block), as for whole blocks (fix_overlap)."""
    g = r.sb.geometry
    chunk = g.block_size // PACK_CHUNKS
    e = r.t.extents
    for slot in finding_items(fs, "index"):
        if not e["owner"][slot]:
            continue
        v = r.view()
        later = int(e["owner"][slot])
        blk, n, c0 = int(e["start_block"][slot]), int(e["count"][slot]), int(e["flags"][slot]) >> 16
        sel = v.e_ok & v.e_packed & (v.e_start == blk) & (v.ext_used != slot) \
            & (v.e_chunk0 < c0 + n) & (v.e_chunk0 + v.e_count > c0)
        partners = {int(o) for o in v.e_owner[sel].tolist()} - {later}
        room = _chunk_room(v, n, slot)
        if room is None:
            runs = take_runs(free_block_mask(r, v), 1)
            if runs:
                p = r.alloc("pack")
                r.save("pack", p)
                r.t.packs[p] = (runs[0][0], 0, 0, bytes(64), bytes(44), 0)
                room = (runs[0][0], 0)
        if room is not None:
            nb, nc = room
            copy_data(r, nb * g.block_size + nc * chunk, blk * g.block_size + c0 * chunk, n * chunk)
            r.set("extent", slot, start_block=nb, flags=EXTENT_PACKED | (nc << 16))
        else:
            r.zero("extent", slot)
        settle_shared(r, later, partners, room is not None, "chunk")


def fix_pack_bitmaps(r: Repair, fs: list[Finding]) -> None:
    """Rebuild each pack block's chunk bitmap from the packed extents in it; a pack
    block left with no chunks is given up (fix_bitmap then frees its block)."""
    v = r.view()
    chunk = r.sb.geometry.block_size // PACK_CHUNKS
    bare, need = bare_small_files(v, chunk)
    for _, _, n in chunk_runs(v, r):
        # Chunks no file claims: a packed extent was lost, and the file it belonged to
        # is one of those with a size but no data. Each of them is named.
        for o in np.flatnonzero(bare & (need <= n)).tolist():
            r.note(o, "lost-blocks", f"it has a size but no data, and {n} chunk(s) of a pack block that no "
                                     "file claims were given up: they may have been its data (an extent "
                                     "record was lost)")
    ok = v.e_ok & v.e_packed
    want: dict[int, np.ndarray] = {int(b): np.zeros(PACK_CHUNKS, bool)
                                   for b in v.packs["block"][v.pack_used].tolist()}
    for b, c0, n in zip(v.e_start[ok].tolist(), v.e_chunk0[ok].tolist(), v.e_count[ok].tolist(), strict=True):
        if b in want:
            want[b][c0:c0 + n] = True
    for slot in v.pack_used.tolist():
        bits = want[int(r.t.packs["block"][slot])]
        if not bits.any():
            r.zero("pack", slot)
        else:
            r.set("pack", slot, bitmap=np.packbits(bits, bitorder="little").tobytes(), used=int(bits.sum()))
