"""The on-media layout of a pmemfs region (format version 1).

docs/FORMAT.md is the prose version of this file; the two must agree. Everything is
little-endian and fixed width; references are table indices or block numbers, never
pointers. Index 0 of every table is reserved, so 0 means "none".

The numbers and record types are in layout.py, the geometry in geometry.py and the
superblock in superblock.py; this module names them all (as every layer imports them
from here) and holds the table views.
"""

from __future__ import annotations

import zlib

import numpy as np

from .errors import FormatError
from .geometry import (
    Geometry,
)
from .layout import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    ATTR_KNOWN,
    ATTR_NOATIME,
    ATTR_NODUMP,
    BLOB_CONT,
    BLOB_DATA,
    BLOB_DTYPE,
    BLOB_FREE,
    BLOB_SYMLINK,
    BLOB_XATTR,
    BLOCK_1G,
    BLOCK_2M,
    BLOCK_SIZES,
    DIRENT_DTYPE,
    EXTENT_COUNT_MAX,
    EXTENT_DTYPE,
    EXTENT_PACKED,
    FEATURE_COMPAT_KNOWN,
    FEATURE_COMPAT_REPLY_RECORD,
    FEATURE_COMPAT_SPARSE,
    FEATURE_INCOMPAT_KNOWN,
    FEATURE_RO_COMPAT_KNOWN,
    FLAG_ORPHAN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    HWM_STEP,
    INODE_DTYPE,
    JOURNAL_HEADER_DTYPE,
    JOURNAL_MAGIC,
    JOURNAL_OFFSET,
    JOURNAL_RECORD_HEADER,
    JOURNAL_SIZE_DEFAULT,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_FIFO,
    KIND_FREE,
    KIND_KOBJ,
    KIND_NAMES,
    KIND_OF_S_IFMT,
    KIND_REG,
    KIND_SOCK,
    KIND_SYMLINK,
    LOFF_MAX,
    MAGIC,
    NAME_MAX,
    PACK_CHUNKS,
    PACK_DTYPE,
    RECORD_SIZES,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SB_SLOT,
    SB_STRUCT,
    SMALL_CHUNKS,
    STATE_CLEAN,
    STATE_DIRTY,
    SUPERBLOCK_DTYPE,
    SYMLINK_MAX,
    TABLE_ALIGN,
    TABLE_COUNT_LIMIT,
    TABLE_NAMES,
    TIME_MAX_S,
    TIME_MIN_S,
    VERSION_MAJOR,
    VERSION_MINOR,
    XATTR_VALUE_MAX,
    align_up,
    clamp_time_ns,
    crc,
    max_file_blocks,
    max_file_size,
    sparse_requested,
)
from .superblock import (
    Superblock,
    _data_ranges,
    find_backup_superblock,
    read_superblock,
)

__all__ = [
    "ATTR_APPEND",
    "ATTR_IMMUTABLE",
    "ATTR_KNOWN",
    "ATTR_NOATIME",
    "ATTR_NODUMP",
    "BLOB_CONT",
    "BLOB_DATA",
    "BLOB_DTYPE",
    "BLOB_FREE",
    "BLOB_SYMLINK",
    "BLOB_XATTR",
    "BLOCK_1G",
    "BLOCK_2M",
    "BLOCK_SIZES",
    "DIRENT_DTYPE",
    "EXTENT_COUNT_MAX",
    "EXTENT_DTYPE",
    "EXTENT_PACKED",
    "FEATURE_COMPAT_KNOWN",
    "FEATURE_COMPAT_REPLY_RECORD",
    "FEATURE_COMPAT_SPARSE",
    "FEATURE_INCOMPAT_KNOWN",
    "FEATURE_RO_COMPAT_KNOWN",
    "FLAGS_KNOWN",
    "FLAG_ORPHAN",
    "FLAG_PINNED",
    "FLAG_TRUNCATING",
    "HWM_STEP",
    "INODE_DTYPE",
    "JOURNAL_HEADER_DTYPE",
    "JOURNAL_MAGIC",
    "JOURNAL_OFFSET",
    "JOURNAL_RECORD_HEADER",
    "JOURNAL_SIZE_DEFAULT",
    "KIND_BLK",
    "KIND_CHR",
    "KIND_DIR",
    "KIND_FIFO",
    "KIND_FREE",
    "KIND_KOBJ",
    "KIND_NAMES",
    "KIND_OF_S_IFMT",
    "KIND_REG",
    "KIND_SOCK",
    "KIND_SYMLINK",
    "LOFF_MAX",
    "MAGIC",
    "NAME_MAX",
    "PACK_CHUNKS",
    "PACK_DTYPE",
    "RECORD_SIZES",
    "ROOT_INO",
    "SB_SLOT",
    "SB_STRUCT",
    "SMALL_CHUNKS",
    "STATE_CLEAN",
    "STATE_DIRTY",
    "SUPERBLOCK_DTYPE",
    "SYMLINK_MAX",
    "S_IFMT_OF_KIND",
    "TABLE_ALIGN",
    "TABLE_COUNT_LIMIT",
    "TABLE_NAMES",
    "TIME_MAX_S",
    "TIME_MIN_S",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "XATTR_VALUE_MAX",
    "FormatError",
    "Geometry",
    "Superblock",
    "Tables",
    "_data_ranges",
    "align_up",
    "clamp_time_ns",
    "crc",
    "find_backup_superblock",
    "max_file_blocks",
    "max_file_size",
    "read_superblock",
    "record_checksums",
    "seal",
    "sparse_requested",
]


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
