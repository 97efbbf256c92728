"""Shared fixtures: regions under /dev/shm, engines, and real FUSE mounts.

Every mount made here is unmounted by a finalizer, even when the test fails, and
every region a test leaves behind must pass the structural checks (the fsck core).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import time
import uuid

import pytest

from pmemfs.fs.engine import Engine
from pmemfs.media.format import STATE_CLEAN, read_superblock
from pmemfs.media.mkfs import make_filesystem
from pmemfs.media.region import Region
from pmemfs.serve import mounting
from pmemfs.tools.fsck import check_region

SMALL = 64 << 20


def new_region_path() -> str:
    return f"/dev/shm/pmemfs-test-{uuid.uuid4().hex[:12]}.region"


def assert_clean(region: str) -> None:
    errors = [f for f in check_region(region) if f.severity == "error"]
    assert not errors, "region fails its checks: " + "; ".join(f.message for f in errors[:5])


SPARSE_ABOVE = 1 << 30


@pytest.fixture
def region_factory():
    """Regions up to 1 GiB are reserved as pmemfs-mkfs makes them by default; larger
    ones are overcommitted (--sparse), as the tests that make them rely on: the few
    blocks they use are memory, the rest are holes. sparse= says it explicitly."""
    made: list[str] = []

    def make(size: int = SMALL, sparse: bool | None = None, **kw) -> str:
        path = new_region_path()
        made.append(path)
        make_filesystem(path, size=size, sparse=size > SPARSE_ABOVE if sparse is None else sparse, **kw)
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


def written_bytes(path: str) -> int:
    """Bytes of a file on tmpfs whose pages were written (or faulted in): mincore over a
    shared mapping counts those, not pages only reserved by fallocate (which st_blocks
    counts). So a reserved region's untouched blocks show here as 0."""
    import ctypes
    import mmap

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
    finally:
        libc.munmap(addr, size)


def superblock_state(region: str) -> int:
    with Region(region, writable=False, lock=False) as r:
        return read_superblock(r.buf, r.size)[0].state


class Mount:
    """A daemon serving region on path. Teardown (cleanup) always leaves nothing mounted,
    and reports as a test failure whatever a user would call broken: an unmount that
    fails, a daemon that does not exit 0 after it, a region not marked clean, a daemon
    that died by itself (only kill() is allowed to end one)."""

    debug = False  # the daemon logs every request it answers (tools/soak.py skips __init__)

    def __init__(self, region: str, path: str, options: set[str], debug: bool = False):
        self.region = region
        self.path = path
        self.options = options
        self.debug = debug  # the daemon logs every request it answers
        self.proc: subprocess.Popen | None = None
        self.killed = False
        self.start()

    def start(self) -> None:
        m = mounting.spawn(self.region, self.path, set(self.options), log=self.path + ".log",
                           debug=self.debug)
        self.proc = m.proc
        self.status = m.status
        self.killed = False

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
        self.killed = True

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
        """pmemfs umount: the daemon exits 0 and the region is marked clean."""
        mounting.unmount(self.path)
        assert self.proc.wait(timeout=30) == 0, f"daemon exited with {self.proc.returncode}: {self.log()[-2000:]}"
        assert superblock_state(self.region) == STATE_CLEAN, "unmounted, but the region is not marked clean"

    def restart(self) -> None:
        """kill -9 and mount again, as a kexec would."""
        self.kill()
        self.start()

    def cleanup(self) -> list[str]:
        """Unmount whatever is left, always (lazily when a clean unmount fails); returns
        the problems found, which fail the test."""
        problems: list[str] = []
        clean_exit = False
        if self.proc is not None and self.proc.poll() is None:
            wait = 20
            try:
                mounting.unmount(self.path, timeout=20)
            except Exception as e:
                problems.append(f"{self.path}: unmount failed: {e}")
                subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
                wait = 2  # a lazy unmount of a busy mount leaves the daemon serving: kill it
            try:
                code = self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.path}: daemon {self.proc.pid} still running {wait} s after the unmount")
                self.proc.kill()
                code = self.proc.wait()
            if code != 0:
                problems.append(f"{self.path}: daemon exited with {code} after the unmount")
            clean_exit = code == 0 and not problems
        elif self.proc is not None and not self.killed and self.proc.returncode != 0:
            problems.append(f"{self.path}: daemon {self.proc.pid} died by itself ({self.proc.returncode})")
        elif self.proc is not None and not self.killed:
            clean_exit = True  # unmounted by the test
        if mounting.pmemfs_mount_at(self.path) is not None:
            # Dead after kill(), or served by a daemon the test started itself.
            stale = mounting.is_stale(self.path)
            try:
                mounting.unmount(self.path, timeout=20)
                if not stale and not self.killed and self.proc is not None:
                    problems.append(f"{self.path}: still mounted after its daemon exited")
            except Exception as e:
                problems.append(f"{self.path}: unmount failed: {e}")
        if mounting.pmemfs_mount_at(self.path) is not None:
            subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
            problems.append(f"{self.path}: needed a lazy unmount")
        if (clean_exit and os.path.exists(self.region) and mounting.region_holder(self.region) is None
                and superblock_state(self.region) != STATE_CLEAN):
            problems.append(f"{self.region}: the daemon exited 0, but the region is not marked clean")
        return problems

    def log(self) -> str:
        try:
            with open(self.path + ".log") as f:
                return f.read()
        except OSError:
            return ""


