"""The region-level checks: one superblock copy (magic, checksum, version, features,
layout) and whether the backup copy agrees with the primary."""

from __future__ import annotations

import numpy as np

from ..format import (
    FEATURE_INCOMPAT_KNOWN,
    FEATURE_RO_COMPAT_KNOWN,
    MAGIC,
    SB_STRUCT,
    SUPERBLOCK_DTYPE,
    VERSION_MAJOR,
    FormatError,
    Superblock,
    crc,
)
from .core import Finding


def check_superblock_raw(raw: bytes, region_size: int) -> tuple[Superblock | None, list[Finding]]:
    """Decode one superblock copy: (superblock or None, findings).

    Check "superblock" covers magic, checksum, version and features; "layout" covers
    the geometry: table offsets and sizes inside the region and not overlapping.
    """
    raw = bytes(raw[:SB_STRUCT])
    if len(raw) < SB_STRUCT:
        return None, [Finding("superblock", "error", "superblock", "region is smaller than a superblock",
                              code="sb-bad", fix=None)]
    rec = np.frombuffer(raw, SUPERBLOCK_DTYPE)[0]
    problem = None
    if bytes(rec["magic"]) != MAGIC:
        problem = "bad magic"
    elif crc(raw[:-4]) != int(rec["checksum"]):
        problem = "checksum mismatch"
    elif int(rec["version_major"]) != VERSION_MAJOR:
        problem = f"format version {int(rec['version_major'])} is not supported"
    elif int(rec["feature_incompat"]) & ~FEATURE_INCOMPAT_KNOWN:
        problem = f"unknown incompatible features 0x{int(rec['feature_incompat']) & ~FEATURE_INCOMPAT_KNOWN:x}"
    if problem:
        return None, [Finding("superblock", "error", "superblock", f"superblock: {problem}",
                              code="sb-bad", fix="p")]
    try:
        sb = Superblock.decode(raw, region_size)
    except FormatError as e:
        return None, [Finding("layout", "error", "superblock", str(e), code="sb-bad", fix="p")]
    findings = []
    unknown_ro = sb.feature_ro_compat & ~FEATURE_RO_COMPAT_KNOWN
    if unknown_ro:
        findings.append(Finding("superblock", "warning", "superblock",
                                f"unknown read-only-compatible features 0x{unknown_ro:x}: "
                                "only read-only use is possible", code="sb-ro-compat"))
    return sb, findings


STATIC_SB_FIELDS = [n for n in SUPERBLOCK_DTYPE.names if n not in (
    "state", "mount_generation", "last_mount_ns", "last_umount_ns", "checksum", "reserved",
    "inode_hwm", "extent_hwm", "dirent_hwm", "blob_hwm")]


def compare_backup(primary: bytes, backup: bytes) -> list[str]:
    """Fields that never change after mkfs and differ between the two copies."""
    a = np.frombuffer(primary[:SB_STRUCT], SUPERBLOCK_DTYPE)[0]
    b = np.frombuffer(backup[:SB_STRUCT], SUPERBLOCK_DTYPE)[0]
    return [n for n in STATIC_SB_FIELDS if a[n] != b[n]]


def format_seal_sb(sbv: np.ndarray) -> None:
    """Reseal the primary superblock's checksum after an in-place change."""
    from ..format import seal

    seal(sbv, 0)
