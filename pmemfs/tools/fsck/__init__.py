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
pass), pipeline (the run) and command (the CLI). What callers outside the package use
is importable from here.
"""

from __future__ import annotations

from ...media import check
from .command import main
from .fix_inodes import fix_nlink
from .pipeline import check_region, fsck
from .repair import Repair
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

# What callers outside the package use (the command, the suite, tools/); the rest is
# reached in its own module.
__all__ = ["EXIT_CLEAN", "EXIT_CORRECTED", "EXIT_OPERATIONAL", "EXIT_UNCORRECTED", "EXIT_USAGE",
           "FileChange", "FsckError", "Repair", "Report", "check", "check_region", "display",
           "fix_nlink", "format_text", "fsck", "main"]
