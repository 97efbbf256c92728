"""Live update: the daemon is killed (kill -9) or upgraded while clients run, and no
client notices more than a pause. The supervisor keeps the FUSE connection; a standby
daemon takes it over and the kernel resends what the dead one had not answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import children, wait_for

from pmemfs.serve import mountctl, mounting

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS = os.path.join(HERE, "live_clients.py")
BIN = os.path.dirname(sys.executable)
WRITERS = ("seq", "mmap", "churn")
ROLES = (*WRITERS, "read", "list")


def tree(root: str, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Everything a client can observe of a tree: names, kinds, sizes, content, links."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in skip:
            continue
        for name in dirnames:
            out[os.path.normpath(os.path.join(rel, name))] = ("dir",)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.normpath(os.path.join(rel, name))] = (stat.S_IFMT(st.st_mode), st.st_size,
                                                              st.st_nlink, digest)
    return out


def start_clients(root: str, stop: str, seed: int) -> dict[str, subprocess.Popen]:
    return {role: subprocess.Popen([sys.executable, CLIENTS, role, root, str(seed + i), "--stop", stop],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, role in enumerate(ROLES)}


def finish(clients: dict[str, subprocess.Popen]) -> dict[str, int]:
    counts, failures = {}, []
    for role, p in clients.items():
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            failures.append(f"{role}: exit {p.returncode}: {err.strip()}")
        else:
            counts[role] = int(out.split("ops=")[1])
    assert not failures, failures
    return counts


def replay_without_kills(tmp_path, counts: dict[str, int], seed: int) -> dict[str, tuple]:
    """The oracle: the same seeded operations on a tmpfs directory, no daemon at all."""
    oracle = str(tmp_path / "oracle")
    os.mkdir(oracle)
    for i, role in enumerate(ROLES):
        if role in WRITERS:
            subprocess.run([sys.executable, CLIENTS, role, oracle, str(seed + i), "--count",
                            str(counts[role])], check=True, capture_output=True)
    return tree(oracle)


def interrupt_workload(m, tmp_path, events: int, event, seed: int = 7) -> list[float]:
    """Run the five clients, call event() `events` times while they run, and check
    that every client finished without an error and the tree is what it would be
    without the events. Returns the time each event took."""
    subprocess.run([sys.executable, CLIENTS, "prepare", m.path, "0"], check=True)
    stop = str(tmp_path / "stop")
    clients = start_clients(m.path, stop, seed)
    took = []
    try:
        time.sleep(0.5)
        for _ in range(events):
            dead = [r for r, p in clients.items() if p.poll() is not None]
            assert not dead, f"clients ended early: {dead}: " + "; ".join(
                clients[r].stderr.read() for r in dead)
            t = time.monotonic()
            event()
            took.append(time.monotonic() - t)
            # Longer than supervisor.YOUNG, so these are not a crash loop, and long
            # enough for every client to get work done against each daemon.
            time.sleep(0.5)
    finally:
        open(stop, "w").close()
        counts = finish(clients)
    assert all(counts[r] > 0 for r in ROLES), counts
    got = tree(m.path, skip=("listed",))
    del got["pattern"], got["listed"]
    assert got == replay_without_kills(tmp_path, counts, seed)
    return took


# The suite's share; tools/live_loop.py runs hundreds (500 kills: docs/BENCHMARKS.md).
KILLS, UPGRADES = 10, 3


def test_kill_9_under_five_clients_is_a_pause(mounted, tmp_path):
    daemons = set()

    def kill():
        daemons.add(mounted.crash())

    took = interrupt_workload(mounted, tmp_path, KILLS, kill)
    assert len(daemons) == KILLS and mounted.proc.poll() is None
    print(f"kill -9 to a new daemon serving: max {max(took) * 1000:.0f} ms")
    log = mounted.log()
    assert log.count("the standby takes over") == KILLS
    assert "ENOTCONN" not in log and "Traceback" not in log


def test_upgrade_under_five_clients_is_a_pause(mounted, tmp_path):
    gaps = []

    def upgrade():
        r = subprocess.run([os.path.join(BIN, "pmemfs"), "upgrade", mounted.path],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        gaps.append(json.loads(r.stdout.splitlines()[-1])["gap_ms"] if r.stdout.startswith("{")
                    else float(r.stdout.split("gap ")[1].split(" ms")[0]))

    interrupt_workload(mounted, tmp_path, UPGRADES, upgrade)
    assert len(gaps) == UPGRADES
    log = mounted.log()
    assert log.count("drained: handing") == UPGRADES and "Traceback" not in log


@pytest.mark.parametrize("when", ["starting", "told to go"])
def test_a_replacement_killed_before_it_serves_is_replaced_too(mounted, when):
    """kill -9 of the daemon, then of its replacement while that one takes over (still
    starting, or told "go" and not yet serving): one more crash, so a third daemon
    serves; the mount stays and the client's descriptor works (found by tools/soak.py: a
    second kill one second after the first, on a loaded machine, lost the mount)."""
    fd = os.open(mounted.p("f"), os.O_CREAT | os.O_RDWR)
    try:
        assert wait_for(lambda: len(children(mounted.proc.pid)) == 2, 60)  # daemon and standby
        first = mounted.pid
        (standby,) = [p for p in children(mounted.proc.pid) if p != first]
        if when == "told to go":  # ready: it said so and waits on its socket for "go"
            assert wait_for(lambda: Path(f"/proc/{standby}/wchan").read_text() == "unix_stream_read_generic", 60)
            time.sleep(0.3)  # the supervisor has heard "ready"
        os.kill(standby, signal.SIGSTOP)  # it will not answer in time
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: mounted.log().count("the standby takes over") == 1, 30)
        time.sleep(0.3)  # the supervisor waits for it (or has told it to go)
        os.kill(standby, signal.SIGKILL)
        assert wait_for(lambda: mounting.region_holder(mounted.region) not in (None, first, standby), 120), \
            mounted.log()[-2000:]
        os.write(fd, b"served by a third daemon")
        assert os.pread(fd, 100, 0) == b"served by a third daemon"
        assert mounted.proc.poll() is None and mounting.pmemfs_mount_at(mounted.path)
    finally:
        os.close(fd)
    assert "giving up" not in mounted.log() and "died before it served" in mounted.log()


def test_the_mount_never_goes_away_and_descriptors_stay_valid(mounted):
    fd = os.open(mounted.p("f"), os.O_CREAT | os.O_RDWR)
    os.write(fd, b"before")
    dfd = os.open(mounted.path, os.O_RDONLY | os.O_DIRECTORY)
    mounted.crash()
    assert mounting.pmemfs_mount_at(mounted.path) is not None
    os.write(fd, b" after")
    assert os.pread(fd, 100, 0) == b"before after"
    assert os.listdir(dfd) == ["f"]
    os.close(fd)
    os.close(dfd)


def test_a_request_in_flight_at_the_kill_is_answered_once(mounted):
    """A request the dead daemon had taken is resent to the new one (NOTIFY_RESEND),
    and a mkdir it had committed is answered with its entry, not EEXIST."""
    # PMEMFS_CRASH_AT can't be aimed at one request from here; the engine-level test
    # below covers the committed-but-unanswered case exactly. Here: a client blocked
    # in the kernel while no daemon serves completes once one does.
    os.kill(mounted.proc.pid, signal.SIGSTOP)  # no takeover until we say so
    try:
        old = mounting.region_holder(mounted.region)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: mounting.region_holder(mounted.region) is None, 10)
        p = subprocess.Popen([sys.executable, "-c", f"import os; os.mkdir({mounted.p('made')!r})"],
                             stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert p.poll() is None  # blocked, not failed
    finally:
        os.kill(mounted.proc.pid, signal.SIGCONT)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    assert os.path.isdir(mounted.p("made"))


def _incompat(region: str, bits: int) -> None:
    """Set the superblock's incompat mask (and its checksum) in place, under the daemon."""
    import mmap

    import numpy as np

    from pmemfs.media.format import SUPERBLOCK_DTYPE, seal

    with open(region, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        sb = np.frombuffer(m, SUPERBLOCK_DTYPE, 1, 0)
        sb["feature_incompat"] = bits
        seal(sb, 0)
        del sb


def test_supervisor_status_and_upgrade_refused_for_unknown_region_features(mounted):
    status = mountctl.ask(mounted.path, {"verb": "status"})
    assert status["mode"] == "live" and status["daemon_pid"] == mounted.pid
    r = subprocess.run([os.path.join(BIN, "pmemfs"), "info", "--json", mounted.path],
                       capture_output=True, text=True)
    assert json.loads(r.stdout)["restart_mode"] == "live"
    old = mounted.pid
    _incompat(mounted.region, 0x80000000)  # as if a newer pmemfs had set a feature
    try:
        r = subprocess.run([os.path.join(BIN, "pmemfs"), "upgrade", mounted.path],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "unknown incompatible features 0x80000000" in r.stderr
        assert "the old one goes on serving" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert mounted.pid == old
        with open(mounted.p("still"), "w") as f:
            f.write("served")
    finally:
        _incompat(mounted.region, 0)


def test_an_unprivileged_user_cannot_upgrade(mounted):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        os.path.join(BIN, "pmemfs"), "upgrade", mounted.path],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "only root" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_unprivileged_user_cannot_remount_through_the_supervisor(mounted):
    """The remount verb asked of the supervisor's socket directly (the CLI would first
    fail at the kernel's MS_REMOUNT): refused, and the mount stays writable."""
    ask = ("import json, sys; from pmemfs.serve import mountctl; "
           "print(json.dumps(mountctl.ask(sys.argv[1], {'verb': 'remount', 'options': ['ro']})))")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        ask, mounted.path], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["ok"] is False and "only root" in answer["error"], answer
    with open(mounted.p("still-writable"), "w") as f:
        f.write("yes")
    assert "remounted" not in mounted.log()


