"""Checks of where data lies: extents, blocks claimed twice, the allocation bitmap, bad
blocks, and pack blocks with their chunks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import PACK_CHUNKS
from .core import Finding, View, check, first_few, per_object


@check("extents")
def check_extents(v: View) -> Iterator[Finding]:
    bad = ~v.e_ok
    dangling = bad & ~v.is_live(v.e_owner)
    yield from per_object("extents", "bad-extent", "p", "extent", v.ext_used[dangling],
                     lambda i: f"extent {i} belongs to inode {int(v.extents['owner'][i])}, which does not exist")
    yield from per_object("extents", "bad-extent", "y", "extent", v.ext_used[bad & ~dangling],
                     lambda i: f"extent {i} has a bad owner kind, length or place"
                               f" (file block {int(v.extents['file_block'][i])}, "
                               f"{int(v.extents['count'][i])} at region block {int(v.extents['start_block'][i])})")
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    wrong = np.flatnonzero(v.live & (v.inodes["nblocks"].astype(np.int64) != sums))
    yield from per_object("extents", "nblocks", "p", "inode", wrong,
                     lambda i: f"inode {i} says it owns {int(v.inodes['nblocks'][i])} blocks "
                               f"but its extents hold {int(sums[i])}", key="ino")
    # A packed file has that one extent and no other.
    packed_owner = np.bincount(v.e_owner[v.e_ok & v.e_packed], minlength=v.n)
    any_owner = np.bincount(v.e_owner[v.e_ok], minlength=v.n)
    mixed = (packed_owner > 0) & (any_owner > 1)
    drop = v.ext_used[v.e_ok & v.e_packed & mixed[np.where(v.e_ok, v.e_owner, 0)]]
    yield from per_object("extents", "packed-mixed", "y", "extent", drop,
                     lambda i: f"packed extent {i}: its file has other extents too")
    # A file's extents must not overlap in file offsets.
    used, owner, fb, cnt = v.ext_used[v.e_blk], v.e_owner[v.e_blk], v.e_fb[v.e_blk], v.e_count[v.e_blk]
    order = np.lexsort((fb, owner))
    o, s, c = owner[order], fb[order], cnt[order]
    overl = _overlaps(o, s, s + c)
    yield from per_object("extents", "file-overlap", "y", "extent", used[order[overl]],
                     lambda i: f"extent {i} overlaps another extent of inode {int(v.extents['owner'][i])} "
                               "in file offsets")


def _overlaps(group: np.ndarray | None, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Positions (in sorted order) whose interval starts before an earlier one of its group ends."""
    if len(start) < 2:
        return np.zeros(0, np.int64)
    if group is None:
        run_end = np.maximum.accumulate(end)
        return np.flatnonzero(start[1:] < run_end[:-1]) + 1
    # Per-group running maximum: offset each group so maxima never leak across groups.
    newgrp = np.concatenate(([True], group[1:] != group[:-1]))
    gid = np.cumsum(newgrp) - 1
    big = np.int64(1) << 42
    run_end = np.maximum.accumulate(end + gid * big) - gid * big
    same = ~newgrp[1:]
    return np.flatnonzero(same & (start[1:] < run_end[:-1])) + 1


@check("extent-overlap")
def check_extent_overlap(v: View) -> Iterator[Finding]:
    """No two extents (of one file or of two) claim the same region block; a pack block
    counts as one claim, its chunks are the packs check's business."""
    pb = v.packs["block"][v.pack_used].astype(np.int64)
    used = np.concatenate((v.ext_used[v.e_blk], -v.pack_used.astype(np.int64)))
    s = np.concatenate((v.e_start[v.e_blk], pb))
    c = np.concatenate((v.e_count[v.e_blk], np.ones(len(pb), np.int64)))
    order = np.lexsort((used, s))
    overl = _overlaps(None, s[order], (s + c)[order])
    yield from per_object("extent-overlap", "overlap", "y", "extent", used[order[overl]],
                     lambda i: f"extent {i} (inode {int(v.extents['owner'][i])}) claims region blocks "
                               "another extent already owns")


def block_owners(v: View) -> np.ndarray:
    """How many owners each block has: sound extents, plus 1 for metadata blocks."""
    g = v.sb.geometry
    pb = v.packs["block"][v.pack_used].astype(np.int64)
    pb = pb[(pb >= g.data_start_block) & (pb < g.block_count)]
    s = np.concatenate((v.e_start[v.e_blk], pb))
    c = np.concatenate((v.e_count[v.e_blk], np.ones(len(pb), np.int64)))
    delta = np.zeros(g.block_count + 1, np.int64)
    np.add.at(delta, s, 1)
    np.add.at(delta, s + c, -1)
    owners = np.cumsum(delta)[: g.block_count]
    owners[: g.data_start_block] += 1
    return owners


def expected_bitmap(v: View, owners: np.ndarray) -> np.ndarray:
    g = v.sb.geometry
    bits = np.ones(len(v.t.bitmap) * 8, bool)  # tail bits past the last block count as used
    bits[: g.block_count] = owners > 0
    return np.packbits(bits, bitorder="little")


