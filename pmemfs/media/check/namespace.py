"""Checks of the namespace: directory entries, names, link counts, the tree (reachable,
one name per directory, '..') and orphans."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import NAME_MAX, ROOT_INO
from .core import COOKIE_END, Finding, View, check, per_object


@check("dirents")
def check_dirents(v: View) -> Iterator[Finding]:
    """Entries join a live directory to a live inode, with the right kind and a sane cookie."""
    d = v.dirents
    yield from per_object("dirents", "bad-dirent", "p", "dirent", v.dir_used[~v.d_linked],
                     lambda i: f"directory entry {i} ({_name(v, i)!r}) is in a missing directory "
                               "or names a missing inode")
    used, parent, ino = v.dir_used[v.d_linked], v.d_parent[v.d_linked], v.d_ino[v.d_linked]
    wrong_kind = used[d["kind"][used] != v.kind[ino]]
    yield from per_object("dirents", "dirent-kind", "p", "dirent", wrong_kind,
                     lambda i: f"directory entry {i} ({_name(v, i)!r}) records the wrong file kind")
    cookie = d["cookie"][used].astype(np.uint64)
    bad = (cookie < 3) | (cookie >= v.inodes["next_cookie"][parent]) | (cookie >= COOKIE_END)
    order = np.lexsort((used, cookie, parent))
    dup = np.zeros(len(used), bool)
    if len(used) > 1:
        same = (parent[order][1:] == parent[order][:-1]) & (cookie[order][1:] == cookie[order][:-1])
        dup[order[1:][same]] = True
    yield from per_object("dirents", "cookie", "p", "dirent", used[bad | dup],
                     lambda i: f"directory entry {i} has a readdir cookie that is reused or from the future")
    past = np.flatnonzero(v.is_dir & (v.inodes["next_cookie"] >= COOKIE_END))
    yield from per_object("dirents", "next-cookie", "p", "inode", past,
                     lambda i: f"directory inode {i} would hand out readdir cookies past 2^63 "
                               "(readdir offsets are off_t)")


def _name(v: View, i: int) -> bytes:
    return bytes(v.dirents["name"][i])[:NAME_MAX]


def name_problems(v: View, used: np.ndarray) -> np.ndarray:
    """Mask over `used` dirents whose name is invalid."""
    d = v.dirents
    nlen = d["name_len"][used].astype(np.int64)
    raw = d["name"][used].view(np.uint8).reshape(len(used), 256)
    bad = (nlen == 0) | (nlen > NAME_MAX)
    # No NUL inside the name and only NULs after it: exactly name_len non-zero bytes.
    bad |= np.count_nonzero(raw, axis=1) != nlen
    longest = min(int(nlen.max()), 256) if len(nlen) else 0
    bad |= (raw[:, :longest] == ord("/")).any(axis=1)
    dot = raw[:, 0] == ord(".")
    bad |= dot & (nlen == 1)
    bad |= dot & (raw[:, 1] == ord(".")) & (nlen == 2)
    return bad


def name_hash(v: View, used: np.ndarray) -> np.ndarray:
    words = v.dirents["name"][used].view("<u8").reshape(len(used), 32)
    mult = (np.arange(32, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (words * mult).sum(axis=1, dtype=np.uint64)
        return h ^ (h >> np.uint64(29))


@check("names")
def check_names(v: View) -> Iterator[Finding]:
    """Names are 1..255 bytes without '/' or NUL, not '.' or '..', unique in their directory."""
    used = v.dir_used
    bad = name_problems(v, used)
    yield from per_object("names", "bad-name", "y", "dirent", used[bad],
                     lambda i: f"directory entry {i} has an invalid name {_name(v, i)!r}")
    ok = v.d_linked & ~bad
    used, parent = used[ok], v.d_parent[ok]
    if len(used) < 2:
        return
    h = name_hash(v, used)
    order = np.lexsort((used, h, parent))
    su, sp, sh = used[order], parent[order], h[order]
    cand = np.flatnonzero((sp[1:] == sp[:-1]) & (sh[1:] == sh[:-1])) + 1
    names = v.dirents["name"]
    dups = [int(su[k]) for k in cand.tolist() if names[su[k]] == names[su[k - 1]]]
    yield from per_object("names", "dup-name", "y", "dirent", np.array(dups, np.int64),
                     lambda i: f"name {_name(v, i)!r} appears twice in directory {int(v.dirents['parent'][i])}")


def expected_nlink(v: View) -> np.ndarray:
    names = v.names_per_inode()
    parent, ino = v.d_parent[v.d_linked], v.d_ino[v.d_linked]
    subdirs = np.bincount(parent[v.is_dir[ino]], minlength=v.n)
    expect = np.where(v.is_dir, 2 + subdirs, names)
    return np.where(v.orphan & (names == 0), 0, expect)


@check("links")
def check_links(v: View) -> Iterator[Finding]:
    """Link count == names (directories: 2 + subdirectories); orphans have no names."""
    names = v.names_per_inode()
    named_orphan = np.flatnonzero(v.orphan & (names > 0))
    yield from per_object("links", "named-orphan", "p", "inode", named_orphan,
                     lambda i: f"inode {i} is marked orphan but still has a name", key="ino")
    expect = expected_nlink(v)
    wrong = np.flatnonzero(v.live & (v.inodes["nlink"].astype(np.int64) != expect))
    yield from per_object("links", "nlink", "p", "inode", wrong,
                     lambda i: f"inode {i} has link count {int(v.inodes['nlink'][i])}, expected {int(expect[i])}",
                     key="ino")


def dir_name_parent(v: View) -> np.ndarray:
    """For each directory, the parent of one of its names (-1: none); the '..' one wins."""
    up = np.full(v.n, -1, np.int64)
    parent, ino = v.d_parent[v.d_linked], v.d_ino[v.d_linked]
    sel = v.is_dir[ino]
    parent, ino = parent[sel], ino[sel]
    up[ino] = parent
    match = v.inodes["parent"][ino].astype(np.int64) == parent
    up[ino[match]] = parent[match]
    return up


def reachability(v: View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reached, name_parent, cyclic) over inodes: pointer jumping, O(n log depth)."""
    up0 = dir_name_parent(v)
    up = np.where(up0 < 0, 0, up0)
    up[0] = 0
    if v.n > ROOT_INO:
        up[ROOT_INO] = ROOT_INO
    steps = max(1, int(np.ceil(np.log2(max(v.n, 2)))) + 1)
    for _ in range(steps):
        nxt = up[up]
        if np.array_equal(nxt, up):
            break
        up = nxt
    reached_dir = v.is_dir & (up == ROOT_INO)
    reached = reached_dir.copy()
    parent, ino = v.d_parent[v.d_linked], v.d_ino[v.d_linked]
    files = ~v.is_dir[ino] & reached_dir[parent]
    reached[ino[files]] = True
    cyclic = v.is_dir & ~reached_dir & (up != 0)
    if v.n > ROOT_INO:
        reached[ROOT_INO] = v.live[ROOT_INO]
    return reached, up0, cyclic