@pytest.fixture
def mount_factory(tmp_path):
    made: list[Mount] = []

    def make(region: str, options: set[str] | None = None, name: str = "mnt", debug: bool = False) -> Mount:
        path = str(tmp_path / name)
        os.makedirs(path, exist_ok=True)
        m = Mount(region, path, options or set(), debug)
        made.append(m)
        return m

    yield make
    problems = [p for m in made for p in m.cleanup()]  # every mount is cleaned up first
    for m in made:
        assert mounting.pmemfs_mount_at(m.path) is None
        assert "Traceback" not in m.log(), m.log()
    assert not problems, "teardown: " + "; ".join(problems) + "\n" + "\n".join(m.log()[-1500:] for m in made)
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


HUGEPAGES = {"2M": "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
             "1G": "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"}


@contextlib.contextmanager
def hugetlbfs(where: str, pages: int, pagesize: str = "2M", skip_if_unavailable: bool = False):
    """Reserve `pages` more huge pages of pagesize and mount a hugetlbfs of that page size
    at where; always unmount it and give the pages back (as a difference, so a concurrent
    user keeps what it reserved). With no hugetlbfs in the kernel the test is skipped;
    pages the kernel cannot reserve fail it, or skip it when skip_if_unavailable (1 GiB
    pages need CPU support and 1 GiB of contiguous free memory each)."""
    with open("/proc/filesystems") as f:
        if "hugetlbfs" not in f.read():
            pytest.skip("this kernel has no hugetlbfs")
    knob = HUGEPAGES[pagesize]
    if not os.path.exists(knob):
        pytest.skip(f"this kernel or CPU has no {pagesize} huge pages ({knob} is missing)")
    os.makedirs(where, exist_ok=True)
    added = 0
    mounted = False
    try:
        with open(knob) as f:
            old = int(f.read())
        with open(knob, "w") as f:
            f.write(str(old + pages))
        with open(knob) as f:
            added = max(int(f.read()) - old, 0)
        if added < pages:
            msg = f"the kernel reserved {added} of {pages} {pagesize} huge pages"
            if skip_if_unavailable:
                pytest.skip(msg + " (not enough contiguous free memory)")
            pytest.fail(msg)
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize}", "none", where],
                       check=True, capture_output=True)
        mounted = True
        yield where
    finally:
        busy = None
        if mounted:
            for name in os.listdir(where):
                os.unlink(os.path.join(where, name))
            r = subprocess.run(["umount", where], capture_output=True, text=True)
            if r.returncode != 0:  # still mapped by someone: detach it, fail after the release
                subprocess.run(["umount", "-l", where], capture_output=True)
                busy = r.stderr.strip()
        if added:
            with open(knob) as f:
                now = int(f.read())
            with open(knob, "w") as f:
                f.write(str(max(now - added, 0)))
        if busy:
            pytest.fail(f"hugetlbfs at {where} was busy at the end: {busy}")


@pytest.fixture
def hugetlbfs_factory(tmp_path):
    """hugetlbfs(...) as a fixture: request it before mount_factory, so that its finalizer
    runs after every daemon using it has been unmounted."""
    stack = contextlib.ExitStack()

    def make(pages: int, pagesize: str = "2M", skip_if_unavailable: bool = False) -> str:
        return stack.enter_context(hugetlbfs(str(tmp_path / f"huge-{pagesize}"), pages, pagesize,
                                             skip_if_unavailable))

    yield make
    stack.close()
