"""The on-media layout of a pmemfs region (format version 1).

docs/FORMAT.md is the prose version of this file; the two must agree. Everything is
little-endian and fixed width; references are table indices or block numbers, never
pointers. Index 0 of every table is reserved, so 0 means "none".
"""

from __future__ import annotations

import errno
import os
import time
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"PMEMFSSB"
VERSION_MAJOR = 1
VERSION_MINOR = 2  # 1.1: the reply record; 1.2: inode.attr, the chattr flags (docs/FORMAT.md)

SB_SLOT = 4096  # bytes reserved for one superblock copy
SB_STRUCT = 512  # bytes of it that are defined; the rest is zero
JOURNAL_OFFSET = SB_SLOT  # fixed, so recovery needs nothing but the region
JOURNAL_SIZE_DEFAULT = 1 << 20
TABLE_ALIGN = 4096

BLOCK_2M = 2 << 20
BLOCK_1G = 1 << 30
BLOCK_SIZES = (BLOCK_2M, BLOCK_1G)

ROOT_INO = 1
TABLE_NAMES = ("inode", "extent", "dirent", "blob", "pack")
HWM_STEP = 1024  # high-water marks grow in steps of this many records
NAME_MAX = 255
XATTR_VALUE_MAX = 65536
SYMLINK_MAX = 4095