@check("bitmap")
def check_bitmap(v: View) -> Iterator[Finding]:
    """Allocation bitmap == union of extents + metadata blocks."""
    g = v.sb.geometry
    owners = block_owners(v)
    bits = np.unpackbits(v.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    bad = np.unpackbits(v.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    leaked = np.flatnonzero(bits & (owners == 0) & ~bad)
    unmarked = np.flatnonzero(~bits & (owners > 0))
    double = np.flatnonzero(owners > 1)
    if len(leaked):
        yield Finding("bitmap", "error", f"block {leaked[0]}",
                      f"{len(leaked)} block(s) marked used but owned by nobody (leaked), first {leaked[0]}",
                      data={"blocks": first_few(leaked, 1000)}, code="leaked", fix="p")
    if len(unmarked):
        yield Finding("bitmap", "error", f"block {unmarked[0]}",
                      f"{len(unmarked)} block(s) in use but marked free, first {unmarked[0]}",
                      data={"blocks": first_few(unmarked, 1000)}, code="unmarked", fix="p")
    if len(double):
        yield Finding("bitmap", "error", f"block {double[0]}",
                      f"{len(double)} block(s) owned twice, first {double[0]}",
                      data={"blocks": first_few(double, 1000)}, code="double", fix="y")


@check("badblocks")
def check_badblocks(v: View) -> Iterator[Finding]:
    """Bad blocks (badmap) are reported and never owned by a file."""
    g = v.sb.geometry
    bad = np.unpackbits(v.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    if not bad.any():
        return
    yield Finding("badblocks", "warning", "badmap", f"{int(bad.sum())} block(s) are marked bad",
                  data={"blocks": first_few(np.flatnonzero(bad), 1000)}, code="bad-blocks")
    s, c = v.e_start[v.e_ok], v.e_count[v.e_ok]
    prefix = np.concatenate(([0], np.cumsum(bad)))
    holds = (prefix[s + c] - prefix[s]) > 0
    yield from per_object("badblocks", "bad-owned", "y", "extent", v.ext_used[v.e_ok][holds],
                     lambda i: f"extent {i} (inode {int(v.extents['owner'][i])}) holds a bad block")


@check("packs")
def check_packs(v: View) -> Iterator[Finding]:
    """Pack blocks: in the data area, listed once, and their chunk bitmaps equal the
    union of the packed extents in them, with no chunk claimed twice."""
    g = v.sb.geometry
    slots = v.pack_used
    block = v.packs["block"][slots].astype(np.int64)
    bad = (block < g.data_start_block) | (block >= g.block_count)
    yield from per_object("packs", "pack-place", "y", "pack", slots[bad],
                     lambda i: f"pack record {i} points outside the data area")
    slots, block = slots[~bad], block[~bad]
    order = np.argsort(block, kind="stable")
    dup = slots[order][1:][block[order][1:] == block[order][:-1]]
    yield from per_object("packs", "pack-dup", "y", "pack", dup, lambda i: f"pack record {i} repeats a pack block")
    bits = np.unpackbits(v.packs["bitmap"][slots].view(np.uint8).reshape(len(slots), 64), axis=1,
                         bitorder="little").astype(np.int64) if len(slots) else np.zeros((0, PACK_CHUNKS), np.int64)
    # Chunk claims of the packed extents, all at once: row of the pack block * 512 + chunk.
    ok = v.e_ok & v.e_packed
    ext, b, c0, n = v.ext_used[ok], v.e_start[ok], v.e_chunk0[ok], v.e_count[ok]
    srt = np.argsort(block, kind="stable")
    pos = np.searchsorted(block[srt], b)
    found = (pos < len(block)) & (block[srt][np.minimum(pos, max(len(block) - 1, 0))] == b) if len(block) \
        else np.zeros(len(b), bool)
    yield from per_object("packs", "packed-nowhere", "y", "extent", ext[~found],
                     lambda i: f"packed extent {i} lies in a block that is not a pack block")
    ext, c0, n = ext[found], c0[found], n[found]
    row = srt[pos[found]] if len(block) else pos[found]
    first = row * PACK_CHUNKS + c0
    owner_ext = np.repeat(ext, n)
    chunk = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    claims = np.bincount(chunk, minlength=len(slots) * PACK_CHUNKS)
    earliest = np.full(len(slots) * PACK_CHUNKS, np.iinfo(np.int64).max)
    np.minimum.at(earliest, chunk, owner_ext)
    later = np.unique(owner_ext[earliest[chunk] != owner_ext])  # the later claim is the one dropped
    yield from per_object("packs", "chunk-twice", "y", "extent", later,
                     lambda i: f"packed extent {i} claims chunks another file has")
    want = claims.reshape(len(slots), PACK_CHUNKS) if len(slots) else np.zeros((0, PACK_CHUNKS), np.int64)
    wrong = slots[((want > 0) != (bits > 0)).any(axis=1) | (v.packs["used"][slots] != bits.sum(axis=1))
                  | (bits.sum(axis=1) == 0)] if len(slots) else slots
    yield from per_object("packs", "pack-bitmap", "p", "pack", wrong,
                     lambda i: f"pack record {i}: chunk bitmap or count does not match its files")
