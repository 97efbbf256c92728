#!/usr/bin/env python3
"""The floor: what one FUSE request costs through pyfuse3 + trio when the handler does nothing.

    python tools/floor.py [--ops 20000] [--json out.json]

Mounts an empty filesystem (this file, run with --serve MOUNTPOINT) whose handlers
answer at once from constants, drives three request kinds from this process, and
prints for each the requests per second (wall clock) and the daemon's CPU per request
(its utime+stime over the requests it counted itself):

- getattr: stat of a file whose attributes time out at once (one GETATTR a stat);
- lookup: stat of a name whose entry times out at once (one LOOKUP a stat);
- write: 4 KiB pwrite to an open file (one WRITE, plus the GETXATTR of
  security.capability the kernel sends before every write to a FUSE file).

Then the same lookup and write workloads on a pmemfs mount (a prefaulted region in
/dev/shm), with the requests pmemfs's daemon received per operation (from a short
second pass with `pmemfs mount --debug`, which logs every request its handlers answer;
flush and release, which do nothing, are not logged) and its CPU per operation and per
request, next to the floor: how far above the floor each request is.
Root is needed (mounts, drop_caches). Everything mounted or started is undone.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, ROOT)

from pmemfs.serve import mounting  # noqa: E402


# ------------------------------------------------------------------ the empty fs
def empty_fs(counts: collections.Counter):
    """The handlers: each counts its request and answers at once from constants. pyfuse3
    is imported here: only the --serve process needs it."""
    import pyfuse3

    def attrs(ino: int, entry: float, attr: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        a.st_nlink = 1
        a.st_size = 1 << 30
        a.entry_timeout, a.attr_timeout = entry, attr
        return a

    # "a": entry kept, attributes expire at once; "b": the entry expires at once.
    files = {b"a": (2, 300.0, 0.0), b"b": (3, 0.0, 300.0)}
    by_ino = {v[0]: v for v in files.values()}

    class Empty(pyfuse3.Operations):
        async def lookup(self, parent, name, ctx=None):
            counts["lookup"] += 1
            if name not in files:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(*files[name])

        async def getattr(self, ino, ctx=None):
            counts["getattr"] += 1
            return attrs(*by_ino[ino]) if ino in by_ino else attrs(ino, 300.0, 300.0)

        async def open(self, ino, flags, ctx):
            counts["open"] += 1
            return pyfuse3.FileInfo(fh=ino)

        async def write(self, fh, off, buf):
            counts["write"] += 1
            return len(buf)

        async def getxattr(self, ino, name, ctx):
            counts["getxattr"] += 1
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def flush(self, fh):
            counts["flush"] += 1

        async def release(self, fh):
            counts["release"] += 1

    return Empty()


def serve(mountpoint: str, counts_path: str) -> int:
    """Serve the empty filesystem until SIGTERM; SIGUSR1 (and SIGTERM) write the counts."""
    import pyfuse3
    import trio

    counts: collections.Counter = collections.Counter()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as rx:
                    async for sig in rx:
                        with open(counts_path + ".tmp", "w") as f:
                            json.dump(counts, f)
                        os.replace(counts_path + ".tmp", counts_path)
                        if sig == signal.SIGTERM:
                            pyfuse3.terminate()
                            return
            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    pyfuse3.init(empty_fs(counts), mountpoint, {"fsname=floor", "default_permissions"})
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


# ------------------------------------------------------------------ measuring
def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_mounted(mp: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.ismount(mp):
        if time.monotonic() > end:
            raise SystemExit(f"{mp}: not mounted within {timeout:.0f} s")
        time.sleep(0.05)


def run_ops(kind: str, path: str, ops: int) -> float:
    """Do ops operations of one kind on path; the wall time they took."""
    if kind == "write":
        fd = os.open(path, os.O_WRONLY)
        buf = b"x" * 4096
        try:
            t = time.perf_counter()
            for i in range(ops):
                os.pwrite(fd, buf, (i % 256) * 4096)
            return time.perf_counter() - t
        finally:
            os.close(fd)
    t = time.perf_counter()
    for _ in range(ops):
        os.stat(path)
    return time.perf_counter() - t


def floor(ops: int, work: str) -> dict:
    mp = os.path.join(work, "floor")
    os.mkdir(mp)
    counts_path = os.path.join(work, "counts.json")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mp, "--counts", counts_path])
    results = {}
    try:
        wait_mounted(mp)
        for kind, name in (("getattr", "a"), ("lookup", "b"), ("write", "a")):
            path = os.path.join(mp, name)
            run_ops(kind, path, min(ops, 500))  # warm up
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            with open(counts_path) as f:
                before = json.load(f)
            cpu0 = cpu_seconds(proc.pid)
            wall = run_ops(kind, path, ops)
            cpu = cpu_seconds(proc.pid) - cpu0
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            with open(counts_path) as f:
                after = json.load(f)
            got = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
            requests = sum(got.values())
            results[kind] = {"ops_per_s": ops / wall, "requests_per_op": requests / ops,
                             "requests": {k: v / ops for k, v in got.items()}, "cpu_us_per_request": cpu / requests * 1e6,
                             "cpu_us_per_op": cpu / ops * 1e6}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", mp])
    return results


def drop_dentries() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def pmemfs_side(ops: int, work: str) -> dict:
    """Lookup (stat after the dentries are dropped, as tools/bench.py) and 4 KiB writes."""
    region = f"/dev/shm/pmemfs-floor-{os.getpid()}.region"
    mp = os.path.join(work, "pmemfs")
    os.mkdir(mp)
    files = min(ops, 10000)
    results = {}
    try:
        subprocess.run([os.path.join(BIN, "pmemfs-mkfs"), "--size", "1G", "--inodes", str(files + 1000), region],
                       check=True, capture_output=True)
        for debug in (False, True):  # the second pass counts requests from the debug log
            log = os.path.join(work, f"pmemfs-{int(debug)}.log")
            subprocess.run([os.path.join(BIN, "pmemfs"), "mount", "-o", "prefault", "--log", log,
                            *(["--debug"] if debug else []), region, mp], check=True, capture_output=True)
            try:
                daemon = mounting.region_holder(region)  # the serving daemon holds the region's lock
                n = 300 if debug else files
                d = os.path.join(mp, f"d{int(debug)}")
                os.mkdir(d)
                for i in range(n):
                    os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
                drop_dentries()
                mark = os.path.getsize(log)
                cpu0 = cpu_seconds(daemon)
                t = time.perf_counter()
                for i in range(n):
                    os.stat(os.path.join(d, f"f{i}"))
                wall = time.perf_counter() - t
                cpu = cpu_seconds(daemon) - cpu0
                lookups = requests_in(log, mark)
                big = os.path.join(mp, f"w{int(debug)}")
                with open(big, "wb"):
                    pass
                mark2 = os.path.getsize(log)
                w = 300 if debug else ops
                cpu1 = cpu_seconds(daemon)
                wall_w = run_ops("write", big, w)
                cpu_w = cpu_seconds(daemon) - cpu1
                writes = requests_in(log, mark2)
                if debug:
                    results["lookup"]["requests"] = {k: v / n for k, v in lookups.items()}
                    results["write"]["requests"] = {k: v / w for k, v in writes.items()}
                else:
                    results["lookup"] = {"ops_per_s": n / wall, "cpu_us_per_op": cpu / n * 1e6}
                    results["write"] = {"ops_per_s": w / wall_w, "cpu_us_per_op": cpu_w / w * 1e6}
            finally:
                subprocess.run([os.path.join(BIN, "pmemfs"), "umount", mp], capture_output=True)
    finally:
        if os.path.exists(region):
            os.unlink(region)
    for r in results.values():
        r["requests_per_op"] = sum(r.get("requests", {}).values())
        r["cpu_us_per_request"] = r["cpu_us_per_op"] / r["requests_per_op"] if r["requests_per_op"] else 0
    return results


_REQUEST = re.compile(r" DEBUG (\w+)\(")


def requests_in(log: str, offset: int) -> dict[str, int]:
    """Requests the daemon logged (pmemfs --debug: one line per request) after offset."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        c = collections.Counter(m.group(1) for line in f if (m := _REQUEST.search(line)))
    return dict(c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--json")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--counts", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.counts)
    if os.geteuid() != 0:
        print("floor.py: needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pmemfs-floor-") as work:
        result = {"floor": floor(a.ops, work), "pmemfs": pmemfs_side(a.ops, work)}
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'workload':10} {'target':8} {'ops/s':>9} {'req/op':>7} {'CPU/op us':>10} {'CPU/req us':>11} "
          f"{'x floor/req':>11}  requests")
    for kind in ("getattr", "lookup", "write"):
        for target in ("floor", "pmemfs"):
            r = result[target].get(kind)
            if not r:
                continue
            ratio = r["cpu_us_per_request"] / result["floor"][kind]["cpu_us_per_request"]
            reqs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("requests", {}).items()) if v >= 0.005)
            print(f"{kind:10} {target:8} {r['ops_per_s']:9.0f} {r['requests_per_op']:7.2f} "
                  f"{r['cpu_us_per_op']:10.1f} {r['cpu_us_per_request']:11.1f} {ratio:11.2f}  {reqs}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
