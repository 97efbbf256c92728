"""Repairs of inode fields: the root, kind and mode, flags, sizes and block counts,
link counts, and inodes that must go."""

from __future__ import annotations

import time

import numpy as np

from ...media import check
from ...media.check import Finding
from ...media.format import (
    ATTR_KNOWN,
    FLAG_ORPHAN,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    KIND_DIR,
    KIND_NAMES,
    ROOT_INO,
    S_IFMT_OF_KIND,
    max_file_size,
)
from .repair import Repair, finding_items


def fix_root(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    kids = v.dir_used[v.d_parent == ROOT_INO]
    cookie = int(r.t.dirents["cookie"][kids].max()) + 1 if len(kids) else 3
    r.save("inode", ROOT_INO)
    if v.live[ROOT_INO] and v.kind[ROOT_INO] != KIND_DIR:
        for slot in v.ext_used[v.e_owner == ROOT_INO].tolist():
            r.zero("extent", slot)
    now = time.time_ns()
    gen = int(r.t.inodes["generation"][ROOT_INO]) + 1
    r.t.inodes[ROOT_INO] = (KIND_DIR, 0, 0, 0o040755, 0, 0, 2, gen & 0xFFFFFFFF, 0, 0, now, now, now, now,
                            0, ROOT_INO, max(cookie, 3), 0, 0, 0, 0, b"\0" * 16, 0)
    r.note(ROOT_INO, "recreated", "the root directory was missing or not a directory: made afresh "
                                  "(mode 0755, root's)")


CLEAR_WHY = {"bad-kind": "it has an unknown kind", "no-target": "a symlink without a target",
             "bad-target": "a symlink whose target has an impossible length",
             "orphan": "an orphan (unlinked while open), freed as mount would"}


def fix_clear_inode(r: Repair, fs: list[Finding]) -> None:
    why = {ino: CLEAR_WHY.get(f.code, f.code) for f in fs for ino in f.data.get("ino", [])}
    for ino in finding_items(fs, "ino"):
        if ino != ROOT_INO and r.t.inodes["kind"][ino]:
            r.note(ino, "removed", f"removed: {why[ino]}")
            r.free_inode(ino)


def fix_mode(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "ino"):
        kind = int(r.t.inodes["kind"][ino])
        mode = int(r.t.inodes["mode"][ino])
        new = S_IFMT_OF_KIND[kind] | (mode & 0o7777)
        r.set("inode", ino, mode=new)
        r.note(ino, "mode", f"its mode {mode:o} did not match its kind ({KIND_NAMES[kind]}): now {new:o}")


def fix_flags(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & FLAGS_KNOWN)


def fix_attr(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "ino"):
        r.set("inode", ino, attr=int(r.t.inodes["attr"][ino]) & ATTR_KNOWN)


def fix_named_orphan(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_ORPHAN)


def fix_trim(r: Repair, fs: list[Finding]) -> None:
    """Free the blocks past what each file's size needs (finishes an interrupted truncate)."""
    v = r.view()
    bs = r.sb.geometry.block_size
    for ino in finding_items(fs, "ino"):
        size = int(r.t.inodes["size"][ino])
        keep = -(-size // bs)
        freed = 0
        for k in np.flatnonzero((v.e_owner == ino) & v.e_blk).tolist():
            slot, fb, cnt = int(v.ext_used[k]), int(v.e_fb[k]), int(v.e_count[k])
            if fb >= keep:
                r.zero("extent", slot)
                freed += cnt
            elif fb + cnt > keep:
                r.set("extent", slot, count=keep - fb)
                freed += fb + cnt - keep
        nblocks = int(r.t.inodes["nblocks"][ino])
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_TRUNCATING,
              nblocks=max(0, nblocks - freed))


def fix_nblocks(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    for ino in finding_items(fs, "ino"):
        if not v.live[ino]:
            continue
        have = int(r.t.inodes["nblocks"][ino])
        if have > sums[ino] and ino not in r.suspect["inode"] and v.has_data[ino]:
            r.note(ino, "lost-blocks", f"its block count says {have} block(s) but its extents map "
                                       f"{int(sums[ino])}: the rest were lost with their extent records")
        r.set("inode", ino, nblocks=int(sums[ino]))


def fix_size_zero(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "ino"):
        r.set("inode", ino, size=0)


def fix_size_limit(r: Repair, fs: list[Finding]) -> None:
    """A size past the largest file size becomes that size (bytes past it cannot be
    addressed by any file offset; extents past it are dropped by their own check)."""
    limit = max_file_size(r.sb.geometry.block_size)
    for ino in finding_items(fs, "ino"):
        r.note(ino, "size", f"its size {int(r.t.inodes['size'][ino])} was past the largest file size: "
                            f"set to {limit}")
        r.set("inode", ino, size=limit)


def fix_symlink_size(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    b = r.t.blobs
    heads = v.blob_used[b["kind"][v.blob_used] == 2]
    length = dict(zip(b["owner"][heads].tolist(), b["value_len"][heads].tolist(), strict=True))
    for ino in finding_items(fs, "ino"):
        if ino in length:
            r.set("inode", ino, size=int(length[ino]))


def fix_nlink(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    expect = check.expected_nlink(v)
    for ino in np.flatnonzero(v.live & (v.inodes["nlink"].astype(np.int64) != expect)).tolist():
        have = int(r.t.inodes["nlink"][ino])
        if not v.is_dir[ino] and ino not in r.suspect["inode"] and not v.orphan[ino]:
            # The count is part of a sound record: a name it counts was lost, or one appeared.
            r.note(ino, "names", f"its link count said {have} name(s) but {int(expect[ino])} were found: "
                                 "a name was lost or the count was wrong")
        r.set("inode", ino, nlink=int(expect[ino]))
