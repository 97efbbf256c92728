"""The run of tools/bench.py: its targets started and stopped, the interleaved loop of
every workload, and the goals set on the rows at the end."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

from bench_measure import anon_rss, round_up
from bench_results import (
    BASELINES,
    WORKLOAD_UNITS,
    Goal,
    MiB,
    Profile,
    Results,
    all_goals,
    human_bytes,
    max_goal,
    ratio_goal,
    reference_goal,
)
from bench_targets import (
    HUGE_PAGE,
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
    is_mounted,
    log,
    pmemfs_unmount,
    run,
    umount_kernel,
)


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
        shm_size = round_up(2 * f + f // 2 + 64 * MiB, HUGE_PAGE)
        huge_size = round_up(2 * f + 64 * MiB, HUGE_PAGE)
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

