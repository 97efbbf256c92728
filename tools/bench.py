#!/usr/bin/env python3
"""pmemfs benchmark harness (`./run bench`).

Runs each workload against these targets (tools/bench_targets.py) in one run,
interleaved (A B C D A B C D ...) so that machine drift lands on all of them alike:

  pmemfs-shm      pmemfs, region in /dev/shm, mounted with -o prefault
  pmemfs-huge     pmemfs, region on hugetlbfs (only when huge pages can be reserved)
  pmemfs-wb       pmemfs-shm plus -o writeback (skipped with a note if pmemfs refuses it)
  tmpfs           a fresh kernel tmpfs mount
  passthrough     tools/passthroughfs.py (minimal pyfuse3 + trio) over a fresh tmpfs
  passthrough_ll  libfuse's C example passthrough_ll, compiled for the run, over a fresh
                  tmpfs: the reference of the goals (skipped with a note without gcc)

`--targets` picks some of them, `--pmemfs NAME=OPT,OPT` adds a pmemfs target on
/dev/shm with those mount options. It prints one table: median, min-max, the
baselines' medians, the ratio pmemfs / baseline and the project's goal with
met/MISSED, then a table of the FUSE requests per operation of the pmemfs targets
(counted in a separate short pass with `pmemfs mount --debug`, never in the timed
runs). `--json FILE` writes the same as JSON, `--markdown FILE` the tables as
Markdown (docs/BENCHMARKS.md uses it).

Needs root (mounts, drop_caches, huge pages), /dev/fuse and fio. Everything it
mounts, starts or reserves is undone in `finally` blocks: mounts unmounted, daemons
it started stopped by PID, huge pages given back, regions under /dev/shm deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
from bench_targets import (  # noqa: E402
    BIN,
    HUGE_PAGE,
    MKFS,
    NR_HUGEPAGES,
    PMEMFS_VARIANTS,
    HugePages,
    Passthrough,
    PassthroughLL,
    Pmemfs,
    PmemfsVariant,
    Target,
    Tmpfs,
    Unavailable,
    drop_caches,
    is_mounted,
    kill_mount,
    log,
    pmemfs_mount,
    pmemfs_unmount,
    run,
    serving_pid,
    umount_kernel,
)

# pmemfs itself is imported late and Engine is used in child processes (`--internal`):
# the package may change on disk while a run goes on, and every region the harness
# makes must be made and read by the code that mounts it.

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BASELINES = ("tmpfs", "passthrough", "passthrough_ll")
REFERENCE = "passthrough_ll"  # the goals' reference
DEFAULT_TARGETS = "pmemfs-shm,pmemfs-huge,pmemfs-wb,tmpfs,passthrough,passthrough_ll"
WORKLOAD_UNITS = ("MB/s", "IOPS", "ops/s", "s")


# ----------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Profile:
    name: str
    file_size: int  # the big file of the I/O workloads
    runs: int
    write4k_cap_s: int  # 4 KiB writes stop after this long (FUSE does ~10k requests/s)
    randread_ios: int
    meta_files: int  # create / stat / unlink
    ls_files: int
    many_files: int  # the files in the mount-time regions
    many_inodes: int
    small_region: int
    big_region: int
    count_ops: int  # the request-counting pass: operations per workload


PROFILES = {
    "default": Profile("default", 1 * GiB, 3, 5, 20000, 10000, 10000, 100000, 200000, 1 * GiB, 1 * TiB, 256),
    "quick": Profile("quick", 128 * MiB, 3, 1, 2000, 1000, 2000, 10000, 200000, 1 * GiB, 1 * TiB, 256),
    "tiny": Profile("tiny", 8 * MiB, 1, 1, 200, 100, 100, 500, 4096, 256 * MiB, 64 * GiB, 64),
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:g} {unit}"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------- helpers
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


# ----------------------------------------------------------------- results
@dataclass
class Goal:
    text: str
    check: Callable[[Row], bool | None]


@dataclass
class Row:
    metric: str
    target: str
    unit: str
    better: str  # "higher" or "lower"
    values: list[float] = field(default_factory=list)
    baselines: dict[str, Row] = field(default_factory=dict)
    goal: Goal | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def ratio(self, base: str) -> float | None:
        b = self.baselines.get(base)
        if b is None or not b.values or not self.values or not b.median:
            return None
        return self.median / b.median

    @property
    def met(self) -> bool | None:
        if self.goal is None or not self.values:
            return None
        return self.goal.check(self)

    def as_json(self) -> dict:
        return {
            "metric": self.metric, "target": self.target, "unit": self.unit, "better": self.better,
            "runs": self.values, "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "baselines": {k: {"median": b.median, "ratio": self.ratio(k)} for k, b in self.baselines.items()},
            "goal": self.goal.text if self.goal else None, "met": self.met, "note": self.note,
        }


class Results:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.order: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def row(self, metric: str, target: str, unit: str = "", better: str = "higher") -> Row:
        key = (metric, target)
        if key not in self.rows:
            self.rows[key] = Row(metric, target, unit, better)
            self.order.append(key)
        return self.rows[key]

    def add(self, metric: str, target: str, value: float, unit: str, better: str = "higher") -> None:
        self.row(metric, target, unit, better).values.append(value)

    def get(self, metric: str, target: str) -> Row | None:
        return self.rows.get((metric, target))


def ratio_goal(base: str, at_least: float) -> Goal:
    return Goal(f">= {at_least:g}x {base}",
                lambda r: None if r.ratio(base) is None else r.ratio(base) >= at_least)


def max_goal(limit: float, text: str) -> Goal:
    return Goal(text, lambda r: r.median <= limit)


def reference_goal(better: str, base: str = REFERENCE) -> Goal:
    """At least as good as base: a rate >= 1x, a time <= 1x (the ratio is pmemfs / base)."""
    if better == "higher":
        return ratio_goal(base, 1.0)
    return Goal(f"<= 1x {base}", lambda r: None if r.ratio(base) is None else r.ratio(base) <= 1.0)


def all_goals(*goals: Goal) -> Goal:
    """Met when all are; missed when one is; unknown (a baseline missing) otherwise."""
    def check(r: Row) -> bool | None:
        got = [g.check(r) for g in goals]
        return False if False in got else None if None in got else True

    return Goal(" and ".join(g.text for g in goals), check)


# ----------------------------------------------------------------- workloads
class Bench:
    def __init__(self, prof: Profile, args: argparse.Namespace):
        self.prof = prof
        self.args = args
        self.res = Results()
        self.base = tempfile.mkdtemp(prefix="pmemfs-bench-", dir="/tmp")
        self.tag = os.path.basename(self.base)
        self.targets: list[Target] = []
        self.started: list[Target] = []
        self.huge = HugePages()
        self.huge_dir: str | None = None
        self.regions: list[str] = []
        self.extra_mps: list[tuple[str, list]] = []  # (mountpoint, [pid]) of the 100k-file section
        self.workloads: set[str] = set()  # the metrics that get a goal against passthrough_ll
        self.requests: list[dict] = []  # the counting pass: requests per operation

    # ---- setup / teardown
    def setup(self) -> None:
        f = self.prof.file_size
        shm_size = _round(2 * f + f // 2 + 64 * MiB, HUGE_PAGE)
        huge_size = _round(2 * f + 64 * MiB, HUGE_PAGE)
        inodes = 4 * max(self.prof.meta_files, self.prof.ls_files, 1024)
        tmp_size = 3 * f + 256 * MiB
        variants = self.variants
        wanted = self.args.target_list
        huge = [n for n in wanted if n in variants and variants[n].backing == "huge"]
        if huge and self.args.no_hugetlbfs:
            self.res.notes.append(f"{', '.join(huge)} skipped (--no-hugetlbfs)")
            wanted = [n for n in wanted if n not in huge]
        elif huge:
            if self.huge.reserve(len(huge) * huge_size // HUGE_PAGE):
                self.huge_dir = os.path.join(self.base, "hugetlbfs")
                os.makedirs(self.huge_dir)
                run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", self.huge_dir])
            else:
                self.res.notes.append(f"{', '.join(huge)} skipped: huge pages could not be reserved")
                wanted = [n for n in wanted if n not in huge]
        for name in wanted:
            t: Target
            if name in variants:
                v = variants[name]
                if v.backing == "huge":
                    region, size = os.path.join(self.huge_dir or "", f"{name}.region"), huge_size
                else:
                    region, size = f"/dev/shm/{self.tag}-{name}.region", shm_size
                self.regions.append(region)
                t = Pmemfs(self.base, name, region, size, list(v.options), inodes)
            elif name == "tmpfs":
                t = Tmpfs(self.base, tmp_size)
            elif name == "passthrough":
                t = Passthrough(self.base, tmp_size)
            else:
                t = PassthroughLL(self.base, tmp_size)
            log(f"starting {t.name}")
            self.started.append(t)
            try:
                t.start()
            except Unavailable as e:  # this machine or the installed pmemfs cannot: the others run
                log(f"{t.name} skipped: {e}")
                self.res.notes.append(f"{t.name} skipped: {e}")
                self.started.remove(t)
                t.stop()
                continue
            self.targets.append(t)
            if t.pid:
                self.res.add("daemon anon memory, idle", t.name, (anon_rss(t.pid) or 0) / MiB, "MiB", "lower")

    @property
    def variants(self) -> dict[str, PmemfsVariant]:
        return {**PMEMFS_VARIANTS, **self.args.extra_variants}

    @property
    def pmemfs_targets(self) -> list[Pmemfs]:
        return [t for t in self.targets if isinstance(t, Pmemfs)]

    @property
    def primary(self) -> Pmemfs | None:
        """The pmemfs target of the single-target rows: the first on /dev/shm."""
        pm = self.pmemfs_targets
        return next((t for t in pm if t.region.startswith("/dev/shm/")), pm[0] if pm else None)

    def teardown(self) -> None:
        for mp, pids in self.extra_mps:
            with contextlib.suppress(Exception):
                pmemfs_unmount(mp, pids[0] if pids else None)
        for t in reversed(self.started):
            try:
                t.stop()
            except Exception as e:
                log(f"stopping {t.name}: {e}")
        if self.huge_dir:
            umount_kernel(self.huge_dir)
        try:
            self.huge.release()
        except OSError as e:
            log(f"cannot restore {NR_HUGEPAGES}: {e}")
        for r in self.regions:
            with contextlib.suppress(OSError):
                os.unlink(r)
        for dirpath, _, _ in os.walk(self.base):
            if is_mounted(dirpath):
                log(f"still mounted: {dirpath}; leaving {self.base}")
                return
        shutil.rmtree(self.base, ignore_errors=True)

    # ---- the interleaved loop
    def each(self, label: str, fn: Callable[[Target], dict[str, tuple[float, str, str]]],
             prepare: Callable[[Target], None] | None = None,
             cleanup: Callable[[Target], None] | None = None,
             targets: list[Target] | None = None) -> None:
        targets = targets or self.targets
        log(label)
        if prepare:
            for t in targets:
                prepare(t)
        for _ in range(self.prof.runs):
            for t in targets:
                for metric, (value, unit, better) in fn(t).items():
                    self.res.add(metric, t.name, value, unit, better)
                    if unit in WORKLOAD_UNITS:  # not the daemon's CPU: those rows have no goal
                        self.workloads.add(metric)
        if cleanup:
            for t in targets:
                cleanup(t)

    def io_workloads(self) -> None:
        f = self.prof.file_size

        def timed_fio(t: Target, label: str, metric: str, *a, **kw) -> dict:
            c0 = daemon_cpu(t.pid)
            r = fio(*a, **kw)
            out = {label: (r["iops"] if metric == "iops" else r["bw_bytes"] / 1e6,
                           "IOPS" if metric == "iops" else "MB/s", "higher")}
            if t.pid and r["total_ios"]:
                out[f"{label}: daemon CPU per call"] = (
                    1e6 * (daemon_cpu(t.pid) - c0) / r["total_ios"], "us", "lower")
            return out

        def seq_write(bs: str, label: str, cap: int | None = None):
            def go(t: Target):
                path = t.p("new.dat")
                out = timed_fio(t, label, "bw", path, "write", bs, f, runtime=cap)
                os.unlink(path)
                return out
            return go

        self.each("sequential write 4 KiB", seq_write("4k", "write 4 KiB, new file", self.prof.write4k_cap_s))
        self.each("sequential write 128 KiB", seq_write("128k", "write 128 KiB, new file"))
        self.each("sequential write 1 MiB", seq_write("1m", "write 1 MiB, new file"))

        # Two clients at once (fio numjobs=2: two processes), each on its own file of
        # half the size; before data.dat exists, so the regions hold them.
        def two_writes(t: Target):
            d = t.p("jobs-w")
            os.mkdir(d)
            out = timed_fio(t, "write 1 MiB, new files, 2 jobs", "bw", d, "write", "1m", f // 2, numjobs=2)
            shutil.rmtree(d)
            return out

        self.each("sequential write 1 MiB, 2 jobs", two_writes)

        def make_data(t: Target) -> None:
            fio(t.p("data.dat"), "write", "1m", f)

        def overwrite(t: Target):
            return timed_fio(t, "overwrite 1 MiB", "bw", t.p("data.dat"), "write", "1m", f)

        self.each("overwrite 1 MiB", overwrite, prepare=make_data)

        def overwrite_4k(t: Target):
            return timed_fio(t, "overwrite 4 KiB", "bw", t.p("data.dat"), "write", "4k", f,
                             runtime=self.prof.write4k_cap_s)

        self.each("overwrite 4 KiB", overwrite_4k)  # data.dat is there from the row above

        def cold_read(bs: str, label: str):
            def go(t: Target):
                drop_caches()
                return timed_fio(t, label, "bw", t.p("data.dat"), "read", bs, f)
            return go

        self.each("cold read 128 KiB", cold_read("128k", "cold read 128 KiB"))
        self.each("cold read 1 MiB", cold_read("1m", "cold read 1 MiB"))

        def rand_read(t: Target):
            drop_caches()
            return timed_fio(t, "random read 4 KiB, cold", "iops", t.p("data.dat"), "randread", "4k", f,
                             number_ios=self.prof.randread_ios)

        self.each("random read 4 KiB", rand_read)

        def make_job_files(t: Target) -> None:  # a quarter each: data.dat is there too
            os.mkdir(t.p("jobs-r"))
            fio(t.p("jobs-r"), "write", "1m", f // 4, numjobs=2)

        def two_rand_reads(t: Target):
            drop_caches()
            return timed_fio(t, "random read 4 KiB, cold, 2 jobs", "iops", t.p("jobs-r"), "randread", "4k",
                             f // 4, number_ios=self.prof.randread_ios, numjobs=2)

        self.each("random read 4 KiB, 2 jobs", two_rand_reads, prepare=make_job_files,
                  cleanup=lambda t: shutil.rmtree(t.p("jobs-r")))

    def meta_workloads(self) -> None:
        n = self.prof.meta_files

        def cycle(t: Target):
            d = t.p("meta")
            os.mkdir(d)
            names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
            c0, t0 = daemon_cpu(t.pid), time.perf_counter()
            for p in names:
                os.close(os.open(p, flags, 0o644))
            t1, c1 = time.perf_counter(), daemon_cpu(t.pid)
            drop_caches(2)  # forget dentries: each stat is a lookup
            c2, t2 = daemon_cpu(t.pid), time.perf_counter()
            for p in names:
                os.stat(p)
            t3, c3 = time.perf_counter(), daemon_cpu(t.pid)
            for p in names:
                os.unlink(p)
            t4, c4 = time.perf_counter(), daemon_cpu(t.pid)
            os.rmdir(d)
            out = {"create": (n / (t1 - t0), "ops/s", "higher"),
                   "stat, cold dentries": (n / (t3 - t2), "ops/s", "higher"),
                   "unlink": (n / (t4 - t3), "ops/s", "higher")}
            if t.pid:
                out["create: daemon CPU per call"] = (1e6 * (c1 - c0) / n, "us", "lower")
                out["stat, cold dentries: daemon CPU per call"] = (1e6 * (c3 - c2) / n, "us", "lower")
                out["unlink: daemon CPU per call"] = (1e6 * (c4 - c3) / n, "us", "lower")
            return out

        self.each(f"create / stat / unlink of {n} files", cycle)
        def pair(t: Target) -> dict[str, tuple[float, str, str]]:
            try:
                return meta_pair(t, n)
            except RuntimeError as e:  # one target's failure (a baseline's bug) is a note
                self.res.notes.append(f"{t.name}: two-process metadata rows missing: {e}")
                return {}

        self.each(f"create / stat / unlink of 2 x {n} files, 2 processes", pair)

        m = self.prof.ls_files

        def make_files(t: Target) -> None:
            d = t.p("ls")
            os.mkdir(d)
            for i in range(m):
                os.close(os.open(os.path.join(d, f"file-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))

        def ls(t: Target):
            drop_caches()
            t0 = time.perf_counter()
            subprocess.run(["ls", "-l", t.p("ls")], stdout=subprocess.DEVNULL, check=True)
            t1 = time.perf_counter()
            subprocess.run(["ls", "-l", t.p("ls")], stdout=subprocess.DEVNULL, check=True)
            t2 = time.perf_counter()
            return {f"ls -l {m} files, cold": (t1 - t0, "s", "lower"),
                    f"ls -l {m} files, warm": (t2 - t1, "s", "lower")}

        self.each(f"ls -l of {m} files", ls, prepare=make_files)
        for t in self.targets:
            if t.pid:
                self.res.add("daemon anon memory, after workloads", t.name,
                             (anon_rss(t.pid) or 0) / MiB, "MiB", "lower")
        for t in self.targets:  # not timed
            shutil.rmtree(t.p("ls"), ignore_errors=True)

    # ---- requests per operation (not timed)
    def request_counts(self) -> None:
        """Each pmemfs target's options again, on a small region of its own, mounted with
        --debug; passthrough_ll with -d, for reference. tools/bench_requests.py."""
        from bench_requests import LIBFUSE_LINE, PMEMFS_LINE, count_requests

        if not self.pmemfs_targets:
            self.res.notes.append("requests per operation skipped: no pmemfs target")
            return
        ops = self.prof.count_ops
        size = _round(ops * (128 << 10) + max(4, ops // 4) * MiB + 64 * MiB, HUGE_PAGE)
        counted: list[tuple[str, Target, str, re.Pattern]] = []
        for t in self.pmemfs_targets:
            if not t.region.startswith("/dev/shm/"):
                self.res.notes.append(f"{t.name}: requests counted on a /dev/shm region with its options "
                                      "(the backing does not change what the kernel asks)")
            region = f"/dev/shm/{self.tag}-{t.name}-count.region"
            self.regions.append(region)
            log_file = os.path.join(self.base, f"{t.name}-count.log")
            c = Pmemfs(self.base, f"{t.name}-count", region, size, t.options, 4 * ops + 1024, log_file)
            counted.append((t.name, c, log_file, PMEMFS_LINE))
        if any(t.name == "passthrough_ll" for t in self.targets):
            c = PassthroughLL(self.base, size, label="passthrough_ll-count", debug=True)
            counted.append(("passthrough_ll", c, c.log_path, LIBFUSE_LINE))
        for name, c, log_file, pattern in counted:
            log(f"requests per operation: {name}")
            self.started.append(c)
            try:
                c.start()
                self.requests += count_requests(c, name, log_file, pattern, ops)
            finally:
                c.stop()
                self.started.remove(c)

    # ---- metadata size
    def metadata_size(self) -> None:
        log("metadata bytes per GiB")
        f = self.prof.file_size
        shm = self.primary
        if shm is None:
            self.res.notes.append("metadata size rows skipped: no pmemfs target")
            return
        for t in self.pmemfs_targets:
            self.res.add("metadata bytes per GiB, sequential", t.name, _meta_per_gib(t, "data.dat"),
                         "B/GiB", "lower")
        # Churn: files of random sizes written and half of them removed, so free space is
        # fragmented; then a file of the same size written in random 1 MiB order.
        os.unlink(shm.p("data.dat"))
        rnd = random.Random(1)
        chunk = os.urandom(MiB)
        made, total = [], 0
        while total < f // 2:
            size = rnd.randint(1, max(1, f // (16 * MiB))) * MiB
            p = shm.p(f"churn-{len(made)}")
            with open(p, "wb") as fh:
                for _ in range(size // MiB):
                    fh.write(chunk)
            made.append(p)
            total += size
        for p in rnd.sample(made, len(made) // 2):
            os.unlink(p)
        order = list(range(f // MiB))
        rnd.shuffle(order)
        fd = os.open(shm.p("churn.dat"), os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            for k in order:
                os.pwrite(fd, chunk, k * MiB)
        finally:
            os.close(fd)
        self.res.add("metadata bytes per GiB, after churn", shm.name, _meta_per_gib(shm, "churn.dat"),
                     "B/GiB", "lower")
        for p in [*made, shm.p("churn.dat")]:
            with contextlib.suppress(OSError):
                os.unlink(p)
        for t in self.targets:
            with contextlib.suppress(OSError):
                os.unlink(t.p("data.dat"))

    # ---- many files: mount, remount after kill -9, fsck, memory
    def many_files(self) -> None:
        prof = self.prof
        sizes = [("small", prof.small_region), ("big", prof.big_region)]
        regions = {}
        for label, size in sizes:
            path = f"/dev/shm/{self.tag}-{label}.region"
            self.regions.append(path)
            log(f"building a {human_bytes(size)} region with {prof.many_files} files (Engine, no FUSE)")
            # The big region is overcommitted (--sparse): it is larger than the machine's memory.
            sparse = ["--sparse"] if label == "big" else []
            run([MKFS, *sparse, "--size", str(size), "--inodes", str(prof.many_inodes), path])
            run([sys.executable, __file__, "--internal", "populate", path, str(prof.many_files)], timeout=900)
            regions[label] = path
            g = _geometry(size, prof.many_inodes)
            self.res.add(f"metadata area share, {human_bytes(size)} region, {prof.many_inodes} inodes",
                         "pmemfs", 100 * g.data_start_block / g.block_count, "%", "lower")
        shm = self.primary
        if shm is not None:
            g = _geometry(shm.size, shm.inodes)
            self.res.add(f"metadata area share, {human_bytes(shm.size)} region, {shm.inodes} inodes",
                         "pmemfs", 100 * g.data_start_block / g.block_count, "%", "lower")
        for size in (GiB, TiB):
            g = _geometry(size, None)
            self.res.add(f"metadata area share, {human_bytes(size)} region, default inodes", "pmemfs",
                         100 * g.data_start_block / g.block_count, "%", "lower")

        mps = {}
        for label, _ in sizes:
            mp = os.path.join(self.base, f"many-{label}")
            os.makedirs(mp)
            mps[label] = mp
        n = prof.many_files
        log(f"mount / remount after kill -9, {n} files")
        for _ in range(prof.runs):
            for label, size in sizes:
                mp, region = mps[label], regions[label]
                pids: list = []
                self.extra_mps.append((mp, pids))
                try:
                    pid, dt = pmemfs_mount(region, mp, [])
                    pids.append(pid)
                    self.res.add(f"mount, {n} files, {human_bytes(size)} region", "pmemfs", dt, "s", "lower")
                    kill_mount(pid)
                    pid, dt = pmemfs_mount(region, mp, [])
                    pids[:] = [pid]
                    self.res.add(f"remount after kill -9, {n} files, {human_bytes(size)} region", "pmemfs",
                                 dt, "s", "lower")
                finally:
                    pmemfs_unmount(mp, pids[0] if pids else None)
                    self.extra_mps.remove((mp, pids))

        log(f"daemon memory and ls -lR with {n} files")
        for label, size in sizes:
            mp, region = mps[label], regions[label]
            pids = []
            self.extra_mps.append((mp, pids))
            try:
                sup, _ = pmemfs_mount(region, mp, [])
                pids.append(sup)
                pid = serving_pid(region)
                where = f"{n} files, {human_bytes(size)} region"
                self.res.add(f"daemon anon memory, idle, {where}", "pmemfs", anon_rss(pid) / MiB, "MiB", "lower")
                t0 = time.perf_counter()
                subprocess.run(["ls", "-lR", mp], stdout=subprocess.DEVNULL, check=True)
                self.res.add(f"ls -lR, {where}", "pmemfs", time.perf_counter() - t0, "s", "lower")
                self.res.add(f"daemon anon memory, after ls -lR, {where}", "pmemfs", anon_rss(pid) / MiB,
                             "MiB", "lower")
            finally:
                pmemfs_unmount(mp, pids[0] if pids else None)
                self.extra_mps.remove((mp, pids))

        fsck = _fsck_command()
        if fsck is None:
            msg = "fsck rows skipped: pmemfs/tools/fsck/ does not exist yet"
            log(msg)
            self.res.notes.append(msg)
        else:
            log(f"fsck, {n} files")
            for _ in range(prof.runs):
                for label, size in sizes:
                    t0 = time.perf_counter()
                    r = run([*fsck, "-n", regions[label]], check=False)
                    dt = time.perf_counter() - t0
                    row = self.res.row(f"fsck -n, {n} files, {human_bytes(size)} region", "pmemfs", "s", "lower")
                    row.values.append(dt)
                    if r.returncode != 0:
                        row.note = f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[-120:]}"
        for r in regions.values():
            with contextlib.suppress(OSError):
                os.unlink(r)

    def direct_access(self) -> None:
        log("direct-access copy vs numpy memcpy")
        shm = self.primary
        if shm is None:
            self.res.notes.append("direct-access copy skipped: no pmemfs target")
            return
        row = self.res.row("direct-access copy", shm.name, "MB/s")
        ref = self.res.row("numpy memcpy (reference)", "numpy", "MB/s")
        row.baselines["numpy"] = ref
        if not (ROOT / "pmemfs" / "direct.py").exists():
            row.note = "not available: pmemfs/direct.py does not exist"
            return
        size = _round(min(512 * MiB, self.prof.file_size // 2), MiB)
        from direct_bench import copy_bandwidth  # file to file through the mappings

        # A failure here fails the section (and the run's exit status), like any other.
        r = copy_bandwidth(shm.dir, size, max(5, self.prof.runs))
        row.values.append(r["direct_copy_Bps"] / 1e6)
        ref.values.append(r["memcpy_Bps"] / 1e6)
        row.note = (f"{human_bytes(size)} file to file via pmemfs.direct, extents {r['extents']}, "
                    f"paired ratio {r['ratio']:.2f}, best {r['ratio_best']:.2f}")

    # ---- goals and baselines
    def finish(self) -> None:
        res = self.res
        pm = [t.name for t in self.targets if t.kind == "pmemfs"]
        for (metric, target), row in res.rows.items():
            if target in pm:
                for base in BASELINES:
                    b = res.get(metric, base)
                    if b is not None:
                        row.baselines[base] = b
        # Every workload at least as fast as libfuse's C passthrough; plus tmpfs for 1 MiB writes.
        for (metric, target), row in res.rows.items():
            if target in pm and metric in self.workloads:
                row.goal = reference_goal(row.better)
                if metric == "write 1 MiB, new file":
                    row.goal = all_goals(row.goal, ratio_goal("tmpfs", 0.8))
            if target in pm and metric == "metadata bytes per GiB, sequential":
                row.goal = max_goal(64, "<= 64 B")
        n = self.prof.many_files
        big = human_bytes(self.prof.big_region)
        small = human_bytes(self.prof.small_region)
        rb = res.get(f"remount after kill -9, {n} files, {big} region", "pmemfs")
        rs = res.get(f"remount after kill -9, {n} files, {small} region", "pmemfs")
        if rb is not None:
            rb.goal = max_goal(1.0, "<= 1 s")
            if rs is not None:
                rb.baselines[f"{small} region"] = rs
                rb.goal = Goal(f"<= 1 s and <= 1.2x {small} region",
                               lambda r, k=f"{small} region": r.median <= 1.0 and (r.ratio(k) or 99) <= 1.2)
        for row in res.rows.values():
            if row.metric.startswith("fsck -n"):
                row.goal = max_goal(3.0, "<= 3 s")
            if row.metric.startswith("daemon anon memory, after ls -lR") and big in row.metric:
                row.goal = max_goal(150, "<= 150 MiB")
        for d in (res.get("direct-access copy", t) for t in pm):
            if d is not None:
                d.goal = ratio_goal("numpy", 0.9)


def meta_pair(t: Target, n: int) -> dict[str, tuple[float, str, str]]:
    """create / stat / unlink of n files in each of two directories by two processes at
    once (`--internal meta-client`); aggregate ops/s of each phase, from the command to
    both clients until both have answered. The clients start before the clock does."""
    dirs = [t.p(f"meta2-{k}") for k in range(2)]
    procs = []
    try:
        for d in dirs:
            os.mkdir(d)
            procs.append(subprocess.Popen([sys.executable, __file__, "--internal", "meta-client", d, str(n)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:  # both have started (Python's start is not part of a phase)
            if p.stdout.readline() != "ready\n":
                raise RuntimeError(f"meta-client in {t.name} did not start (exit {p.wait()})")

        def phase(cmd: str) -> tuple[float, float]:
            c0, t0 = daemon_cpu(t.pid), time.perf_counter()
            for p in procs:
                p.stdin.write(cmd + "\n")
                p.stdin.flush()
            for p in procs:
                if p.stdout.readline() != "ok\n":
                    raise RuntimeError(f"meta-client {cmd} in {t.name} failed (exit {p.wait()})")
            return time.perf_counter() - t0, daemon_cpu(t.pid) - c0

        out = {}
        for cmd, label in (("create", "create"), ("stat", "stat, cold dentries"), ("unlink", "unlink")):
            if cmd == "stat":
                drop_caches(2)  # forget dentries: each stat is a lookup
            wall, cpu = phase(cmd)
            out[f"{label}, 2 processes"] = (2 * n / wall, "ops/s", "higher")
            if t.pid:
                out[f"{label}, 2 processes: daemon CPU per call"] = (1e6 * cpu / (2 * n), "us", "lower")
        return out
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _meta_client(d: str, n: int) -> None:
    """One of meta_pair's clients: a phase per line on stdin, "ok" when it is done."""
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        for p in names:
            if cmd == "create":
                os.close(os.open(p, flags, 0o644))
            elif cmd == "stat":
                os.stat(p)
            elif cmd == "unlink":
                os.unlink(p)
            else:
                return
        print("ok", flush=True)


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def _geometry(size: int, inodes: int | None):
    from pmemfs.media.format import BLOCK_2M, Geometry

    return Geometry.plan(size, BLOCK_2M, inodes)


