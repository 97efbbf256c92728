"""The untimed and the pmemfs-only sections of tools/bench.py: FUSE requests per
operation, metadata bytes per GiB, regions of many files (mount, remount after kill -9,
fsck, memory) and the direct-access copy."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_measure import BENCH, anon_rss, round_up
from bench_results import GiB, MiB, TiB, human_bytes
from bench_run import Bench
from bench_targets import (
    BIN,
    HUGE_PAGE,
    MKFS,
    PassthroughLL,
    Pmemfs,
    Target,
    kill_mount,
    log,
    pmemfs_mount,
    pmemfs_unmount,
    run,
    serving_pid,
)

ROOT = Path(__file__).resolve().parent.parent


def request_counts(b: Bench) -> None:
    """Each pmemfs target's options again, on a small region of its own, mounted with
    --debug; passthrough_ll with -d, for reference. tools/bench_requests.py."""
    from bench_requests import LIBFUSE_LINE, PMEMFS_LINE, count_requests

    if not b.pmemfs_targets:
        b.res.notes.append("requests per operation skipped: no pmemfs target")
        return
    ops = b.prof.count_ops
    size = round_up(ops * (128 << 10) + max(4, ops // 4) * MiB + 64 * MiB, HUGE_PAGE)
    counted: list[tuple[str, Target, str, re.Pattern]] = []
    for t in b.pmemfs_targets:
        if not t.region.startswith("/dev/shm/"):
            b.res.notes.append(f"{t.name}: requests counted on a /dev/shm region with its options "
                               "(the backing does not change what the kernel asks)")
        region = f"/dev/shm/{b.tag}-{t.name}-count.region"
        b.regions.append(region)
        log_file = os.path.join(b.base, f"{t.name}-count.log")
        c = Pmemfs(b.base, f"{t.name}-count", region, size, t.options, 4 * ops + 1024, log_file)
        counted.append((t.name, c, log_file, PMEMFS_LINE))
    if any(t.name == "passthrough_ll" for t in b.targets):
        c = PassthroughLL(b.base, size, label="passthrough_ll-count", debug=True)
        counted.append(("passthrough_ll", c, c.log_path, LIBFUSE_LINE))
    for name, c, log_file, pattern in counted:
        log(f"requests per operation: {name}")
        b.started.append(c)
        try:
            c.start()
            b.requests += count_requests(c, name, log_file, pattern, ops)
        finally:
            c.stop()
            b.started.remove(c)


def metadata_size(b: Bench) -> None:
    log("metadata bytes per GiB")
    f = b.prof.file_size
    shm = b.primary
    if shm is None:
        b.res.notes.append("metadata size rows skipped: no pmemfs target")
        return
    for t in b.pmemfs_targets:
        b.res.add("metadata bytes per GiB, sequential", t.name, _meta_per_gib(t, "data.dat"),
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
    b.res.add("metadata bytes per GiB, after churn", shm.name, _meta_per_gib(shm, "churn.dat"),
              "B/GiB", "lower")
    for p in [*made, shm.p("churn.dat")]:
        with contextlib.suppress(OSError):
            os.unlink(p)
    for t in b.targets:
        with contextlib.suppress(OSError):
            os.unlink(t.p("data.dat"))


def many_files(b: Bench) -> None:
    """Two regions (small, and big and overcommitted) of prof.many_files files: the
    metadata area's share, mount and remount after kill -9, daemon memory and ls -lR,
    fsck -n."""
    sizes = [("small", b.prof.small_region), ("big", b.prof.big_region)]
    regions = _many_regions(b, sizes)
    mps = {}
    for label, _ in sizes:
        mp = os.path.join(b.base, f"many-{label}")
        os.makedirs(mp)
        mps[label] = mp
    _mount_times(b, sizes, regions, mps)
    _memory_and_ls(b, sizes, regions, mps)
    _fsck_times(b, sizes, regions)
    for r in regions.values():
        with contextlib.suppress(OSError):
            os.unlink(r)


def _many_regions(b: Bench, sizes: list[tuple[str, int]]) -> dict[str, str]:
    """The regions, made and filled without FUSE; with the metadata area share rows
    (also of the primary target's region and of 1 GiB and 1 TiB ones)."""
    prof = b.prof
    regions = {}
    for label, size in sizes:
        path = f"/dev/shm/{b.tag}-{label}.region"
        b.regions.append(path)
        log(f"building a {human_bytes(size)} region with {prof.many_files} files (Engine, no FUSE)")
        # The big region is overcommitted (--sparse): it is larger than the machine's memory.
        sparse = ["--sparse"] if label == "big" else []
        run([MKFS, *sparse, "--size", str(size), "--inodes", str(prof.many_inodes), path])
        run([sys.executable, BENCH, "--internal", "populate", path, str(prof.many_files)], timeout=900)
        regions[label] = path
        g = _geometry(size, prof.many_inodes)
        b.res.add(f"metadata area share, {human_bytes(size)} region, {prof.many_inodes} inodes",
                  "pmemfs", 100 * g.data_start_block / g.block_count, "%", "lower")
    shm = b.primary
    if shm is not None:
        g = _geometry(shm.size, shm.inodes)
        b.res.add(f"metadata area share, {human_bytes(shm.size)} region, {shm.inodes} inodes",
                  "pmemfs", 100 * g.data_start_block / g.block_count, "%", "lower")
    for size in (GiB, TiB):
        g = _geometry(size, None)
        b.res.add(f"metadata area share, {human_bytes(size)} region, default inodes", "pmemfs",
                  100 * g.data_start_block / g.block_count, "%", "lower")
    return regions


def _mount_times(b: Bench, sizes: list[tuple[str, int]], regions: dict[str, str], mps: dict[str, str]) -> None:
    n = b.prof.many_files
    log(f"mount / remount after kill -9, {n} files")
    for _ in range(b.prof.runs):
        for label, size in sizes:
            mp, region = mps[label], regions[label]
            pids: list = []
            b.extra_mps.append((mp, pids))  # teardown unmounts it if this fails half-way
            try:
                pid, dt = pmemfs_mount(region, mp, [])
                pids.append(pid)
                b.res.add(f"mount, {n} files, {human_bytes(size)} region", "pmemfs", dt, "s", "lower")
                kill_mount(pid)
                pid, dt = pmemfs_mount(region, mp, [])
                pids[:] = [pid]
                b.res.add(f"remount after kill -9, {n} files, {human_bytes(size)} region", "pmemfs",
                          dt, "s", "lower")
            finally:
                pmemfs_unmount(mp, pids[0] if pids else None)
                b.extra_mps.remove((mp, pids))


def _memory_and_ls(b: Bench, sizes: list[tuple[str, int]], regions: dict[str, str], mps: dict[str, str]) -> None:
    n = b.prof.many_files
    log(f"daemon memory and ls -lR with {n} files")
    for label, size in sizes:
        mp, region = mps[label], regions[label]
        pids: list = []
        b.extra_mps.append((mp, pids))
        try:
            sup, _ = pmemfs_mount(region, mp, [])
            pids.append(sup)
            pid = serving_pid(region)
            where = f"{n} files, {human_bytes(size)} region"
            b.res.add(f"daemon anon memory, idle, {where}", "pmemfs", anon_rss(pid) / MiB, "MiB", "lower")
            t0 = time.perf_counter()
            subprocess.run(["ls", "-lR", mp], stdout=subprocess.DEVNULL, check=True)
            b.res.add(f"ls -lR, {where}", "pmemfs", time.perf_counter() - t0, "s", "lower")
            b.res.add(f"daemon anon memory, after ls -lR, {where}", "pmemfs", anon_rss(pid) / MiB,
                      "MiB", "lower")
        finally:
            pmemfs_unmount(mp, pids[0] if pids else None)
            b.extra_mps.remove((mp, pids))


def _fsck_times(b: Bench, sizes: list[tuple[str, int]], regions: dict[str, str]) -> None:
    n = b.prof.many_files
    fsck = _fsck_command()
    if fsck is None:
        msg = "fsck rows skipped: pmemfs/tools/fsck/ does not exist yet"
        log(msg)
        b.res.notes.append(msg)
        return
    log(f"fsck, {n} files")
    for _ in range(b.prof.runs):
        for label, size in sizes:
            t0 = time.perf_counter()
            r = run([*fsck, "-n", regions[label]], check=False)
            dt = time.perf_counter() - t0
            row = b.res.row(f"fsck -n, {n} files, {human_bytes(size)} region", "pmemfs", "s", "lower")
            row.values.append(dt)
            if r.returncode != 0:
                row.note = f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[-120:]}"


