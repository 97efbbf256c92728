#!/usr/bin/env python3
"""Service gap of a live update: how long clients wait when the daemon is killed
(kill -9) or upgraded (`pmemfs upgrade`) under them.

A client process sends requests back to back (statfs, which the kernel always
forwards, so every call is one request to the daemon) and records when each one
completed and how long it took. For each event the gap is the longest wait of a
request that overlapped it: from the old daemon's last answer to the new daemon's
first, as a client sees it. Printed: median, p99 and max of the gaps over N events,
and p50/p99/max of every request's latency over the run. Between events the harness
waits until the supervisor has a standby ready again (its status), as a production
host would not kill twice in a second.

    python tools/live_bench.py [--events 100] [--files 0,100000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pmemfs.fs.engine import Engine  # noqa: E402
from pmemfs.media.mkfs import make_filesystem  # noqa: E402
from pmemfs.serve import mountctl, mounting  # noqa: E402

CLIENT = r"""
import os, sys, time
mp, out, stop = sys.argv[1:4]
rows = []
while not os.path.exists(stop):
    t = time.monotonic()
    os.statvfs(mp)
    rows.append((t, time.monotonic() - t))
with open(out, "w") as f:
    f.write("\n".join(f"{a} {b}" for a, b in rows))
"""


def populate(region: str, files: int) -> None:
    e = Engine(region)
    try:
        per_dir = 1000
        for d in range(-(-files // per_dir)):
            di = e.mkdir(1, b"d%d" % d, 0o755).ino
            for i in range(min(per_dir, files - d * per_dir)):
                e.create(di, b"f%d" % i, 0o644)
    finally:
        e.close()


def wait_standby(mp: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = mountctl.ask(mp, {"verb": "status"}, timeout=10)
        if s["standby_pid"] and s["daemon_pid"]:
            return
        time.sleep(0.05)
    raise RuntimeError("no standby became ready")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run(kind: str, files: int, events: int, workdir: str) -> dict:
    region = os.path.join("/dev/shm", f"pmemfs-livebench-{os.getpid()}-{files}.region")
    mp = os.path.join(workdir, f"mnt-{kind}-{files}")
    os.makedirs(mp, exist_ok=True)
    size = (1 << 30) if files < 10000 else (1 << 40)
    # 1 TiB is larger than the machine's memory: overcommitted (pmemfs-mkfs --sparse).
    make_filesystem(region, size=size, inodes=max(4096, files + 1000), sparse=size > (1 << 30))
    if files:
        populate(region, files)
    m = mounting.spawn(region, mp, set(), log=os.path.join(workdir, f"{kind}-{files}.log"))
    out, stop = os.path.join(workdir, "client.out"), os.path.join(workdir, "client.stop")
    client = None
    spans = []
    try:
        wait_standby(mp)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, mp, out, stop])
        time.sleep(0.5)
        for _ in range(events):
            t0 = time.monotonic()
            if kind == "kill":
                before = mountctl.ask(mp, {"verb": "status"})["restarts"]
                t0 = time.monotonic()
                os.kill(mounting.region_holder(region), signal.SIGKILL)
                while mountctl.ask(mp, {"verb": "status"}, timeout=30)["restarts"] == before:
                    time.sleep(0.01)
            else:
                answer = mountctl.ask(mp, {"verb": "upgrade"})
                if not answer.get("ok"):
                    raise RuntimeError(answer)
            spans.append((t0, time.monotonic()))
            wait_standby(mp)
            time.sleep(0.5)  # well past supervisor.YOUNG: these kills are not a crash loop
        open(stop, "w").close()
        client.wait(timeout=60)
    finally:
        if client and client.poll() is None:
            open(stop, "w").close()
            client.wait(timeout=60)
        try:
            if mounting.pmemfs_mount_at(mp):
                mounting.unmount(mp)
            m.proc.wait(timeout=60)
        finally:
            os.unlink(region)
            if os.path.exists(stop):
                os.unlink(stop)
    with open(out) as f:
        rows = [tuple(map(float, line.split())) for line in f if line.strip()]
    latencies = [b for _, b in rows]
    gaps = []
    for a, b in spans:
        overlapping = [lat for t, lat in rows if t <= b and t + lat >= a]
        gaps.append(max(overlapping) if overlapping else 0.0)
    ms = [g * 1000 for g in gaps]
    return {"event": kind, "files": files, "events": events, "requests": len(rows),
            "gap_ms": {"median": statistics.median(ms), "p99": percentile(ms, 0.99), "max": max(ms)},
            "latency_us": {"p50": percentile(latencies, 0.5) * 1e6, "p99": percentile(latencies, 0.99) * 1e6,
                           "max": max(latencies) * 1e6}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--files", default="0,100000", help="comma-separated file counts")
    p.add_argument("--kinds", default="kill,upgrade")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="pmemfs-livebench-") as workdir:
        for files in (int(x) for x in a.files.split(",")):
            for kind in a.kinds.split(","):
                r = run(kind, files, a.events, workdir)
                results.append(r)
                g, lat = r["gap_ms"], r["latency_us"]
                print(f"{kind:8s} {files:>7d} files  {a.events} events  gap median {g['median']:.0f} ms  "
                      f"p99 {g['p99']:.0f} ms  max {g['max']:.0f} ms   request latency p50 "
                      f"{lat['p50']:.0f} us  p99 {lat['p99']:.0f} us  max {lat['max'] / 1000:.0f} ms  "
                      f"({r['requests']} requests)", flush=True)
    if a.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
