"""The targets of tools/bench.py: what each one mounts, how it starts and stops.

  pmemfs-*        pmemfs with some mount options, region in /dev/shm or on hugetlbfs
  tmpfs           a fresh kernel tmpfs mount
  passthrough     tools/passthroughfs.py (minimal pyfuse3 + trio) over a fresh tmpfs
  passthrough_ll  libfuse's low-level C example (multi-threaded), built at bench time,
                  over a fresh tmpfs

A target that cannot run here (no compiler, an option the installed pmemfs refuses)
raises Unavailable from start(): the harness notes why and runs the others.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PMEMFS = str(BIN / "pmemfs")
MKFS = str(BIN / "pmemfs-mkfs")
PASSTHROUGH = str(ROOT / "tools" / "passthroughfs.py")
# Debian's libfuse3-dev ships the examples as plain files; other packagings gzip them.
LL_EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"
MiB = 1 << 20
HUGE_PAGE = 2 * MiB
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


class Unavailable(Exception):
    """This target cannot run on this machine or with the installed code (a note, not a failure)."""


# ----------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
    return r


def drop_caches(level: int = 3) -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(str(level))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def fusermount_u(mp: str) -> None:
    if run(["fusermount3", "-u", "-q", mp], check=False).returncode != 0:
        run(["fusermount3", "-uz", "-q", mp], check=False)


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f if len(line.split()) > 1)


def umount_kernel(path: str) -> None:
    if is_mounted(path) and run(["umount", path], check=False).returncode != 0:
        run(["umount", "-l", path], check=False)


def mount_tmpfs(path: str, size: int, name: str) -> None:
    os.makedirs(path)
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", name, path])


# ----------------------------------------------------------------- targets
class Target:
    name = "?"
    kind = "?"
    pid: int | None = None

    def __init__(self, base: str):
        self.base = base
        self.dir = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def p(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)


class Tmpfs(Target):
    name = kind = "tmpfs"

    def __init__(self, base: str, size: int):
        super().__init__(base)
        self.dir = os.path.join(base, "tmpfs")
        self.size = size

    def start(self) -> None:
        mount_tmpfs(self.dir, self.size, "bench-tmpfs")

    def stop(self) -> None:
        umount_kernel(self.dir)


class FuseChild(Target):
    """A FUSE daemon run in the foreground as our child over a fresh tmpfs directory;
    its PID is ours to stop."""

    def __init__(self, base: str, size: int, label: str = ""):
        super().__init__(base)
        self.label = label or self.name
        self.src = os.path.join(base, f"{self.label}-src")
        self.dir = os.path.join(base, f"{self.label}-mnt")
        self.log_path = os.path.join(base, f"{self.label}.log")
        self.size = size
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        cmd = self.command()  # may raise Unavailable: then nothing is mounted yet
        mount_tmpfs(self.src, self.size, f"bench-{self.label}-src")
        os.makedirs(self.dir)
        with open(self.log_path, "w") as errlog:
            self.proc = subprocess.Popen(cmd, cwd="/", stdin=subprocess.DEVNULL, stdout=errlog,
                                         stderr=errlog, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while not is_mounted(self.dir):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount (see {self.log_path})")
            time.sleep(0.02)
        os.stat(self.dir)

    def stop(self) -> None:
        if self.proc is not None:
            if is_mounted(self.dir):
                fusermount_u(self.dir)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.pid = None
        if is_mounted(self.dir):
            run(["fusermount3", "-uz", "-q", self.dir], check=False)
        umount_kernel(self.src)


class Passthrough(FuseChild):
    name = kind = "passthrough"

    def command(self) -> list[str]:
        return [sys.executable, PASSTHROUGH, self.src, self.dir]


def _example(name: str, out_dir: str) -> str | None:
    """Copy one of libfuse's examples (plain or gzipped) into out_dir; None if absent."""
    src = next((s for s in (f"{LL_EXAMPLES}/{name}", f"{LL_EXAMPLES}/{name}.gz") if os.path.exists(s)), None)
    if src is None:
        return None
    out = os.path.join(out_dir, name)
    with (gzip.open(src, "rb") if src.endswith(".gz") else open(src, "rb")) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return out


