"""Starting, finding and stopping pmemfs daemons (what `pmemfs mount/umount` do)."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from ..media.region import lock_holder

READAHEAD_KB = 1024  # sequential reads then arrive as 1 MiB requests
# Pairs of contradicting options, the one kept in the resolved set first: the second is
# the default (rw, nosuid, nodev, exec, diratime, async).
OPTION_PAIRS = {"ro": "rw", "suid": "nosuid", "dev": "nodev", "noexec": "exec", "nodiratime": "diratime",
                "sync": "async"}
ATIME_OPTIONS = {"relatime", "strictatime", "noatime", "atime"}
DAEMON_OPTIONS = {"allow_other", "allow_root", "debug", "prefault", "force",  # and live=on|off
                  "writeback", "noacl"}
# What mount(8), mount.fuse3 and fstab pass along that concerns nothing here, with the
# FUSE superblock's own options, which mount(8) hands back at a remount.
PASSED_ALONG = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "nofail", "_netdev",
                "default_permissions", "remount"}
PASSED_ALONG_KEYS = {"user_id", "group_id", "fsname", "subtype", "rootmode", "fd", "max_read", "blksize"}
MOUNT_OPTIONS_ALLOWED = (set(OPTION_PAIRS) | set(OPTION_PAIRS.values()) | ATIME_OPTIONS | DAEMON_OPTIONS
                         | PASSED_ALONG | PASSED_ALONG_KEYS | {"live"})


class MountFailed(Exception):
    """One line for a person."""


class OptionError(MountFailed):
    """A mount option that is unknown, or that cannot be had here."""


def resolve_options(words, base=()) -> set[str]:
    """Mount options as mount(8) reads them: of two contradicting words the later wins
    (ro after rw, noatime after relatime), starting from `base` (a resolved set).
    Returns the options that differ from the defaults (rw, nosuid, nodev, exec, relatime,
    diratime), plus the daemon's own (allow_other, sync, prefault, live=off, ...)."""
    opts = set(base)
    unknown = []
    for word in words:
        word = word.strip()
        key = word.split("=", 1)[0]
        if not word or word in PASSED_ALONG or key in PASSED_ALONG_KEYS:
            continue
        pair = next(((k, v) for k, v in OPTION_PAIRS.items() if word in (k, v)), None)
        if pair:
            opts.discard(pair[0])
            if word == pair[0]:
                opts.add(word)
        elif word in ATIME_OPTIONS:
            # atime only undoes noatime: Linux's default mode is relatime.
            opts -= {"noatime"} if word == "atime" else {"noatime", "strictatime"}
            if word in ("noatime", "strictatime"):
                opts.add(word)
        elif word in DAEMON_OPTIONS:
            opts.add(word)
        elif word in ("live=on", "live=off"):
            opts -= {"live=off"}
            if word == "live=off":
                opts.add(word)
        else:
            unknown.append(word)
    if unknown:
        raise OptionError(f"unknown mount option(s): {', '.join(unknown)}")
    return opts


def check_privilege(options: set[str]) -> None:
    """dev and suid are root's: fusermount3 mounts nodev,nosuid for everyone else."""
    asked = sorted(options & {"dev", "suid"})
    if asked and os.geteuid() != 0:
        raise MountFailed(f"-o {','.join(asked)} needs root: a mount by another user is always "
                          "nodev,nosuid (fusermount3)")


