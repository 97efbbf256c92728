"""Starting, finding and stopping pmemfs daemons (what `pmemfs mount/umount` do)."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from .region import lock_holder

READAHEAD_KB = 1024  # sequential reads then arrive as 1 MiB requests
MOUNT_OPTIONS_ALLOWED = {"allow_other", "allow_root", "ro", "noatime", "debug", "sync", "prefault",
                         "live"}


class MountFailed(Exception):
    """One line for a person."""


@dataclass
class MountEntry:
    source: str
    mountpoint: str
    fstype: str


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append(MountEntry(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def pmemfs_mount_at(mountpoint: str) -> MountEntry | None:
    mp = os.path.realpath(mountpoint)
    for m in reversed(mounts()):
        if m.mountpoint == mp and m.fstype == "fuse.pmemfs":
            return m
    return None


def is_stale(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN.

    statvfs, not stat: the kernel answers stat from its attribute cache without
    asking the (dead) daemon, but it always forwards statfs.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def fusermount(mountpoint: str, lazy: bool = False) -> None:
    args = ["fusermount3", "-u", "-q"] + (["-z"] if lazy else []) + [mountpoint]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise MountFailed(f"{mountpoint}: cannot unmount: {msg}")


def region_holder(region: str) -> int | None:
    try:
        fd = os.open(region, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return lock_holder(fd)
    finally:
        os.close(fd)


def set_readahead(mountpoint: str, kb: int = READAHEAD_KB) -> bool:
    try:
        dev = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        return True
    except OSError:
        return False


@dataclass
class Mounted:
    proc: subprocess.Popen
    status: str
    recovered_stale: bool
    downtime_ms: float


def make_mountpoint(mountpoint: str) -> None:
    """Make the mountpoint (and its parents) if it is missing. It is never stat'ed: a
    mount that nobody serves yet may be there, and a stat would wait for its daemon."""
    os.makedirs(os.path.dirname(os.path.abspath(mountpoint)), exist_ok=True)
    try:
        os.mkdir(mountpoint, 0o755)
    except FileExistsError:
        pass


def prepare_mountpoint(region: str, mountpoint: str, force: bool) -> bool:
    """Check the mountpoint; clear a dead pmemfs mount there. Returns True if one was cleared."""
    region_real = os.path.realpath(region)
    mp_real = os.path.realpath(mountpoint)
    if region_real == mp_real or region_real.startswith(mp_real.rstrip("/") + "/"):
        raise MountFailed(f"{region}: the region lies inside the mountpoint {mountpoint} "
                          "(the daemon would deadlock on itself)")
    if is_stale(mountpoint):
        entry = pmemfs_mount_at(mountpoint)
        if entry is None and not force:
            raise MountFailed(f"{mountpoint}: a dead FUSE mount of another filesystem is there; "
                              "unmount it or use --force")
        holder = region_holder(region)
        if holder:
            raise MountFailed(f"{region}: region is in use by process {holder}")
        fusermount(mountpoint, lazy=True)
        return True
    if not os.path.isdir(mountpoint):
        raise MountFailed(f"{mountpoint}: mountpoint is not a directory")
    if os.path.ismount(mountpoint):
        raise MountFailed(f"{mountpoint}: something is already mounted there")
    return False


def spawn(region: str, mountpoint: str, options: set[str], *, log: str | None = None,
          debug: bool = False, timeout: float = 300.0, env: dict | None = None,
          respawn: bool = True, single: bool = False) -> Mounted:
    """Start a background daemon and return once the mount answers.

    By default a supervisor holds the connection, so a daemon that dies or is
    upgraded is replaced without unmounting (respawn is that default, kept for old
    callers); single: one process that mounts and serves, restarted only by a remount.
    """
    started = time.monotonic()
    cleared = prepare_mountpoint(region, mountpoint, "force" in options)
    options = options - {"force"}
    rfd, wfd = os.pipe()
    module = "pmemfs.daemon" if single else "pmemfs.supervisor"
    cmd = [sys.executable, "-m", module, os.path.abspath(region), os.path.abspath(mountpoint),
           "--options", ",".join(sorted(options)), "--ready-fd", str(wfd)]
    if single:
        cmd.append("--single")
    if log:
        cmd += ["--log", os.path.abspath(log)]
    if debug:
        cmd.append("--debug")
    try:
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, cwd="/", env=env)
    finally:
        os.close(wfd)
    try:
        line = _read_line(rfd, timeout, proc)
    finally:
        os.close(rfd)
    if not line.startswith("ok"):
        proc.wait(timeout=30)
        reason = line[len("error "):] if line.startswith("error ") else (line or "daemon exited without a word")
        raise MountFailed(reason)
    # The daemon serves once its main loop runs; the first stat waits for that.
    try:
        os.stat(mountpoint)
    except OSError as e:
        raise MountFailed(f"{mountpoint}: mounted, but the daemon stopped answering: {e.strerror}") from None
    set_readahead(mountpoint)
    return Mounted(proc, line, cleared, (time.monotonic() - started) * 1000)


def _read_line(fd: int, timeout: float, proc: subprocess.Popen) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise MountFailed(f"daemon did not answer within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None and not data:
            break
    return data.decode(errors="replace").strip()


def unmount(mountpoint: str, timeout: float = 60.0) -> str:
    """Unmount and wait until the daemon has released the region (clean superblock)."""
    entry = pmemfs_mount_at(mountpoint)
    if entry is None:
        raise MountFailed(f"{mountpoint}: no pmemfs is mounted there")
    region = entry.source
    stale = is_stale(mountpoint)
    fusermount(mountpoint, lazy=stale)
    deadline = time.monotonic() + timeout
    while region_holder(region):
        if time.monotonic() > deadline:
            raise MountFailed(f"{mountpoint}: unmounted, but the daemon still holds {region} "
                              f"after {timeout:.0f} s")
        time.sleep(0.01)
    return region
