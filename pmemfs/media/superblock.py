"""The superblock: encoding and decoding it (with its geometry checked against the
region), reading the primary or the backup, and finding the backup of a region whose
primary is gone. Re-exported by pmemfs.media.format.
"""

from __future__ import annotations

import errno
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError
from .geometry import Geometry
from .layout import (
    BLOB_DTYPE,
    BLOCK_SIZES,
    DIRENT_DTYPE,
    EXTENT_DTYPE,
    FEATURE_COMPAT_REPLY_RECORD,
    FEATURE_INCOMPAT_KNOWN,
    HWM_STEP,
    INODE_DTYPE,
    JOURNAL_OFFSET,
    MAGIC,
    PACK_DTYPE,
    ROOT_INO,
    SB_SLOT,
    SB_STRUCT,
    STATE_CLEAN,
    SUPERBLOCK_DTYPE,
    TABLE_COUNT_LIMIT,
    TABLE_NAMES,
    VERSION_MAJOR,
    VERSION_MINOR,
    crc,
)


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