def kernel_options_at(mountpoint: str) -> set[str] | None:
    """The mount's own flags at `mountpoint` (absolute, as mountinfo spells it), in
    resolve_options' form; None when no pmemfs is mounted there. Read from mountinfo,
    never by a stat: the mount may be dead or not yet served."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 6 and right.split()[:1] == ["fuse.pmemfs"] and _unescape(fields[4]) == mountpoint:
                found = fields[5].split(",")
    if found is None:
        return None
    out = {w for w in ("ro", "noexec", "noatime", "nodiratime") if w in found}
    out |= {w for w in ("suid", "dev") if "no" + w not in found}
    if "noatime" not in found and "relatime" not in found:
        out.add("strictatime")
    return out


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
    module = "pmemfs.serve.daemon" if single else "pmemfs.serve.supervisor"
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
    pids = [] if stale else _serving_pids(os.path.realpath(mountpoint))
    fusermount(mountpoint, lazy=stale)
    deadline = time.monotonic() + timeout
    # This mount's daemon (and supervisor) when they say who they are: read-only mounts
    # share a region's lock, so another mount's daemon may hold it too.
    while any(_alive(p) for p in pids) if pids else region_holder(region):
        if time.monotonic() > deadline:
            raise MountFailed(f"{mountpoint}: unmounted, but the daemon still holds {region} "
                              f"after {timeout:.0f} s")
        time.sleep(0.01)
    return region


def remount(mountpoint: str, words: list[str]) -> str:
    """mount -o remount: change the mount's flags (ro/rw, atime, dev, suid, exec) and the
    daemon with them. Returns the mount's flags afterwards, as mountinfo shows them.

    The kernel's side is MS_REMOUNT; the daemon is told through its supervisor (or its
    own socket, --single). The order keeps every write either refused by the kernel or
    served: to read-only, the kernel first (it refuses with EBUSY while a file is open
    for writing), then the daemon (marks the region clean); to read-write, the daemon
    first. A step that fails undoes the one before it.
    """
    from .mountctl import SupervisorError, ask_daemon, kernel_remount

    if pmemfs_mount_at(mountpoint) is None:
        raise MountFailed(f"{mountpoint}: no pmemfs is mounted there")
    if os.geteuid() != 0:
        raise MountFailed(f"{mountpoint}: remount needs root (fusermount3 cannot remount)")
    real = os.path.realpath(mountpoint)
    before, after = _remount_options(mountpoint, real, words)
    to_ro, to_rw = "ro" in after - before, "ro" in before - after

    def tell(options: set[str], check: bool = False) -> None:
        try:
            a = ask_daemon(real, {"verb": "remount", "options": sorted(options), "check": check})
        except (SupervisorError, OSError, ValueError) as e:
            raise MountFailed(f"{mountpoint}: cannot reach the daemon: {e}") from None
        if not a.get("ok"):
            raise MountFailed(f"{mountpoint}: cannot remount: {a.get('error', 'the daemon refused')}")

    def kernel_to(options: set[str]) -> None:
        try:
            kernel_remount(real, options)
        except OSError as e:
            hint = " (a file is open for writing)" if e.errno == errno.EBUSY else ""
            raise MountFailed(f"{mountpoint}: cannot remount: {e.strerror}{hint}") from None

    if to_ro:
        tell(after, check=True)  # e.g. no read-write direct mapping, before the kernel
    if to_rw:
        tell(after)
    try:
        kernel_to(after)
    except MountFailed:
        if to_rw:
            tell(before)
        raise
    if not to_rw:
        try:
            tell(after)
        except MountFailed:
            if to_ro:
                kernel_to(before)
            raise
    return _mount_flags_text(real)


def _remount_options(mountpoint: str, real: str, words: list[str]) -> tuple[set[str], set[str]]:
    """The mount's options now (the daemon's and the kernel's) and after the remount;
    OptionError for one that cannot change without a fresh mount."""
    from .mountctl import REMOUNTABLE, SupervisorError, ask_daemon

    try:
        status = ask_daemon(real, {"verb": "status"}, timeout=30.0)
    except (SupervisorError, OSError, ValueError) as e:
        raise MountFailed(f"{mountpoint}: cannot reach the daemon: {e}") from None
    kernel = kernel_options_at(real) or set()
    before = (set(status.get("options", ())) - REMOUNTABLE) | kernel
    after = resolve_options([w for w in words if w.split("=")[0] not in ("live", "force")], base=before)
    fixed = (before ^ after) - REMOUNTABLE
    if fixed:
        raise OptionError(f"{mountpoint}: {', '.join(sorted(fixed))} cannot change at a remount "
                          "(unmount and mount again)")
    return before, after


def _mount_flags_text(real: str) -> str:
    text = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and _unescape(fields[4]) == real:
                text = fields[5]
    return text


def _serving_pids(real: str) -> list[int]:
    from .mountctl import SupervisorError, ask_daemon

    try:
        s = ask_daemon(real, {"verb": "status"}, timeout=5.0)
    except (SupervisorError, OSError, ValueError):
        return []
    return [p for p in (s.get("daemon_pid"), s.get("supervisor_pid")) if isinstance(p, int)]


def _alive(pid: int) -> bool:
    """pid runs (a zombie has exited: its parent has not asked yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")