# Limits the field widths imply (docs/FORMAT.md, "Limits"). A file's size is a u64
# but the kernel's file offsets (loff_t) are signed 64-bit, and a file owns whole
# blocks: its largest size (the kernel's s_maxbytes) is the last block boundary at or
# below 2^63 - 1, so the end of every block it can own, and its size rounded up to
# blocks, are valid offsets: no extent's byte range needs more than a signed 64 bits.
LOFF_MAX = (1 << 63) - 1
EXTENT_COUNT_MAX = (1 << 32) - 1  # extent.count is a u32 (the table bound keeps it below)
TABLE_COUNT_LIMIT = 1 << 32  # record indices are u32 in extents and blobs
# Timestamps are signed 64-bit nanoseconds; as the kernel does for a filesystem's
# s_time_min/s_time_max, times are clamped to the whole seconds that fit, and a time
# clamped to either end has no nanoseconds.
TIME_MIN_S = -((1 << 63) // 10**9)  # -9223372036: 1677-09-21 00:12:44 UTC
TIME_MAX_S = ((1 << 63) - 1) // 10**9  # 9223372036: 2262-04-11 23:47:16 UTC


def max_file_size(block_size: int) -> int:
    """The largest file size (s_maxbytes) with this block size: 2^63 - block_size."""
    return LOFF_MAX // block_size * block_size


def max_file_blocks(block_size: int) -> int:
    """File blocks a file can have: every extent lies in [0, this)."""
    return LOFF_MAX // block_size


def clamp_time_ns(ns: int) -> int:
    """A timestamp in nanoseconds as stored: clamped to [TIME_MIN_S, TIME_MAX_S]
    seconds, with no nanoseconds at either end (the kernel's timestamp_truncate)."""
    sec, nsec = divmod(int(ns), 10**9)
    if sec >= TIME_MAX_S:
        return TIME_MAX_S * 10**9
    if sec <= TIME_MIN_S:
        return TIME_MIN_S * 10**9
    return sec * 10**9 + nsec

# Feature masks. Unknown incompat bits refuse mount; unknown ro_compat bits allow
# only read-only use; unknown compat bits are ignored.
FEATURE_COMPAT_REPLY_RECORD = 0x1  # bytes 2048-2175 of block 0 hold the reply record
# The region was made overcommitted (pmemfs-mkfs --sparse): its backing holds memory only
# for the metadata in use and the blocks in use, reserved as they are allocated.
FEATURE_COMPAT_SPARSE = 0x2
FEATURE_COMPAT_KNOWN = FEATURE_COMPAT_REPLY_RECORD | FEATURE_COMPAT_SPARSE
FEATURE_INCOMPAT_KNOWN = 0
FEATURE_RO_COMPAT_KNOWN = 0


def sparse_requested(head: bytes) -> bool:
    """Does a region whose first bytes are head say it is overcommitted? Read before the
    region is mapped (on hugetlbfs the mapping must then not reserve every page); a
    damaged superblock says no, and the mount refuses it later anyway."""
    if len(head) < 24 or head[:8] != MAGIC:
        return False
    return bool(int.from_bytes(head[16:24], "little") & FEATURE_COMPAT_SPARSE)


STATE_CLEAN = 1
STATE_DIRTY = 2

# Inode kinds (inode.kind). Mode bits carry the matching S_IFMT as well.
KIND_FREE = 0
KIND_REG = 1
KIND_DIR = 2
KIND_SYMLINK = 3
KIND_FIFO = 4
KIND_SOCK = 5
KIND_CHR = 6
KIND_BLK = 7
KIND_KOBJ = 8
KIND_NAMES = {KIND_REG: "file", KIND_DIR: "directory", KIND_SYMLINK: "symlink", KIND_FIFO: "fifo",
              KIND_SOCK: "socket", KIND_CHR: "char device", KIND_BLK: "block device",
              KIND_KOBJ: "kernel object"}
S_IFMT_OF_KIND = {KIND_REG: 0o100000, KIND_DIR: 0o040000, KIND_SYMLINK: 0o120000,
                  KIND_FIFO: 0o010000, KIND_SOCK: 0o140000, KIND_CHR: 0o020000,
                  KIND_BLK: 0o060000, KIND_KOBJ: 0o100000}
KIND_OF_S_IFMT = {v: k for k, v in S_IFMT_OF_KIND.items() if k != KIND_KOBJ}

# Inode flags (inode.flags).
FLAG_ORPHAN = 0x1  # nlink reached 0 while open: free it at the next mount
FLAG_TRUNCATING = 0x2  # blocks beyond size are being freed in several transactions
FLAG_PINNED = 0x4  # kernel object: blocks never move, unlink/truncate get EBUSY
FLAGS_KNOWN = FLAG_ORPHAN | FLAG_TRUNCATING | FLAG_PINNED

# chattr flags (inode.attr, version 1.2): the FS_IOC_GETFLAGS bits, as their values.
ATTR_IMMUTABLE = 0x10  # FS_IMMUTABLE_FL: no change of data, metadata or names
ATTR_APPEND = 0x20  # FS_APPEND_FL: data only added at the end; never removed or renamed
ATTR_NODUMP = 0x40  # FS_NODUMP_FL: stored only (for dump(8))
ATTR_NOATIME = 0x80  # FS_NOATIME_FL: reads leave atime alone
ATTR_KNOWN = ATTR_IMMUTABLE | ATTR_APPEND | ATTR_NODUMP | ATTR_NOATIME

# Blob kinds (blob.kind): blobs hold xattrs and symlink targets.
BLOB_FREE = 0
BLOB_XATTR = 1
BLOB_SYMLINK = 2
BLOB_CONT = 3  # continuation of the value of the head blob that links to it

SUPERBLOCK_DTYPE = np.dtype([
    ("magic", "S8"),
    ("version_major", "<u2"), ("version_minor", "<u2"), ("struct_size", "<u4"),
    ("feature_compat", "<u8"), ("feature_incompat", "<u8"), ("feature_ro_compat", "<u8"),
    ("uuid", "V16"), ("label", "S64"),
    ("create_time_ns", "<i8"),
    ("block_size", "<u8"), ("region_size", "<u8"), ("block_count", "<u8"),
    ("data_start_block", "<u8"),
    ("journal_offset", "<u8"), ("journal_size", "<u8"),
    ("bitmap_offset", "<u8"), ("bitmap_size", "<u8"),
    ("badmap_offset", "<u8"),
    ("inode_offset", "<u8"), ("inode_count", "<u8"), ("inode_size", "<u4"),
    ("extent_size", "<u4"), ("extent_offset", "<u8"), ("extent_count", "<u8"),
    ("dirent_offset", "<u8"), ("dirent_count", "<u8"), ("dirent_size", "<u4"),
    ("blob_size", "<u4"), ("blob_offset", "<u8"), ("blob_count", "<u8"),
    ("backup_offset", "<u8"),
    ("root_ino", "<u8"),
    ("state", "<u4"), ("reserved0", "<u4"),
    ("mount_generation", "<u8"),
    ("last_mount_ns", "<i8"), ("last_umount_ns", "<i8"),
    # High-water marks: no record at or past these indices has ever been used, so a
    # mount reads only [0, hwm) of each table however large the region is.
    ("inode_hwm", "<u8"), ("extent_hwm", "<u8"), ("dirent_hwm", "<u8"), ("blob_hwm", "<u8"),
    ("pack_offset", "<u8"), ("pack_count", "<u8"), ("pack_size", "<u4"), ("reserved1", "<u4"),
    ("pack_hwm", "<u8"),
    ("reserved", "V116"),
    ("checksum", "<u4"),
])
assert SUPERBLOCK_DTYPE.itemsize == SB_STRUCT, SUPERBLOCK_DTYPE.itemsize

INODE_DTYPE = np.dtype([
    ("kind", "u1"), ("attr", "u1"), ("flags", "<u2"), ("mode", "<u4"),
    ("uid", "<u4"), ("gid", "<u4"),
    ("nlink", "<u4"), ("generation", "<u4"),
    ("size", "<u8"),
    ("nblocks", "<u8"),  # data blocks owned (sum of its extents' counts)
    ("atime_ns", "<i8"), ("mtime_ns", "<i8"), ("ctime_ns", "<i8"), ("btime_ns", "<i8"),
    ("rdev", "<u8"),
    ("parent", "<u8"),  # directories: the inode of ".."
    ("next_cookie", "<u8"),  # directories: readdir cookie for the next entry
    ("ktype", "<u2"), ("kstate", "<u2"), ("kversion", "<u4"),  # kernel objects
    ("kchecksum", "<u4"),
    ("reserved", "V16"),
    ("checksum", "<u4"),
])
assert INODE_DTYPE.itemsize == 128, INODE_DTYPE.itemsize

EXTENT_DTYPE = np.dtype([
    ("owner", "<u4"),  # inode number; 0 = free slot
    ("count", "<u4"),  # blocks, > 0
    ("file_block", "<u8"),  # first block of the file it maps
    ("start_block", "<u8"),  # first block of the region it occupies
    ("flags", "<u4"),
    ("checksum", "<u4"),
])
assert EXTENT_DTYPE.itemsize == 32

DIRENT_DTYPE = np.dtype([
    ("parent", "<u8"),  # directory inode; 0 = free slot
    ("ino", "<u8"),
    ("cookie", "<u8"),  # readdir position inside parent, unique, grows
    ("name_len", "<u2"), ("kind", "u1"), ("reserved0", "u1"),
    ("name", "S256"),  # name_len bytes, then zeros
    ("checksum", "<u4"),
])
assert DIRENT_DTYPE.itemsize == 288

BLOB_DATA = 488
BLOB_DTYPE = np.dtype([
    ("owner", "<u8"),  # inode; 0 = free slot
    ("next", "<u4"),  # slot of the continuation, 0 = last
    ("kind", "u1"), ("reserved0", "u1"), ("name_len", "<u2"),
    ("value_len", "<u4"),  # total value length (head), bytes in this slot (continuation)
    ("data", f"V{BLOB_DATA}"),  # head: name, then the start of the value
    ("checksum", "<u4"),
])
assert BLOB_DTYPE.itemsize == 512

# Small files share "pack" blocks: a block cut into PACK_CHUNKS chunks, with one
# record of this table per pack block holding its chunk bitmap (64 bytes a block).
PACK_CHUNKS = 512
SMALL_CHUNKS = 16  # a file whose data fits in this many chunks lives in a pack block
PACK_DTYPE = np.dtype([
    ("block", "<u8"),  # the region block; 0 = free slot
    ("used", "<u4"),  # chunks in use (= bits set in bitmap)
    ("reserved0", "<u4"),
    ("bitmap", "V64"),  # bit c (little-endian) set: chunk c belongs to a file
    ("reserved", "V44"),
    ("checksum", "<u4"),
])
assert PACK_DTYPE.itemsize == 128
EXTENT_PACKED = 0x1  # extent flag: `count` chunks of block `start_block`, from chunk (flags >> 16)

JOURNAL_HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("size", "<u8"),  # bytes of the journal area, header included
    ("sequence", "<u8"),  # transaction number, grows
    ("state", "<u4"),  # the commit word: 0 idle, 1 active
    ("nrecords", "<u4"),  # undo records that are complete, in order
    ("reserved", "V24"),
    ("checksum", "<u4"),  # over magic and size only (the rest changes every tx)
    ("reserved1", "<u4"),
])
assert JOURNAL_HEADER_DTYPE.itemsize == 64
JOURNAL_MAGIC = b"PMEMFSJ1"
JOURNAL_RECORD_HEADER = 16  # offset u64, length u32, checksum u32; then data padded to 8


