#!/usr/bin/env python3
"""kill -9 the daemon under a multi-process workload, many times, and verify each time.

    python tools/crash_loop.py [--iterations 200] [--workers 3] [--size 1G] [--seed 1]

Each iteration starts workers on the mount, kills the daemon at a random moment,
remounts (pmemfs mount clears the dead mountpoint), verifies that every acknowledged
effect of every iteration so far is intact, and prints the downtime. Exits non-zero
at the first loss. The test suite runs three iterations of the same thing
(tests/test_crash_kill.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pmemfs.media.mkfs import make_filesystem
from pmemfs.serve import mounting
from pmemfs.tools import stress
from pmemfs.tools.common import parse_size
from pmemfs.tools.fsck import check_region


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="pmemfs-crash-loop-")
    region = os.path.join("/dev/shm", os.path.basename(work) + ".region")
    mp = os.path.join(work, "mnt")
    os.mkdir(mp)
    logs = {w: os.path.join(work, f"ack{w}.log") for w in range(a.workers)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup below runs
    make_filesystem(region, size=parse_size(a.size))
    proc = mounting.spawn(region, mp, set()).proc
    ctx = multiprocessing.get_context("fork")
    try:
        for it in range(1, a.iterations + 1):
            deadline = time.monotonic() + 30
            workers = [ctx.Process(target=stress.worker,
                                   args=(mp, logs[w], w, it * 1000 + w, deadline)) for w in range(a.workers)]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.05, 1.0))
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            for w in workers:
                w.join()
            failed = [w.exitcode for w in workers if w.exitcode != 0]
            if failed:  # a worker ends quietly only on a dead mount (stress.worker)
                print(f"iteration {it}: worker(s) failed with {failed}", flush=True)
                return 1
            m = mounting.spawn(region, mp, set())
            proc = m.proc
            downtime = (time.monotonic() - killed_at) * 1000
            problems = stress.verify(mp, logs)
            acked = 0
            for path in logs.values():
                with open(path) as f:
                    acked += sum(1 for _ in f)
            print(f"iteration {it}: {acked} acknowledged ops so far, remount {m.downtime_ms:.0f} ms, "
                  f"kill-to-serving {downtime:.0f} ms, {len(problems)} problems", flush=True)
            if problems:
                for p in problems[:20]:
                    print("  " + p)
                return 1
    finally:
        try:
            mounting.unmount(mp)
        except Exception:
            subprocess.run(["fusermount3", "-uz", mp])
        proc.wait()
        errors = [f.message for f in check_region(region) if f.severity == "error"]
        print("final check:", "clean" if not errors else errors[:5])
        os.unlink(region)
        subprocess.run(["rm", "-rf", work])
    return 0


if __name__ == "__main__":
    sys.exit(main())
