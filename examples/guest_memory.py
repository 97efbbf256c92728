#!/usr/bin/env python3
"""Demo 1: guest memory survives a simulated kexec (kill -9 of the daemon).

Writes a multi-GiB "guest RAM" file with a known pattern on pmemfs. A "vCPU" process
maps it shared and keeps touching it while the daemon is killed with SIGKILL and then
upgraded: the supervisor's standby takes the FUSE connection over each time, so the
vCPU sees a pause, never an error. Then every byte is checked, and once more after a
cold restart (the connection ends and the region is mounted afresh).

    python examples/guest_memory.py [--size 2G] [--region PATH] [--keep]
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import numpy as np
from _common import Demo, cli, drop_caches, fail, proved, step

from pmemfs.serve import mounting

CHUNK = 64 << 20
SEED = 0x9E3779B97F4A7C15


MULT = np.uint64(0x100000001B3)
_BASE = np.arange(CHUNK // 8, dtype=np.uint64) * MULT


def pattern(offset: int, length: int) -> np.ndarray:
    """Every 8-byte word says where it lives: a torn or misplaced page cannot pass."""
    words = _BASE[: length // 8] + np.uint64((offset // 8) * int(MULT) % (1 << 64))
    words ^= np.uint64(SEED)
    return words


VCPU = r"""
import mmap, os, sys, time, numpy as np
path, size, state, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, os.path.dirname(sys.argv[5]))
from guest_memory import pattern
fd = os.open(path, os.O_RDONLY)
ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
sfd = os.open(state, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(sfd, 1 << 20)
st = mmap.mmap(sfd, 1 << 20, mmap.MAP_SHARED)
rng = np.random.default_rng(1)
ticks, stall, last = 0, 0.0, time.monotonic()
while not os.path.exists(stop):
    off = int(rng.integers(size // 65536)) * 65536
    want = pattern(off, 65536).tobytes()
    if ram[off:off + 65536] != want:
        print(f"guest RAM differs at {off}", file=sys.stderr)
        sys.exit(1)
    os.posix_fadvise(fd, off, 65536, os.POSIX_FADV_DONTNEED)
    ticks += 1
    st[(ticks % 4096) * 8:(ticks % 4096) * 8 + 8] = ticks.to_bytes(8, "little")
    now = time.monotonic()
    stall, last = max(stall, now - last), now
st.flush()
print(ticks, stall)
"""


def start_vcpu(path: str, size: int, state: str):
    import subprocess
    import sys

    stop = state + ".stop"
    return subprocess.Popen([sys.executable, "-c", VCPU, path, str(size), state, stop,
                             os.path.abspath(__file__)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True), stop


def stop_vcpu(vcpu) -> tuple[int, float]:
    proc, stop = vcpu
    open(stop, "w").close()
    out, err = proc.communicate(timeout=120)
    os.unlink(stop)
    if proc.returncode != 0:
        fail(f"the vCPU failed: {err.strip()}")
    ticks, stall = out.split()
    return int(ticks), float(stall)


def verify(path: str, guest: int, crc: int) -> None:
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


def write_guest_ram(path: str, guest: int) -> int:
    """Write guest bytes of the pattern to path, fsync; returns their crc32."""
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
    return crc


def main() -> int:
    from pmemfs.tools.common import parse_size

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
        crc = write_guest_ram(path, guest)

        step("a vCPU maps guest RAM (MAP_SHARED) and keeps touching it: reads verify the "
             "pattern, pages are evicted after each touch so every touch asks the daemon")
        vcpu = start_vcpu(path, guest, demo.p("vcpu-state"))
        time.sleep(1.0)

        step("kill -9 the daemon while the vCPU runs (the supervisor's standby takes over)")
        died = demo.kill9()
        demo.wait_for_replacement(demo.last_killed)
        takeover = (time.monotonic() - died) * 1000
        if not mounting.pmemfs_mount_at(demo.mp):
            fail("the mount went away")
        proved(f"kill -9 to a new daemon serving the same connection: {takeover:.0f} ms; "
               "the mount never went away")
        time.sleep(1.0)

        step("pmemfs upgrade: replace the daemon with the installed code, draining it first")
        line = cli("pmemfs", "upgrade", demo.mp).stdout.strip()
        print(f"  {line}")
        time.sleep(1.0)
        ticks, stall = stop_vcpu(vcpu)
        proved(f"the vCPU ran through both: {ticks} touches, no error, longest stall "
               f"{stall * 1000:.0f} ms")

        step("verify every byte of guest RAM through the new daemon")
        verify(path, guest, crc)
        proved(f"all {guest >> 20} MiB intact, crc32 {crc:08x}")

        step("a cold restart (the connection ends: supervisor and daemon killed), then a new mount")
        demo.kill_all()
        died = time.monotonic()
        demo.mount()
        proved(f"downtime of a cold restart: {(time.monotonic() - died) * 1000:.0f} ms "
               "(clients saw ENOTCONN meanwhile)")
        verify(path, guest, crc)
        proved("guest RAM still intact after the cold restart")
        info = __import__("json").loads(cli("pmemfs", "info", "--json", demo.mp).stdout)
        print("  region:", " ".join(f"{k}={info[k]}" for k in
                                    ("state", "mount_generation", "restart_mode") if k in info))
    print("guest memory survived the restart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
