"""Reading a region's description without changing it (allowed while mounted)."""

from __future__ import annotations

import time

import numpy as np

from ..media.format import (
    FEATURE_COMPAT_SPARSE,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
    STATE_CLEAN,
    TABLE_NAMES,
    TIME_MAX_S,
    TIME_MIN_S,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    read_superblock,
)
from ..media.journal import Journal
from ..media.region import Region, backing_free
from ..serve.mounting import region_holder


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9)) if ns else "never"


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _read_live_superblock(region: Region):
    """The primary superblock, read without the lock: a running daemon may be in the
    middle of updating it (state, generation, high-water marks), so a checksum
    mismatch is retried for a moment before the backup is believed."""
    for _ in range(50):
        try:
            return read_superblock(region.buf, region.size, fd=region.fd)
        except FormatError:
            time.sleep(0.002)
    return read_superblock(region.buf, region.size, allow_backup=True, fd=region.fd)


def _block_counts(t: Tables, g: Geometry) -> tuple[int, int, int]:
    """(used, free, bad) data blocks."""
    bits = np.unpackbits(t.bitmap, bitorder="little")[g.data_start_block: g.block_count]
    badbits = np.unpackbits(t.badmap, bitorder="little")[g.data_start_block: g.block_count]
    # A block can be both used and bad (a block that went bad under a file): count
    # it once, as the allocator does (free = neither used nor bad).
    return int(bits.sum()), int(np.count_nonzero((bits | badbits) == 0)), int(badbits.sum())


def _journal_state(region: Region, g: Geometry) -> str:
    try:
        return "idle" if Journal(region.buf, g.data_start_block * g.block_size).state == 0 \
            else "interrupted transaction"
    except Exception as e:  # a damaged journal is worth reporting, not fatal here
        return f"damaged ({e})"


def _reservation(region: Region, sb: Superblock, held: int) -> str:
    """How the backing holds the region's memory."""
    if region.kind == "devdax":
        return "the device (its memory is the region)"
    if not region.memory:
        return "none (a file on a disk filesystem)"
    if sb.feature_compat & FEATURE_COMPAT_SPARSE:
        return "sparse (overcommitted: blocks are reserved as they are used)"
    if held < region.size:
        return "sparse (not wholly reserved: served as overcommitted)"
    return "reserved"


def describe(path: str) -> dict:
    with Region(path, writable=False, lock=False) as region:
        sb, which = _read_live_superblock(region)
        g = sb.geometry
        t = Tables(region.buf, sb)
        hwm = {n: min(sb.hwm[n], getattr(g, f"{n}_count")) for n in TABLE_NAMES}
        used_data, free, bad = _block_counts(t, g)
        kinds = t.inodes["kind"][1: hwm["inode"]]
        journal_state = _journal_state(region, g)
        holder = region_holder(path)
        held = region.allocated()
        reservation = _reservation(region, sb, held)
        data = {
            "region": path,
            "backing": region.kind,
            "reservation": reservation,
            "backing_held_bytes": held,  # memory (or disk) the backing holds for the region now
        }
        if region.memory:
            data["backing_free_bytes"] = backing_free(path) or 0
        data |= {
            "superblock": which,
            "format_version": f"{sb.version_major}.{sb.version_minor}",
            "features": f"compat 0x{sb.feature_compat:x} incompat 0x{sb.feature_incompat:x} "
                        f"ro_compat 0x{sb.feature_ro_compat:x}",
            "uuid": sb.uuid_str,
            "label": sb.label,
            "created": _when(sb.create_time_ns),
            "region_size": g.region_size,
            "block_size": g.block_size,
            "max_file_size": g.max_file_size,  # s_maxbytes: larger writes and truncates get EFBIG
            # s_time_min .. s_time_max: times outside are stored clamped to these
            "time_range": f"{_utc(TIME_MIN_S)} .. {_utc(TIME_MAX_S)}",
            "data_blocks": g.data_blocks,
            "used_blocks": used_data,
            "free_blocks": free,
            "bad_blocks": bad,
            "inodes_total": g.inode_count - 1,
            "inodes_used": int(np.count_nonzero(kinds)),
            "files": int(np.count_nonzero(kinds == KIND_REG)),
            "directories": int(np.count_nonzero(kinds == KIND_DIR)),
            "kernel_objects": int(np.count_nonzero(kinds == KIND_KOBJ)),
            "metadata_bytes": g.data_start_block * g.block_size,
            "state": "clean" if sb.state == STATE_CLEAN else "dirty",
            "journal": journal_state,
            "mount_generation": sb.mount_generation,
            "last_mount": _when(sb.last_mount_ns),
            "last_unmount": _when(sb.last_umount_ns),
            "mounted_by_pid": holder or 0,
        }
        del t, kinds  # views of the mapping: gone before it closes
        return data