def _meta_per_gib(t: Pmemfs, name: str) -> float:
    st = os.stat(t.p(name))
    r = run([sys.executable, __file__, "--internal", "extents", t.region, str(st.st_ino)])
    extents = int(r.stdout.split()[0])
    return (extents * 32 + 128) / (st.st_size / GiB)


def _internal(argv: list[str]) -> int:
    """Helpers run in a child process: `populate REGION N`, `extents REGION INO`,
    `meta-client DIR N`."""
    what, region, n = argv[0], argv[1], int(argv[2])
    if what == "meta-client":
        _meta_client(region, n)
        return 0
    from pmemfs.fs.engine import Engine

    if what == "populate":
        _populate(Engine, region, n)
    elif what == "extents":
        e = Engine(region, readonly=True, check_on_mount=False)
        try:
            print(len(e.extents(n)))
        finally:
            e.close()
    return 0


def _populate(Engine, region: str, n: int) -> None:
    e = Engine(region)
    try:
        per_dir = 1000
        for d in range(-(-n // per_dir)):
            parent = e.mkdir(1, b"d%04d" % d, 0o755).ino
            for i in range(min(per_dir, n - d * per_dir)):
                e.create(parent, b"file-%06d" % i, 0o644)
    finally:
        e.close()


def _fsck_command() -> list[str] | None:
    if not (ROOT / "pmemfs" / "tools" / "fsck" / "__init__.py").exists():  # (a package since the split)
        return None
    script = BIN / "pmemfs-fsck"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmemfs.tools.fsck"]


# ----------------------------------------------------------------- report
def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")), "")
    import pyfuse3
    import trio

    libfuse = run(["dpkg-query", "-W", "-f", "${Version}", "libfuse3-3"], check=False).stdout.strip()
    fio_v = run(["fio", "--version"], check=False).stdout.strip()
    head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "pyfuse3": pyfuse3.__version__, "trio": trio.__version__,
            "numpy": np.__version__, "libfuse": libfuse, "fio": fio_v,
            "commit": head + (" (with uncommitted changes)" if dirty else ""),
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(res: Results) -> tuple[list[str], list[list[str]]]:
    head = ["metric", "target", "median", "min-max", "unit"]
    for base in BASELINES:
        head += [base, f"x {base}"]
    head += ["goal", "status"]
    lines = []
    pm_metrics = {m for m, t in res.order if t.startswith("pmemfs")}
    for key in res.order:
        row = res.rows[key]
        if row.target in BASELINES and row.metric in pm_metrics:
            continue  # a baseline: its median and ratio are columns of the pmemfs rows
        other = [k for k in row.baselines if k not in BASELINES]
        goal = row.goal.text if row.goal else ""
        if other:  # a baseline without a column of its own: its ratio goes with the goal
            goal = (goal + f" (now {fmt(row.ratio(other[0]))}x {other[0]})").strip()
        status = {True: "met", False: "MISSED", None: "no baseline"}[row.met] if row.goal else ""
        if row.note and not row.values:
            status = row.note
        line = [row.metric, row.target, fmt(row.median, row.unit),
                f"{fmt(min(row.values), row.unit)}-{fmt(max(row.values), row.unit)}" if row.values else "-",
                row.unit]
        for base in BASELINES:
            b = row.baselines.get(base)
            line += [fmt(b.median, row.unit), fmt(row.ratio(base))] if b else ["", ""]
        lines.append([*line, goal, status])
    return head, lines


def request_table(requests: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "target", "ops", "requests/op", "by kind"]
    lines = [[r["workload"], r["target"], str(r["ops"]), f"{r['per_op']:.2f}",
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]))]
             for r in requests]
    return head, lines


