"""What every check shares: `Finding`, the `View` of the tables the checks read, the
registry of named table checks (and their order), and running them (`structure`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..format import (
    EXTENT_PACKED,
    FLAG_ORPHAN,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
    PACK_CHUNKS,
    SMALL_CHUNKS,
    TABLE_NAMES,
    Superblock,
    Tables,
    max_file_blocks,
)

LIMIT = 20  # findings of one kind listed one by one; the rest are summarised
COOKIE_END = np.uint64(1 << 63)  # readdir cookies are offsets (off_t): below 2^63
XATTR_NAMESPACES = (b"user", b"trusted", b"security")  # what the engine serves (engine._check_xattr_ns)
XATTR_SYSTEM_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")  # acl.NAMES


@dataclass
class Finding:
    check: str
    severity: str  # "error" or "warning"
    obj: str  # what it is about, e.g. "inode 12"
    message: str
    repaired: bool = False
    data: dict = field(default_factory=dict)
    code: str = ""  # what exactly is wrong; selects the repair
    fix: str | None = None  # "p" (safe), "y" (may lose data) or None (no repair)

    def as_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "object": self.obj,
                "message": self.message, "repaired": self.repaired, "code": self.code,
                "fix": self.fix}

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.check, self.code, self.obj)


@dataclass
class View:
    """What the checks look at: the used prefix of each table and derived arrays."""

    t: Tables
    sb: Superblock
    hwm: dict[str, int]

    def __post_init__(self) -> None:
        t, g = self.t, self.sb.geometry
        self.inodes = t.inodes[: self.hwm["inode"]]
        self.extents = t.extents[: self.hwm["extent"]]
        self.dirents = t.dirents[: self.hwm["dirent"]]
        self.blobs = t.blobs[: self.hwm["blob"]]
        self.n = len(self.inodes)
        self.kind = self.inodes["kind"]
        self.live = self.kind != 0
        self.live[0] = False
        self.flags = self.inodes["flags"]
        self.orphan = self.live & ((self.flags & FLAG_ORPHAN) != 0)
        self.is_dir = self.live & (self.kind == KIND_DIR)
        self.has_data = self.live & ((self.kind == KIND_REG) | (self.kind == KIND_KOBJ))
        # Extents in use, and which of them are sound (the rest are findings).
        self.ext_used = _used(self.extents["owner"])
        e = self.extents
        self.e_owner = e["owner"][self.ext_used].astype(np.int64)
        self.e_start = e["start_block"][self.ext_used].astype(np.int64)
        self.e_count = e["count"][self.ext_used].astype(np.int64)
        self.e_fb = e["file_block"][self.ext_used].astype(np.int64)
        own_ok = self.idx_ok(self.e_owner)
        flags = e["flags"][self.ext_used].astype(np.int64)
        self.e_packed = (flags & EXTENT_PACKED) != 0
        self.e_chunk0 = flags >> 16
        # A packed extent is `count` chunks of one (shared) block; its block span is 1.
        span = np.where(self.e_packed, 1, self.e_count)
        packed_ok = ((self.e_fb == 0) & (self.e_count <= SMALL_CHUNKS)
                     & (self.e_chunk0 + self.e_count <= PACK_CHUNKS) & ((flags & 0xFFFE) == 0))
        # Bounds are compared without adding to the (u64, maybe huge) fields, so a
        # block number near 2^63 cannot wrap around and pass.
        self.e_ok = (own_ok & self.has_data[np.where(own_ok, self.e_owner, 0)] & (self.e_count > 0)
                     & (self.e_start >= g.data_start_block) & (self.e_start <= g.block_count - span)
                     & (self.e_fb >= 0) & (self.e_fb <= max_file_blocks(g.block_size) - span)
                     & (~self.e_packed | packed_ok))
        self.e_ok &= ~self.e_packed | (self.kind[np.where(own_ok, self.e_owner, 0)] == KIND_REG)
        self.e_blk = self.e_ok & ~self.e_packed  # extents that own whole blocks
        self.packs = t.packs[: self.hwm["pack"]]
        self.pack_used = _used(self.packs["block"])
        # Directory entries in use; "linked" ones join a live directory to a live inode.
        self.dir_used = _used(self.dirents["parent"])
        d = self.dirents
        self.d_parent = d["parent"][self.dir_used].astype(np.int64)
        self.d_ino = d["ino"][self.dir_used].astype(np.int64)
        pl, il = self.idx_ok(self.d_parent), self.idx_ok(self.d_ino)
        self.d_linked = pl & il
        self.d_linked[pl] &= self.is_dir[self.d_parent[pl]]
        self.d_linked[il] &= self.live[self.d_ino[il]]
        self.blob_used = _used(self.blobs["owner"])

    def idx_ok(self, inos: np.ndarray) -> np.ndarray:
        return (inos > 0) & (inos < self.n)

    def is_live(self, inos: np.ndarray) -> np.ndarray:
        inos = np.asarray(inos, dtype=np.int64)
        ok = self.idx_ok(inos)
        out = np.zeros(len(inos), bool)
        out[ok] = self.live[inos[ok]]
        return out

    def names_per_inode(self) -> np.ndarray:
        return np.bincount(self.d_ino[self.d_linked], minlength=self.n)


def _used(keys: np.ndarray) -> np.ndarray:
    used = np.flatnonzero(keys != 0)
    return used[used > 0]


# The field whose 0 marks a free record, per table (FORMAT.md).
KEY_FIELD = {"inode": "kind", "extent": "owner", "dirent": "parent", "blob": "owner", "pack": "block"}


def table_arrays(v: View) -> dict[str, np.ndarray]:
    return {"inode": v.inodes, "extent": v.extents, "dirent": v.dirents, "blob": v.blobs, "pack": v.packs}


# The table checks in the order they run, and so the order fsck reports them in. Written
# here once: the modules that define them register in whatever order they are imported.
TABLE_CHECKS = ["checksums", "inodes", "sizes", "extents", "extent-overlap", "bitmap", "badblocks",
                "dirents", "names", "links", "tree", "orphans", "packs", "blobs", "kernel-objects",
                "symlinks"]
CHECKS: list[tuple[str, Callable[[View], Iterator[Finding]]]] = []
CHECK_NAMES = ["superblock", "layout", "backup-superblock", "journal", *TABLE_CHECKS]  # region-level, then tables


def check(name: str):
    def register(fn: Callable[[View], Iterator[Finding]]):
        CHECKS.append((name, fn))
        CHECKS.sort(key=lambda c: TABLE_CHECKS.index(c[0]))  # (a check not in TABLE_CHECKS fails here)
        return fn
    return register


def first_few(idx, limit: int = LIMIT) -> list[int]:
    return np.asarray(idx)[:limit].tolist()


def per_object(check_name: str, code: str, fix: str | None, what: str, idx: np.ndarray, message,
          severity: str = "error", key: str = "index") -> Iterator[Finding]:
    """One finding per object for the first LIMIT, then one summary carrying the rest."""
    idx = np.asarray(idx)
    for i in first_few(idx):
        yield Finding(check_name, severity, f"{what} {i}", message(i), data={key: [int(i)]}, code=code, fix=fix)
    if len(idx) > LIMIT:
        rest = idx[LIMIT:]
        yield Finding(check_name, severity, f"{what} {int(rest[0])}",
                      f"{len(rest)} more {what}(s) with the same problem ({code})",
                      data={key: rest.tolist()}, code=code, fix=fix)


def run_check(name: str, v: View) -> list[Finding]:
    return [f for n, fn in CHECKS if n == name for f in fn(v)]


def structure(t: Tables, sb: Superblock, hwm: dict[str, int] | None = None,
              only: set[str] | None = None, on_check: Callable[[str], None] | None = None) -> list[Finding]:
    """Run the table checks; hwm defaults to the superblock's high-water marks."""
    hwm = hwm or {n: int(sb.hwm[n]) for n in TABLE_NAMES}
    view = View(t, sb, hwm)
    findings: list[Finding] = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        findings.extend(fn(view))
        if on_check:
            on_check(name)
    return findings
