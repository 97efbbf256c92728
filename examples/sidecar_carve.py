#!/usr/bin/env python3
"""Demo 5: carve memory out of a running guest to start a side-car VM, without copying.

A "guest" keeps its RAM file mapped (MAP_SHARED, through the mount) and keeps
writing into its first page. The host carves 512 MiB out of the middle of that RAM
into a new file for a side-car VM: the blocks change owner in one journaled step, no
byte is copied. The new file holds exactly those bytes, the guest file has a hole
there, and the rest of the guest is untouched while the guest went on running.

    python examples/sidecar_carve.py [--guest 2G] [--carve 512M]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import struct
import time

import numpy as np
from _common import Demo, cli, drop_caches, fail, proved, step

CHUNK = 64 << 20


def pattern(offset: int, length: int) -> bytes:
    words = np.arange(offset // 8, (offset + length) // 8, dtype=np.uint64) * np.uint64(0x9E3779B1)
    return words.tobytes()


def guest(path: str, stop_at: float) -> None:
    """A running guest: it keeps bumping a counter in its first page."""
    with open(path, "r+b") as f:
        mem = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            mem[:8] = struct.pack("<Q", n)
        mem.flush()
        mem.close()


def main() -> int:
    from pmemfs.tools.common import parse_size

    ap = argparse.ArgumentParser(description="carve a side-car VM's memory out of a running guest")
    ap.add_argument("--guest", default="2G")
    ap.add_argument("--carve", default="512M")
    a = ap.parse_args()
    size, carve = parse_size(a.guest), parse_size(a.carve)
    offset = (size // 2) // (2 << 20) * (2 << 20)
    with Demo("sidecar", str(size * 2 + (64 << 20))) as demo:
        ram, side = demo.p("guest-ram"), demo.p("sidecar-ram")
        step(f"guest RAM: {size >> 20} MiB, preallocated in aligned runs, filled with a pattern")
        cli("pmemfs", "prealloc", ram, str(size), "--align", "1G")
        with open(ram, "r+b") as f:
            for off in range(0, size, CHUNK):
                f.write(pattern(off, min(CHUNK, size - off)))
        before = {tuple(x) for x in json.loads(os.getxattr(ram, b"user.pmemfs.extents"))}
        g = multiprocessing.get_context("fork").Process(target=guest, args=(ram, time.monotonic() + 3))
        g.start()
        time.sleep(0.5)
        step(f"the guest is running; carve {carve >> 20} MiB at offset {offset >> 20} MiB into {side}")
        started = time.monotonic()
        r = cli("pmemfs", "carve", ram, str(offset), str(carve), side)
        print(f"  {r.stdout.strip()} in {(time.monotonic() - started) * 1000:.0f} ms")
        g.join()
        if g.exitcode != 0:
            fail("the guest died during the carve")
        proved("the guest kept running through the carve")
        side_ext = json.loads(os.getxattr(side, b"user.pmemfs.extents"))
        old_home = [(fo, ro, ln) for fo, ro, ln in before if fo <= offset < fo + ln]
        if not old_home or side_ext[0][1] != old_home[0][1] + (offset - old_home[0][0]):
            fail("the side-car's blocks are not the guest's former blocks")
        proved(f"the side-car owns the guest's former blocks at region offset {side_ext[0][1]:#x}: nothing was copied")
        drop_caches()
        with open(side, "rb") as f:
            for off in range(0, carve, CHUNK):
                if f.read(min(CHUNK, carve - off)) != pattern(offset + off, min(CHUNK, carve - off)):
                    fail(f"side-car bytes at {off} are not the guest's")
        proved(f"the side-car holds exactly the {carve >> 20} MiB carved out")
        with open(ram, "rb") as f:
            head = f.read(8)
            f.seek(8)
            for off in range(8, size, CHUNK):
                n = min(CHUNK, size - off)
                got = f.read(n)
                want = bytearray(pattern(off, n))
                lo, hi = max(off, offset), min(off + n, offset + carve)
                if lo < hi:
                    want[lo - off:hi - off] = bytes(hi - lo)
                if got != bytes(want):
                    fail(f"guest RAM changed at {off}")
        counter = struct.unpack("<Q", head)[0]
        if counter == 0:
            fail("the guest's own writes are missing")
        proved(f"the guest has a hole where the side-car's memory was; everything else is as it was "
               f"(and its own counter reached {counter})")
    print("the side-car VM got its memory without a copy, and the guest never stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
