"""What tools/bench.py prints and writes: the machine, the results table and the table of
FUSE requests per operation, as text or Markdown."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import numpy as np
from bench_results import BASELINES, Results
from bench_targets import run

ROOT = Path(__file__).resolve().parent.parent


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


