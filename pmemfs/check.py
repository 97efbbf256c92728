"""Structural checks of a region's tables, vectorised with numpy.

Each check is a small named function that returns findings; mount runs them all and
refuses a region with any error, pmemfs-fsck runs them to report and repair. Checks
read only [0, high-water mark) of each table, so their cost follows the metadata in
use, not the size of the region.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .format import (
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    FLAG_ORPHAN,
    FLAGS_KNOWN,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
    KIND_SYMLINK,
    NAME_MAX,
    ROOT_INO,
    S_IFMT_OF_KIND,
    TABLE_NAMES,
    Superblock,
    Tables,
    record_checksums,
)


@dataclass
class Finding:
    check: str
    severity: str  # "error" or "warning"
    obj: str  # what it is about, e.g. "inode 12"
    message: str
    repaired: bool = False
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "object": self.obj,
                "message": self.message, "repaired": self.repaired}


@dataclass
class View:
    """What the checks look at: the used prefix of each table and derived masks."""

    t: Tables
    sb: Superblock
    hwm: dict[str, int]

    def __post_init__(self) -> None:
        t = self.t
        self.inodes = t.inodes[: self.hwm["inode"]]
        self.extents = t.extents[: self.hwm["extent"]]
        self.dirents = t.dirents[: self.hwm["dirent"]]
        self.blobs = t.blobs[: self.hwm["blob"]]
        self.kind = self.inodes["kind"]
        self.live = self.kind != 0
        self.live[0] = False
        self.ext_used = np.flatnonzero(self.extents["owner"] != 0)
        self.ext_used = self.ext_used[self.ext_used > 0]
        self.dir_used = np.flatnonzero(self.dirents["parent"] != 0)
        self.dir_used = self.dir_used[self.dir_used > 0]
        self.blob_used = np.flatnonzero(self.blobs["owner"] != 0)
        self.blob_used = self.blob_used[self.blob_used > 0]

    def is_live(self, inos: np.ndarray) -> np.ndarray:
        inos = np.asarray(inos, dtype=np.int64)
        ok = (inos > 0) & (inos < len(self.inodes))
        out = np.zeros(len(inos), bool)
        out[ok] = self.live[inos[ok]]
        return out


CHECKS: list[tuple[str, Callable[[View], Iterator[Finding]]]] = []


def check(name: str):
    def register(fn: Callable[[View], Iterator[Finding]]):
        CHECKS.append((name, fn))
        return fn
    return register


def _some(idx: np.ndarray, limit: int = 20) -> list[int]:
    return np.asarray(idx)[:limit].tolist()


@check("checksums")
def check_checksums(v: View) -> Iterator[Finding]:
    for name, table, used in (("inode", v.inodes, np.flatnonzero(v.live)), ("extent", v.extents, v.ext_used),
                              ("dirent", v.dirents, v.dir_used), ("blob", v.blobs, v.blob_used)):
        if not len(used):
            continue
        bad = used[record_checksums(table, used) != table["checksum"][used]]
        for i in _some(bad):
            yield Finding("checksums", "error", f"{name} {i}", f"{name} record {i} checksum mismatch",
                          data={"table": name, "index": i})


@check("inodes")
def check_inodes(v: View) -> Iterator[Finding]:
    if not v.live[ROOT_INO] if len(v.live) > ROOT_INO else True:
        yield Finding("inodes", "error", f"inode {ROOT_INO}", "root inode is missing")
        return
    if v.kind[ROOT_INO] != KIND_DIR:
        yield Finding("inodes", "error", f"inode {ROOT_INO}", "root inode is not a directory")
    ino = v.inodes
    live = np.flatnonzero(v.live)
    kinds = v.kind[live]
    bad_kind = live[(kinds < 1) | (kinds > KIND_KOBJ)]
    for i in _some(bad_kind):
        yield Finding("inodes", "error", f"inode {i}", f"inode {i} has unknown kind {int(v.kind[i])}",
                      data={"ino": i})
    ok = live[(kinds >= 1) & (kinds <= KIND_KOBJ)]
    fmt = np.array([S_IFMT_OF_KIND.get(k, 0) for k in range(KIND_KOBJ + 1)], np.uint32)
    wrong_mode = ok[(ino["mode"][ok] & 0o170000) != fmt[v.kind[ok]]]
    for i in _some(wrong_mode):
        yield Finding("inodes", "error", f"inode {i}",
                      f"inode {i} mode {int(ino['mode'][i]):o} does not match its kind", data={"ino": i})
    bad_flags = live[(ino["flags"][live] & np.uint16(0xFFFF & ~FLAGS_KNOWN)) != 0]
    for i in _some(bad_flags):
        yield Finding("inodes", "error", f"inode {i}", f"inode {i} has unknown flags", data={"ino": i})
    dirs = live[v.kind[live] == KIND_DIR]
    parents = ino["parent"][dirs].astype(np.int64)
    orphan = (ino["flags"][dirs] & FLAG_ORPHAN) != 0
    bad_parent = dirs[~orphan & ~(v.is_live(parents) & (v.kind[np.clip(parents, 0, len(v.kind) - 1)] == KIND_DIR))]
    for i in _some(bad_parent):
        yield Finding("inodes", "error", f"inode {i}", f"directory {i} has a bad parent", data={"ino": i})
    non_file = live[(v.kind[live] != KIND_REG) & (v.kind[live] != KIND_KOBJ) & (ino["nblocks"][live] != 0)]
    for i in _some(non_file):
        yield Finding("inodes", "error", f"inode {i}", f"inode {i} is not a file but owns blocks",
                      data={"ino": i})


@check("extents")
def check_extents(v: View) -> Iterator[Finding]:
    e = v.extents
    used = v.ext_used
    owner = e["owner"][used].astype(np.int64)
    start = e["start_block"][used].astype(np.int64)
    count = e["count"][used].astype(np.int64)
    fb = e["file_block"][used].astype(np.int64)
    g = v.sb.geometry
    bad = (~v.is_live(owner)) | (count <= 0) | (start < g.data_start_block) | (start + count > g.block_count)
    okown = v.is_live(owner)
    bad |= okown & ~np.isin(v.kind[np.where(okown, owner, 0)], (KIND_REG, KIND_KOBJ))
    for i in _some(used[bad]):
        yield Finding("extents", "error", f"extent {i}", f"extent {i} has a bad owner, length or place",
                      data={"index": i})
    used, owner, start, count, fb = used[~bad], owner[~bad], start[~bad], count[~bad], fb[~bad]
    order = np.argsort(start, kind="stable")
    s, c = start[order], count[order]
    overlap = np.flatnonzero(s[1:] < s[:-1] + c[:-1])
    for k in _some(overlap):
        a, b = used[order[k]], used[order[k + 1]]
        yield Finding("extents", "error", f"extent {b}",
                      f"extents {a} and {b} claim the same region blocks", data={"index": int(b), "other": int(a)})
    order = np.lexsort((fb, owner))
    o, f, c = owner[order], fb[order], count[order]
    same = o[1:] == o[:-1]
    file_overlap = np.flatnonzero(same & (f[1:] < f[:-1] + c[:-1]))
    for k in _some(file_overlap):
        b = used[order[k + 1]]
        yield Finding("extents", "error", f"extent {b}", f"extent {b} overlaps another extent of inode {o[k]}",
                      data={"index": int(b)})
    sums = np.bincount(owner, weights=count, minlength=len(v.inodes)).astype(np.int64)
    wrong = np.flatnonzero(v.live & (v.inodes["nblocks"].astype(np.int64) != sums))
    for i in _some(wrong):
        yield Finding("extents", "error", f"inode {i}",
                      f"inode {i} says it owns {int(v.inodes['nblocks'][i])} blocks but its extents hold {int(sums[i])}",
                      data={"ino": i, "blocks": int(sums[i])})


@check("bitmap")
def check_bitmap(v: View) -> Iterator[Finding]:
    g = v.sb.geometry
    e = v.extents
    owner = e["owner"][v.ext_used].astype(np.int64)
    start = e["start_block"][v.ext_used].astype(np.int64)
    count = e["count"][v.ext_used].astype(np.int64)
    ok = v.is_live(owner) & (count > 0) & (start >= 0) & (start + count <= g.block_count)
    start, count = start[ok], count[ok]
    owned = np.zeros(g.block_count + 1, np.int64)
    np.add.at(owned, start, 1)
    np.add.at(owned, start + count, -1)
    owners = np.cumsum(owned)[: g.block_count]
    owners[: g.data_start_block] += 1  # metadata blocks
    bits = np.unpackbits(v.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    leaked = np.flatnonzero(bits & (owners == 0))
    unmarked = np.flatnonzero(~bits & (owners > 0))
    double = np.flatnonzero(owners > 1)
    if len(leaked):
        yield Finding("bitmap", "error", f"block {leaked[0]}",
                      f"{len(leaked)} block(s) marked used but owned by nobody (leaked), first {leaked[0]}",
                      data={"blocks": leaked.tolist()})
    if len(unmarked):
        yield Finding("bitmap", "error", f"block {unmarked[0]}",
                      f"{len(unmarked)} block(s) in use but marked free, first {unmarked[0]}",
                      data={"blocks": unmarked.tolist()})
    if len(double):
        yield Finding("bitmap", "error", f"block {double[0]}",
                      f"{len(double)} block(s) owned twice, first {double[0]}", data={"blocks": double.tolist()})
    bad = np.unpackbits(v.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    bad_owned = np.flatnonzero(bad & (owners > 0))
    if len(bad_owned):
        yield Finding("bitmap", "error", f"block {bad_owned[0]}",
                      f"{len(bad_owned)} bad block(s) hold data, first {bad_owned[0]}",
                      data={"blocks": bad_owned.tolist()})
    if bad.any():
        yield Finding("bitmap", "warning", "badmap", f"{int(bad.sum())} block(s) are marked bad")


@check("dirents")
def check_dirents(v: View) -> Iterator[Finding]:
    d = v.dirents
    used = v.dir_used
    parent = d["parent"][used].astype(np.int64)
    ino = d["ino"][used].astype(np.int64)
    nlen = d["name_len"][used].astype(np.int64)
    names = d["name"][used]
    real_len = np.char.str_len(names) if len(used) else np.zeros(0, np.int64)
    pl, il = v.is_live(parent), v.is_live(ino)
    bad = ~pl | ~il
    bad |= pl & (v.kind[np.where(pl, parent, 0)] != KIND_DIR)
    bad |= (nlen == 0) | (nlen > NAME_MAX) | (real_len != nlen)
    bad |= il & (d["kind"][used] != v.kind[np.where(il, ino, 0)])
    if len(used):
        has_slash = np.char.find(names, b"/") >= 0
        dots = (names == b".") | (names == b"..")
        bad |= has_slash | dots
    for i in _some(used[bad]):
        yield Finding("dirents", "error", f"dirent {i}",
                      f"directory entry {i} ({bytes(d['name'][i])!r}) is malformed or names a missing inode",
                      data={"index": i})
    good = used[~bad]
    if len(good):
        keys = np.rec.fromarrays([d["parent"][good], d["name"][good]])
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        for k in _some(np.flatnonzero(counts > 1)):
            i = good[first[k]]
            yield Finding("dirents", "error", f"dirent {i}",
                          f"name {bytes(d['name'][i])!r} appears twice in directory {int(d['parent'][i])}",
                          data={"index": int(i)})
        cookie_limit = v.inodes["next_cookie"][d["parent"][good].astype(np.int64)]
        for i in _some(good[d["cookie"][good] >= cookie_limit]):
            yield Finding("dirents", "error", f"dirent {i}", f"directory entry {i} has a cookie from the future",
                          data={"index": i})


@check("links")
def check_links(v: View) -> Iterator[Finding]:
    """Link counts, and that every directory hangs off the root exactly once."""
    d = v.dirents
    used = v.dir_used
    parent = d["parent"][used].astype(np.int64)
    ino = d["ino"][used].astype(np.int64)
    ok = v.is_live(parent) & v.is_live(ino)
    parent, ino = parent[ok], ino[ok]
    n = len(v.inodes)
    names = np.bincount(ino, minlength=n)
    is_dir = v.kind == KIND_DIR
    subdirs = np.bincount(parent[is_dir[ino]], minlength=n)
    expect = np.where(is_dir, 2 + subdirs, names)
    expect[ROOT_INO] = 2 + subdirs[ROOT_INO]
    nlink = v.inodes["nlink"].astype(np.int64)
    orphan = (v.inodes["flags"] & FLAG_ORPHAN) != 0
    # Orphans have no names and nlink 0; a named orphan or a nameless non-orphan is wrong.
    expect = np.where(orphan & (names == 0), 0, expect)
    wrong = np.flatnonzero(v.live & (nlink != expect))
    for i in _some(wrong):
        yield Finding("links", "error", f"inode {i}",
                      f"inode {i} has link count {int(nlink[i])}, expected {int(expect[i])}",
                      data={"ino": int(i), "nlink": int(expect[i])})
    # Directories: exactly one name, and it must agree with ".." (parent field).
    dir_names = np.flatnonzero(is_dir & v.live & (names > 1))
    for i in _some(dir_names):
        yield Finding("links", "error", f"inode {i}", f"directory {i} has {int(names[i])} names",
                      data={"ino": int(i)})
    dir_entries = is_dir[ino]
    wrong_parent = ino[dir_entries][v.inodes["parent"][ino[dir_entries]].astype(np.int64) != parent[dir_entries]]
    for i in _some(wrong_parent):
        yield Finding("links", "error", f"inode {i}", f"directory {i} has a '..' that is not its parent",
                      data={"ino": int(i)})
    unreachable = _unreachable(v, parent, ino)
    for i in _some(unreachable):
        yield Finding("links", "error", f"inode {i}", f"inode {i} is not reachable from the root",
                      data={"ino": int(i)})


def _unreachable(v: View, parent: np.ndarray, ino: np.ndarray) -> np.ndarray:
    """Live, non-orphan inodes that no path from the root reaches (cycles included)."""
    n = len(v.inodes)
    reached = np.zeros(n, bool)
    reached[ROOT_INO] = True
    frontier = np.array([ROOT_INO])
    order = np.argsort(parent, kind="stable")
    sp, si = parent[order], ino[order]
    while len(frontier):
        lo = np.searchsorted(sp, frontier, "left")
        hi = np.searchsorted(sp, frontier, "right")
        kids = np.concatenate([si[a:b] for a, b in zip(lo, hi, strict=True)]) if len(lo) else np.zeros(0, np.int64)
        kids = kids[~reached[kids]]
        reached[kids] = True
        frontier = np.unique(kids[v.kind[kids] == KIND_DIR])
    orphan = (v.inodes["flags"] & FLAG_ORPHAN) != 0
    return np.flatnonzero(v.live & ~reached & ~orphan)


@check("blobs")
def check_blobs(v: View) -> Iterator[Finding]:
    b = v.blobs
    used = v.blob_used
    owner = b["owner"][used].astype(np.int64)
    kind = b["kind"][used]
    nxt = b["next"][used].astype(np.int64)
    bad = ~v.is_live(owner) | ~np.isin(kind, (BLOB_XATTR, BLOB_SYMLINK, BLOB_CONT))
    bad |= (nxt < 0) | (nxt >= len(b))
    head = kind != BLOB_CONT
    bad |= head & (b["name_len"][used].astype(np.int64) > NAME_MAX)
    bad |= ~head & (b["value_len"][used] > BLOB_DATA)
    for i in _some(used[bad]):
        yield Finding("blobs", "error", f"blob {i}", f"xattr/symlink record {i} is malformed", data={"index": i})
    ok = used[~bad]
    # Every continuation is linked from exactly one record of the same owner.
    nx = b["next"][ok].astype(np.int64)
    linked = nx[nx > 0]
    conts = ok[b["kind"][ok] == BLOB_CONT]
    refcount = np.bincount(linked, minlength=len(b))
    for i in _some(conts[refcount[conts] != 1]):
        yield Finding("blobs", "error", f"blob {i}", f"continuation record {i} is not linked exactly once",
                      data={"index": i})
    targets_bad = linked[(b["kind"][linked] != BLOB_CONT)]
    for i in _some(targets_bad):
        yield Finding("blobs", "error", f"blob {i}", f"record {i} is linked as a continuation but is not one",
                      data={"index": int(i)})
    symlinks = np.flatnonzero(v.live & (v.kind == KIND_SYMLINK))
    heads = ok[b["kind"][ok] == BLOB_SYMLINK]
    has = np.zeros(len(v.inodes), np.int64)
    np.add.at(has, b["owner"][heads].astype(np.int64), 1)
    for i in _some(symlinks[has[symlinks] != 1]):
        yield Finding("blobs", "error", f"inode {i}", f"symlink {i} has {int(has[i])} targets", data={"ino": int(i)})


def structure(t: Tables, sb: Superblock, hwm: dict[str, int] | None = None,
              only: set[str] | None = None) -> list[Finding]:
    """Run every check; hwm defaults to the superblock's high-water marks."""
    hwm = hwm or {n: int(sb.hwm[n]) for n in TABLE_NAMES}
    view = View(t, sb, hwm)
    findings: list[Finding] = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        findings.extend(fn(view))
    return findings


def check_region(path: str) -> list[Finding]:
    """Open a region read-only (no lock: allowed while mounted) and run every check."""
    from .format import read_superblock
    from .region import Region

    with Region(path, writable=False, lock=False) as region:
        sb, _ = read_superblock(region.buf, region.size)
        t = Tables(region.buf, sb)
        findings = structure(t, sb)
        del t
        return findings