def test_unmount_ends_supervisor_standby_and_daemon(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    m = mounting.spawn(region, mp, set(), log=str(tmp_path / "log"))
    try:
        assert wait_for(lambda: len(children(m.proc.pid)) == 2, 60)  # the daemon and its standby
        kids = children(m.proc.pid)
    finally:
        mounting.unmount(mp)
    assert m.proc.wait(timeout=30) == 0
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{k}/fd") for k in kids), 30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_unmounts_cleanly(region, tmp_path, sig):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    m = mounting.spawn(region, mp, set(), log=str(tmp_path / "log"))
    try:
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("x")
        os.kill(m.proc.pid, sig)
        assert m.proc.wait(timeout=30) == 0
    finally:
        if mounting.pmemfs_mount_at(mp):
            mounting.unmount(mp)
    assert mounting.pmemfs_mount_at(mp) is None and mounting.region_holder(region) is None


def test_a_region_nobody_can_serve_fails_its_clients_instead_of_hanging(mounted):
    """The replacement refuses the region (here: its magic destroyed under the live
    mount), so the supervisor aborts the connection: clients get an error, not a hang."""
    fd = os.open(mounted.p("f"), os.O_CREAT | os.O_RDWR)
    with open(mounted.region, "r+b") as r:
        r.write(b"NOTPMEMF")
    try:
        os.kill(mounted.pid, signal.SIGKILL)
        assert mounted.proc.wait(timeout=60) == 1  # it gave up, as it should
        mounted.killed = True  # not a failure for the fixture's teardown
        probe = subprocess.run([sys.executable, "-c", f"import os; os.fstatvfs({fd})"], pass_fds=(fd,),
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0 and ("not connected" in probe.stderr or "abort" in probe.stderr)
        assert "giving up the mount" in mounted.log()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # the flush of a dead connection fails
        with open(mounted.region, "r+b") as r:
            r.write(b"PMEMFSSB")  # so the fixture's final check sees the region as it was


def test_live_off_falls_back_to_a_remount(region, mount_factory):
    m = mount_factory(region, {"live=off"})
    with open(m.p("f"), "w") as f:
        f.write("kept")
    r = subprocess.run([os.path.join(BIN, "pmemfs"), "info", "--json", m.path], capture_output=True, text=True)
    assert json.loads(r.stdout)["restart_mode"].startswith("remount")
    old = mounting.region_holder(region)
    os.kill(old, signal.SIGKILL)
    # A remount: between the dead mount's removal and the new one the directory is bare.
    assert wait_for(lambda: mounting.region_holder(region) not in (None, old)
                    and mounting.pmemfs_mount_at(m.path) and not mounting.is_stale(m.path), 60)
    with open(m.p("f")) as f:
        assert f.read() == "kept"
    assert "live update unavailable (live=off was asked for)" in m.log()


def test_sighup_to_the_supervisor_upgrades(mounted):
    fd = os.open(mounted.p("f"), os.O_CREAT | os.O_RDWR)
    old = mounted.pid
    os.kill(mounted.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: mounting.region_holder(mounted.region) not in (None, old), 60)
    os.write(fd, b"same descriptor")
    assert os.pread(fd, 100, 0) == b"same descriptor"
    os.close(fd)
    assert wait_for(lambda: "'ok': True" in mounted.log(), 30), mounted.log()[-2000:]
