"""Real kill -9 of the daemon under a multi-process workload: nothing acknowledged is lost."""

from __future__ import annotations

import multiprocessing
import os
import random
import time

from conftest import wait_for

from pmemfs.serve import mounting
from pmemfs.tools import stress


def run_round(mount, logs: dict[int, str], seed: int, workers: int = 3) -> int:
    ctx = multiprocessing.get_context("fork")
    deadline = time.monotonic() + 10
    procs = [ctx.Process(target=stress.worker, args=(mount.path, logs[w], w, seed * 100 + w, deadline))
             for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(random.Random(seed).uniform(0.3, 1.5))
    mount.kill()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0, f"worker failed with {p.exitcode}"
    mount.start()  # pmemfs mount clears the dead mountpoint itself
    return sum(1 for path in logs.values() for _ in open(path))


def test_kill_during_workload_loses_nothing_acknowledged(region_factory, mount_factory, tmp_path):
    region = region_factory(size=512 << 20)
    mount = mount_factory(region)
    logs = {w: str(tmp_path / f"ack{w}.log") for w in range(3)}
    total = 0
    for round_no in range(3):
        total = run_round(mount, logs, seed=round_no + 1)
        assert "clean=0" in mount.status, mount.status  # it really was an unclean stop
        problems = stress.verify(mount.path, logs)
        assert not problems, problems[:5]
    assert total > 10, "the workload acknowledged too little to prove anything"
    assert os.listdir(mount.path)


def test_worker_fails_on_enoent_from_a_live_mount(mounted, tmp_path):
    """ENOENT from a mount that still answers is a bug the workload must report, not an
    end of the workload: here another process removes the worker's files under it."""
    ctx = multiprocessing.get_context("fork")
    log = str(tmp_path / "ack.log")
    p = ctx.Process(target=stress.worker, args=(mounted.path, log, 0, 7, time.monotonic() + 30))
    p.start()
    try:
        assert wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, timeout=20)
        os.rename(mounted.p("w0"), mounted.p("moved"))  # every file the worker owns is gone
        p.join(timeout=60)
        assert p.exitcode not in (None, 0), "the worker ended quietly on ENOENT"
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    assert not mounting.is_stale(mounted.path)  # the mount was alive all along