from .errors import FormatError  # noqa: E402  (re-exported: format.FormatError)

RECORD_SIZES = {"inode": INODE_DTYPE.itemsize, "extent": EXTENT_DTYPE.itemsize,
                "dirent": DIRENT_DTYPE.itemsize, "blob": BLOB_DTYPE.itemsize, "pack": PACK_DTYPE.itemsize}


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class Geometry:
    """Where everything lives; computed once at mkfs and stored in the superblock."""

    region_size: int
    block_size: int
    inode_count: int
    extent_count: int
    dirent_count: int
    blob_count: int
    pack_count: int = 2
    journal_size: int = JOURNAL_SIZE_DEFAULT
    offsets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    data_start_block: int = 0
    backup_offset: int = 0

    @property
    def block_count(self) -> int:
        return self.region_size // self.block_size

    @property
    def data_blocks(self) -> int:
        return self.block_count - self.data_start_block

    @property
    def metadata_bytes(self) -> int:
        return self.backup_offset + SB_SLOT

    @property
    def max_file_size(self) -> int:
        return max_file_size(self.block_size)

    def metadata_in_use(self, hwm: dict[str, int]) -> list[tuple[int, int]]:
        """(offset, length) of the metadata a filesystem with these high-water marks can
        touch: the superblock slot, journal and both bitmaps, each table below its mark,
        and the backup superblock. An overcommitted region keeps exactly this reserved
        (the rest of the metadata area stays holes)."""
        out = [(0, self.offsets["inode"])]
        for name in TABLE_NAMES:
            count = min(hwm[name], getattr(self, f"{name}_count"))
            out.append((self.offsets[name], count * RECORD_SIZES[name]))
        out.append((self.backup_offset, SB_SLOT))
        return out

    @classmethod
    def plan(cls, region_size: int, block_size: int, inodes: int | None = None, *,
             extents: int | None = None, dirents: int | None = None, blobs: int | None = None,
             packs: int | None = None) -> Geometry:
        """The layout of a region. inodes, extents, dirents, blobs, packs: records of
        each table (slot 0 is reserved and comes on top); None chooses the default.
        Smaller tables are for tests and special uses (each can then fill: ENOSPC)."""
        if block_size not in BLOCK_SIZES:
            raise FormatError(f"block size {block_size} is not 2M or 1G")
        if region_size % block_size:
            raise FormatError(f"region size {region_size} is not a multiple of the block size {block_size}")
        if inodes is None:
            # One inode per MiB of region, within [4096, 1M]; --inodes for more. Tables
            # are sparse until used, so capacity costs address space, not memory.
            inodes = min(max(region_size // (1 << 20), 4096), 1 << 20)
        if inodes < 16 or inodes >= 1 << 32:
            raise FormatError(f"inode count {inodes} is outside 16..{(1 << 32) - 1}")
        block_count = region_size // block_size
        if block_count + inodes + 1 >= TABLE_COUNT_LIMIT:
            # The extent table needs a record per block; its indices (and extent.count)
            # are u32, so a region has fewer than 2^32 blocks.
            bigger = [b for b in BLOCK_SIZES if b > block_size and region_size // b + inodes + 1 < TABLE_COUNT_LIMIT]
            raise FormatError(f"region of {block_count} blocks of {block_size} bytes is too large: "
                              f"at most {TABLE_COUNT_LIMIT - inodes - 2} blocks with {inodes} inodes"
                              + (" (use 1G blocks)" if bigger else ""))
        counts = {
            # Whole-block extents hold >= 1 block and a file has at most one packed
            # extent, so by default the extent table can never run out.
            "extents": block_count + inodes if extents is None else extents,
            "dirents": inodes if dirents is None else dirents,
            "blobs": inodes + 63 if blobs is None else blobs,  # room for a symlink or xattr each
            "packs": min(inodes, block_count) if packs is None else packs,  # >= 1 small file each
        }
        for name, n in (("extents", extents), ("dirents", dirents), ("blobs", blobs), ("packs", packs)):
            if n is not None and not 1 <= n < (1 << 32) - 1:
                raise FormatError(f"{name[:-1]} count {n} is outside 1..{(1 << 32) - 2}")
        g = cls(region_size, block_size, inode_count=inodes + 1, extent_count=counts["extents"] + 1,
                dirent_count=counts["dirents"] + 1, blob_count=counts["blobs"] + 1,
                pack_count=counts["packs"] + 1)
        sizes = {
            "journal": g.journal_size,
            "bitmap": align_up((block_count + 7) // 8, TABLE_ALIGN),
            "badmap": align_up((block_count + 7) // 8, TABLE_ALIGN),
            "inode": align_up(g.inode_count * INODE_DTYPE.itemsize, TABLE_ALIGN),
            "extent": align_up(g.extent_count * EXTENT_DTYPE.itemsize, TABLE_ALIGN),
            "dirent": align_up(g.dirent_count * DIRENT_DTYPE.itemsize, TABLE_ALIGN),
            "blob": align_up(g.blob_count * BLOB_DTYPE.itemsize, TABLE_ALIGN),
            "pack": align_up(g.pack_count * PACK_DTYPE.itemsize, TABLE_ALIGN),
        }
        pos = JOURNAL_OFFSET
        for name, size in sizes.items():
            g.offsets[name] = pos
            pos += size
        g.sizes = sizes
        # The backup superblock ends the metadata area, just below the first data block.
        data_start = align_up(pos + SB_SLOT, block_size)
        g.data_start_block = data_start // block_size
        g.backup_offset = data_start - SB_SLOT
        if g.data_start_block >= block_count:
            need = data_start + block_size
            raise FormatError(
                f"region of {region_size} bytes is too small: metadata and one data block need {need} bytes")
        return g


@dataclass
class Superblock:
    geometry: Geometry
    uuid: bytes
    label: str = ""
    create_time_ns: int = 0
    feature_compat: int = FEATURE_COMPAT_REPLY_RECORD
    feature_incompat: int = 0
    feature_ro_compat: int = 0
    state: int = STATE_CLEAN
    mount_generation: int = 0
    last_mount_ns: int = 0
    last_umount_ns: int = 0
    hwm: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_NAMES, HWM_STEP))
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR

    @classmethod
    def new(cls, geometry: Geometry, label: str = "") -> Superblock:
        return cls(geometry, uuidlib.uuid4().bytes, label, time.time_ns())

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def encode(self) -> bytes:
        g = self.geometry
        rec = np.zeros(1, SUPERBLOCK_DTYPE)[0]
        values = {
            "magic": MAGIC, "version_major": self.version_major, "version_minor": self.version_minor,
            "struct_size": SB_STRUCT, "feature_compat": self.feature_compat,
            "feature_incompat": self.feature_incompat, "feature_ro_compat": self.feature_ro_compat,
            "uuid": self.uuid, "label": self.label.encode()[:64], "create_time_ns": self.create_time_ns,
            "block_size": g.block_size, "region_size": g.region_size, "block_count": g.block_count,
            "data_start_block": g.data_start_block,
            "journal_offset": g.offsets["journal"], "journal_size": g.sizes["journal"],
            "bitmap_offset": g.offsets["bitmap"], "bitmap_size": g.sizes["bitmap"],
            "badmap_offset": g.offsets["badmap"],
            "inode_offset": g.offsets["inode"], "inode_count": g.inode_count,
            "inode_size": INODE_DTYPE.itemsize,
            "extent_offset": g.offsets["extent"], "extent_count": g.extent_count,
            "extent_size": EXTENT_DTYPE.itemsize,
            "dirent_offset": g.offsets["dirent"], "dirent_count": g.dirent_count,
            "dirent_size": DIRENT_DTYPE.itemsize,
            "blob_offset": g.offsets["blob"], "blob_count": g.blob_count,
            "blob_size": BLOB_DTYPE.itemsize,
            "pack_offset": g.offsets["pack"], "pack_count": g.pack_count, "pack_size": PACK_DTYPE.itemsize,
            "backup_offset": g.backup_offset, "root_ino": ROOT_INO,
            "state": self.state, "mount_generation": self.mount_generation,
            "last_mount_ns": self.last_mount_ns, "last_umount_ns": self.last_umount_ns,
        }
        for name in TABLE_NAMES:
            values[f"{name}_hwm"] = min(self.hwm[name], getattr(g, f"{name}_count"))
        for k, v in values.items():
            rec[k] = v
        raw = bytearray(rec.tobytes())
        raw[-4:] = crc(raw[:-4]).to_bytes(4, "little")
        return bytes(raw)

    @classmethod
    def decode(cls, raw: bytes | memoryview, region_size: int | None = None) -> Superblock:
        """Parse and validate one superblock copy; FormatError names the first problem."""
        raw = bytes(raw[:SB_STRUCT])
        if len(raw) < SB_STRUCT:
            raise FormatError("region is smaller than a superblock")
        rec = np.frombuffer(raw, SUPERBLOCK_DTYPE)[0]
        if bytes(rec["magic"]) != MAGIC:
            raise FormatError("no pmemfs superblock (bad magic)")
        if crc(raw[:-4]) != int(rec["checksum"]):
            raise FormatError("superblock checksum mismatch")
        if int(rec["version_major"]) != VERSION_MAJOR:
            raise FormatError(f"format version {int(rec['version_major'])} is not supported (this is {VERSION_MAJOR})")
        unknown = int(rec["feature_incompat"]) & ~FEATURE_INCOMPAT_KNOWN
        if unknown:
            raise FormatError(f"unknown incompatible features 0x{unknown:x}: refusing to use this region")
        g = Geometry(
            region_size=int(rec["region_size"]), block_size=int(rec["block_size"]),
            inode_count=int(rec["inode_count"]), extent_count=int(rec["extent_count"]),
            dirent_count=int(rec["dirent_count"]), blob_count=int(rec["blob_count"]),
            pack_count=int(rec["pack_count"]),
            journal_size=int(rec["journal_size"]),
            data_start_block=int(rec["data_start_block"]), backup_offset=int(rec["backup_offset"]))
        for name in ("journal", "bitmap", "badmap", "inode", "extent", "dirent", "blob", "pack"):
            g.offsets[name] = int(rec[f"{name}_offset"])
        g.sizes = {
            "journal": g.journal_size, "bitmap": int(rec["bitmap_size"]), "badmap": int(rec["bitmap_size"]),
            "inode": g.inode_count * INODE_DTYPE.itemsize, "extent": g.extent_count * EXTENT_DTYPE.itemsize,
            "dirent": g.dirent_count * DIRENT_DTYPE.itemsize, "blob": g.blob_count * BLOB_DTYPE.itemsize,
            "pack": g.pack_count * PACK_DTYPE.itemsize,
        }
        sb = cls(g, bytes(rec["uuid"]), bytes(rec["label"]).decode(errors="replace"),
                 int(rec["create_time_ns"]), int(rec["feature_compat"]), int(rec["feature_incompat"]),
                 int(rec["feature_ro_compat"]), int(rec["state"]), int(rec["mount_generation"]),
                 int(rec["last_mount_ns"]), int(rec["last_umount_ns"]),
                 {n: int(rec[f"{n}_hwm"]) for n in TABLE_NAMES},
                 int(rec["version_major"]), int(rec["version_minor"]))
        sb.validate_geometry(region_size, rec)
        return sb

    def validate_geometry(self, region_size: int | None, rec) -> None:
        g = self.geometry
        if g.block_size not in BLOCK_SIZES:
            raise FormatError(f"superblock block size {g.block_size} is not 2M or 1G")
        if region_size is not None and g.region_size > region_size:
            raise FormatError(f"superblock says the region is {g.region_size} bytes but it is {region_size}")
        if g.region_size % g.block_size or g.block_count < 2:
            raise FormatError("superblock region size does not fit its block size")
        if int(rec["block_count"]) != g.block_count:
            raise FormatError("superblock block count does not match region size")
        sizes = {"inode": INODE_DTYPE, "extent": EXTENT_DTYPE, "dirent": DIRENT_DTYPE, "blob": BLOB_DTYPE,
                 "pack": PACK_DTYPE}
        for name, dt in sizes.items():
            if int(rec[f"{name}_size"]) != dt.itemsize:
                raise FormatError(f"superblock {name} record size {int(rec[f'{name}_size'])} is not {dt.itemsize}")
        if g.offsets["journal"] != JOURNAL_OFFSET:
            raise FormatError("superblock journal offset is not 4096")
        if g.sizes["bitmap"] * 8 < g.block_count:
            raise FormatError("superblock allocation bitmap is too small for the block count")
        data_start = g.data_start_block * g.block_size
        if not 0 < g.data_start_block < g.block_count or g.backup_offset != data_start - SB_SLOT:
            raise FormatError("superblock data area or backup offset is inconsistent")
        spans = sorted((g.offsets[n], g.offsets[n] + g.sizes[n], n) for n in g.offsets)
        prev_end, prev_name = SB_SLOT, "superblock"
        for start, end, name in spans:
            if start < prev_end:
                raise FormatError(f"superblock tables {prev_name} and {name} overlap")
            if start % 8:
                raise FormatError(f"superblock table {name} is misaligned")
            prev_end, prev_name = end, name
        if prev_end > g.backup_offset:
            raise FormatError(f"superblock table {prev_name} runs into the data area")
        for name in TABLE_NAMES:
            count = getattr(g, f"{name}_count")
            if not 2 <= count < TABLE_COUNT_LIMIT:
                raise FormatError(f"superblock {name} count {count} is out of range")
            if not 0 < self.hwm[name] <= count:
                raise FormatError(f"superblock {name} high-water mark {self.hwm[name]} is out of range")


def read_superblock(buf: memoryview, region_size: int, *, allow_backup: bool = False,
                    fd: int | None = None) -> tuple[Superblock, str]:
    """The primary superblock, or with allow_backup the backup when the primary is bad.

    Returns (superblock, which) where which is "primary" or "backup". fd, the region's
    descriptor, lets the backup search skip holes (see find_backup_superblock).
    """
    try:
        return Superblock.decode(buf[:SB_STRUCT], region_size), "primary"
    except FormatError as primary_error:
        if not allow_backup:
            raise
        backup = find_backup_superblock(buf, region_size, fd=fd)
        if backup is None:
            raise FormatError(f"{primary_error}; no valid backup superblock found") from None
        return backup, "backup"


def _data_ranges(fd: int | None, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of fd that hold data (SEEK_DATA/SEEK_HOLE); all of it if unknown."""
    if fd is None:
        return [(0, size)]
    ranges = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data past pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            ranges.append((start, end))
            pos = end
    except OSError:  # e.g. /dev/dax: no holes to skip
        return [(0, size)]
    return ranges


def find_backup_superblock(buf: memoryview, region_size: int, *,
                           fd: int | None = None) -> Superblock | None:
    """The backup sits just below the first data block: try every block boundary.

    Reading a hole of a tmpfs or hugetlbfs mapping allocates a page, so probing every
    boundary of a sparse 1 TiB region through buf would allocate gigabytes; with fd
    only boundaries inside data ranges are read, and with pread.
    """
    ranges = _data_ranges(fd, region_size)

    def magic_at(off: int) -> bytes:
        # pread does not allocate a hole either (hugetlbfs has no SEEK_DATA to skip them).
        if fd is not None:
            try:
                return os.pread(fd, 8, off)
            except OSError:  # /dev/dax cannot read(2)
                pass
        return bytes(buf[off:off + 8])

    for block_size in BLOCK_SIZES:
        last = region_size // block_size - 1
        for start, end in ranges:
            # off = k * block_size - SB_SLOT must lie in [start, end).
            first_k = max(1, -(-(start + SB_SLOT) // block_size))
            last_k = min(last, (end - 1 + SB_SLOT) // block_size)
            for k in range(first_k, last_k + 1):
                off = k * block_size - SB_SLOT
                if magic_at(off) != MAGIC:
                    continue
                try:
                    sb = Superblock.decode(buf[off:off + SB_STRUCT], region_size)
                except FormatError:
                    continue
                if sb.geometry.backup_offset == off:
                    return sb
    return None


class Tables:
    """numpy structured-array views over a region's tables: no copies."""

    def __init__(self, buf: memoryview, sb: Superblock):
        g = sb.geometry
        self.geometry = g
        self.buf = buf

        def view(name: str, dtype: np.dtype, count: int) -> np.ndarray:
            return np.frombuffer(buf, dtype=dtype, count=count, offset=g.offsets[name])

        self.inodes = view("inode", INODE_DTYPE, g.inode_count)
        self.extents = view("extent", EXTENT_DTYPE, g.extent_count)
        self.dirents = view("dirent", DIRENT_DTYPE, g.dirent_count)
        self.blobs = view("blob", BLOB_DTYPE, g.blob_count)
        self.packs = view("pack", PACK_DTYPE, g.pack_count)
        nbytes = (g.block_count + 7) // 8
        self.bitmap = view("bitmap", np.dtype("u1"), nbytes)
        self.badmap = view("badmap", np.dtype("u1"), nbytes)

def record_checksums(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """CRC-32 of the given records; every record ends with its checksum field."""
    raw = memoryview(table.view(np.uint8)).cast("B")
    size = table.dtype.itemsize
    return np.fromiter((zlib.crc32(raw[i * size:(i + 1) * size - 4]) for i in indices.tolist()),
                       np.uint32, len(indices))


def seal(table: np.ndarray, index: int) -> None:
    """Store the checksum of one record (called when a transaction commits)."""
    size = table.dtype.itemsize
    raw = memoryview(table.view(np.uint8)).cast("B")
    table["checksum"][index] = zlib.crc32(raw[index * size:(index + 1) * size - 4])