def direct_access(b: Bench) -> None:
    log("direct-access copy vs numpy memcpy")
    shm = b.primary
    if shm is None:
        b.res.notes.append("direct-access copy skipped: no pmemfs target")
        return
    row = b.res.row("direct-access copy", shm.name, "MB/s")
    ref = b.res.row("numpy memcpy (reference)", "numpy", "MB/s")
    row.baselines["numpy"] = ref
    if not (ROOT / "pmemfs" / "direct.py").exists():
        row.note = "not available: pmemfs/direct.py does not exist"
        return
    size = round_up(min(512 * MiB, b.prof.file_size // 2), MiB)
    from direct_bench import copy_bandwidth  # file to file through the mappings

    # A failure here fails the section (and the run's exit status), like any other.
    r = copy_bandwidth(shm.dir, size, max(5, b.prof.runs))
    row.values.append(r["direct_copy_Bps"] / 1e6)
    ref.values.append(r["memcpy_Bps"] / 1e6)
    row.note = (f"{human_bytes(size)} file to file via pmemfs.direct, extents {r['extents']}, "
                f"paired ratio {r['ratio']:.2f}, best {r['ratio_best']:.2f}")



def _geometry(size: int, inodes: int | None):
    from pmemfs.media.format import BLOCK_2M, Geometry

    return Geometry.plan(size, BLOCK_2M, inodes)


def _meta_per_gib(t: Pmemfs, name: str) -> float:
    st = os.stat(t.p(name))
    r = run([sys.executable, BENCH, "--internal", "extents", t.region, str(st.st_ino)])
    extents = int(r.stdout.split()[0])
    return (extents * 32 + 128) / (st.st_size / GiB)



def _fsck_command() -> list[str] | None:
    if not (ROOT / "pmemfs" / "tools" / "fsck" / "__init__.py").exists():  # (a package since the split)
        return None
    script = BIN / "pmemfs-fsck"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmemfs.tools.fsck"]


