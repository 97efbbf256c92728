#!/usr/bin/env python3
"""Measure pmemfs-fsck (and mount) on a big sparse region with many files.

    python tools/fsck_speed.py [--files 100000] [--size 1T] [--region PATH] [--keep]

Builds the region through the Engine API (no FUSE): --files files spread over
directories of 1000, each with a few bytes of data (so each owns one block), plus
some symlinks and xattrs; then times `fsck -n` in process, `pmemfs-fsck -n` as a
command, a repair run (`fsck -y` on the clean region) and a mount (Engine open+close).
The goal is under 3 s for 100,000 files on a 1 TiB region.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pmemfs.fs.engine import Engine
from pmemfs.media.mkfs import make_filesystem
from pmemfs.tools.common import parse_size
from pmemfs.tools.fsck import fsck


def build(path: str, size: int, files: int) -> float:
    t0 = time.perf_counter()
    make_filesystem(path, size=size, sparse=True)  # overcommitted: 1 TiB is more than the memory
    e = Engine(path)
    try:
        per_dir = 1000
        d = 1
        for i in range(files):
            if i % per_dir == 0:
                d = e.mkdir(1, b"d%05d" % (i // per_dir), 0o755).ino
            ino = e.create(d, b"file-%07d" % i, 0o644).ino
            e.write(ino, 0, b"%d\n" % i)
            if i % 1000 == 1:
                e.setxattr(ino, b"user.tag", b"v" * 600)
                e.symlink(d, b"link-%07d" % i, b"file-%07d" % i)
    finally:
        e.close()
    return time.perf_counter() - t0


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--size", default="1T")
    ap.add_argument("--region", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the region afterwards")
    args = ap.parse_args()
    path = args.region or f"/dev/shm/pmemfs-fsck-speed-{uuid.uuid4().hex[:8]}.region"
    size = parse_size(args.size)
    try:
        built = build(path, size, args.files)
        print(f"built {args.files} files on a {args.size} sparse region in {built:.1f} s ({path})")

        def check() -> None:
            rep = fsck(path, "n")
            assert rep.exit_code == 0, [f.message for f in rep.findings][:5]

        def repair() -> None:
            assert fsck(path, "y").exit_code == 0

        def mount() -> None:
            Engine(path).close()

        exe = os.path.join(os.path.dirname(sys.executable), "pmemfs-fsck")

        def command() -> None:
            subprocess.run([exe, "-n", path], check=True, capture_output=True)

        print(f"fsck -n (Python API, best of 3): {timed(check):.3f} s")
        print(f"pmemfs-fsck -n (command, with interpreter start): {timed(command):.3f} s")
        print(f"fsck -y on the clean region: {timed(repair, 1):.3f} s")
        print(f"mount (Engine open + close): {timed(mount, 1):.3f} s")
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
