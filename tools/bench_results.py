"""The results of tools/bench.py: the profiles (sizes), rows of measurements, the goals
they are held to."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BASELINES = ("tmpfs", "passthrough", "passthrough_ll")
REFERENCE = "passthrough_ll"  # the goals' reference
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

