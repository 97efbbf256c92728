#!/usr/bin/env python3
"""Demo 1: guest memory survives a simulated kexec (kill -9 of the daemon).

Writes a multi-GiB "guest RAM" file with a known pattern on pmemfs, kills the
daemon with SIGKILL, mounts the region again with a new daemon, and checks every
byte. Prints the downtime: from the old daemon's death to the new mount answering.

    python examples/guest_memory.py [--size 2G] [--region PATH] [--keep]
"""

from __future__ import annotations

import argparse
import errno
import os
import time
import zlib

import numpy as np
from _common import Demo, cli, drop_caches, fail, proved, step

CHUNK = 64 << 20
SEED = 0x9E3779B97F4A7C15


MULT = np.uint64(0x100000001B3)
_BASE = np.arange(CHUNK // 8, dtype=np.uint64) * MULT


def pattern(offset: int, length: int) -> np.ndarray:
    """Every 8-byte word says where it lives: a torn or misplaced page cannot pass."""
    words = _BASE[: length // 8] + np.uint64((offset // 8) * int(MULT) % (1 << 64))
    words ^= np.uint64(SEED)
    return words


def main() -> int:
    from pmemfs.cli import parse_size

    ap = argparse.ArgumentParser(description="guest memory survives kill -9 of the pmemfs daemon")
    ap.add_argument("--size", default="2G", help="guest RAM size (default 2G)")
    ap.add_argument("--region", help="region path (default /dev/shm/pmemfs-demo.region)")
    ap.add_argument("--keep", action="store_true", help="keep the region afterwards")
    a = ap.parse_args()
    guest = parse_size(a.size)
    guest -= guest % CHUNK if guest > CHUNK else guest % 8
    region_size = (guest + (64 << 20) + (2 << 20) - 1) // (2 << 20) * (2 << 20) + (32 << 20)
    with Demo("demo", str(region_size), a.region, a.keep) as demo:
        path = demo.p("guest-ram")
        step(f"the guest writes {guest >> 20} MiB of RAM with a known pattern")
        crc = 0
        started = time.monotonic()
        with open(path, "wb") as f:
            for off in range(0, guest, CHUNK):
                data = pattern(off, min(CHUNK, guest - off)).tobytes()
                crc = zlib.crc32(data, crc)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        secs = time.monotonic() - started
        print(f"  wrote {guest >> 20} MiB in {secs:.2f} s, pattern and crc32 included "
              f"({guest / secs / 1e9:.2f} GB/s), crc32 {crc:08x}")

        step("kexec: kill -9 the daemon")
        died = demo.kill9()
        try:
            os.statvfs(demo.mp)
            fail("the mount still answers after its daemon was killed")
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                fail(f"unexpected error from the dead mount: {e}")
        proved("the old mount is dead (Transport endpoint is not connected)")

        step("a new daemon mounts the same region (pmemfs mount clears the dead mountpoint)")
        demo.mount()
        downtime = (time.monotonic() - died) * 1000
        print(f"  {demo.last_mount_line}")
        proved(f"downtime from the old daemon's death to the new mount answering: {downtime:.0f} ms")

        step("verify every byte of guest RAM through the new daemon")
        drop_caches()
        check = 0
        with open(path, "rb") as f:
            for off in range(0, guest, CHUNK):
                n = min(CHUNK, guest - off)
                got = f.read(n)
                check = zlib.crc32(got, check)
                if got != pattern(off, n).tobytes():
                    bad = np.flatnonzero(np.frombuffer(got, np.uint64) != pattern(off, n))
                    fail(f"guest RAM differs at byte {off + 8 * int(bad[0])}")
        if check != crc:
            fail(f"crc32 {check:08x} != {crc:08x}")
        proved(f"all {guest >> 20} MiB intact, crc32 {check:08x}")
        extents = cli("pmemfs", "info", "--json", demo.region).stdout
        print("  region after the restart:", " ".join(
            f"{k}={v}" for k, v in __import__("json").loads(extents).items()
            if k in ("state", "mount_generation", "used_blocks", "files")))

        step("again with a supervisor that replaces a dead daemon by a fork (pmemfs mount --respawn)")
        cli("pmemfs", "umount", demo.mp)
        demo.mount(respawn=True)
        died = demo.kill9()
        demo.wait_for_replacement(demo.last_killed)
        proved(f"downtime with --respawn: {(time.monotonic() - died) * 1000:.0f} ms "
               "(no interpreter start; what is left is the mount's O(metadata) check)")
        drop_caches()
        with open(path, "rb") as f:
            f.seek(guest - CHUNK)
            if f.read(CHUNK) != pattern(guest - CHUNK, CHUNK).tobytes():
                fail("guest RAM differs after the second restart")
        proved("guest RAM still intact after the second restart")
    print("guest memory survived the restart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
