"""Shared fixtures: regions under /dev/shm, engines, and real FUSE mounts.

Every mount made here is unmounted by a finalizer, even when the test fails, and
every region a test leaves behind must pass the structural checks (the fsck core).
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import time
import uuid

import pytest

from pmemfs import check, mounting
from pmemfs.engine import Engine
from pmemfs.mkfs import make_filesystem

SMALL = 64 << 20


def new_region_path() -> str:
    return f"/dev/shm/pmemfs-test-{uuid.uuid4().hex[:12]}.region"


def assert_clean(region: str) -> None:
    errors = [f for f in check.check_region(region) if f.severity == "error"]
    assert not errors, "region fails its checks: " + "; ".join(f.message for f in errors[:5])


@pytest.fixture
def region_factory():
    made: list[str] = []

    def make(size: int = SMALL, **kw) -> str:
        path = new_region_path()
        made.append(path)
        make_filesystem(path, size=size, **kw)
        return path

    make.paths = made
    yield make
    for path in made:
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def region(region_factory) -> str:
    return region_factory()


@pytest.fixture
def engine(region):
    e = Engine(region)
    yield e
    e.close()
    assert_clean(region)


class Mount:
    def __init__(self, region: str, path: str, options: set[str]):
        self.region = region
        self.path = path
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        m = mounting.spawn(self.region, self.path, set(self.options), log=self.path + ".log")
        self.proc = m.proc
        self.status = m.status

    @property
    def pid(self) -> int:
        """The serving daemon (the region's lock holder); self.proc is its supervisor."""
        return mounting.region_holder(self.region) or self.proc.pid

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def kill(self) -> None:
        """kill -9 the supervisor and the daemon: the connection ends and the
        mountpoint is left dead (ENOTCONN), as after a reboot."""
        kids = children(self.proc.pid)  # the daemon and the standby hold the connection too
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}/fd") for p in kids), 30)
        wait_for(lambda: mounting.region_holder(self.region) is None, 30)

    def crash(self) -> int:
        """kill -9 the daemon only: the supervisor's standby takes the connection over
        (live update). Returns once a new daemon serves; the mount never goes away."""
        old = mounting.region_holder(self.region)
        assert old and old != self.proc.pid
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: mounting.region_holder(self.region) not in (None, old), 60), \
            "no daemon took over:\n" + self.log()[-3000:]
        return mounting.region_holder(self.region)

    def unmount(self) -> None:
        mounting.unmount(self.path)
        self.proc.wait(timeout=30)

    def restart(self) -> None:
        """kill -9 and mount again, as a kexec would."""
        self.kill()
        self.start()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                mounting.unmount(self.path, timeout=20)
            except Exception:
                subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounting.pmemfs_mount_at(self.path) is not None:
            subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)

    def log(self) -> str:
        try:
            with open(self.path + ".log") as f:
                return f.read()
        except OSError:
            return ""


@pytest.fixture
def mount_factory(tmp_path):
    made: list[Mount] = []

    def make(region: str, options: set[str] | None = None, name: str = "mnt") -> Mount:
        path = str(tmp_path / name)
        os.makedirs(path, exist_ok=True)
        m = Mount(region, path, options or set())
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    for m in made:
        assert mounting.pmemfs_mount_at(m.path) is None
        assert "Traceback" not in m.log(), m.log()
    for region in {m.region for m in made}:
        if os.path.exists(region):
            assert_clean(region)


@pytest.fixture
def mounted(region, mount_factory) -> Mount:
    return mount_factory(region)


def children(pid: int) -> list[int]:
    """Processes whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def snapshot(root: str) -> dict:
    """Everything a failed call must not change: the tree with contents, xattrs and
    symlink targets, the free space and inodes, the kernel objects."""
    from pmemfs.kernel import KernelObjects

    out: dict = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rec = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_blocks]
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    rec.append(hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                rec.append(os.readlink(p))
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                rec.append(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p)))
            out[os.path.relpath(p, root)] = rec
    s = os.statvfs(root)
    out["<statfs>"] = [s.f_bfree, s.f_ffree]
    out["<kernel>"] = [(o["name"], o["state"], o["size"]) for o in KernelObjects(root).list()]
    return out
