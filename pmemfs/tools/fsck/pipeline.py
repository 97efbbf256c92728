"""The run: roll back the journal, choose and repair the superblock, then check the
tables and repair them in passes until nothing that may be repaired is left."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import (
    HWM_STEP,
    JOURNAL_OFFSET,
    JOURNAL_SIZE_DEFAULT,
    SB_STRUCT,
    TABLE_NAMES,
    FormatError,
    Superblock,
    Tables,
)
from ...media.journal import HEADER_SIZE, Journal, format_journal
from .fixers import FIXERS, ONCE_PER_PASS, _allowed
from .image import _Image, find_backup, save_metadata
from .repair import Repair
from .report import Report

MAX_PASSES = 8


MODES = ("n", "p", "y")


def fsck(path: str, mode: str = "n", backup: str | None = None,
         progress: Callable[[int], None] | None = None,
         on_check: Callable[[str, list[Finding]], None] | None = None) -> Report:
    """Check (mode "n") or repair ("p", "y") the region at path; returns the report.

    Raises RegionError/FsckError (exit 8) when the region cannot be opened or is locked.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of n, p, y")
    started = time.monotonic()
    report = Report(path, mode)
    img = _Image(path, writable=mode != "n")
    try:
        if mode == "n":
            report.holder = img.holder()
            report.live = report.holder is not None
        _run(img, report, backup, progress, on_check)
    finally:
        img.close()
    report.elapsed = time.monotonic() - started
    return report


def _note(report: Report, name: str, found: list[Finding], on_check, progress) -> None:
    report.checks.append(name)
    report.findings.extend(found)
    if on_check:
        on_check(name, found)
    if progress:
        progress(1)


