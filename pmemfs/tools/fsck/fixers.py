"""Which repair answers which finding code, in the order they run within a pass."""

from __future__ import annotations

from collections.abc import Callable

from ...media import check
from ...media.check import Finding
from .fix_blobs import fix_free_blobs, fix_free_chains
from .fix_blocks import fix_bitmap, fix_drop_extents, fix_overlap
from .fix_inodes import (
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
from .repair import Repair
from .triage import fix_checksums

# Repairs in the order they run within a pass: code -> fixer.
FIXERS: list[tuple[str, Callable[[Repair, list[Finding]], None]]] = [
    ("checksum", fix_checksums),
    ("free-damaged", fix_checksums),
    ("root", fix_root),
    ("bad-kind", fix_clear_inode),
    ("no-target", fix_clear_inode),
    ("bad-target", fix_clear_inode),
    ("bad-mode", fix_mode),
    ("bad-flags", fix_flags),
    ("bad-attr", fix_attr),
    ("named-orphan", fix_named_orphan),
    ("root-orphan", fix_named_orphan),
    ("orphan", fix_clear_inode),
    ("bad-extent", fix_drop_extents),
    ("file-overlap", fix_drop_extents),
    ("bad-owned", fix_drop_extents),
    ("packed-mixed", fix_drop_extents),
    ("past-eof", fix_trim),  # before the overlaps: a block past the end is no claim worth a copy
    ("truncating", fix_trim),
    ("overlap", fix_overlap),
    ("double", fix_overlap),
    ("pack-place", fix_drop_packs),
    ("pack-dup", fix_drop_packs),
    ("packed-nowhere", fix_packed_nowhere),
    ("chunk-twice", fix_chunk_twice),
    ("pack-bitmap", fix_lost_extents),  # before the bitmaps and block counts forget what was lost
    ("nblocks", fix_lost_extents),
    ("leaked", fix_lost_extents),
    ("pack-bitmap", fix_pack_bitmaps),
    ("nblocks", fix_nblocks),
    ("size-nonzero", fix_size_zero),
    ("size-too-big", fix_size_limit),
    ("bad-dirent", fix_drop_dirents),
    ("dirent-kind", fix_dirent_kind),
    ("bad-name", fix_rename),
    ("dup-name", fix_rename),
    ("cookie", fix_cookies),
    ("next-cookie", fix_next_cookie),
    ("bad-blob", fix_free_blobs),
    ("stray-cont", fix_free_blobs),
    ("bad-chain", fix_free_chains),
    ("bad-xattr-name", fix_free_chains),
    ("dup-xattr", fix_free_chains),
    ("stray-target", fix_free_chains),
    ("extra-target", fix_free_chains),
    ("symlink-size", fix_symlink_size),
    ("root-named", fix_root_named),
    ("dir-names", fix_dir_names),
    ("dotdot", fix_dotdot),
    ("unreachable", fix_reconnect),
    ("nlink", fix_nlink),
    ("leaked", fix_bitmap),
    ("unmarked", fix_bitmap),
]


ONCE_PER_PASS = (fix_checksums, fix_overlap, fix_lost_extents, fix_bitmap, fix_nlink)  # they look at everything themselves


def fix_allowed(f: Finding, mode: str) -> bool:
    return f.fix is not None and (f.fix == "p" or mode == "y") and mode in ("p", "y")


def run_pass(r: Repair, flat: list[Finding], todo: set[str], seen: dict[tuple, Finding]) -> None:
    """One pass: each repair, in FIXERS order, on what the checks find now for its code
    (a repair that looks at everything itself runs once a pass); the findings it answers
    are marked repaired (the next checks tell whether they were)."""
    mode = r.mode
    ran = set()
    for code, fixer in FIXERS:
        if code not in todo:
            continue
        if not (fixer in ran and fixer in ONCE_PER_PASS):
            name = next(f.check for f in flat if f.code == code)
            fresh = [f for f in check.run_check(name, r.view()) if f.code == code and fix_allowed(f, mode)]
            if fresh:  # (a fixer that found nothing to do for one code may still be needed by the next)
                ran.add(fixer)
                fixer(r, fresh)
        for f in flat:
            if f.code == code and fix_allowed(f, mode):
                seen.setdefault(f.key, f).repaired = True
                f.repaired = True
