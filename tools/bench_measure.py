"""How tools/bench.py measures: fio runs, a daemon's CPU time and anonymous memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench_targets import Target, run

# The harness's helpers run in child processes: `python tools/bench.py --internal ...`.
BENCH = str(Path(__file__).resolve().parent / "bench.py")


def anon_rss(pid: int) -> int | None:
    """Anonymous memory of a process in bytes (smaps_rollup "Anonymous").

    Not Private_Dirty: the region is a MAP_SHARED file mapping, and its pages that only
    the daemon maps count as Private_* there, although they are the filesystem's data.
    "Anonymous" counts only anonymous pages: heap, Python objects, numpy arrays that are
    not views of the region. Region pages are shmem (or hugetlb) pages and never count.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def daemon_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a daemon has used so far; 0 without a daemon.

    Per call, this is the daemon's cost of a request; it is much less disturbed by other
    load on the machine than the wall-clock rates are.
    """
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(path: str, rw: str, bs: str, size: int, *, runtime: int | None = None,
        number_ios: int | None = None, numjobs: int = 1) -> dict:
    """fio, psync; returns the read or write section of its JSON. One job on the file
    path, or numjobs processes at once in the directory path, each on its own file
    (bench.0.0, bench.1.0, ... of `size` each), reported together (aggregate rates)."""
    where = [f"--filename={path}"] if numjobs == 1 else [
        f"--directory={path}", f"--numjobs={numjobs}", "--group_reporting"]
    cmd = ["fio", "--name=bench", *where, f"--rw={rw}", f"--bs={bs}", f"--size={size}",
           "--ioengine=psync", "--fallocate=none", "--invalidate=1", "--output-format=json"]
    if "write" in rw:
        # The rate counts the final fsync: with a writeback cache (pmemfs-wb) the data
        # must have reached the daemon, not only the page cache, to count as written.
        cmd.append("--end_fsync=1")
    if runtime:
        cmd.append(f"--runtime={runtime}")  # without time_based: stops early, never loops
    if number_ios:
        cmd += [f"--number_ios={number_ios}", "--norandommap=1", "--randrepeat=1"]
    r = run(cmd, timeout=900)
    out = json.loads(r.stdout[r.stdout.index("{"):])
    job = out["jobs"][0]
    return job["read"] if "read" in rw else job["write"]



def timed_fio(t: Target, label: str, metric: str, *a, **kw) -> dict:
    """fio (its arguments after metric) as a row: MB/s or IOPS, plus the daemon's CPU per call."""
    c0 = daemon_cpu(t.pid)
    r = fio(*a, **kw)
    out = {label: (r["iops"] if metric == "iops" else r["bw_bytes"] / 1e6,
                   "IOPS" if metric == "iops" else "MB/s", "higher")}
    if t.pid and r["total_ios"]:
        out[f"{label}: daemon CPU per call"] = (
            1e6 * (daemon_cpu(t.pid) - c0) / r["total_ios"], "us", "lower")
    return out


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to

