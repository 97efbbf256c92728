"""Where everything of a region lives: Geometry, planned once at mkfs (table counts,
offsets, the data start) and stored in the superblock. Re-exported by
pmemfs.media.format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import FormatError
from .layout import (
    BLOB_DTYPE,
    BLOCK_SIZES,
    DIRENT_DTYPE,
    EXTENT_DTYPE,
    INODE_DTYPE,
    JOURNAL_OFFSET,
    JOURNAL_SIZE_DEFAULT,
    PACK_DTYPE,
    RECORD_SIZES,
    SB_SLOT,
    TABLE_ALIGN,
    TABLE_COUNT_LIMIT,
    TABLE_NAMES,
    align_up,
    max_file_size,
)


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
        inodes = _inode_count(region_size, block_size, inodes)
        block_count = region_size // block_size
        counts = _table_counts(block_count, inodes, extents=extents, dirents=dirents,
                               blobs=blobs, packs=packs)
        g = cls(region_size, block_size, inode_count=inodes + 1, extent_count=counts["extents"] + 1,
                dirent_count=counts["dirents"] + 1, blob_count=counts["blobs"] + 1,
                pack_count=counts["packs"] + 1)
        g._place()
        return g

    def _place(self) -> None:
        """Lay the journal, bitmaps and tables out one after another from the journal's
        fixed offset, and the backup superblock and the first data block after them."""
        block_count, block_size = self.block_count, self.block_size
        sizes = {
            "journal": self.journal_size,
            "bitmap": align_up((block_count + 7) // 8, TABLE_ALIGN),
            "badmap": align_up((block_count + 7) // 8, TABLE_ALIGN),
            "inode": align_up(self.inode_count * INODE_DTYPE.itemsize, TABLE_ALIGN),
            "extent": align_up(self.extent_count * EXTENT_DTYPE.itemsize, TABLE_ALIGN),
            "dirent": align_up(self.dirent_count * DIRENT_DTYPE.itemsize, TABLE_ALIGN),
            "blob": align_up(self.blob_count * BLOB_DTYPE.itemsize, TABLE_ALIGN),
            "pack": align_up(self.pack_count * PACK_DTYPE.itemsize, TABLE_ALIGN),
        }
        pos = JOURNAL_OFFSET
        for name, size in sizes.items():
            self.offsets[name] = pos
            pos += size
        self.sizes = sizes
        # The backup superblock ends the metadata area, just below the first data block.
        data_start = align_up(pos + SB_SLOT, block_size)
        self.data_start_block = data_start // block_size
        self.backup_offset = data_start - SB_SLOT
        if self.data_start_block >= block_count:
            need = data_start + block_size
            raise FormatError(
                f"region of {self.region_size} bytes is too small: metadata and one data block need {need} bytes")


def _inode_count(region_size: int, block_size: int, inodes: int | None) -> int:
    """The inodes asked for (or the default), once the block size, the region size and
    the count are known to fit the format."""
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
    return inodes


def _table_counts(block_count: int, inodes: int, *, extents: int | None, dirents: int | None,
                  blobs: int | None, packs: int | None) -> dict[str, int]:
    """Records of the extent, dirent, blob and pack tables: as asked, or the defaults."""
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
    return counts