def _run(img: _Image, report: Report, backup: str | None, progress, on_check) -> None:
    buf, size, mode = img.buf, img.size, report.mode
    repair = mode != "n"
    # 1. The journal sits at a fixed offset: roll back an interrupted transaction first,
    #    as mount does (Journal.recover), before believing the superblock.
    jfind: list[Finding] = []
    journal_ok = False
    journal_active = False
    try:
        j = Journal(buf, img.limit)
        pending = j.pending()
        journal_ok = True
        if j.state != 0:
            journal_active = True
            jfind.append(Finding("journal", "warning", "journal",
                                 f"an interrupted transaction ({len(pending)} undo record(s)) is rolled back",
                                 code="journal-active", fix="p"))
    except FormatError as e:
        jfind.append(Finding("journal", "error", "journal", f"journal: {e}", code="journal-damaged", fix="y"))
    # The superblock tells where the metadata ends: needed for --backup before any write.
    sb, sb_find = check.check_superblock_raw(buf[:SB_STRUCT], size)
    bsb, boff = (None, 0)
    if sb is None:
        bsb, boff = find_backup(buf, size)
    use = sb or bsb
    if backup and use is not None:
        g = use.geometry
        save_metadata(img.fd, g.data_start_block * g.block_size, backup)
        report.backup_file = backup
    undone: list[tuple[int, bytes, bytes]] = []  # (offset, bytes before, after) of a rollback
    if journal_ok and journal_active and (img.private or repair):
        before = [(off, bytes(buf[off:off + length])) for off, length, _ in pending]
        Journal(buf, img.limit).recover()  # a private copy for -n: the region is not touched
        undone = [(off, old, bytes(buf[off:off + len(old)])) for off, old in before]
        if repair:
            jfind[0].repaired = True
            report.modified = True
        sb, sb_find = check.check_superblock_raw(buf[:SB_STRUCT], size)
        if sb is None and bsb is None:
            bsb, boff = find_backup(buf, size)
    _note(report, "journal", jfind, on_check, progress)
    # 2. Superblock, layout, backup superblock.
    hwm_full = False
    if sb is None:
        report.superblock = "backup" if bsb is not None else None
        if bsb is None:
            for f in sb_find:
                f.fix = None
            sb_find.append(Finding("superblock", "error", "backup superblock",
                                   "no valid backup superblock found: nothing to check", code="no-backup"))
            _note(report, "superblock", sb_find, on_check, progress)
            return
        for f in sb_find:
            f.message += "; the backup superblock is valid"
        sb, hwm_full = bsb, True
    else:
        report.superblock = "primary"
    sup = [f for f in sb_find if f.check == "superblock"]
    lay = [f for f in sb_find if f.check == "layout"]
    g = sb.geometry
    bfind: list[Finding] = []
    if report.superblock == "primary":
        raw_b = bytes(buf[g.backup_offset:g.backup_offset + SB_STRUCT])
        b_sb, _ = check.check_superblock_raw(raw_b, size)
        if b_sb is None:
            bfind.append(Finding("backup-superblock", "error", "backup superblock",
                                 f"backup superblock at {g.backup_offset} is damaged", code="backup", fix="p"))
        else:
            differ = check.compare_backup(bytes(buf[:SB_STRUCT]), raw_b)
            if differ:
                bfind.append(Finding("backup-superblock", "error", "backup superblock",
                                     f"backup superblock differs from the primary in {', '.join(differ[:5])}",
                                     code="backup", fix="p"))
    data_start = g.data_start_block * g.block_size
    # Damaged journal: -y starts it afresh (its undo records are lost).
    if not journal_ok and mode == "y":
        jsize = g.journal_size if JOURNAL_OFFSET + g.journal_size <= data_start else JOURNAL_SIZE_DEFAULT
        np.frombuffer(buf, np.uint8, HEADER_SIZE, JOURNAL_OFFSET)[:] = 0
        format_journal(buf, jsize)
        jfind[0].repaired = True
        report.modified = journal_ok = True
    can_write = repair and journal_ok
    hwm = {n: (getattr(g, f"{n}_count") if hwm_full else int(sb.hwm[n])) for n in TABLE_NAMES}
    if hwm_full:
        hwm = _true_hwm(Tables(buf, sb), hwm)
    if (sup or lay) and can_write:
        r = Repair(buf, sb, hwm)
        r.save_bytes(0, SB_STRUCT)
        raw = bytearray(buf[boff:boff + SB_STRUCT])
        buf[0:SB_STRUCT] = bytes(raw)
        for n in TABLE_NAMES:
            r.sbv[f"{n}_hwm"] = hwm[n]
        check.format_seal_sb(r.sbv)
        r.commit()
        for f in sup + lay:
            f.repaired = True
        report.modified = True
        report.superblock = "backup"
    _note(report, "superblock", sup, on_check, progress)
    _note(report, "layout", lay, on_check, progress)
    if bfind and can_write:
        raw = bytes(buf[:SB_STRUCT])
        r = Repair(buf, sb, hwm)
        r.save_bytes(g.backup_offset, SB_STRUCT)
        buf[g.backup_offset:g.backup_offset + SB_STRUCT] = raw
        r.commit()
        for f in bfind:
            f.repaired = True
        report.modified = True
    _note(report, "backup-superblock", bfind, on_check, progress)
    # 3. The tables.
    t = Tables(buf, sb)
    first = _table_checks(t, sb, hwm)
    if not can_write:
        for name in check.TABLE_CHECKS:
            _note(report, name, first[name], on_check, progress)
        return
    seen: dict[tuple, Finding] = {}
    for name in check.TABLE_CHECKS:
        for f in first[name]:
            seen.setdefault(f.key, f)
    r = Repair(buf, sb, hwm)
    r.mode = mode
    for ino in _rolled_back(buf, sb, undone):
        r.note(ino, "rolled-back", "an interrupted transaction was rolled back (as mount does): "
                                   "a change it was making to this file was undone")
    if r.notes or any(_allowed(f, mode) for fs in first.values() for f in fs):
        r.snapshot()
    current = first
    # -p repairs nothing in the tables when the damage needs -y: its safe repairs (block
    # counts, the bitmap, dropping what points nowhere) would destroy evidence -y uses.
    stop = mode == "p" and any(f.fix == "y" for fs in first.values() for f in fs)
    for _ in range(0 if stop else MAX_PASSES):
        flat = [f for fs in current.values() for f in fs]
        todo = {f.code for f in flat if _allowed(f, mode)}
        if not todo:
            break
        report.passes += 1
        ran = set()
        for code, fixer in FIXERS:
            if code not in todo:
                continue
            if not (fixer in ran and fixer in ONCE_PER_PASS):
                name = next(f.check for f in flat if f.code == code)
                fresh = [f for f in check.run_check(name, r.view()) if f.code == code and _allowed(f, mode)]
                if fresh:  # (a fixer that found nothing to do for one code may still be needed by the next)
                    ran.add(fixer)
                    fixer(r, fresh)
            for f in flat:
                if f.code == code and _allowed(f, mode):
                    seen.setdefault(f.key, f).repaired = True
                    f.repaired = True
        r.commit()
        report.modified = report.modified or r.changed
        current = _table_checks(t, sb, r.hwm)
        for fs in current.values():
            for f in fs:
                seen.setdefault(f.key, f)
    r.commit()
    final = current  # the checks after the last pass (or the first, if none ran)
    left = {f.key for fs in final.values() for f in fs}
    by_check: dict[str, list[Finding]] = {n: [] for n in check.TABLE_CHECKS}
    for f in seen.values():
        f.repaired = f.key not in left  # (one a pass left behind and a later pass undid is repaired too)
        by_check.setdefault(f.check, []).append(f)
    for fs in final.values():
        for f in fs:
            if f.key not in seen:
                by_check.setdefault(f.check, []).append(f)
    for f in seen.values():  # what became of each record that failed its checksum
        if f.code in ("checksum", "free-damaged"):
            said = [r.outcome[(f.data["table"], i)] for i in f.data.get("index", [])
                    if (f.data["table"], i) in r.outcome]
            if len(f.data.get("index", [])) == 1 and said:
                f.message += f": {said[0]}"
            elif said:
                restored = sum(s.startswith("restored") for s in said)
                f.message += f" ({restored} restored exactly from their checksums)"
    for name in check.TABLE_CHECKS:
        _note(report, name, by_check.get(name, []), on_check, progress)
    report.files = r.changes()
    del t, r


