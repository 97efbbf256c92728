"""Structural checks of a region, vectorised with numpy.

Each check is a small named function over a `View` that yields `Finding`s; mount runs
the table checks (`structure`) and refuses a region with any error, pmemfs-fsck runs
them to report and repair. Checks read only [0, high-water mark) of each table, so
their cost follows the metadata in use, not the size of the region.

A finding carries a `code` (what is wrong, and which repair applies) and a `fix` tier:
"p" for repairs that are safe to make without asking (pmemfs-fsck -p and -y), "y" for
repairs that may lose or rewrite data (-y only), None when nothing can repair it.
The region-level checks (superblock, layout, backup superblock, journal) are
functions here too; pmemfs/tools/fsck/ runs them before the table checks.

The package, one concern a module: core (Finding, View, the registry), superblock,
records (checksums), inodes, blocks (extents, bitmap, packs), namespace (entries,
names, links, tree) and blobs (xattrs, symlink targets). Importing the package
registers every table check; everything is importable from here as before.
"""

from __future__ import annotations

from ..format import SUPERBLOCK_DTYPE, crc  # (callers reached these through this module)
from .blobs import blob_chains, check_blobs, check_symlinks
from .blocks import (
    block_owners,
    check_badblocks,
    check_bitmap,
    check_extent_overlap,
    check_extents,
    check_packs,
    expected_bitmap,
)
from .core import (
    CHECK_NAMES,
    CHECKS,
    COOKIE_END,
    KEY_FIELD,
    LIMIT,
    TABLE_CHECKS,
    XATTR_NAMESPACES,
    XATTR_SYSTEM_NAMES,
    Finding,
    View,
    check,
    run_check,
    structure,
    table_arrays,
)
from .inodes import check_inodes, check_kernel_objects, check_sizes
from .namespace import (
    check_dirents,
    check_links,
    check_names,
    check_orphans,
    check_tree,
    dir_name_parent,
    expected_nlink,
    name_hash,
    name_problems,
    reachability,
)
from .records import check_checksums, crc_bit_columns, crc_of_field, damaged_free
from .superblock import STATIC_SB_FIELDS, check_superblock_raw, compare_backup, format_seal_sb

if [name for name, _ in CHECKS] != TABLE_CHECKS:  # a check listed in TABLE_CHECKS that no module defines
    raise ImportError(f"table checks registered {[n for n, _ in CHECKS]}, expected {TABLE_CHECKS}")

__all__ = ["CHECKS", "CHECK_NAMES", "COOKIE_END", "KEY_FIELD", "LIMIT", "STATIC_SB_FIELDS", "SUPERBLOCK_DTYPE",
           "TABLE_CHECKS", "XATTR_NAMESPACES", "XATTR_SYSTEM_NAMES", "Finding", "View", "blob_chains",
           "block_owners", "check", "check_badblocks", "check_bitmap", "check_blobs", "check_checksums",
           "check_dirents", "check_extent_overlap", "check_extents", "check_inodes", "check_kernel_objects",
           "check_links", "check_names", "check_orphans", "check_packs", "check_sizes", "check_superblock_raw",
           "check_symlinks", "check_tree", "compare_backup", "crc", "crc_bit_columns", "crc_of_field",
           "damaged_free", "dir_name_parent", "expected_bitmap", "expected_nlink", "format_seal_sb",
           "name_hash", "name_problems", "reachability", "run_check", "structure", "table_arrays"]
