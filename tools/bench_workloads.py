"""The timed workloads of tools/bench.py on every target: I/O through fio, and metadata
(create / stat / unlink, by one process and by two, and ls -l)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

from bench_measure import BENCH, anon_rss, daemon_cpu, fio, timed_fio
from bench_results import MiB
from bench_run import Bench
from bench_targets import Target, drop_caches

Rates = dict[str, tuple[float, str, str]]  # metric: (value, unit, "higher" or "lower" is better)


def io_workloads(b: Bench) -> None:
    """The fio rows, in this order: the writes of new files first (before data.dat
    exists, so the regions hold them), then the overwrites and reads of data.dat."""
    new_file_writes(b)
    data_file_io(b)


def new_file_writes(b: Bench) -> None:
    f = b.prof.file_size

    def seq_write(bs: str, label: str, cap: int | None = None):
        def go(t: Target):
            path = t.p("new.dat")
            out = timed_fio(t, label, "bw", path, "write", bs, f, runtime=cap)
            os.unlink(path)
            return out
        return go

    b.each("sequential write 4 KiB", seq_write("4k", "write 4 KiB, new file", b.prof.write4k_cap_s))
    b.each("sequential write 128 KiB", seq_write("128k", "write 128 KiB, new file"))
    b.each("sequential write 1 MiB", seq_write("1m", "write 1 MiB, new file"))

    # Two clients at once (fio numjobs=2: two processes), each on its own file of
    # half the size; before data.dat exists, so the regions hold them.
    def two_writes(t: Target):
        d = t.p("jobs-w")
        os.mkdir(d)
        out = timed_fio(t, "write 1 MiB, new files, 2 jobs", "bw", d, "write", "1m", f // 2, numjobs=2)
        shutil.rmtree(d)
        return out

    b.each("sequential write 1 MiB, 2 jobs", two_writes)


def data_file_io(b: Bench) -> None:
    f = b.prof.file_size

    def make_data(t: Target) -> None:
        fio(t.p("data.dat"), "write", "1m", f)

    def overwrite(t: Target):
        return timed_fio(t, "overwrite 1 MiB", "bw", t.p("data.dat"), "write", "1m", f)

    b.each("overwrite 1 MiB", overwrite, prepare=make_data)

    def overwrite_4k(t: Target):
        return timed_fio(t, "overwrite 4 KiB", "bw", t.p("data.dat"), "write", "4k", f,
                         runtime=b.prof.write4k_cap_s)

    b.each("overwrite 4 KiB", overwrite_4k)  # data.dat is there from the row above

    def cold_read(bs: str, label: str):
        def go(t: Target):
            drop_caches()
            return timed_fio(t, label, "bw", t.p("data.dat"), "read", bs, f)
        return go

    b.each("cold read 128 KiB", cold_read("128k", "cold read 128 KiB"))
    b.each("cold read 1 MiB", cold_read("1m", "cold read 1 MiB"))

    def rand_read(t: Target):
        drop_caches()
        return timed_fio(t, "random read 4 KiB, cold", "iops", t.p("data.dat"), "randread", "4k", f,
                         number_ios=b.prof.randread_ios)

    b.each("random read 4 KiB", rand_read)

    def make_job_files(t: Target) -> None:  # a quarter each: data.dat is there too
        os.mkdir(t.p("jobs-r"))
        fio(t.p("jobs-r"), "write", "1m", f // 4, numjobs=2)

    def two_rand_reads(t: Target):
        drop_caches()
        return timed_fio(t, "random read 4 KiB, cold, 2 jobs", "iops", t.p("jobs-r"), "randread", "4k",
                         f // 4, number_ios=b.prof.randread_ios, numjobs=2)

    b.each("random read 4 KiB, 2 jobs", two_rand_reads, prepare=make_job_files,
           cleanup=lambda t: shutil.rmtree(t.p("jobs-r")))


def meta_cycle(t: Target, n: int) -> Rates:
    """create, stat (cold dentries) and unlink of n files by one process."""
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


def meta_workloads(b: Bench) -> None:
    n = b.prof.meta_files
    b.each(f"create / stat / unlink of {n} files", lambda t: meta_cycle(t, n))

    def pair(t: Target) -> Rates:
        try:
            return meta_pair(t, n)
        except RuntimeError as e:  # one target's failure (a baseline's bug) is a note
            b.res.notes.append(f"{t.name}: two-process metadata rows missing: {e}")
            return {}

    b.each(f"create / stat / unlink of 2 x {n} files, 2 processes", pair)
    ls_workload(b)
    for t in b.targets:
        if t.pid:
            b.res.add("daemon anon memory, after workloads", t.name,
                      (anon_rss(t.pid) or 0) / MiB, "MiB", "lower")
    for t in b.targets:  # not timed
        shutil.rmtree(t.p("ls"), ignore_errors=True)


def ls_workload(b: Bench) -> None:
    m = b.prof.ls_files

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

    b.each(f"ls -l of {m} files", ls, prepare=make_files)


def meta_pair(t: Target, n: int) -> dict[str, tuple[float, str, str]]:
    """create / stat / unlink of n files in each of two directories by two processes at
    once (`--internal meta-client`); aggregate ops/s of each phase, from the command to
    both clients until both have answered. The clients start before the clock does."""
    dirs = [t.p(f"meta2-{k}") for k in range(2)]
    procs = []
    try:
        for d in dirs:
            os.mkdir(d)
            procs.append(subprocess.Popen([sys.executable, BENCH, "--internal", "meta-client", d, str(n)],
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

