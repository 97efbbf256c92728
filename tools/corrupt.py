#!/usr/bin/env python3
"""Apply named damage to a pmemfs region, for testing pmemfs-fsck.

    python tools/corrupt.py REGION DAMAGE [--seed N]

DAMAGE is one of the names in DAMAGES (run with --help to list them), or "random"
(random bytes in used metadata) or "bits" (flipped bits in it). Every named damage
but superblock-bits and checksum keeps the record checksums valid (it reseals what it
changes), so exactly the structural check meant is what finds it. Importable too:
`apply(path, damage, seed)` returns a dict describing what was done, with `victims`:
the inodes whose contents the damage (or its repair) may legitimately change.
The region must not be mounted (its lock is taken).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pmemfs.media.format import (
    JOURNAL_OFFSET,
    KIND_DIR,
    KIND_REG,
    ROOT_INO,
    SB_STRUCT,
    TABLE_NAMES,
    Superblock,
    Tables,
    seal,
)
from pmemfs.media.journal import HEADER_SIZE
from pmemfs.media.region import Region


class Damage:
    def __init__(self, path: str, seed: int):
        self.region = Region(path, writable=True, lock=True)
        self.buf = self.region.buf
        self.sb = Superblock.decode(self.buf, self.region.size)
        self.t = Tables(self.buf, self.sb)
        self.rng = random.Random(seed)
        self.hwm = {n: int(self.sb.hwm[n]) for n in TABLE_NAMES}

    def close(self) -> None:
        del self.t
        self.region.close()

    def live_inodes(self, kind: int | None = None) -> list[int]:
        k = self.t.inodes["kind"][: self.hwm["inode"]]
        mask = (k != 0) if kind is None else (k == kind)
        return [i for i in np.flatnonzero(mask).tolist() if i != 0]

    def extents(self) -> list[int]:
        o = self.t.extents["owner"][: self.hwm["extent"]]
        return [i for i in np.flatnonzero(o != 0).tolist() if i != 0]

    def dirents(self) -> list[int]:
        p = self.t.dirents["parent"][: self.hwm["dirent"]]
        return [i for i in np.flatnonzero(p != 0).tolist() if i != 0]

    def dirent_of(self, ino: int) -> int:
        for i in self.dirents():
            if int(self.t.dirents["ino"][i]) == ino:
                return i
        raise SystemExit(f"inode {ino} has no name")

    def data_files(self) -> list[int]:
        owners = sorted({int(self.t.extents["owner"][i]) for i in self.extents()})
        return owners


def superblock_bits(d: Damage) -> dict:
    """Flip a few bits of the primary superblock (its backup is left intact)."""
    bits = d.rng.sample(range(SB_STRUCT * 8), 3)
    for b in bits:
        d.buf[b // 8] ^= 1 << (b % 8)
    return {"detail": f"flipped superblock bits {bits}", "victims": []}


def checksum(d: Damage) -> dict:
    """Break the checksum of one used record."""
    table, idx = d.rng.choice([("inode", i) for i in d.live_inodes()] + [("dirent", i) for i in d.dirents()]
                              + [("extent", i) for i in d.extents()])
    arr = getattr(d.t, table + "s")
    arr["checksum"][idx] ^= 1 << d.rng.randrange(32)
    return {"detail": f"{table} {idx} checksum broken", "victims": []}


def extent_overlap(d: Damage) -> dict:
    """Move one file's extent onto blocks another file owns."""
    ext = d.extents()
    by_owner: dict[int, list[int]] = {}
    for i in ext:
        by_owner.setdefault(int(d.t.extents["owner"][i]), []).append(i)
    if len(by_owner) < 2:
        raise SystemExit("extent-overlap needs two files with data")
    a, b = d.rng.sample(sorted(by_owner), 2)
    ea, eb = by_owner[a][0], max(by_owner[b])
    if eb < ea:  # the repair drops the higher slot of two extents that start together
        a, b, ea, eb = b, a, eb, ea
    d.t.extents["start_block"][eb] = d.t.extents["start_block"][ea]
    seal(d.t.extents, eb)
    return {"detail": f"extent {eb} of inode {b} now starts where extent {ea} of inode {a} does",
            "victims": [b]}