def _rolled_back(buf: memoryview, sb: Superblock, undone: list[tuple[int, bytes, bytes]]) -> list[int]:
    """The inodes whose records a journal rollback changed (before or after it)."""
    g = sb.geometry
    t = Tables(buf, sb)
    tables = {"inode": t.inodes, "extent": t.extents, "dirent": t.dirents, "blob": t.blobs}
    who = {"inode": None, "extent": "owner", "dirent": "ino", "blob": "owner"}
    out: dict[int, None] = {}
    for off, old, new in undone:
        if old == new:
            continue
        for name, arr in tables.items():
            size, base = arr.dtype.itemsize, g.offsets[name]
            lo, hi = max(off, base), min(off + len(old), base + len(arr) * size)
            for idx in range((lo - base) // size, (hi - 1 - base) // size + 1) if lo < hi else ():
                rs = base + idx * size
                a, b = max(rs, off), min(rs + size, off + len(old))
                if old[a - off:b - off] == new[a - off:b - off]:
                    continue
                now = bytearray(arr[idx:idx + 1].tobytes())
                was = bytearray(now)
                was[a - rs:b - rs] = old[a - off:b - off]
                for rec in (np.frombuffer(bytes(was), arr.dtype)[0], np.frombuffer(bytes(now), arr.dtype)[0]):
                    ino = idx if who[name] is None else int(rec[who[name]])
                    if ino and (who[name] is not None or int(rec["kind"])):
                        out[int(ino)] = None
    del t
    return list(out)


def _table_checks(t: Tables, sb: Superblock, hwm: dict[str, int]) -> dict[str, list[Finding]]:
    v = View(t, sb, hwm)
    return {name: list(fn(v)) for name, fn in check.CHECKS}


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


def check_region(path: str) -> list[Finding]:
    """Open a region read-only (no lock: allowed while mounted) and run every check.

    This is `pmemfs-fsck -n` through its Python API; the journal is rolled back in a
    private copy first, exactly as a mount would.
    """
    return fsck(path, mode="n").findings
