"""Checks of xattr and symlink-target records: owners, value chains, xattr names, and
one target of the right length per symlink."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import (
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    KIND_SYMLINK,
    NAME_MAX,
    SYMLINK_MAX,
)
from .core import XATTR_NAMESPACES, XATTR_SYSTEM_NAMES, Finding, View, check, per_object


def blob_chains(v: View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walk every head's continuation chain at once.

    Returns (heads, ok mask over heads, visited mask over blob slots).
    """
    b = v.blobs
    nb = len(b)
    used = v.blob_used
    owner = b["owner"][used].astype(np.int64)
    kind = b["kind"][used]
    heads = used[(kind != BLOB_CONT) & v.is_live(owner) & np.isin(kind, (BLOB_XATTR, BLOB_SYMLINK))]
    nlen = b["name_len"][heads].astype(np.int64)
    vlen = b["value_len"][heads].astype(np.int64)
    ok = (nlen <= NAME_MAX) & (vlen <= (1 << 17))
    have = np.minimum(vlen, np.maximum(BLOB_DATA - nlen, 0))
    visited = np.zeros(nb, bool)
    cur = b["next"][heads].astype(np.int64)
    active = np.arange(len(heads))
    for _ in range(300):
        sel = cur[active] != 0
        active = active[sel]
        if not len(active):
            break
        c = cur[active]
        inside = (c > 0) & (c < nb)
        ok[active[~inside]] = False
        active, c = active[inside], c[inside]
        good = (b["kind"][c] == BLOB_CONT) & (b["owner"][c].astype(np.int64) == b["owner"][heads[active]]) \
            & ~visited[c]
        ok[active[~good]] = False
        active, c = active[good], c[good]
        visited[c] = True
        have[active] += b["value_len"][c].astype(np.int64)
        cur[active] = b["next"][c].astype(np.int64)
    else:
        ok[active] = False
    ok &= have == vlen
    return heads, ok, visited


@check("blobs")
def check_blobs(v: View) -> Iterator[Finding]:
    """xattr and symlink records: live owner, sound chains, no stray continuations."""
    b = v.blobs
    used = v.blob_used
    owner = b["owner"][used].astype(np.int64)
    kind = b["kind"][used]
    dead = ~v.is_live(owner)
    bad = ~np.isin(kind, (BLOB_XATTR, BLOB_SYMLINK, BLOB_CONT)) & ~dead
    cont = kind == BLOB_CONT
    bad |= cont & (b["value_len"][used] > BLOB_DATA) & ~dead
    def dead_msg(i: int) -> str:
        what = ""
        if int(b["kind"][i]) == BLOB_XATTR:
            nl = min(int(b["name_len"][i]), NAME_MAX)
            what = f" (xattr {bytes(b['data'][i].tobytes()[:nl])!r}: the file it belonged to cannot be told)"
        return f"xattr/symlink record {i} belongs to a missing inode {int(b['owner'][i])}{what}"

    yield from per_object("blobs", "bad-blob", "p", "blob", used[dead], dead_msg)
    yield from per_object("blobs", "bad-blob", "y", "blob", used[bad],
                     lambda i: f"xattr/symlink record {i} is malformed")
    heads, ok, visited = blob_chains(v)
    yield from per_object("blobs", "bad-chain", "y", "blob", heads[~ok],
                     lambda i: f"xattr/symlink record {i} has a broken value chain")
    stray = used[cont & ~dead & ~bad & ~visited[used]]
    yield from per_object("blobs", "stray-cont", "p", "blob", stray,
                     lambda i: f"continuation record {i} is not part of any value")
    yield from _xattr_names(v, heads[ok & (b["kind"][heads] == BLOB_XATTR)])