def build_passthrough_ll(out_dir: str) -> str:
    """Compile libfuse's passthrough_ll example into out_dir (once); its path. Unavailable
    when the compiler, pkg-config, fuse3's development files or the example are missing."""
    out = os.path.join(out_dir, "passthrough_ll")
    if os.path.exists(out):
        return out
    missing = [tool for tool in ("gcc", "pkg-config") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{' and '.join(missing)} not found (apt-get install {' '.join(missing)})")
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"], check=False)
    if flags.returncode != 0:
        raise Unavailable(f"pkg-config fuse3: {(flags.stderr or flags.stdout).strip()[-200:]} "
                          "(apt-get install libfuse3-dev)")
    c_file = _example("passthrough_ll.c", out_dir)
    if c_file is None:
        raise Unavailable(f"{LL_EXAMPLES}/passthrough_ll.c(.gz) not found (apt-get install libfuse3-dev)")
    _example("passthrough_helpers.h", out_dir)  # it includes it; gcc says so if it is missing
    # Plain, as its header says to build it: no HAVE_FALLOCATE / HAVE_COPY_FILE_RANGE from
    # libfuse's config.h (fallocate answers EOPNOTSUPP; the workloads do not use either).
    r = run(["gcc", "-O2", "-Wall", "-o", out, c_file, *flags.stdout.split()], check=False, timeout=300)
    if r.returncode != 0:
        raise Unavailable(f"gcc passthrough_ll.c failed: {r.stderr.strip().splitlines()[0][-300:]}")
    return out


class PassthroughLL(FuseChild):
    """libfuse's passthrough_ll with its defaults: multi-threaded loop, cache=auto (entry
    and attribute timeouts 1 s, no keep_cache: an open drops the file's page cache),
    no writeback cache, no xattrs (GETXATTR answers ENOSYS, so the kernel stops asking),
    no flock. `debug` runs it with -d: one "opcode: NAME" line per request in its log."""

    name = kind = "passthrough_ll"

    def __init__(self, base: str, size: int, label: str = "", debug: bool = False):
        super().__init__(base, size, label)
        self.debug = debug

    def command(self) -> list[str]:
        binary = build_passthrough_ll(self.base)
        return [binary, "-f", *(["-d"] if self.debug else []), "-o", f"source={self.src}", self.dir]


def pmemfs_mount(region: str, mp: str, options: list[str], extra: tuple[str, ...] = ()) -> tuple[int, float]:
    """`pmemfs mount`; returns (supervisor pid, seconds until the command returned).
    The serving daemon is serving_pid(region). Unavailable when an option is refused."""
    cmd = [PMEMFS, "mount", *extra, *(["-o", ",".join(options)] if options else []), region, mp]
    t0 = time.perf_counter()
    r = run(cmd, check=False, timeout=600)
    dt = time.perf_counter() - t0
    said = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        bad = re.search(r"unknown mount option\(s\): [^\n]*", said)
        if bad and options:
            raise Unavailable(f"pmemfs mount -o {','.join(options)} refused: {bad.group(0)}")
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {said[-400:]}")
    m = re.search(r"(?:daemon|supervisor) pid (\d+)", said)
    if not m:
        raise RuntimeError(f"pmemfs mount said: {said}")
    return int(m.group(1)), dt


def serving_pid(region: str) -> int | None:
    from pmemfs.serve.mounting import region_holder

    return region_holder(region)


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def kill_mount(supervisor: int) -> None:
    """kill -9 a mount's supervisor and its daemons: the connection ends (a cold restart)."""
    kids = child_pids(supervisor)
    for pid in (supervisor, *kids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in (supervisor, *kids):
        wait_dead(pid, 30)


def pmemfs_unmount(mp: str, pid: int | None) -> None:
    if is_mounted(mp) and run([PMEMFS, "umount", mp], check=False, timeout=120).returncode != 0:
        fusermount_u(mp)
    if pid is not None and not wait_dead(pid, 30):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a daemon this harness started
        wait_dead(pid, 10)
    if is_mounted(mp):
        run(["fusermount3", "-uz", "-q", mp], check=False)


@dataclass(frozen=True)
class PmemfsVariant:
    """A pmemfs target: where its region lives and its mount options."""

    name: str
    backing: str  # "shm" (/dev/shm) or "huge" (hugetlbfs)
    options: tuple[str, ...]


# The built-in pmemfs targets; `bench.py --pmemfs NAME=OPTS` adds more on /dev/shm.
PMEMFS_VARIANTS = {v.name: v for v in (
    PmemfsVariant("pmemfs-shm", "shm", ("prefault",)),
    PmemfsVariant("pmemfs-huge", "huge", ()),
    PmemfsVariant("pmemfs-wb", "shm", ("prefault", "writeback")),  # the kernel's writeback cache
)}


class Pmemfs(Target):
    kind = "pmemfs"

    def __init__(self, base: str, name: str, region: str, size: int, options: list[str], inodes: int,
                 log_file: str | None = None):
        super().__init__(base)
        self.inodes = inodes
        self.name = name
        self.region = region
        self.size = size
        self.options = options
        self.log_file = log_file  # set: mounted with --debug, every request logged there
        self.dir = os.path.join(base, name)
        self.supervisor: int | None = None

    def start(self) -> None:
        os.makedirs(self.dir)
        run([MKFS, "--size", str(self.size), "--inodes", str(self.inodes), self.region])
        extra = ("--debug", "--log", self.log_file) if self.log_file else ()
        self.supervisor, self.mount_s = pmemfs_mount(self.region, self.dir, self.options, extra)
        self.pid = serving_pid(self.region)

    def stop(self) -> None:
        pmemfs_unmount(self.dir, self.supervisor)
        self.pid = None
        with contextlib.suppress(OSError):
            os.unlink(self.region)


class HugePages:
    """Reserve huge pages for the run; always give them back."""

    def __init__(self) -> None:
        self.orig: int | None = None
        self.got = 0

    def reserve(self, pages: int) -> bool:
        try:
            with open(NR_HUGEPAGES) as f:
                self.orig = int(f.read())
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(self.orig + pages))
            with open(NR_HUGEPAGES) as f:
                self.got = int(f.read()) - self.orig
        except OSError as e:
            log(f"cannot reserve huge pages: {e}")
            self.release()
            return False
        if self.got < pages:
            log(f"asked for {pages} huge pages, got {self.got}: skipping hugetlbfs")
            self.release()
            return False
        return True

    def release(self) -> None:
        if self.orig is not None:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(self.orig))
            self.orig = None
