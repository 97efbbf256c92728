#!/usr/bin/env python3
"""Long live-update loop: the suite's five-client workload (tests/test_live_update.py)
with hundreds of kill -9s or upgrades of the daemon.

Each round mounts a fresh region, starts the five clients (a sequential writer that
fsyncs, a shared-mmap writer, a namespace churner, a verifying reader and a lister,
each keeping its descriptors open), interrupts the daemon --per-round times, and
checks: no client saw an error, the final tree equals a kill-free replay of the same
seeded operations, the log has no traceback, and fsck is clean after unmount.

    python tools/live_loop.py --kills 500 [--per-round 50] [--event kill|upgrade]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import conftest  # noqa: E402
import test_live_update as live  # noqa: E402

from pmemfs.media import mkfs  # noqa: E402
from pmemfs.serve import mountctl  # noqa: E402
from pmemfs.tools.fsck import check_region  # noqa: E402


def one_round(workdir: Path, n: int, event_kind: str, seed: int) -> float:
    region = f"/dev/shm/pmemfs-liveloop-{os.getpid()}.region"
    mkfs.make_filesystem(region, size=256 << 20)
    mp = workdir / "mnt"
    mp.mkdir(exist_ok=True)
    m = conftest.Mount(region, str(mp), set())
    started = time.monotonic()
    try:
        def event() -> None:
            if event_kind == "kill":
                m.crash()
            else:
                answer = mountctl.ask(m.path, {"verb": "upgrade"})
                assert answer.get("ok"), answer

        live.interrupt_workload(m, workdir, n, event, seed)
        log = m.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        m.cleanup()
    errors = [f.message for f in check_region(region) if f.severity == "error"]
    os.unlink(region)
    assert not errors, errors
    return time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=500, help="events in all")
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--event", choices=("kill", "upgrade"), default="kill")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    done, rnd = 0, 0
    while done < a.kills:
        n = min(a.per_round, a.kills - done)
        with tempfile.TemporaryDirectory(prefix="pmemfs-liveloop-") as d:
            secs = one_round(Path(d), n, a.event, a.seed + rnd)
        done += n
        rnd += 1
        print(f"round {rnd}: {n} {a.event}s under five clients in {secs:.0f} s; "
              f"{done}/{a.kills} done, 0 problems", flush=True)
    print(f"{done} {a.event}s, {rnd} rounds: every client ran without an error, every tree "
          "matched its kill-free replay, fsck clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
