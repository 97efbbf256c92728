#!/usr/bin/env python3
"""Measure what the backing costs: zeroing a block, and reserving and releasing blocks.

    python tools/backing_bench.py [--runs 7] [--no-hugetlbfs] [--big-mib 1024] [--only zero,mount]

**zero**: a block that a file takes over may hold an old file's bytes, so what the file
does not write must read as zeros. On memory the block must also stay reserved
(docs/DESIGN.md, "The backing"). The ways, each timed on a block whose pages are
populated and dirty (a block freed by another file):

  store     write zeros through the mapping as region.zero did (buf[a:b] = bytes(n))
  memset    write zeros through the mapping with libc's memset (what zero() does now)
  punch     fallocate(PUNCH_HOLE): the memory goes back to the backing; *not allowed* on
            a reserved region, shown as the floor
  punch+re  PUNCH_HOLE then fallocate(KEEP_SIZE): reserved again, zeroed by the kernel
            when a page is next touched

and then the cost of touching every page of the block afterwards (one byte per 4 KiB),
which is where the punching ways pay their zeroing. "fresh" is the overcommitted
region's case: reserving a block that was a hole (fallocate), which reads as zeros
with no zeroing at all.

**mount**: through a real mount, a reserved and an overcommitted (--sparse) region of
1 GiB on /dev/shm: a 512 MiB file written sequentially in 1 MiB writes (every block
new), then overwritten (no block new), 4 KiB written into each of 128 new blocks (the
rest of each is zeroed or known to be zeros), and the time from unlink until statfs
shows the space free again (the sparse region punches the blocks).

Needs root (mounts; the hugetlbfs part reserves huge pages and gives them back, and
mounts a hugetlbfs under /tmp that it unmounts). Prints tables; --json for numbers.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmemfs.media.region import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate

MiB = 1 << 20
GiB = 1 << 30
KNOB = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"


def touch(buf: memoryview, start: int, length: int) -> None:
    for off in range(start, start + length, 4096):
        buf[off] = 1


def _timed(buf: memoryview, junk: bytes, a: int, b: int, runs: int, name: str, fn) -> dict[str, float]:
    """Median seconds of fn zeroing [a, b) of a dirty block, and of touching it after."""
    zero, after = [], []
    for _ in range(runs):
        buf[:] = junk  # populated, dirty, mapped: a block another file freed
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        touch(buf, a, b - a)
        t2 = time.perf_counter()
        assert buf[a + 1] == 0 and buf[b - 1] == 0, name
        zero.append(t1 - t0)
        after.append(t2 - t1)
    return {"zero": statistics.median(zero), "touch": statistics.median(after)}


def _timed_fresh(fd: int, buf: memoryview, block: int, a: int, b: int, runs: int) -> dict[str, float]:
    """A sparse region's fresh block: a hole reserved by the allocator, then touched."""
    fresh, after = [], []
    for _ in range(runs):
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, block)
        t0 = time.perf_counter()
        assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, block) == 0
        t1 = time.perf_counter()
        touch(buf, a, b - a)
        t2 = time.perf_counter()
        fresh.append(t1 - t0)
        after.append(t2 - t1)
    return {"zero": statistics.median(fresh), "touch": statistics.median(after)}


