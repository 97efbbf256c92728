"""Checks of inode fields: kind, mode and flags ("inodes"), sizes against kinds and
blocks ("sizes"), and what a kernel object must be ("kernel-objects")."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format import (
    ATTR_KNOWN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    KIND_DIR,
    KIND_KOBJ,
    KIND_SYMLINK,
    ROOT_INO,
    S_IFMT_OF_KIND,
    max_file_size,
)
from .core import Finding, View, check, per_object


@check("inodes")
def check_inodes(v: View) -> Iterator[Finding]:
    if v.n <= ROOT_INO or not v.live[ROOT_INO]:
        yield Finding("inodes", "error", f"inode {ROOT_INO}", "root inode is missing", code="root", fix="y")
        return
    if v.kind[ROOT_INO] != KIND_DIR:
        yield Finding("inodes", "error", f"inode {ROOT_INO}", "root inode is not a directory", code="root", fix="y")
    if v.orphan[ROOT_INO]:
        yield Finding("inodes", "error", f"inode {ROOT_INO}", "root inode is marked orphan (mount would free it)",
                      data={"ino": [ROOT_INO]}, code="root-orphan", fix="p")
    ino = v.inodes
    live = np.flatnonzero(v.live)
    kinds = v.kind[live]
    bad_kind = live[kinds > KIND_KOBJ]
    yield from per_object("inodes", "bad-kind", "y", "inode", bad_kind,
                     lambda i: f"inode {i} has unknown kind {int(v.kind[i])}", key="ino")
    ok = live[kinds <= KIND_KOBJ]
    fmt = np.array([S_IFMT_OF_KIND.get(k, 0) for k in range(KIND_KOBJ + 1)], np.uint32)
    wrong_mode = ok[(ino["mode"][ok] & 0o170000) != fmt[v.kind[ok]]]
    yield from per_object("inodes", "bad-mode", "y", "inode", wrong_mode,
                     lambda i: f"inode {i} mode {int(ino['mode'][i]):o} does not match its kind", key="ino")
    bad_flags = live[(v.flags[live] & np.uint16(0xFFFF & ~FLAGS_KNOWN)) != 0]
    yield from per_object("inodes", "bad-flags", "p", "inode", bad_flags,
                     lambda i: f"inode {i} has unknown flags 0x{int(v.flags[i]):x}", key="ino")
    bad_attr = live[(ino["attr"][live] & np.uint8(0xFF & ~ATTR_KNOWN)) != 0]
    yield from per_object("inodes", "bad-attr", "p", "inode", bad_attr,
                     lambda i: f"inode {i} has unknown chattr flags 0x{int(ino['attr'][i]):x}", key="ino")


@check("sizes")
def check_sizes(v: View) -> Iterator[Finding]:
    """Size consistent with kind; no blocks past what the size needs unless truncating."""
    size = v.inodes["size"]
    sizeless = v.live & (v.kind <= KIND_KOBJ) & ~v.has_data & (v.kind != KIND_SYMLINK)
    bad = np.flatnonzero(sizeless & (size != 0))
    yield from per_object("sizes", "size-nonzero", "p", "inode", bad,
                     lambda i: f"inode {i} ({int(v.kind[i])}) has size {int(size[i])}, expected 0", key="ino")
    bs = v.sb.geometry.block_size
    limit = max_file_size(bs)
    yield from per_object("sizes", "size-too-big", "y", "inode",
                     np.flatnonzero(v.has_data & (size > np.uint64(limit))),
                     lambda i: f"inode {i} has size {int(size[i])}, past the largest file size {limit}", key="ino")
    ok = v.e_blk
    owner, end = v.e_owner[ok], (v.e_fb + v.e_count)[ok]
    last = np.zeros(v.n, np.int64)
    np.maximum.at(last, owner, end)
    need = size // np.uint64(bs) + (size % np.uint64(bs) != 0)
    past = v.has_data & (last.astype(np.uint64) > need)
    truncating = (v.flags & FLAG_TRUNCATING) != 0
    yield from per_object("sizes", "past-eof", "p", "inode", np.flatnonzero(past & ~truncating),
                     lambda i: f"inode {i} has blocks past its size {int(size[i])}", key="ino")
    yield from per_object("sizes", "truncating", "p", "inode", np.flatnonzero(v.live & truncating & ~v.orphan),
                     lambda i: f"inode {i}: an interrupted truncate left blocks to free", severity="warning",
                     key="ino")


@check("kernel-objects")
def check_kernel_objects(v: View) -> Iterator[Finding]:
    """Kernel objects: pinned, a known lifecycle state, a type tag, one contiguous run
    that holds the payload, and named only in the root-owned 0700 /.kernel directory."""
    ko = np.flatnonzero(v.live & (v.kind == KIND_KOBJ) & ~v.orphan)  # a removed one is unpinned
    ino = v.inodes
    bad = ko[((v.flags[ko] & FLAG_PINNED) == 0) | (ino["ktype"][ko] == 0) | (ino["kstate"][ko] > 5)
             | (ino["uid"][ko] != 0)]
    yield from per_object("kernel-objects", "kobj-fields", None, "inode", bad,
                     lambda i: f"kernel object {i} is not pinned, has no type tag, an unknown state "
                               "or an owner other than root", key="ino")
    ok = v.e_blk
    runs = np.bincount(v.e_owner[ok], minlength=v.n)
    blocks = np.bincount(v.e_owner[ok], weights=v.e_count[ok], minlength=v.n).astype(np.int64)
    bs = v.sb.geometry.block_size
    short = ko[(runs[ko] != 1) | (blocks[ko] * bs < ino["size"][ko].astype(np.int64))]
    yield from per_object("kernel-objects", "kobj-contiguity", None, "inode", short,
                     lambda i: f"kernel object {i} is not one contiguous run holding its payload", key="ino")
    named = v.d_linked & (v.kind[np.where(v.d_linked, v.d_ino, 0)] == KIND_KOBJ)
    parents = v.d_parent[named]
    wrong_home = v.d_ino[named][(v.flags[parents] & FLAG_PINNED) == 0]
    yield from per_object("kernel-objects", "kobj-namespace", None, "inode", np.unique(wrong_home),
                     lambda i: f"kernel object {i} is named outside /.kernel", key="ino")
    spaces = np.flatnonzero(v.is_dir & ((v.flags & FLAG_PINNED) != 0))
    loose = spaces[(ino["uid"][spaces] != 0) | ((ino["mode"][spaces] & 0o7777) != 0o700)]
    yield from per_object("kernel-objects", "kobj-namespace", None, "inode", loose,
                     lambda i: f"the kernel namespace {i} is not root's with mode 0700", key="ino")
