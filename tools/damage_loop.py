#!/usr/bin/env python3
"""Random damage to a populated region, many times: fsck and mount must never crash.

    python tools/damage_loop.py [--seeds 2000] [--first 0]

Each seed copies a populated template region, writes random bytes into random places
of its used metadata (superblock, journal header, used table records: tools/corrupt.py
random_bytes), then checks that `fsck -n` and mount fail only with their one-line
errors, that mount refuses whatever `fsck -y` cannot repair, and that whatever it
repairs is clean afterwards and mounts. The suite runs 200 seeds of the same thing
(tests/test_fsck.py); this is the long version. Exits non-zero at the first breach.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corrupt

from pmemfs.engine import Engine, MountError
from pmemfs.format import FormatError
from pmemfs.fsck import fsck
from pmemfs.mkfs import make_filesystem
from pmemfs.region import RegionError


def populate(path: str) -> None:
    rng = random.Random(7)
    e = Engine(path)
    try:
        a = e.mkdir(1, b"a", 0o755).ino
        b = e.mkdir(a, b"b", 0o755).ino
        for parent, name, size in ((1, b"big", 3 << 20), (a, b"small", 1000), (b, b"mid", 70_000),
                                   (1, b"tiny", 10), (a, b"empty", 0)):
            ino = e.create(parent, name, 0o644).ino
            e.write(ino, 0, rng.randbytes(size))
            e.setxattr(ino, b"user.x", rng.randbytes(rng.randrange(1, 1500)))
        e.link(e.lookup(1, b"big"), b, b"hard")
        e.symlink(1, b"l", b"a/b/mid")
        e.kernel.create("obj", "device-state", 5000)
    finally:
        e.close()


def mounts(path: str) -> bool:
    try:
        Engine(path).close()
        return True
    except (MountError, FormatError, RegionError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2000)
    ap.add_argument("--first", type=int, default=0)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pmemfs-damage-", dir="/dev/shm")
    template, path = os.path.join(work, "template"), os.path.join(work, "victim")
    make_filesystem(template, size=64 << 20)
    populate(template)
    with open(template, "rb") as f:
        image = f.read()
    outcome = {"clean": 0, "repaired": 0, "refused": 0}
    started = time.monotonic()
    try:
        for seed in range(a.first, a.first + a.seeds):
            with open(path, "wb") as f:
                f.write(image)
            corrupt.random_bytes(path, seed, writes=random.Random(seed).choice([1, 2, 4, 8]))
            first = fsck(path, "n").exit_code
            if first not in (0, 4):
                print(f"seed {seed}: fsck -n exited {first}")
                return 1
            if first == 0 and not mounts(path):
                print(f"seed {seed}: fsck says clean but mount refuses")
                return 1
            rep = fsck(path, "y").exit_code
            if rep == 4:
                outcome["refused"] += 1
                if mounts(path):
                    print(f"seed {seed}: fsck -y gave up but mount accepts the region")
                    return 1
            else:
                outcome["repaired" if rep == 1 else "clean"] += 1
                again = fsck(path, "n").exit_code
                if again != 0 or not mounts(path):
                    print(f"seed {seed}: repaired, but a second fsck says {again} or mount refuses")
                    return 1
            if (seed - a.first + 1) % 100 == 0:
                print(f"{seed - a.first + 1} seeds, {time.monotonic() - started:.0f} s: {outcome}", flush=True)
    finally:
        for p in (template, path):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(work)
    print(f"{a.seeds} seeds: {outcome}; no crash, no hang, mount refused everything fsck could not repair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
