"""The fixed numbers of the on-media format: magic and version, sizes and limits, feature
bits, inode kinds, flags and chattr attributes, blob kinds, the numpy record types of
the superblock, tables and journal, and the checksum. docs/FORMAT.md in prose;
pmemfs.media.format re-exports every name.
"""

from __future__ import annotations

import zlib

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



RECORD_SIZES = {"inode": INODE_DTYPE.itemsize, "extent": EXTENT_DTYPE.itemsize,
                "dirent": DIRENT_DTYPE.itemsize, "blob": BLOB_DTYPE.itemsize, "pack": PACK_DTYPE.itemsize}


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


