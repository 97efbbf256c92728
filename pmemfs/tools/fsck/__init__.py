"""pmemfs-fsck: check a region and repair it (the library and the command).

    pmemfs-fsck [-n | -p | -y] [--backup FILE] [--json] [-v] REGION

-n (the default when stdin is not a terminal) never writes: the region is mapped
privately (copy-on-write), so the journal can be rolled back exactly as a mount would
and the rolled-back image checked, without touching the region; it is allowed while
the region is mounted (the report then says it looked at a live image). -p repairs
what is safe, -y everything it can. Repairs hold the region lock and go through the
region's own undo journal, so a crash during a repair is itself recoverable.

Exit codes follow fsck(8): 0 clean, 1 errors corrected, 4 errors left uncorrected,
8 operational error, 16 usage error. docs/FSCK.md describes checks and repairs.

A repair never changes a file silently: records that fail their checksum are restored
exactly when one explanation of the damage fits the checksum, and otherwise trusted
only as far as everything that refers to them agrees; every file a repair may have
changed is in the report's per-file list (Report.files, "files" in --json, CHANGED
lines in the text) by path, with what happened to it.

The package, one concern a module: report (findings, exit codes, the text report),
image (mapping the region, finding the backup superblock, --backup), header (the
journal and both superblocks, checked and repaired first), repair (journaled writes and
the per-file notes), evidence, restore and triage (records that fail their checksum),
fix_* (the repairs, by what they mend), fixers (which repair answers which finding, one
pass), pipeline (the run) and command (the CLI). Every name callers used from the
single module it once was is still importable from here.
"""

from __future__ import annotations

from ...media import check
from .command import main
from .fix_blobs import fix_free_blobs, fix_free_chains
from .fix_blocks import DROP_WHY, fix_bitmap, fix_drop_extents, fix_overlap
from .fix_inodes import (
    CLEAR_WHY,
    fix_attr,
    fix_clear_inode,
    fix_flags,
    fix_mode,
    fix_named_orphan,
    fix_nblocks,
    fix_nlink,
    fix_root,
    fix_size_limit,
    fix_size_zero,
    fix_symlink_size,
    fix_trim,
)
from .fix_lost import fix_lost_extents
from .fix_names import (
    fix_cookies,
    fix_dir_names,
    fix_dirent_kind,
    fix_dotdot,
    fix_drop_dirents,
    fix_next_cookie,
    fix_reconnect,
    fix_rename,
    fix_root_named,
)
from .fix_packs import fix_chunk_twice, fix_drop_packs, fix_pack_bitmaps, fix_packed_nowhere
from .fixers import FIXERS, ONCE_PER_PASS
from .image import MAP_NORESERVE, find_backup, save_metadata
from .pipeline import MAX_PASSES, MODES, check_region, fsck
from .repair import Paths, Repair
from .report import (
    EXIT_CLEAN,
    EXIT_CORRECTED,
    EXIT_OPERATIONAL,
    EXIT_UNCORRECTED,
    EXIT_USAGE,
    FileChange,
    FsckError,
    Report,
    display,
    format_text,
)
from .restore import EXTENT_HEAD, SIZELESS, SOLVE_FIELDS, XATTR_NAMESPACES, restore_records
from .triage import fix_checksums

__all__ = ["CLEAR_WHY", "DROP_WHY", "EXIT_CLEAN", "EXIT_CORRECTED", "EXIT_OPERATIONAL", "EXIT_UNCORRECTED",
           "EXIT_USAGE", "EXTENT_HEAD", "FIXERS", "MAP_NORESERVE", "MAX_PASSES", "MODES", "ONCE_PER_PASS",
           "SIZELESS", "SOLVE_FIELDS", "XATTR_NAMESPACES", "FileChange", "FsckError", "Paths", "Repair",
           "Report", "check", "check_region", "display", "find_backup", "fix_attr", "fix_bitmap",
           "fix_checksums", "fix_chunk_twice", "fix_clear_inode", "fix_cookies", "fix_dir_names",
           "fix_dirent_kind", "fix_dotdot", "fix_drop_dirents", "fix_drop_extents", "fix_drop_packs",
           "fix_flags", "fix_free_blobs", "fix_free_chains", "fix_lost_extents", "fix_mode",
           "fix_named_orphan", "fix_nblocks", "fix_next_cookie", "fix_nlink", "fix_overlap",
           "fix_pack_bitmaps", "fix_packed_nowhere", "fix_reconnect", "fix_rename", "fix_root",
           "fix_root_named", "fix_size_limit", "fix_size_zero", "fix_symlink_size", "fix_trim",
           "format_text", "fsck", "main", "restore_records", "save_metadata"]