def notes(res: Results) -> list[str]:
    return res.notes + [f"{r.metric} ({r.target}): {r.note}" for r in res.rows.values() if r.note and r.values]


def _text(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)).rstrip()
            for ln in [head, ["-" * w for w in widths], *lines]]


def _md(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(c.replace("|", "/") for c in ln) + " |" for ln in lines)]


REQUESTS_TITLE = ("FUSE requests per operation (a separate short pass per workload, "
                  "pmemfs mount --debug; not the timed runs)")


def print_table(res: Results, requests: list[dict]) -> None:
    print("\n".join(_text(*table(res))))
    for n in notes(res):
        print(f"note: {n}")
    if requests:
        print(f"\n{REQUESTS_TITLE}\n")
        print("\n".join(_text(*request_table(requests))))


def markdown(res: Results, requests: list[dict]) -> str:
    out = _md(*table(res))
    out += [f"\nNote: {n}" for n in notes(res)]
    if requests:
        out += ["", f"{REQUESTS_TITLE}:", "", *_md(*request_table(requests))]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--internal"]:
        return _internal(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, one run (smoke test)")
    ap.add_argument("--runs", type=int, help="runs per workload and target (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    ap.add_argument("--no-hugetlbfs", action="store_true", help="do not reserve huge pages")
    ap.add_argument("--only", default="io,meta,requests,size,many,direct",
                    help="comma-separated sections: io, meta, requests, size, many, direct")
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma-separated targets, in this order (default {DEFAULT_TARGETS}; "
                         "any --pmemfs names are added)")
    ap.add_argument("--pmemfs", action="append", default=[], metavar="NAME=OPT,OPT",
                    help="add a pmemfs target NAME (region in /dev/shm) mounted with -o OPT,OPT, "
                         "e.g. pmemfs-noacl=prefault,noacl; repeatable")
    args = ap.parse_args(argv)
    args.extra_variants = {}
    for spec in args.pmemfs:
        name, eq, opts = spec.partition("=")
        if not eq or not name.startswith("pmemfs-") or name in PMEMFS_VARIANTS:
            ap.error(f"--pmemfs {spec}: expected NAME=OPTIONS with a new NAME starting pmemfs-")
        args.extra_variants[name] = PmemfsVariant(name, "shm", tuple(o for o in opts.split(",") if o))
    known = {*PMEMFS_VARIANTS, *args.extra_variants, *BASELINES}
    args.target_list = [n for n in args.targets.split(",") if n]
    args.target_list += [n for n in args.extra_variants if n not in args.target_list]
    unknown = [n for n in args.target_list if n not in known]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    prof = PROFILES["tiny" if args.tiny else "quick" if args.quick else "default"]
    if args.runs:
        prof = Profile(**{**prof.__dict__, "runs": args.runs})
    if os.geteuid() != 0:
        print("bench: needs root (mounts, drop_caches, huge pages)", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("bench: fio is missing (apt-get install -y fio)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    b = Bench(prof, args)
    started = time.monotonic()
    info = machine()
    log(f"profile {prof.name}: file {human_bytes(prof.file_size)}, {prof.runs} run(s); workdir {b.base}")
    def data_files() -> None:
        for t in b.targets:
            fio(t.p("data.dat"), "write", "1m", prof.file_size)

    sections = [("io", b.io_workloads if "io" in only else data_files), ("meta", b.meta_workloads),
                ("requests", b.request_counts), ("size", b.metadata_size), ("many", b.many_files),
                ("direct", b.direct_access)]
    failed = False
    try:
        b.setup()
        for name, fn in sections:
            if name in only or (name == "io" and "size" in only):
                try:
                    fn()
                except Exception as e:  # keep what the other sections measured
                    failed = True
                    traceback.print_exc()
                    b.res.notes.append(f"section {name} failed: {type(e).__name__}: {e}")
    finally:
        b.teardown()
    b.finish()
    elapsed = time.monotonic() - started
    info["elapsed_s"] = round(elapsed, 1)
    print()
    print_table(b.res, b.requests)
    print(f"\n{prof.name} profile, {prof.runs} run(s) per target, {elapsed:.0f} s; "
          f"ratios are pmemfs/baseline of the medians (for times in s, lower is better)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "profile": prof.__dict__, "notes": b.res.notes,
                       "targets": [t.name for t in b.targets],
                       "rows": [b.res.rows[k].as_json() for k in b.res.order],
                       "requests": b.requests}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(b.res, b.requests))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