def leak_block(d: Damage) -> dict:
    """Mark a free data block used in the allocation bitmap."""
    g = d.sb.geometry
    bits = np.unpackbits(d.t.bitmap, bitorder="little")[: g.block_count]
    free = np.flatnonzero(bits == 0)
    free = free[free >= g.data_start_block]
    blk = int(d.rng.choice(free.tolist()))
    d.t.bitmap[blk // 8] |= 1 << (blk % 8)
    return {"detail": f"block {blk} leaked", "victims": []}


def double_own(d: Damage) -> dict:
    """Give a file an extra extent over a block another file already owns."""
    files = d.data_files()
    if len(files) < 2:
        raise SystemExit("double-own needs two files with data")
    a, b = d.rng.sample(files, 2)
    ea = next(i for i in d.extents() if int(d.t.extents["owner"][i]) == a)
    end_b = max(int(d.t.extents["file_block"][i] + d.t.extents["count"][i])
                for i in d.extents() if int(d.t.extents["owner"][i]) == b)
    free = np.flatnonzero(d.t.extents["owner"][1: d.hwm["extent"]] == 0)
    slot = int(free[0]) + 1
    d.t.extents[slot] = (b, 1, end_b, int(d.t.extents["start_block"][ea]), 0, 0)
    seal(d.t.extents, slot)
    d.t.inodes["nblocks"][b] += 1
    seal(d.t.inodes, b)
    return {"detail": f"inode {b} got extent {slot} over block {int(d.t.extents['start_block'][ea])} of inode {a}",
            "victims": []}


def link_count(d: Damage) -> dict:
    ino = d.rng.choice(d.live_inodes(KIND_REG))
    d.t.inodes["nlink"][ino] += d.rng.choice([1, 2, 5])
    seal(d.t.inodes, ino)
    return {"detail": f"inode {ino} link count raised", "victims": []}


def dir_cycle(d: Damage) -> dict:
    """Hang a directory under its own subdirectory: both fall off the tree."""
    dirs = [i for i in d.live_inodes(KIND_DIR) if i != ROOT_INO]
    pairs = [(p, c) for c in dirs for p in [int(d.t.inodes["parent"][c])] if p in dirs]
    if not pairs:
        raise SystemExit("dir-cycle needs a directory with a subdirectory")
    top, sub = d.rng.choice(pairs)
    slot = d.dirent_of(top)
    old_parent = int(d.t.dirents["parent"][slot])
    d.t.dirents["parent"][slot] = sub
    seal(d.t.dirents, slot)
    d.t.inodes["parent"][top] = sub
    seal(d.t.inodes, top)
    return {"detail": f"directory {top} moved from {old_parent} into its child {sub}", "victims": [],
            "top": top}


def orphan_inode(d: Damage) -> dict:
    """Remove a file's only name without marking it orphan: it becomes unreachable."""
    names: dict[int, int] = {}
    for i in d.dirents():
        ino = int(d.t.dirents["ino"][i])
        names[ino] = names.get(ino, 0) + 1
    cands = [i for i in d.live_inodes(KIND_REG) if names.get(i) == 1]
    ino = d.rng.choice(cands)
    slot = d.dirent_of(ino)
    d.t.dirents[slot] = np.zeros(1, d.t.dirents.dtype)[0]
    return {"detail": f"inode {ino} lost its name (dirent {slot})", "victims": [], "ino": ino}


def bad_name(d: Damage) -> dict:
    slot = d.rng.choice(d.dirents())
    name = bytes(d.t.dirents["name"][slot])
    cut = d.rng.randrange(len(name) + 1)
    new = (name[:cut] + b"/" + name[cut:])[:255]
    d.t.dirents["name"][slot] = new
    d.t.dirents["name_len"][slot] = len(new)
    seal(d.t.dirents, slot)
    return {"detail": f"dirent {slot} renamed {name!r} -> {new!r}", "victims": [],
            "ino": int(d.t.dirents["ino"][slot]), "old": name.decode(errors="surrogateescape"),
            "new": new.decode(errors="surrogateescape")}


def journal_truncated(d: Damage) -> dict:
    """An active journal whose record count runs past the area, or whose record is damaged."""
    header = np.frombuffer(d.buf, np.uint8, HEADER_SIZE, JOURNAL_OFFSET)
    state_at = 24  # offset of state in the journal header (nrecords follows it)
    if d.rng.random() < 0.5:
        struct.pack_into("<II", header, state_at, 1, 1 << 30)
        return {"detail": "journal active with 2**30 records", "victims": []}
    # One record whose checksum does not match its bytes.
    pos = JOURNAL_OFFSET + HEADER_SIZE
    data = b"\xa5" * 128
    off = d.sb.geometry.offsets["inode"] + 128
    struct.pack_into("<QII", d.buf, pos, off, len(data), 0xDEADBEEF)
    d.buf[pos + 16:pos + 16 + len(data)] = data
    struct.pack_into("<II", header, state_at, 1, 1)
    return {"detail": "journal active with one damaged record", "victims": []}


DAMAGES = {
    "superblock-bits": superblock_bits,
    "checksum": checksum,
    "extent-overlap": extent_overlap,
    "leak-block": leak_block,
    "double-own": double_own,
    "link-count": link_count,
    "dir-cycle": dir_cycle,
    "orphan-inode": orphan_inode,
    "bad-name": bad_name,
    "journal-truncated": journal_truncated,
}

# The check pmemfs-fsck names for each damage.
EXPECTED_CHECK = {
    "superblock-bits": "superblock",
    "checksum": "checksums",
    "extent-overlap": "extent-overlap",
    "leak-block": "bitmap",
    "double-own": "bitmap",
    "link-count": "links",
    "dir-cycle": "tree",
    "orphan-inode": "tree",
    "bad-name": "names",
    "journal-truncated": "journal",
}


def apply(path: str, damage: str, seed: int = 0) -> dict:
    if damage not in DAMAGES:
        raise ValueError(f"unknown damage {damage!r}")
    d = Damage(path, seed)
    try:
        out = DAMAGES[damage](d)
    finally:
        d.close()
    out["damage"] = damage
    return out


def _used_spans(region: Region) -> list[tuple[int, int]]:
    """(offset, length) of every used part of the metadata area: the primary
    superblock, the journal header, the allocation bitmap and each used record of
    every table (inodes, extents, dirents, blobs, packs)."""
    buf = region.buf
    sb = Superblock.decode(buf, region.size)
    g = sb.geometry
    t = Tables(buf, sb)
    spans = [(0, SB_STRUCT), (JOURNAL_OFFSET, HEADER_SIZE)]
    for name, key in (("inode", "kind"), ("extent", "owner"), ("dirent", "parent"), ("blob", "owner"),
                      ("pack", "block")):
        arr = getattr(t, name + "s")
        used = np.flatnonzero(arr[key][: sb.hwm[name]] != 0)
        size = arr.dtype.itemsize
        spans += [(g.offsets[name] + int(i) * size, size) for i in used.tolist() if i]
    spans.append((g.offsets["bitmap"], max(1, (g.block_count + 7) // 8)))
    del t
    return spans


def random_bytes(path: str, seed: int, writes: int = 4) -> list[tuple[int, int]]:
    """Write random bytes into random used parts of the metadata area (_used_spans):
    runs of 1 to 63 bytes, within one part. Returns (offset, length) of each write."""
    rng = random.Random(seed)
    region = Region(path, writable=True, lock=True)
    try:
        buf = region.buf
        spans = _used_spans(region)
        done = []
        for _ in range(writes):
            start, length = rng.choice(spans)
            n = rng.choice([1, 1, 2, 4, 8, rng.randrange(1, 64)])
            off = start + rng.randrange(length)
            n = min(n, start + length - off)
            buf[off:off + n] = rng.randbytes(n)
            done.append((off, n))
        return done
    finally:
        region.close()


def random_bits(path: str, seed: int, flips: int = 4) -> list[tuple[int, int]]:
    """Flip random bits of the used parts of the metadata area, each part as likely
    as its size makes it (bit rot). Returns (offset, bit) of each flip."""
    rng = random.Random(seed)
    region = Region(path, writable=True, lock=True)
    try:
        buf = region.buf
        spans = _used_spans(region)
        weights = [length for _, length in spans]
        done = []
        for start, length in rng.choices(spans, weights, k=flips):
            off, bit = start + rng.randrange(length), rng.randrange(8)
            buf[off] ^= 1 << bit
            done.append((off, bit))
        return done
    finally:
        region.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("region")
    ap.add_argument("damage", choices=sorted([*DAMAGES, "random", "bits"]))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.damage == "random":
            print(f"{args.region}: wrote random bytes at {random_bytes(args.region, args.seed)}")
        elif args.damage == "bits":
            print(f"{args.region}: flipped (offset, bit) {random_bits(args.region, args.seed)}")
        else:
            out = apply(args.region, args.damage, args.seed)
            print(f"{args.region}: {args.damage}: {out['detail']}")
    except Exception as e:
        print(f"corrupt.py: {args.region}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