@check("tree")
def check_tree(v: View) -> Iterator[Finding]:
    """Every inode reachable from the root; directories exactly once, with the right '..'."""
    if v.n <= ROOT_INO or not v.is_dir[ROOT_INO]:
        return
    names = v.names_per_inode()
    yield from per_object("tree", "dir-names", "y", "inode", np.flatnonzero(v.is_dir & (names > 1)),
                     lambda i: f"directory {i} has {int(names[i])} names", key="ino")
    if names[ROOT_INO]:
        yield Finding("tree", "error", f"inode {ROOT_INO}", "the root directory has a name",
                      data={"ino": [ROOT_INO]}, code="root-named", fix="y")
    if int(v.inodes["parent"][ROOT_INO]) != ROOT_INO:
        yield Finding("tree", "error", f"inode {ROOT_INO}", "the root's '..' is not itself",
                      data={"ino": [ROOT_INO]}, code="dotdot", fix="p")
    reached, up0, cyclic = reachability(v)
    pfield = v.inodes["parent"].astype(np.int64)
    wrong = np.flatnonzero(v.is_dir & (up0 >= 0) & (pfield != up0))
    yield from per_object("tree", "dotdot", "p", "inode", wrong,
                     lambda i: f"directory {i} has '..' {int(pfield[i])} but its entry is in {int(up0[i])}",
                     key="ino")
    unreachable = np.flatnonzero(v.live & ~reached & ~v.orphan)
    yield from per_object("tree", "unreachable", "p", "inode", unreachable,
                     lambda i: f"inode {i} is not reachable from the root"
                               + (" (a directory cycle)" if cyclic[i] else ""), key="ino")


@check("orphans")
def check_orphans(v: View) -> Iterator[Finding]:
    """Orphans (unlinked while open) are freed, as the next mount would."""
    names = v.names_per_inode()
    orphans = v.orphan & (names == 0)
    orphans[: ROOT_INO + 1] = False
    # Freeing a directory that still has entries would strand them: mount must not do it.
    parents = np.zeros(v.n, bool)
    parents[v.d_parent[v.d_linked]] = True
    yield from per_object("orphans", "orphan", "p", "inode", np.flatnonzero(orphans & ~parents),
                     lambda i: f"orphan inode {i} is waiting to be freed", severity="warning", key="ino")
    yield from per_object("orphans", "orphan", "p", "inode", np.flatnonzero(orphans & parents),
                     lambda i: f"orphan directory {i} still has entries", key="ino")
