"""`pmemfs mount --respawn`: a supervisor replaces a daemon that dies, by a fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pmemfs import check, mounting

BIN = os.path.dirname(sys.executable)


def serving(mp: str) -> bool:
    if mounting.pmemfs_mount_at(mp) is None:
        return False
    try:
        os.statvfs(mp)
        return True
    except OSError:
        return False


def test_a_killed_daemon_is_replaced_and_nothing_is_lost(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    m = mounting.spawn(region, mp, set(), respawn=True, log=str(tmp_path / "log"))
    supervisor = m.proc
    try:
        with open(os.path.join(mp, "f"), "wb") as f:
            f.write(b"kept" * 1000)
            f.flush()
            os.fsync(f.fileno())
        daemons = set()
        for _ in range(3):
            daemon = mounting.region_holder(region)
            assert daemon and daemon != supervisor.pid  # the daemon is the supervisor's child
            daemons.add(daemon)
            died = time.monotonic()
            os.kill(daemon, signal.SIGKILL)
            deadline = died + 30
            while time.monotonic() < deadline and not (serving(mp) and mounting.region_holder(region)
                                                       not in (None, daemon)):
                time.sleep(0.002)
            print(f"kill -9 to serving again: {(time.monotonic() - died) * 1000:.0f} ms")
            with open(os.path.join(mp, "f"), "rb") as f:
                assert f.read() == b"kept" * 1000
        assert len(daemons) == 3
        assert supervisor.poll() is None
    finally:
        r = subprocess.run([os.path.join(BIN, "pmemfs"), "umount", mp], capture_output=True, text=True)
        try:
            supervisor.wait(timeout=20)  # a clean exit of its daemon ends the supervisor
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
            raise
    assert r.returncode == 0, r.stderr
    assert supervisor.returncode == 0
    assert mounting.pmemfs_mount_at(mp) is None
    with open(str(tmp_path / "log")) as f:
        log = f.read()
    assert log.count("died (signal 9): starting another") == 3 and "Traceback" not in log
    assert not [f.message for f in check.check_region(region) if f.severity == "error"]
