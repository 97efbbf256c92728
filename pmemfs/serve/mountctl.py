"""Reaching a live mount from outside it: the control sockets of its supervisor and of
a daemon serving alone (--single), one request and its answer, and the kernel's remount
of the mount's flags.

Below both the supervisor, which listens and mounts, and mounting, which asks and
remounts; standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import socket

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 4096, 1 << 21, 1 << 24
# The options a remount changes (mounting.resolve_options names them): the kernel's
# per-mount flags, which the daemon follows for ro and atime.
REMOUNTABLE = frozenset({"ro", "suid", "dev", "noexec", "noatime", "strictatime", "nodiratime"})


class SupervisorError(Exception):
    """One line for a person."""


def control_address(mountpoint: str, resolved: bool = False) -> str:
    """The supervisor's control socket (abstract namespace), named by the mountpoint."""
    real = mountpoint if resolved else os.path.realpath(mountpoint)
    digest = hashlib.sha256(real.encode()).hexdigest()[:32]
    return f"\0pmemfs-supervisor-{digest}"


def daemon_address(real: str) -> str:
    """The control socket of a daemon that serves without a supervisor (--single)."""
    digest = hashlib.sha256(real.encode()).hexdigest()[:32]
    return f"\0pmemfs-daemon-{digest}"


def ask(mountpoint: str, request: dict, timeout: float = 300.0, address: str | None = None) -> dict:
    """Send one request to the supervisor of `mountpoint`; its JSON answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(address or control_address(mountpoint))
    except OSError:
        s.close()
        raise SupervisorError(f"{mountpoint}: no pmemfs supervisor holds this mount "
                              "(mounted with --single or -f?)") from None
    with s:
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise SupervisorError(f"{mountpoint}: the supervisor closed the connection without an answer")
    return json.loads(data)


def ask_daemon(real: str, request: dict, timeout: float = 300.0) -> dict:
    """Ask whoever serves the mount at `real` (resolved): its supervisor, or else a
    daemon serving it alone (--single, or the remount fallback)."""
    try:
        return ask(real, request, timeout, control_address(real, resolved=True))
    except SupervisorError:
        pass
    try:
        return ask(real, request, timeout, daemon_address(real))
    except SupervisorError:
        raise SupervisorError(f"{real}: no pmemfs daemon answers for this mount") from None


try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_flags(options: set[str]) -> int:
    """mount(2) flags for the options (mounting.resolve_options' form): nosuid and nodev
    unless suid or dev is asked for, and one atime mode always (a remount that names none
    would keep the old one)."""
    flags = (0 if "suid" in options else MS_NOSUID) | (0 if "dev" in options else MS_NODEV)
    if "noexec" in options:
        flags |= MS_NOEXEC
    if "ro" in options:
        flags |= MS_RDONLY
    if "noatime" in options:
        flags |= MS_NOATIME
    elif "strictatime" in options:
        flags |= MS_STRICTATIME
    else:
        flags |= MS_RELATIME
    if "nodiratime" in options:
        flags |= MS_NODIRATIME
    return flags


def kernel_remount(real: str, options: set[str], bind: bool = False) -> None:
    """MS_REMOUNT of the mount at `real` with exactly these flags (the superblock's
    read-only state too, unless bind: then only the mount's own flags change, and the
    kernel asks the filesystem nothing). Raises OSError."""
    flags = MS_REMOUNT | mount_flags(options) | (MS_BIND if bind else 0)
    if libc.mount(None, real.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), real)
