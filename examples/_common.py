"""Shared plumbing for the demos: a region, a mountpoint, and honest reporting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pmemfs.serve import mounting  # noqa: E402

BIN = os.path.dirname(sys.executable)


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's commands the way a person would."""
    name, rest = args[0], args[1:]
    r = subprocess.run([os.path.join(BIN, name), *rest], capture_output=True, text=True,
                       env={**os.environ, **env} if env else None)
    if check and r.returncode != 0:
        fail(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r


def fail(msg: str) -> None:
    print(f"FAILED: {msg}", flush=True)
    raise SystemExit(1)


def proved(msg: str) -> None:
    print(f"  ✔ {msg}", flush=True)


def step(msg: str) -> None:
    print(f"→ {msg}", flush=True)


class Demo:
    """A region under /dev/shm mounted on a fresh directory; always cleaned up."""

    def __init__(self, name: str, size: str, region: str | None = None, keep: bool = False):
        self.region = region or f"/dev/shm/pmemfs-{name}.region"
        self.mp = f"/tmp/pmemfs-{name}"
        self.log = f"/tmp/pmemfs-{name}.log"  # the daemons' log, kept for a look afterwards
        self.size = size
        self.keep = keep

    def __enter__(self) -> Demo:
        os.makedirs(self.mp, exist_ok=True)
        if mounting.pmemfs_mount_at(self.mp):
            fail(f"{self.mp} is already mounted; unmount it first (pmemfs umount {self.mp})")
        cli("pmemfs-mkfs", "--force", "--size", self.size, self.region)
        step(f"made a {self.size} region at {self.region} and mounting it on {self.mp}")
        self.mount()
        return self

    def mount(self, env: dict | None = None, single: bool = False) -> float:
        started = time.monotonic()
        r = cli("pmemfs", "mount", *(["--single"] if single else []), "--log", self.log,
                self.region, self.mp, env=env)
        self.last_mount_line = r.stdout.strip()
        return (time.monotonic() - started) * 1000

    def daemon_pid(self) -> int:
        pid = mounting.region_holder(self.region)
        if not pid:
            fail("no daemon holds the region")
        return pid

    def kill9(self) -> float:
        """SIGKILL the daemon, as a kexec would end it; returns the moment of death."""
        pid = self.last_killed = self.daemon_pid()
        os.kill(pid, 9)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] == "Z":  # dead, not yet reaped
                        break
            except (FileNotFoundError, ProcessLookupError):
                break  # reaped between the two looks
            time.sleep(0.001)
        # A zombie leader can still have threads exiting, and the descriptors (the FUSE
        # connection, the region's lock) go with the last one: wait for the lock too.
        while mounting.region_holder(self.region) == pid:
            time.sleep(0.001)
        return time.monotonic()

    def kill_all(self) -> None:
        """kill -9 the supervisor and the daemons: the FUSE connection ends."""
        status = __import__("json").loads(cli("pmemfs", "info", "--json", self.mp).stdout)
        pids = [status.get("supervisor_pid"), self.daemon_pid()]
        for pid in filter(None, pids):
            os.kill(pid, 9)
        deadline = time.monotonic() + 30
        while not mounting.is_stale(self.mp) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the standby, too, has let the connection go

    def wait_for_replacement(self, dead_pid: int, timeout: float = 30.0) -> None:
        """Until another daemon serves the mountpoint (the supervisor's standby)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holder = mounting.region_holder(self.region)
            if holder and holder != dead_pid and mounting.pmemfs_mount_at(self.mp):
                try:
                    os.statvfs(self.mp)
                    return
                except OSError:
                    pass
            time.sleep(0.001)
        fail("no replacement daemon came up")

    def p(self, *parts: str) -> str:
        return os.path.join(self.mp, *parts)

    def __exit__(self, *exc) -> None:
        if mounting.pmemfs_mount_at(self.mp):
            try:
                mounting.unmount(self.mp)
            except Exception:
                subprocess.run(["fusermount3", "-uz", self.mp])
        shutil.rmtree(self.mp, ignore_errors=True)
        if not self.keep and os.path.exists(self.region):
            os.unlink(self.region)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass  # not root: reads may then come from the page cache