def _xattr_names(v: View, xh: np.ndarray) -> Iterator[Finding]:
    """xattr names (of the heads xh): a namespace the filesystem serves (user., trusted.,
    security., the two system.posix_acl_* names) and something after it, no NUL, and one
    of each name per file (else one hides another)."""
    b = v.blobs
    if not len(xh):
        return
    raw = b["data"][xh].view(np.uint8).reshape(len(xh), BLOB_DATA)
    nl = b["name_len"][xh].astype(np.int64)
    longest = int(min(nl.max(), NAME_MAX))
    cols = np.arange(longest)
    inside = cols[None, :] < nl[:, None]
    valid = (nl >= 1) & (nl <= NAME_MAX) & ~((raw[:, :longest] == 0) & inside).any(axis=1)
    ns_ok = np.zeros(len(xh), bool)
    for ns in XATTR_NAMESPACES:
        pre = np.frombuffer(ns + b".", np.uint8)
        ns_ok |= (raw[:, :len(pre)] == pre).all(axis=1) & (nl > len(pre))
    for full in XATTR_SYSTEM_NAMES:  # system.*: only the two POSIX ACLs
        whole = np.frombuffer(full, np.uint8)
        ns_ok |= (nl == len(whole)) & (raw[:, :len(whole)] == whole).all(axis=1)
    badname = xh[~(valid & ns_ok)]
    yield from per_object("blobs", "bad-xattr-name", "y", "blob", badname,
                     lambda i: f"xattr record {i} has a name that is no xattr name "
                               f"({bytes(b['data'][i].tobytes()[:min(int(b['name_len'][i]), NAME_MAX)])!r})")
    keep = valid & ns_ok
    yield from _dup_xattrs(v, xh[keep], raw[keep, :longest], inside[keep])


def _dup_xattrs(v: View, good: np.ndarray, raw: np.ndarray, inside: np.ndarray) -> Iterator[Finding]:
    """Two xattrs of one name on one file (good: heads with valid names; raw, inside: their
    name bytes and which of them lie inside the name)."""
    b = v.blobs
    if len(good) < 2:
        return
    longest = raw.shape[1]
    width = -(-longest // 8) * 8
    masked = np.zeros((len(good), width), np.uint8)
    masked[:, :longest] = np.where(inside, raw, 0)
    words = masked.view("<u8")
    mult = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (words * mult).sum(axis=1, dtype=np.uint64)
    owner = b["owner"][good].astype(np.int64)
    order = np.lexsort((good, h, owner))
    same = (owner[order][1:] == owner[order][:-1]) & (h[order][1:] == h[order][:-1])
    dups = [int(good[order][k + 1]) for k in np.flatnonzero(same).tolist()
            if bytes(masked[order][k]) == bytes(masked[order][k + 1])]
    yield from per_object("blobs", "dup-xattr", "y", "blob", np.array(dups, np.int64),
                     lambda i: f"xattr record {i} repeats a name its file already has")


@check("symlinks")
def check_symlinks(v: View) -> Iterator[Finding]:
    """A symlink has exactly one target, 1..4095 bytes, and its size is that length."""
    b = v.blobs
    used = v.blob_used
    heads = used[(b["kind"][used] == BLOB_SYMLINK) & v.is_live(b["owner"][used].astype(np.int64))]
    owner = b["owner"][heads].astype(np.int64)
    not_link = v.kind[owner] != KIND_SYMLINK
    yield from per_object("symlinks", "stray-target", "y", "blob", heads[not_link],
                     lambda i: f"symlink target record {i} belongs to inode {int(b['owner'][i])}, not a symlink")
    heads, owner = heads[~not_link], owner[~not_link]
    order = np.lexsort((heads, owner))
    heads, owner = heads[order], owner[order]
    first = np.concatenate(([True], owner[1:] != owner[:-1])) if len(owner) else np.zeros(0, bool)
    yield from per_object("symlinks", "extra-target", "y", "blob", heads[~first],
                     lambda i: f"symlink {int(b['owner'][i])} has more than one target (record {i})")
    has = np.zeros(v.n, bool)
    has[owner] = True
    links = v.live & (v.kind == KIND_SYMLINK)
    yield from per_object("symlinks", "no-target", "y", "inode", np.flatnonzero(links & ~has),
                     lambda i: f"symlink {i} has no target", key="ino")
    target_len = np.zeros(v.n, np.int64)
    target_len[owner[first]] = b["value_len"][heads[first]].astype(np.int64)
    bad_len = links & has & ((target_len == 0) | (target_len > SYMLINK_MAX))
    yield from per_object("symlinks", "bad-target", "y", "inode", np.flatnonzero(bad_len),
                     lambda i: f"symlink {i} has a target of {int(target_len[i])} bytes", key="ino")
    size = v.inodes["size"].astype(np.int64)
    wrong = np.flatnonzero(links & has & ~bad_len & (size != target_len))
    yield from per_object("symlinks", "symlink-size", "p", "inode", wrong,
                     lambda i: f"symlink {i} has size {int(size[i])} but its target is {int(target_len[i])} bytes",
                     key="ino")