def measure(path: str, block: int, runs: int, page: int) -> dict[str, dict[str, float]]:
    """Per way: median seconds to zero one block, and to touch every page of it after."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    mm = buf = None
    try:
        os.ftruncate(fd, block)
        assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, block) == 0, "cannot reserve the test block"
        mm = mmap.mmap(fd, block)
        buf = memoryview(mm)
        junk = b"\xa5" * block
        # Leave a page at each end, as a short write into a fresh block does.
        a, b = page, block - page

        def store() -> None:
            for pos in range(a, b, 64 * MiB):
                n = min(64 * MiB, b - pos)
                buf[pos:pos + n] = bytes(n)

        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))

        def memset() -> None:
            ctypes.memset(base + a, 0, b - a)

        def punch() -> None:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, a, b - a)

        def punch_re() -> None:
            punch()
            assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, a, b - a) == 0

        out = {name: _timed(buf, junk, a, b, runs, name, fn)
               for name, fn in (("store", store), ("memset", memset), ("punch", punch), ("punch+re", punch_re))}
        out["fresh"] = _timed_fresh(fd, buf, block, a, b, runs)
        return out
    finally:
        if buf is not None:
            buf.release()
        if mm is not None:
            mm.close()
        os.close(fd)
        os.unlink(path)


def hugetlbfs(pages: int):
    """Reserve pages more 2 MiB huge pages and mount a hugetlbfs; returns (dir, undo)."""
    with open(KNOB) as f:
        old = int(f.read())
    with open(KNOB, "w") as f:
        f.write(str(old + pages))
    with open(KNOB) as f:
        got = int(f.read()) - old
    where = tempfile.mkdtemp(prefix="pmemfs-zero-bench-")
    mounted = False

    def undo() -> None:
        if mounted:
            subprocess.run(["umount", where], check=False)
        os.rmdir(where)
        with open(KNOB) as f:
            now = int(f.read())
        with open(KNOB, "w") as f:
            f.write(str(max(now - max(got, 0), 0)))

    if got < pages:
        undo()
        raise RuntimeError(f"the kernel reserved {got} of {pages} huge pages")
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", where], check=True)
    mounted = True
    return where, undo


def through_a_mount(runs: int) -> dict[str, dict[str, float]]:
    """Median seconds of each step, per region kind (see the module's docstring)."""
    from pmemfs.media.mkfs import make_filesystem
    from pmemfs.serve import mounting

    out: dict[str, dict[str, list[float]]] = {}
    for kind in ("reserved", "sparse"):
        times: dict[str, list[float]] = {}
        region = f"/dev/shm/pmemfs-backing-bench-{os.getpid()}-{kind}.region"
        mp = tempfile.mkdtemp(prefix="pmemfs-backing-bench-")
        m = None
        try:
            make_filesystem(region, size=GiB, sparse=kind == "sparse")
            m = mounting.spawn(region, mp, set())
            chunk = os.urandom(MiB)
            small = os.urandom(4096)

            def free(mp: str = mp) -> int:
                st = os.statvfs(mp)
                return st.f_bavail * st.f_frsize

            empty = free()
            for _ in range(runs):
                path = os.path.join(mp, "f")
                t0 = time.perf_counter()
                with open(path, "wb") as f:
                    for _ in range(512):
                        f.write(chunk)
                t1 = time.perf_counter()
                with open(path, "r+b") as f:
                    for _ in range(512):
                        f.write(chunk)
                t2 = time.perf_counter()
                os.unlink(path)
                while free() < empty:
                    time.sleep(0.0005)
                t3 = time.perf_counter()
                with open(path, "wb") as f:
                    for k in range(128):
                        f.seek(k * 2 * MiB + 100)
                        f.write(small)
                        f.flush()
                t4 = time.perf_counter()
                os.unlink(path)
                while free() < empty:
                    time.sleep(0.0005)
                for name, v in (("write 512 MiB, new blocks", t1 - t0), ("overwrite 512 MiB", t2 - t1),
                                ("unlink 512 MiB until free", t3 - t2),
                                ("4 KiB into 128 new blocks", t4 - t3)):
                    times.setdefault(name, []).append(v)
        finally:
            if m is not None:
                mounting.unmount(mp)
                m.proc.wait(timeout=60)
            os.rmdir(mp)
            if os.path.exists(region):
                os.unlink(region)
        out[kind] = {k: statistics.median(v) for k, v in times.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--big-mib", type=int, default=1024, help="the big block (a 1 GiB block by default)")
    ap.add_argument("--no-hugetlbfs", action="store_true")
    ap.add_argument("--only", default="zero,mount", help="sections: zero, mount")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sections = set(a.only.split(","))
    mounted = through_a_mount(max(3, a.runs // 2)) if "mount" in sections else {}
    results = []
    if "zero" not in sections:
        a.no_hugetlbfs = True
    for block in (2 * MiB, a.big_mib * MiB) if "zero" in sections else ():
        path = f"/dev/shm/pmemfs-zero-bench-{os.getpid()}"
        results.append(("tmpfs", block, measure(path, block, a.runs, 4096)))
    if not a.no_hugetlbfs:
        try:
            where, undo = hugetlbfs(a.big_mib // 2 + 2)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            print(f"hugetlbfs skipped: {e}", file=sys.stderr)
        else:
            try:
                # Huge pages are 2 MiB: inside a 2 MiB block there is no whole page to
                # punch, so zeroing there always stores. The big block keeps a page at
                # each end.
                results.append(("hugetlbfs", a.big_mib * MiB,
                                measure(os.path.join(where, "r"), a.big_mib * MiB, a.runs, 2 * MiB)))
            finally:
                undo()
    if a.json:
        print(json.dumps({"zero": [{"backing": k, "block": b, **r} for k, b, r in results], "mount": mounted}))
        return 0
    if results:
        print(f"{'backing':10} {'block':>8}  {'way':9} {'zero ms':>9} {'touch ms':>9} {'total ms':>9}")
    for kind, block, r in results:
        for name, v in r.items():
            print(f"{kind:10} {block // MiB:>6}M  {name:9} {v['zero'] * 1e3:9.3f} {v['touch'] * 1e3:9.3f} "
                  f"{(v['zero'] + v['touch']) * 1e3:9.3f}")
    if mounted:
        names = list(next(iter(mounted.values())))
        print(f"\n{'through a mount (ms)':28} " + " ".join(f"{k:>10}" for k in mounted))
        for name in names:
            print(f"{name:28} " + " ".join(f"{mounted[k][name] * 1e3:10.1f}" for k in mounted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
