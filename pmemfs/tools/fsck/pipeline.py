"""The run: roll back the journal, choose and repair the superblock, then check the
tables and repair them in passes until nothing that may be repaired is left."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import (
    Superblock,
    Tables,
)
from . import header
from .fixers import fix_allowed, run_pass
from .image import Image, save_metadata
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
    img = Image(path, writable=mode != "n")
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


def _run(img: Image, report: Report, backup: str | None, progress, on_check) -> None:
    note = functools.partial(_note, report, on_check=on_check, progress=progress)
    buf, size, mode = img.buf, img.size, report.mode
    repair = mode != "n"
    # 1. The journal: an interrupted transaction is rolled back before the superblock is
    #    believed. The superblock tells where the metadata ends: --backup needs it first.
    jfind, pending, journal_ok, journal_active = header.read_journal(img)
    sb, sb_find, (bsb, boff) = header.read_superblocks(buf, size)
    use = sb or bsb
    if backup and use is not None:
        g = use.geometry
        save_metadata(img.fd, g.data_start_block * g.block_size, backup)
        report.backup_file = backup
    undone: header.Undone = []
    if journal_ok and journal_active and (img.private or repair):
        undone = header.roll_back(img, report, pending, jfind)
        sb, sb_find, (bsb, boff) = header.read_superblocks(buf, size, (bsb, boff))
    note("journal", jfind)
    # 2. Superblock, layout, backup superblock.
    sb, hwm_full = header.choose_superblock(report, sb, sb_find, bsb)
    if sb is None:
        note("superblock", sb_find)
        return
    sup = [f for f in sb_find if f.check == "superblock"]
    lay = [f for f in sb_find if f.check == "layout"]
    bfind = header.backup_findings(report, buf, size, sb.geometry)
    if not journal_ok and mode == "y":
        header.reset_journal(buf, sb.geometry)
        jfind[0].repaired = True
        report.modified = journal_ok = True
    can_write = repair and journal_ok
    hwm = header.high_water_marks(buf, sb, hwm_full)
    if (sup or lay) and can_write:
        header.repair_primary(buf, sb, hwm, boff, sup + lay, report)
    note("superblock", sup)
    note("layout", lay)
    if bfind and can_write:
        header.repair_backup(buf, sb, hwm, bfind, report)
    note("backup-superblock", bfind)
    # 3. The tables.
    _tables(buf, sb, hwm, undone, report, note, can_write)


def _tables(buf: memoryview, sb: Superblock, hwm: dict[str, int], undone: header.Undone,
            report: Report, note: Callable[[str, list[Finding]], None], can_write: bool) -> None:
    """Check the tables; when repairs may be written, repair them in passes, then report
    each finding once, as repaired or not, and what became of each damaged record."""
    t = Tables(buf, sb)
    first = _table_checks(t, sb, hwm)
    if not can_write:
        for name in check.TABLE_CHECKS:
            note(name, first[name])
        return
    mode = report.mode
    r = Repair(buf, sb, hwm)
    r.mode = mode
    for ino in _rolled_back(buf, sb, undone):
        r.note(ino, "rolled-back", "an interrupted transaction was rolled back (as mount does): "
                                   "a change it was making to this file was undone")
    if r.notes or any(fix_allowed(f, mode) for fs in first.values() for f in fs):
        r.snapshot()
    seen, final = _passes(r, t, sb, first, report)
    by_check = _merged(seen, final)
    _say_outcomes(r, seen)
    for name in check.TABLE_CHECKS:
        note(name, by_check.get(name, []))
    report.files = r.changes()
    del t, r  # (views of the mapping: gone before it is closed)


def _passes(r: Repair, t: Tables, sb: Superblock, first: dict[str, list[Finding]],
            report: Report) -> tuple[dict[tuple, Finding], dict[str, list[Finding]]]:
    """Repair in passes until the checks find nothing more to repair (at most MAX_PASSES):
    (every finding seen, by key; the checks after the last pass, or the first if none ran)."""
    mode = r.mode
    seen: dict[tuple, Finding] = {}
    for name in check.TABLE_CHECKS:
        for f in first[name]:
            seen.setdefault(f.key, f)
    current = first
    # -p repairs nothing in the tables when the damage needs -y: its safe repairs (block
    # counts, the bitmap, dropping what points nowhere) would destroy evidence -y uses.
    stop = mode == "p" and any(f.fix == "y" for fs in first.values() for f in fs)
    for _ in range(0 if stop else MAX_PASSES):
        flat = [f for fs in current.values() for f in fs]
        todo = {f.code for f in flat if fix_allowed(f, mode)}
        if not todo:
            break
        report.passes += 1
        run_pass(r, flat, todo, seen)
        r.commit()
        report.modified = report.modified or r.changed
        current = _table_checks(t, sb, r.hwm)
        for fs in current.values():
            for f in fs:
                seen.setdefault(f.key, f)
    r.commit()
    return seen, current


def _merged(seen: dict[tuple, Finding], final: dict[str, list[Finding]]) -> dict[str, list[Finding]]:
    """Each finding once, by check: repaired unless the last checks still find it."""
    left = {f.key for fs in final.values() for f in fs}
    by_check: dict[str, list[Finding]] = {n: [] for n in check.TABLE_CHECKS}
    for f in seen.values():
        f.repaired = f.key not in left  # (one a pass left behind and a later pass undid is repaired too)
        by_check.setdefault(f.check, []).append(f)
    for fs in final.values():
        for f in fs:
            if f.key not in seen:
                by_check.setdefault(f.check, []).append(f)
    return by_check


def _say_outcomes(r: Repair, seen: dict[tuple, Finding]) -> None:
    """What became of each record that failed its checksum, in its finding's message."""
    for f in seen.values():
        if f.code in ("checksum", "free-damaged"):
            said = [r.outcome[(f.data["table"], i)] for i in f.data.get("index", [])
                    if (f.data["table"], i) in r.outcome]
            if len(f.data.get("index", [])) == 1 and said:
                f.message += f": {said[0]}"
            elif said:
                restored = sum(s.startswith("restored") for s in said)
                f.message += f" ({restored} restored exactly from their checksums)"


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


def check_region(path: str) -> list[Finding]:
    """Open a region read-only (no lock: allowed while mounted) and run every check.

    This is `pmemfs-fsck -n` through its Python API; the journal is rolled back in a
    private copy first, exactly as a mount would.
    """
    return fsck(path, mode="n").findings
