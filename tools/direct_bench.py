"""Streaming copy through pmemfs.direct versus numpy memcpy of anonymous arrays.

    .venv/bin/python tools/direct_bench.py [--size 1G] [--repeats 9] [--mount MP]

Copies `size` bytes from one directly mapped file to another (np.copyto over the two
mappings: the daemon is not involved) and, in the same run, between two plain
anonymous numpy arrays of the same size, alternating, and prints both bandwidths and
their ratio (direct / memcpy; the goal is >= 0.9). Without --mount it makes a region on
/dev/shm, mounts it, and removes both afterwards. Needs root (the region is root's).

For tools/bench.py: `measure(mountpoint=None, size=..., repeats=...)` returns a dict.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmemfs import direct
from pmemfs.media.mkfs import make_filesystem
from pmemfs.serve import mounting

GiB = 1 << 30


def _copy(dst: direct.Direct, src: direct.Direct) -> None:
    if len(src.arrays) == 1 and len(dst.arrays) == 1:
        np.copyto(dst.arrays[0][1], src.arrays[0][1])
        return
    for foff, a in src.arrays:  # fragmented files: extent by extent
        dst.write(foff, a)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copy_bandwidth(mountpoint: str, size: int = GiB, repeats: int = 9) -> dict:
    """Direct-copy and anonymous-memcpy bandwidth (bytes/s) on a mounted pmemfs."""
    src_path = os.path.join(mountpoint, f".direct-bench-src-{uuid.uuid4().hex[:8]}")
    dst_path = os.path.join(mountpoint, f".direct-bench-dst-{uuid.uuid4().hex[:8]}")
    direct.create(src_path, size)
    direct.create(dst_path, size)
    try:
        a = np.empty(size, np.uint8)
        b = np.empty(size, np.uint8)
        a.fill(1)  # fault both in before timing, as the direct mappings are populated
        b.fill(0)
        with direct.open(src_path, writable=True) as s, direct.open(dst_path, writable=True) as d:
            s.write(0, a[:1 << 20])
            extents = (len(s.extents), len(d.extents))
            t_direct, t_anon = [], []
            for _ in range(repeats):
                t_direct.append(_timed(lambda: _copy(d, s)))
                t_anon.append(_timed(lambda: np.copyto(b, a)))
            ok = bool(np.array_equal(d.read(0, 1 << 20), a[:1 << 20]))
    finally:
        os.unlink(src_path)
        os.unlink(dst_path)
    direct_bw = size / statistics.median(t_direct)
    anon_bw = size / statistics.median(t_anon)
    # Each direct copy is timed next to a memcpy: the median of the pairs' ratios is the
    # figure least disturbed by other load on the machine.
    paired = statistics.median(ta / td for td, ta in zip(t_direct, t_anon, strict=True))
    return {
        "size": size, "repeats": repeats, "extents": extents, "verified": ok,
        "direct_copy_Bps": direct_bw, "memcpy_Bps": anon_bw, "ratio": paired,
        "ratio_of_medians": direct_bw / anon_bw,
        "direct_copy_best_Bps": size / min(t_direct), "memcpy_best_Bps": size / min(t_anon),
        "ratio_best": min(t_anon) / min(t_direct),
    }


def measure(mountpoint: str | None = None, size: int = GiB, repeats: int = 9) -> dict:
    """copy_bandwidth on `mountpoint`, or on a fresh /dev/shm region mounted for the run."""
    if mountpoint is not None:
        return copy_bandwidth(mountpoint, size, repeats)
    region = f"/dev/shm/pmemfs-direct-bench-{uuid.uuid4().hex[:8]}.region"
    mp = tempfile.mkdtemp(prefix="pmemfs-direct-bench-")
    m = None
    try:
        make_filesystem(region, size=2 * size + 2 * GiB, sparse=True)  # only the two files are memory
        m = mounting.spawn(region, mp, set())
        return copy_bandwidth(mp, size, repeats)
    finally:
        if m is not None:
            try:
                mounting.unmount(mp)
            finally:
                m.proc.wait(timeout=60)
        if os.path.exists(region):
            os.unlink(region)
        shutil.rmtree(mp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from pmemfs.tools.common import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--mount", help="a mounted pmemfs to use (default: a fresh /dev/shm region)")
    args = ap.parse_args(argv)
    r = measure(args.mount, parse_size(args.size), args.repeats)
    gb = 1e9
    print(f"size {r['size'] / GiB:.2f} GiB, {r['repeats']} repeats, extents {r['extents']}, "
          f"verified {r['verified']}")
    print(f"direct copy   {r['direct_copy_Bps'] / gb:6.2f} GB/s median  {r['direct_copy_best_Bps'] / gb:6.2f} best")
    print(f"numpy memcpy  {r['memcpy_Bps'] / gb:6.2f} GB/s median  {r['memcpy_best_Bps'] / gb:6.2f} best")
    print(f"ratio direct/memcpy {r['ratio']:.3f} (median of pairs)  {r['ratio_of_medians']:.3f} "
          f"(of medians)  {r['ratio_best']:.3f} (of bests)")
    return 0 if r["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
