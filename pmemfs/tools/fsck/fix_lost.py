"""Rebuilding extent records the damage destroyed, from what still records them (-y
only: it attaches data to a file by inference)."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import EXTENT_PACKED, PACK_CHUNKS
from .evidence import bare_small_files, chunk_runs, gaps
from .repair import Repair


def fix_lost_extents(r: Repair, fs: list[Finding]) -> None:
    """Rebuild extent records the damage destroyed, from what still records them: a
    file whose (sound) block count says it has more blocks than its extents map, with
    a hole of exactly that many blocks, and a run of exactly that many blocks the
    bitmap marks used but nothing owns; or chunks a pack block's bitmap marks that no
    file claims, and the one small file with no data that fits them. Only pairings
    that are the one possible are made; the rest is named as lost by later repairs."""
    if r.mode != "y":
        return  # it attaches data to a file by inference: not one of -p's safe repairs
    v = r.view()
    g = r.sb.geometry
    owners = check.block_owners(v)
    bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    leaked = bits & (owners == 0) & ~bad
    leaked[: g.data_start_block] = False
    ino = r.t.inodes
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    short = v.has_data & (ino["nblocks"][: v.n].astype(np.int64) > sums)
    taken = np.zeros(g.block_count, bool)  # blocks a rebuilt extent has taken
    _rebuild_dropped(r, v, leaked, taken, sums, short)
    _rebuild_from_leaks(r, v, _leaked_runs(r, leaked, taken), taken, sums, short)
    _rebuild_packed(r)


def _rebuild_dropped(r: Repair, v: View, leaked: np.ndarray, taken: np.ndarray, sums: np.ndarray,
                     short: np.ndarray) -> None:
    """First the extents triage dropped, where the fields that survived agree with
    everything else: their file is short of exactly that many blocks, with a hole
    exactly there, and their blocks are marked used and owned by nobody."""
    g = r.sb.geometry
    bs = g.block_size
    ino = r.t.inodes
    for o, s, n, fb, _ in r.lost_hints:
        if not (0 < o < v.n and short[o]) or o in r.suspect["inode"] or not (s >= 0 and s + n <= g.block_count):
            continue
        d = int(ino["nblocks"][o]) - int(sums[o])
        mine = (v.e_owner == o) & v.e_blk
        holes = gaps(v.e_fb[mine].tolist(), v.e_count[mine].tolist(), -(-int(ino["size"][o]) // bs))
        if n == d and (fb, n) in holes and leaked[s:s + n].all() and not taken[s:s + n].any():
            taken[s:s + n] = True
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, n, fb, s, 0, 0)
            sums[o] += n
            short[o] = False
            r.rebuilt(o, f"its extent for file block {fb} ({n} block(s)) failed its checksum and was "
                         "dropped: rebuilt from what of it agrees with its block count, size and the bitmap")


def _leaked_runs(r: Repair, leaked: np.ndarray, taken: np.ndarray) -> dict[tuple[int, int], None]:
    """Candidate runs (start, count), in order: where a dropped extent lay (if still
    unowned), then the maximal runs of leaked blocks."""
    g = r.sb.geometry
    runs: dict[tuple[int, int], None] = {}
    for _, s, n, _, fl in r.lost_hints:
        if not fl & EXTENT_PACKED and s >= 0 and s + n <= g.block_count and leaked[s:s + n].all() \
                and not taken[s:s + n].any():
            runs[(s, n)] = None
    idx = np.flatnonzero(leaked & ~taken)
    if len(idx):
        for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
            runs[(int(run[0]), len(run))] = None
    return runs


def _rebuild_from_leaks(r: Repair, v: View, runs: dict[tuple[int, int], None], taken: np.ndarray,
                        sums: np.ndarray, short: np.ndarray) -> None:
    """A file short of d blocks with exactly one hole of d blocks, and exactly one
    candidate run of d blocks left: when no other file wants d blocks, the run is its."""
    bs = r.sb.geometry.block_size
    ino = r.t.inodes
    wants: list[tuple[int, int, int]] = []  # (inode, file block, count)
    for o in np.flatnonzero(short).tolist():
        if o in r.suspect["inode"]:
            continue
        d = int(ino["nblocks"][o]) - int(sums[o])
        mine = (v.e_owner == o) & v.e_blk
        need = -(-int(ino["size"][o]) // bs)
        fits = [a for a, n in gaps(v.e_fb[mine].tolist(), v.e_count[mine].tolist(), need) if n == d]
        if len(fits) == 1:
            wants.append((o, fits[0], d))
    for o, fb, d in wants:
        mates = [s for s, n in runs if n == d and not taken[s:s + n].any()]
        rivals = [w for w in wants if w[2] == d]
        if len(mates) == 1 and len(rivals) == 1:
            s = mates[0]
            taken[s:s + d] = True
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, d, fb, s, 0, 0)
            r.rebuilt(o, f"its extent record for file block {fb} ({d} block(s)) was lost: rebuilt from its "
                         "block count, its size and blocks no file owned")


def _rebuild_packed(r: Repair) -> None:
    """Packed: chunks a pack bitmap marks that no packed extent claims, and the one small
    file with no data whose size needs exactly that many."""
    chunk = r.sb.geometry.block_size // PACK_CHUNKS
    v = r.view()
    bare, need = bare_small_files(v, chunk)
    runs_c = chunk_runs(v, r)
    for blk, c0, n in runs_c:
        cands = np.flatnonzero(bare & (need == n)).tolist()
        same = [x for x in runs_c if x[2] == n]
        if len(cands) == 1 and len(same) == 1 and cands[0] not in r.suspect["inode"]:
            o = cands[0]
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, n, 0, blk, EXTENT_PACKED | (c0 << 16), 0)
            bare[o] = False
            r.rebuilt(o, f"its extent record ({n} chunk(s) in a pack block) was lost: rebuilt from its size "
                         "and chunks no file claimed")
