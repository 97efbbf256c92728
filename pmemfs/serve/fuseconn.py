"""The kernel's side of a FUSE connection, for the supervisor: mounting fuse.pmemfs (as
root, or through fusermount3), unmounting, the connection's number in fusectl, aborting
it, and reading its FUSE_INIT.

Standard library only (and session's check of the INIT): the supervisor imports nothing
heavy.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import subprocess

from . import session
from .mountctl import SupervisorError, libc, mount_flags

log = logging.getLogger("pmemfs.supervisor")  # the supervisor's log, whose lines these are

MNT_DETACH = 2


def kernel_mount_options(options: set[str], fuse_fd: int, rootmode: int) -> tuple[int, str]:
    flags = mount_flags(options)
    data = [f"fd={fuse_fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", "default_permissions"]
    if "allow_other" in options:
        data.append("allow_other")
    return flags, ",".join(data)


def fuse_mount(source: str, mountpoint: str, options: set[str]) -> int:
    """Mount a FUSE filesystem of type fuse.pmemfs; returns the /dev/fuse descriptor."""
    st = os.stat(mountpoint)
    if os.geteuid() != 0:
        return _fusermount(source, mountpoint, options)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    flags, data = kernel_mount_options(options, fd, st.st_mode & 0o170000)
    if libc.mount(source.encode(), mountpoint.encode(), b"fuse.pmemfs", flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise SupervisorError(f"{mountpoint}: mount failed: {os.strerror(err)}")
    return fd


def _fusermount(source: str, mountpoint: str, options: set[str]) -> int:
    """Unprivileged mount through fusermount3, which passes back the /dev/fuse fd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # fusermount3 mounts nodev,nosuid for anyone but root (pmemfs mount refuses dev and
    # suid before), and knows no strictatime or nodiratime: the daemon honours those.
    opts = ["nosuid", "nodev", "default_permissions", f"fsname={source}", "subtype=pmemfs"]
    opts += sorted(options & {"allow_other", "ro", "noatime", "noexec"})
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        r = subprocess.run(["fusermount3", "-o", ",".join(opts), "--", mountpoint], env=env,
                           pass_fds=(theirs.fileno(),), capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
            raise SupervisorError(f"{mountpoint}: mount failed: {msg}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise SupervisorError(f"{mountpoint}: fusermount3 passed back no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def fuse_unmount(mountpoint: str) -> None:
    """Unmount; lazily when busy (the connection then ends as the last user leaves)."""
    if os.geteuid() == 0:
        if libc.umount2(mountpoint.encode(), 0) == 0:
            return
        if ctypes.get_errno() == errno.EBUSY:
            libc.umount2(mountpoint.encode(), MNT_DETACH)
        return
    r = subprocess.run(["fusermount3", "-u", "-q", mountpoint], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["fusermount3", "-u", "-q", "-z", mountpoint], capture_output=True)


def connection_id(real: str) -> str | None:
    """The connection's number in /sys/fs/fuse/connections (the mount's device minor),
    from mountinfo. `real` is the resolved mountpoint: resolving it again would stat
    the mount, which blocks while nobody serves it."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 8 and parts[4] == real:
                found = parts[2].split(":")[1] if parts[parts.index("-") + 1] == "fuse.pmemfs" else None
    return found


def abort_connection(conn: str | None) -> None:
    """Fail every waiting and future request of the connection at once. (Closing the
    last descriptor aborts it too; this does not wait for the other holders.)"""
    if conn is None:
        return
    if not os.path.exists(f"/sys/fs/fuse/connections/{conn}") and os.geteuid() == 0:
        # fusectl is usually mounted at boot; where it is not, mount it.
        subprocess.run(["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"],
                       capture_output=True)
    try:
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")
    except OSError as e:
        log.error("cannot abort FUSE connection %s: %s", conn, e)


def read_init(fd: int, timeout: float = 30.0) -> bytes:
    """The kernel's first request on a new connection: FUSE_INIT."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise SupervisorError(f"the kernel sent no FUSE_INIT within {timeout:.0f} s")
    data = os.read(fd, (1 << 20) + 4096)
    session.check_init_request(data)
    return data
