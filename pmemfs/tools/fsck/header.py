"""The region's header, checked and repaired before the tables: the journal (an
interrupted transaction rolled back first, as mount does) and both superblock copies
(the one to trust chosen, the other compared with it and rewritten from it)."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import Finding
from ...media.format import (
    HWM_STEP,
    JOURNAL_OFFSET,
    JOURNAL_SIZE_DEFAULT,
    SB_STRUCT,
    TABLE_NAMES,
    FormatError,
    Geometry,
    Superblock,
    Tables,
)
from ...media.journal import HEADER_SIZE, Journal, format_journal
from .image import Image, find_backup
from .repair import Repair
from .report import Report

Undone = list[tuple[int, bytes, bytes]]  # (offset, bytes before, after) of a rollback


def read_journal(img: Image) -> tuple[list[Finding], list[tuple[int, int, bytes]], bool, bool]:
    """The journal sits at a fixed offset, readable before the superblock is believed:
    (its findings, its pending undo records, whether it is sound, whether a transaction
    was interrupted)."""
    jfind: list[Finding] = []
    try:
        j = Journal(img.buf, img.limit)
        pending = j.pending()
    except FormatError as e:
        jfind.append(Finding("journal", "error", "journal", f"journal: {e}", code="journal-damaged", fix="y"))
        return jfind, [], False, False
    if j.state != 0:
        jfind.append(Finding("journal", "warning", "journal",
                             f"an interrupted transaction ({len(pending)} undo record(s)) is rolled back",
                             code="journal-active", fix="p"))
    return jfind, pending, True, j.state != 0


def read_superblocks(buf: memoryview, size: int, backup: tuple[Superblock | None, int] = (None, 0)
                     ) -> tuple[Superblock | None, list[Finding], tuple[Superblock | None, int]]:
    """(the primary or None, its findings, (the backup or None, its offset)); the backup
    is searched for only when the primary is unusable and none was found before."""
    sb, found = check.check_superblock_raw(buf[:SB_STRUCT], size)
    if sb is None and backup[0] is None:
        backup = find_backup(buf, size)
    return sb, found, backup


def roll_back(img: Image, report: Report, pending: list[tuple[int, int, bytes]],
              jfind: list[Finding]) -> Undone:
    """Undo the interrupted transaction as mount does (Journal.recover); for -n in the
    private copy, so the region is not touched. Returns what the rollback changed."""
    buf = img.buf
    before = [(off, bytes(buf[off:off + length])) for off, length, _ in pending]
    Journal(buf, img.limit).recover()
    undone = [(off, old, bytes(buf[off:off + len(old)])) for off, old in before]
    if report.mode != "n":
        jfind[0].repaired = True
        report.modified = True
    return undone


def choose_superblock(report: Report, sb: Superblock | None, sb_find: list[Finding],
                      bsb: Superblock | None) -> tuple[Superblock | None, bool]:
    """The superblock to check the region by: (it or None, whether it is the backup, whose
    high-water marks may be stale)."""
    if sb is not None:
        report.superblock = "primary"
        return sb, False
    report.superblock = "backup" if bsb is not None else None
    if bsb is None:
        for f in sb_find:
            f.fix = None
        sb_find.append(Finding("superblock", "error", "backup superblock",
                               "no valid backup superblock found: nothing to check", code="no-backup"))
        return None, False
    for f in sb_find:
        f.message += "; the backup superblock is valid"
    return bsb, True


def backup_findings(report: Report, buf: memoryview, size: int, g: Geometry) -> list[Finding]:
    """Is the backup superblock sound and the same as the primary (in what never changes)?"""
    if report.superblock != "primary":
        return []
    raw_b = bytes(buf[g.backup_offset:g.backup_offset + SB_STRUCT])
    b_sb, _ = check.check_superblock_raw(raw_b, size)
    if b_sb is None:
        return [Finding("backup-superblock", "error", "backup superblock",
                        f"backup superblock at {g.backup_offset} is damaged", code="backup", fix="p")]
    differ = check.compare_backup(bytes(buf[:SB_STRUCT]), raw_b)
    if differ:
        return [Finding("backup-superblock", "error", "backup superblock",
                        f"backup superblock differs from the primary in {', '.join(differ[:5])}",
                        code="backup", fix="p")]
    return []


def reset_journal(buf: memoryview, g: Geometry) -> None:
    """A damaged journal starts afresh (-y: its undo records are lost)."""
    data_start = g.data_start_block * g.block_size
    jsize = g.journal_size if JOURNAL_OFFSET + g.journal_size <= data_start else JOURNAL_SIZE_DEFAULT
    np.frombuffer(buf, np.uint8, HEADER_SIZE, JOURNAL_OFFSET)[:] = 0
    format_journal(buf, jsize)


def high_water_marks(buf: memoryview, sb: Superblock, from_backup: bool) -> dict[str, int]:
    """How far each table is read: the superblock's marks, or, when they come from the
    backup (written only at mkfs), recomputed from the tables."""
    g = sb.geometry
    hwm = {n: (getattr(g, f"{n}_count") if from_backup else int(sb.hwm[n])) for n in TABLE_NAMES}
    if from_backup:
        hwm = _true_hwm(Tables(buf, sb), hwm)
    return hwm


def repair_primary(buf: memoryview, sb: Superblock, hwm: dict[str, int], boff: int,
                   found: list[Finding], report: Report) -> None:
    """Rewrite the primary superblock from the backup at boff, with true high-water marks."""
    r = Repair(buf, sb, hwm)
    r.save_bytes(0, SB_STRUCT)
    raw = bytearray(buf[boff:boff + SB_STRUCT])
    buf[0:SB_STRUCT] = bytes(raw)
    for n in TABLE_NAMES:
        r.sbv[f"{n}_hwm"] = hwm[n]
    check.format_seal_sb(r.sbv)
    r.commit()
    for f in found:
        f.repaired = True
    report.modified = True
    report.superblock = "backup"


def repair_backup(buf: memoryview, sb: Superblock, hwm: dict[str, int], found: list[Finding],
                  report: Report) -> None:
    """Rewrite the backup superblock from the (sound) primary."""
    g = sb.geometry
    raw = bytes(buf[:SB_STRUCT])
    r = Repair(buf, sb, hwm)
    r.save_bytes(g.backup_offset, SB_STRUCT)
    buf[g.backup_offset:g.backup_offset + SB_STRUCT] = raw
    r.commit()
    for f in found:
        f.repaired = True
    report.modified = True


def _true_hwm(t: Tables, full: dict[str, int]) -> dict[str, int]:
    """High-water marks recomputed from the tables (used when the backup's may be stale)."""
    keys = {"inode": t.inodes["kind"], "extent": t.extents["owner"], "dirent": t.dirents["parent"],
            "blob": t.blobs["owner"], "pack": t.packs["block"]}
    out = {}
    for n, arr in keys.items():
        used = np.flatnonzero(arr[: full[n]] != 0)
        top = int(used[-1]) + 1 if len(used) else 1
        out[n] = min(full[n], max(HWM_STEP, -(-top // HWM_STEP) * HWM_STEP))
    return out
