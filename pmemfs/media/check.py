"""Structural checks of a region, vectorised with numpy.

Each check is a small named function over a `View` that yields `Finding`s; mount runs
the table checks (`structure`) and refuses a region with any error, pmemfs-fsck runs
them to report and repair. Checks read only [0, high-water mark) of each table, so
their cost follows the metadata in use, not the size of the region.

A finding carries a `code` (what is wrong, and which repair applies) and a `fix` tier:
"p" for repairs that are safe to make without asking (pmemfs-fsck -p and -y), "y" for
repairs that may lose or rewrite data (-y only), None when nothing can repair it.
The region-level checks (superblock, layout, backup superblock, journal) are
functions here too; pmemfs/tools/fsck.py runs them before the table checks.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .format import (
    ATTR_KNOWN,
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    EXTENT_PACKED,
    FEATURE_INCOMPAT_KNOWN,
    FEATURE_RO_COMPAT_KNOWN,
    FLAG_ORPHAN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
    KIND_SYMLINK,
    MAGIC,
    NAME_MAX,
    PACK_CHUNKS,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SB_STRUCT,
    SMALL_CHUNKS,
    SUPERBLOCK_DTYPE,
    SYMLINK_MAX,
    TABLE_NAMES,
    VERSION_MAJOR,
    FormatError,
    Superblock,
    Tables,
    crc,
    max_file_blocks,
    max_file_size,
    record_checksums,
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


@functools.lru_cache(maxsize=16)
def crc_bit_columns(length: int) -> np.ndarray:
    """CRC-32 is affine over GF(2): crc(a ^ b) = crc(a) ^ crc(b) ^ crc(0) for messages of one
    length. Column k is what flipping bit k (bit k % 8 of byte k // 8) of a `length`-byte
    message does to its CRC; a damaged record's syndrome is the XOR of the columns of its
    flipped bits, which is what lets fsck restore records (pmemfs/tools/fsck.py)."""
    zero = bytes(length)
    c0 = zlib.crc32(zero)
    out = np.empty(length * 8, np.uint32)
    msg = bytearray(length)
    for k in range(length * 8):
        msg[k // 8] = 1 << (k % 8)
        out[k] = zlib.crc32(msg) ^ c0
        msg[k // 8] = 0
    return out


def crc_of_field(length: int, offset: int, values: np.ndarray, nbits: int = 32) -> np.ndarray:
    """lin(value placed at byte offset): what a field's bits contribute to the CRC of a
    zero message (vectorised over values)."""
    cols = crc_bit_columns(length)[offset * 8: offset * 8 + nbits]
    values = np.asarray(values, np.uint64)
    bits = ((values[:, None] >> np.arange(nbits, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, cols[None, :], np.uint32(0)), axis=1).astype(np.uint32) \
        if len(values) else np.zeros(0, np.uint32)


def damaged_free(name: str, arr: np.ndarray, hwm: int, chunk: int = 1 << 16) -> np.ndarray:
    """Slots below hwm whose key field says "free" but which are not empty.

    pmemfs frees a record by zeroing it (an inode keeps its generation) and sealing it,
    and mkfs leaves unused records all zero, so a free record is all zero but for that
    and a checksum of 0 or of its zeros. Anything else is damage, most likely to the key
    field of a record in use: a file that would silently lose a name, blocks or an xattr."""
    size = arr.dtype.itemsize
    hwm = min(hwm, len(arr))
    words = arr[:hwm].view(np.uint64).reshape(hwm, size // 8)  # every record is 8-byte aligned
    mask = np.full(size // 8, ~np.uint64(0))
    mask[-1] = np.uint64(0xFFFFFFFF)  # the checksum is the last 4 bytes
    if name == "inode":
        mask[2] = np.uint64(0xFFFFFFFF)  # bytes 20..24: the generation a free inode keeps
    key = arr[KEY_FIELD[name]][:hwm]
    empty_crc = np.uint32(zlib.crc32(bytes(size - 4)))
    out = []
    for lo in range(1, hwm, chunk):
        hi = min(hwm, lo + chunk)
        free = key[lo:hi] == 0
        nonempty = free & (words[lo:hi] & mask).any(axis=1)
        ck = arr["checksum"][lo:hi]
        odd = free & ~nonempty & (ck != 0)
        if name == "inode" and odd.any():
            k = np.flatnonzero(odd)
            want = empty_crc ^ crc_of_field(size - 4, 20, arr["generation"][lo:hi][k])
            odd[k] = ck[k] != want
        else:
            odd &= ck != empty_crc
        out.append(np.flatnonzero(nonempty | odd) + lo)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


CHECKS: list[tuple[str, Callable[[View], Iterator[Finding]]]] = []
CHECK_NAMES = ["superblock", "layout", "backup-superblock", "journal"]  # region-level, then tables


def check(name: str):
    def register(fn: Callable[[View], Iterator[Finding]]):
        CHECKS.append((name, fn))
        CHECK_NAMES.append(name)
        return fn
    return register


def _some(idx, limit: int = LIMIT) -> list[int]:
    return np.asarray(idx)[:limit].tolist()


def _many(check_name: str, code: str, fix: str | None, what: str, idx: np.ndarray, message,
          severity: str = "error", key: str = "index") -> Iterator[Finding]:
    """One finding per object for the first LIMIT, then one summary carrying the rest."""
    idx = np.asarray(idx)
    for i in _some(idx):
        yield Finding(check_name, severity, f"{what} {i}", message(i), data={key: [int(i)]}, code=code, fix=fix)
    if len(idx) > LIMIT:
        rest = idx[LIMIT:]
        yield Finding(check_name, severity, f"{what} {int(rest[0])}",
                      f"{len(rest)} more {what}(s) with the same problem ({code})",
                      data={key: rest.tolist()}, code=code, fix=fix)


# ---------------------------------------------------------------- region level
def check_superblock_raw(raw: bytes, region_size: int) -> tuple[Superblock | None, list[Finding]]:
    """Decode one superblock copy: (superblock or None, findings).

    Check "superblock" covers magic, checksum, version and features; "layout" covers
    the geometry: table offsets and sizes inside the region and not overlapping.
    """
    raw = bytes(raw[:SB_STRUCT])
    if len(raw) < SB_STRUCT:
        return None, [Finding("superblock", "error", "superblock", "region is smaller than a superblock",
                              code="sb-bad", fix=None)]
    rec = np.frombuffer(raw, SUPERBLOCK_DTYPE)[0]
    problem = None
    if bytes(rec["magic"]) != MAGIC:
        problem = "bad magic"
    elif crc(raw[:-4]) != int(rec["checksum"]):
        problem = "checksum mismatch"
    elif int(rec["version_major"]) != VERSION_MAJOR:
        problem = f"format version {int(rec['version_major'])} is not supported"
    elif int(rec["feature_incompat"]) & ~FEATURE_INCOMPAT_KNOWN:
        problem = f"unknown incompatible features 0x{int(rec['feature_incompat']) & ~FEATURE_INCOMPAT_KNOWN:x}"
    if problem:
        return None, [Finding("superblock", "error", "superblock", f"superblock: {problem}",
                              code="sb-bad", fix="p")]
    try:
        sb = Superblock.decode(raw, region_size)
    except FormatError as e:
        return None, [Finding("layout", "error", "superblock", str(e), code="sb-bad", fix="p")]
    findings = []
    unknown_ro = sb.feature_ro_compat & ~FEATURE_RO_COMPAT_KNOWN
    if unknown_ro:
        findings.append(Finding("superblock", "warning", "superblock",
                                f"unknown read-only-compatible features 0x{unknown_ro:x}: "
                                "only read-only use is possible", code="sb-ro-compat"))
    return sb, findings


STATIC_SB_FIELDS = [n for n in SUPERBLOCK_DTYPE.names if n not in (
    "state", "mount_generation", "last_mount_ns", "last_umount_ns", "checksum", "reserved",
    "inode_hwm", "extent_hwm", "dirent_hwm", "blob_hwm")]


def compare_backup(primary: bytes, backup: bytes) -> list[str]:
    """Fields that never change after mkfs and differ between the two copies."""
    a = np.frombuffer(primary[:SB_STRUCT], SUPERBLOCK_DTYPE)[0]
    b = np.frombuffer(backup[:SB_STRUCT], SUPERBLOCK_DTYPE)[0]
    return [n for n in STATIC_SB_FIELDS if a[n] != b[n]]


# ---------------------------------------------------------------- table checks
@check("checksums")
def check_checksums(v: View) -> Iterator[Finding]:
    for name, table, used in (("inode", v.inodes, np.flatnonzero(v.live)), ("extent", v.extents, v.ext_used),
                              ("dirent", v.dirents, v.dir_used), ("blob", v.blobs, v.blob_used),
                              ("pack", v.packs, v.pack_used)):
        if not len(used):
            continue
        bad = used[record_checksums(table, used) != table["checksum"][used]]
        for f in _many("checksums", "checksum", "y", f"{name}", bad,
                       lambda i, name=name: f"{name} record {i} checksum mismatch"):
            f.data["table"] = name
            yield f
    for name, table in table_arrays(v).items():
        bad = damaged_free(name, table, len(table))
        for f in _many("checksums", "free-damaged", "y", f"{name}", bad,
                       lambda i, name=name: f"{name} record {i} is marked free but is not empty "
                                            f"(its {KEY_FIELD[name]} field may be damaged)"):
            f.data["table"] = name
            yield f


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
    yield from _many("inodes", "bad-kind", "y", "inode", bad_kind,
                     lambda i: f"inode {i} has unknown kind {int(v.kind[i])}", key="ino")
    ok = live[kinds <= KIND_KOBJ]
    fmt = np.array([S_IFMT_OF_KIND.get(k, 0) for k in range(KIND_KOBJ + 1)], np.uint32)
    wrong_mode = ok[(ino["mode"][ok] & 0o170000) != fmt[v.kind[ok]]]
    yield from _many("inodes", "bad-mode", "y", "inode", wrong_mode,
                     lambda i: f"inode {i} mode {int(ino['mode'][i]):o} does not match its kind", key="ino")
    bad_flags = live[(v.flags[live] & np.uint16(0xFFFF & ~FLAGS_KNOWN)) != 0]
    yield from _many("inodes", "bad-flags", "p", "inode", bad_flags,
                     lambda i: f"inode {i} has unknown flags 0x{int(v.flags[i]):x}", key="ino")
    bad_attr = live[(ino["attr"][live] & np.uint8(0xFF & ~ATTR_KNOWN)) != 0]
    yield from _many("inodes", "bad-attr", "p", "inode", bad_attr,
                     lambda i: f"inode {i} has unknown chattr flags 0x{int(ino['attr'][i]):x}", key="ino")


@check("sizes")
def check_sizes(v: View) -> Iterator[Finding]:
    """Size consistent with kind; no blocks past what the size needs unless truncating."""
    size = v.inodes["size"]
    sizeless = v.live & (v.kind <= KIND_KOBJ) & ~v.has_data & (v.kind != KIND_SYMLINK)
    bad = np.flatnonzero(sizeless & (size != 0))
    yield from _many("sizes", "size-nonzero", "p", "inode", bad,
                     lambda i: f"inode {i} ({int(v.kind[i])}) has size {int(size[i])}, expected 0", key="ino")
    bs = v.sb.geometry.block_size
    limit = max_file_size(bs)
    yield from _many("sizes", "size-too-big", "y", "inode",
                     np.flatnonzero(v.has_data & (size > np.uint64(limit))),
                     lambda i: f"inode {i} has size {int(size[i])}, past the largest file size {limit}", key="ino")
    ok = v.e_blk
    owner, end = v.e_owner[ok], (v.e_fb + v.e_count)[ok]
    last = np.zeros(v.n, np.int64)
    np.maximum.at(last, owner, end)
    need = size // np.uint64(bs) + (size % np.uint64(bs) != 0)
    past = v.has_data & (last.astype(np.uint64) > need)
    truncating = (v.flags & FLAG_TRUNCATING) != 0
    yield from _many("sizes", "past-eof", "p", "inode", np.flatnonzero(past & ~truncating),
                     lambda i: f"inode {i} has blocks past its size {int(size[i])}", key="ino")
    yield from _many("sizes", "truncating", "p", "inode", np.flatnonzero(v.live & truncating & ~v.orphan),
                     lambda i: f"inode {i}: an interrupted truncate left blocks to free", severity="warning",
                     key="ino")


@check("extents")
def check_extents(v: View) -> Iterator[Finding]:
    bad = ~v.e_ok
    dangling = bad & ~v.is_live(v.e_owner)
    yield from _many("extents", "bad-extent", "p", "extent", v.ext_used[dangling],
                     lambda i: f"extent {i} belongs to inode {int(v.extents['owner'][i])}, which does not exist")
    yield from _many("extents", "bad-extent", "y", "extent", v.ext_used[bad & ~dangling],
                     lambda i: f"extent {i} has a bad owner kind, length or place"
                               f" (file block {int(v.extents['file_block'][i])}, "
                               f"{int(v.extents['count'][i])} at region block {int(v.extents['start_block'][i])})")
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    wrong = np.flatnonzero(v.live & (v.inodes["nblocks"].astype(np.int64) != sums))
    yield from _many("extents", "nblocks", "p", "inode", wrong,
                     lambda i: f"inode {i} says it owns {int(v.inodes['nblocks'][i])} blocks "
                               f"but its extents hold {int(sums[i])}", key="ino")
    # A packed file has that one extent and no other.
    packed_owner = np.bincount(v.e_owner[v.e_ok & v.e_packed], minlength=v.n)
    any_owner = np.bincount(v.e_owner[v.e_ok], minlength=v.n)
    mixed = (packed_owner > 0) & (any_owner > 1)
    drop = v.ext_used[v.e_ok & v.e_packed & mixed[np.where(v.e_ok, v.e_owner, 0)]]
    yield from _many("extents", "packed-mixed", "y", "extent", drop,
                     lambda i: f"packed extent {i}: its file has other extents too")
    # A file's extents must not overlap in file offsets.
    used, owner, fb, cnt = v.ext_used[v.e_blk], v.e_owner[v.e_blk], v.e_fb[v.e_blk], v.e_count[v.e_blk]
    order = np.lexsort((fb, owner))
    o, s, c = owner[order], fb[order], cnt[order]
    overl = _overlaps(o, s, s + c)
    yield from _many("extents", "file-overlap", "y", "extent", used[order[overl]],
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
    yield from _many("extent-overlap", "overlap", "y", "extent", used[order[overl]],
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
                      data={"blocks": _some(leaked, 1000)}, code="leaked", fix="p")
    if len(unmarked):
        yield Finding("bitmap", "error", f"block {unmarked[0]}",
                      f"{len(unmarked)} block(s) in use but marked free, first {unmarked[0]}",
                      data={"blocks": _some(unmarked, 1000)}, code="unmarked", fix="p")
    if len(double):
        yield Finding("bitmap", "error", f"block {double[0]}",
                      f"{len(double)} block(s) owned twice, first {double[0]}",
                      data={"blocks": _some(double, 1000)}, code="double", fix="y")


@check("badblocks")
def check_badblocks(v: View) -> Iterator[Finding]:
    """Bad blocks (badmap) are reported and never owned by a file."""
    g = v.sb.geometry
    bad = np.unpackbits(v.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    if not bad.any():
        return
    yield Finding("badblocks", "warning", "badmap", f"{int(bad.sum())} block(s) are marked bad",
                  data={"blocks": _some(np.flatnonzero(bad), 1000)}, code="bad-blocks")
    s, c = v.e_start[v.e_ok], v.e_count[v.e_ok]
    prefix = np.concatenate(([0], np.cumsum(bad)))
    holds = (prefix[s + c] - prefix[s]) > 0
    yield from _many("badblocks", "bad-owned", "y", "extent", v.ext_used[v.e_ok][holds],
                     lambda i: f"extent {i} (inode {int(v.extents['owner'][i])}) holds a bad block")


@check("dirents")
def check_dirents(v: View) -> Iterator[Finding]:
    """Entries join a live directory to a live inode, with the right kind and a sane cookie."""
    d = v.dirents
    yield from _many("dirents", "bad-dirent", "p", "dirent", v.dir_used[~v.d_linked],
                     lambda i: f"directory entry {i} ({_name(v, i)!r}) is in a missing directory "
                               "or names a missing inode")
    used, parent, ino = v.dir_used[v.d_linked], v.d_parent[v.d_linked], v.d_ino[v.d_linked]
    wrong_kind = used[d["kind"][used] != v.kind[ino]]
    yield from _many("dirents", "dirent-kind", "p", "dirent", wrong_kind,
                     lambda i: f"directory entry {i} ({_name(v, i)!r}) records the wrong file kind")
    cookie = d["cookie"][used].astype(np.uint64)
    bad = (cookie < 3) | (cookie >= v.inodes["next_cookie"][parent]) | (cookie >= COOKIE_END)
    order = np.lexsort((used, cookie, parent))
    dup = np.zeros(len(used), bool)
    if len(used) > 1:
        same = (parent[order][1:] == parent[order][:-1]) & (cookie[order][1:] == cookie[order][:-1])
        dup[order[1:][same]] = True
    yield from _many("dirents", "cookie", "p", "dirent", used[bad | dup],
                     lambda i: f"directory entry {i} has a readdir cookie that is reused or from the future")
    past = np.flatnonzero(v.is_dir & (v.inodes["next_cookie"] >= COOKIE_END))
    yield from _many("dirents", "next-cookie", "p", "inode", past,
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
    yield from _many("names", "bad-name", "y", "dirent", used[bad],
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
    yield from _many("names", "dup-name", "y", "dirent", np.array(dups, np.int64),
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
    yield from _many("links", "named-orphan", "p", "inode", named_orphan,
                     lambda i: f"inode {i} is marked orphan but still has a name", key="ino")
    expect = expected_nlink(v)
    wrong = np.flatnonzero(v.live & (v.inodes["nlink"].astype(np.int64) != expect))
    yield from _many("links", "nlink", "p", "inode", wrong,
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
    yield from _many("tree", "dir-names", "y", "inode", np.flatnonzero(v.is_dir & (names > 1)),
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
    yield from _many("tree", "dotdot", "p", "inode", wrong,
                     lambda i: f"directory {i} has '..' {int(pfield[i])} but its entry is in {int(up0[i])}",
                     key="ino")
    unreachable = np.flatnonzero(v.live & ~reached & ~v.orphan)
    yield from _many("tree", "unreachable", "p", "inode", unreachable,
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
    yield from _many("orphans", "orphan", "p", "inode", np.flatnonzero(orphans & ~parents),
                     lambda i: f"orphan inode {i} is waiting to be freed", severity="warning", key="ino")
    yield from _many("orphans", "orphan", "p", "inode", np.flatnonzero(orphans & parents),
                     lambda i: f"orphan directory {i} still has entries", key="ino")


@check("packs")
def check_packs(v: View) -> Iterator[Finding]:
    """Pack blocks: in the data area, listed once, and their chunk bitmaps equal the
    union of the packed extents in them, with no chunk claimed twice."""
    g = v.sb.geometry
    slots = v.pack_used
    block = v.packs["block"][slots].astype(np.int64)
    bad = (block < g.data_start_block) | (block >= g.block_count)
    yield from _many("packs", "pack-place", "y", "pack", slots[bad],
                     lambda i: f"pack record {i} points outside the data area")
    slots, block = slots[~bad], block[~bad]
    order = np.argsort(block, kind="stable")
    dup = slots[order][1:][block[order][1:] == block[order][:-1]]
    yield from _many("packs", "pack-dup", "y", "pack", dup, lambda i: f"pack record {i} repeats a pack block")
    bits = np.unpackbits(v.packs["bitmap"][slots].view(np.uint8).reshape(len(slots), 64), axis=1,
                         bitorder="little").astype(np.int64) if len(slots) else np.zeros((0, PACK_CHUNKS), np.int64)
    # Chunk claims of the packed extents, all at once: row of the pack block * 512 + chunk.
    ok = v.e_ok & v.e_packed
    ext, b, c0, n = v.ext_used[ok], v.e_start[ok], v.e_chunk0[ok], v.e_count[ok]
    srt = np.argsort(block, kind="stable")
    pos = np.searchsorted(block[srt], b)
    found = (pos < len(block)) & (block[srt][np.minimum(pos, max(len(block) - 1, 0))] == b) if len(block) \
        else np.zeros(len(b), bool)
    yield from _many("packs", "packed-nowhere", "y", "extent", ext[~found],
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
    yield from _many("packs", "chunk-twice", "y", "extent", later,
                     lambda i: f"packed extent {i} claims chunks another file has")
    want = claims.reshape(len(slots), PACK_CHUNKS) if len(slots) else np.zeros((0, PACK_CHUNKS), np.int64)
    wrong = slots[((want > 0) != (bits > 0)).any(axis=1) | (v.packs["used"][slots] != bits.sum(axis=1))
                  | (bits.sum(axis=1) == 0)] if len(slots) else slots
    yield from _many("packs", "pack-bitmap", "p", "pack", wrong,
                     lambda i: f"pack record {i}: chunk bitmap or count does not match its files")


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

    yield from _many("blobs", "bad-blob", "p", "blob", used[dead], dead_msg)
    yield from _many("blobs", "bad-blob", "y", "blob", used[bad],
                     lambda i: f"xattr/symlink record {i} is malformed")
    heads, ok, visited = blob_chains(v)
    yield from _many("blobs", "bad-chain", "y", "blob", heads[~ok],
                     lambda i: f"xattr/symlink record {i} has a broken value chain")
    stray = used[cont & ~dead & ~bad & ~visited[used]]
    yield from _many("blobs", "stray-cont", "p", "blob", stray,
                     lambda i: f"continuation record {i} is not part of any value")
    # xattr names: a namespace the filesystem serves (user., trusted., security., the two
    # system.posix_acl_* names) and
    # something after it, no NUL, and one of each name per file (else one hides another).
    xh = heads[ok & (b["kind"][heads] == BLOB_XATTR)]
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
    yield from _many("blobs", "bad-xattr-name", "y", "blob", badname,
                     lambda i: f"xattr record {i} has a name that is no xattr name "
                               f"({bytes(b['data'][i].tobytes()[:min(int(b['name_len'][i]), NAME_MAX)])!r})")
    keep = valid & ns_ok
    good = xh[keep]
    if len(good) < 2:
        return
    width = -(-longest // 8) * 8
    masked = np.zeros((len(good), width), np.uint8)
    masked[:, :longest] = np.where(inside[keep], raw[keep, :longest], 0)
    words = masked.view("<u8")
    mult = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (words * mult).sum(axis=1, dtype=np.uint64)
    owner = b["owner"][good].astype(np.int64)
    order = np.lexsort((good, h, owner))
    same = (owner[order][1:] == owner[order][:-1]) & (h[order][1:] == h[order][:-1])
    dups = [int(good[order][k + 1]) for k in np.flatnonzero(same).tolist()
            if bytes(masked[order][k]) == bytes(masked[order][k + 1])]
    yield from _many("blobs", "dup-xattr", "y", "blob", np.array(dups, np.int64),
                     lambda i: f"xattr record {i} repeats a name its file already has")


@check("kernel-objects")
def check_kernel_objects(v: View) -> Iterator[Finding]:
    """Kernel objects: pinned, a known lifecycle state, a type tag, one contiguous run
    that holds the payload, and named only in the root-owned 0700 /.kernel directory."""
    ko = np.flatnonzero(v.live & (v.kind == KIND_KOBJ) & ~v.orphan)  # a removed one is unpinned
    ino = v.inodes
    bad = ko[((v.flags[ko] & FLAG_PINNED) == 0) | (ino["ktype"][ko] == 0) | (ino["kstate"][ko] > 5)
             | (ino["uid"][ko] != 0)]
    yield from _many("kernel-objects", "kobj-fields", None, "inode", bad,
                     lambda i: f"kernel object {i} is not pinned, has no type tag, an unknown state "
                               "or an owner other than root", key="ino")
    ok = v.e_blk
    runs = np.bincount(v.e_owner[ok], minlength=v.n)
    blocks = np.bincount(v.e_owner[ok], weights=v.e_count[ok], minlength=v.n).astype(np.int64)
    bs = v.sb.geometry.block_size
    short = ko[(runs[ko] != 1) | (blocks[ko] * bs < ino["size"][ko].astype(np.int64))]
    yield from _many("kernel-objects", "kobj-contiguity", None, "inode", short,
                     lambda i: f"kernel object {i} is not one contiguous run holding its payload", key="ino")
    named = v.d_linked & (v.kind[np.where(v.d_linked, v.d_ino, 0)] == KIND_KOBJ)
    parents = v.d_parent[named]
    wrong_home = v.d_ino[named][(v.flags[parents] & FLAG_PINNED) == 0]
    yield from _many("kernel-objects", "kobj-namespace", None, "inode", np.unique(wrong_home),
                     lambda i: f"kernel object {i} is named outside /.kernel", key="ino")
    spaces = np.flatnonzero(v.is_dir & ((v.flags & FLAG_PINNED) != 0))
    loose = spaces[(ino["uid"][spaces] != 0) | ((ino["mode"][spaces] & 0o7777) != 0o700)]
    yield from _many("kernel-objects", "kobj-namespace", None, "inode", loose,
                     lambda i: f"the kernel namespace {i} is not root's with mode 0700", key="ino")


@check("symlinks")
def check_symlinks(v: View) -> Iterator[Finding]:
    """A symlink has exactly one target, 1..4095 bytes, and its size is that length."""
    b = v.blobs
    used = v.blob_used
    heads = used[(b["kind"][used] == BLOB_SYMLINK) & v.is_live(b["owner"][used].astype(np.int64))]
    owner = b["owner"][heads].astype(np.int64)
    not_link = v.kind[owner] != KIND_SYMLINK
    yield from _many("symlinks", "stray-target", "y", "blob", heads[not_link],
                     lambda i: f"symlink target record {i} belongs to inode {int(b['owner'][i])}, not a symlink")
    heads, owner = heads[~not_link], owner[~not_link]
    order = np.lexsort((heads, owner))
    heads, owner = heads[order], owner[order]
    first = np.concatenate(([True], owner[1:] != owner[:-1])) if len(owner) else np.zeros(0, bool)
    yield from _many("symlinks", "extra-target", "y", "blob", heads[~first],
                     lambda i: f"symlink {int(b['owner'][i])} has more than one target (record {i})")
    has = np.zeros(v.n, bool)
    has[owner] = True
    links = v.live & (v.kind == KIND_SYMLINK)
    yield from _many("symlinks", "no-target", "y", "inode", np.flatnonzero(links & ~has),
                     lambda i: f"symlink {i} has no target", key="ino")
    target_len = np.zeros(v.n, np.int64)
    target_len[owner[first]] = b["value_len"][heads[first]].astype(np.int64)
    bad_len = links & has & ((target_len == 0) | (target_len > SYMLINK_MAX))
    yield from _many("symlinks", "bad-target", "y", "inode", np.flatnonzero(bad_len),
                     lambda i: f"symlink {i} has a target of {int(target_len[i])} bytes", key="ino")
    size = v.inodes["size"].astype(np.int64)
    wrong = np.flatnonzero(links & has & ~bad_len & (size != target_len))
    yield from _many("symlinks", "symlink-size", "p", "inode", wrong,
                     lambda i: f"symlink {i} has size {int(size[i])} but its target is {int(target_len[i])} bytes",
                     key="ino")


TABLE_CHECKS = [name for name, _ in CHECKS]


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


def format_seal_sb(sbv: np.ndarray) -> None:
    """Reseal the primary superblock's checksum after an in-place change."""
    from .format import seal

    seal(sbv, 0)
