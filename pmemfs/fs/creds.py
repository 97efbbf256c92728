"""Who is asking: the credentials behind a request, and the kernel's permission rule.

FUSE tells the daemon only the caller's fsuid, fsgid and thread id. A permission check
as the kernel makes it (generic_permission) also needs the caller's supplementary
groups and capabilities, so for the checks the daemon makes itself (control commands,
see the access table in docs/DESIGN.md) they are read from /proc/<tid>/status — per
thread, as credentials are.

Fail closed: when the thread is gone (it may die after sending its request), when its
status no longer shows the request's fsuid and fsgid (the id was reused), or when the
request came with pid 0 (a caller outside the daemon's pid namespace), the caller has
no supplementary groups and no capabilities: only the owner, primary group and other
bits apply. Capabilities count only for a caller in the daemon's user namespace; in a
child namespace they are not held over our inodes as the kernel would need to know
(capable_wrt_inode_uidgid), so they are ignored there too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import acl

R, W, X = 4, 2, 1  # permission mask bits, as MAY_READ / MAY_WRITE / MAY_EXEC
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_LINUX_IMMUTABLE = 9
CAP_SYS_ADMIN = 21
ALL_CAPS = (1 << 64) - 1


@dataclass(frozen=True)
class Creds:
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    caps: int = 0  # effective capabilities that count (see the module docstring)

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups

    def capable(self, cap: int) -> bool:
        return bool(self.caps >> cap & 1)


ROOT = Creds(0, 0, frozenset(), ALL_CAPS)  # the daemon's own work


def _status(pid: int) -> dict[bytes, list[bytes]]:
    with open(f"/proc/{pid}/status", "rb") as f:
        return {k: v.split() for k, _, v in (line.partition(b":") for line in f)}


def of_process(uid: int, gid: int, pid: int) -> Creds:
    """The credentials of thread `pid` that sent a request as fsuid `uid`, fsgid `gid`."""
    if pid <= 0:
        return Creds(uid, gid)
    try:
        st = _status(pid)
        same = int(st[b"Uid"][3]) == uid and int(st[b"Gid"][3]) == gid  # the fs ids
        groups = frozenset(int(g) for g in st.get(b"Groups", []))
        caps = int(st[b"CapEff"][0], 16)
        if caps and os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
            caps = 0
    except (OSError, KeyError, IndexError, ValueError):
        return Creds(uid, gid)
    if not same:
        return Creds(uid, gid)
    return Creds(uid, gid, groups, caps)


def permitted(who: Creds, mode: int, uid: int, gid: int, mask: int,
              acl_entries: list[acl.Entry] | None = None) -> bool:
    """May `who` access an inode with this mode and owner for `mask` (R|W|X)?

    The kernel's generic_permission: the owner's bits; else the access ACL when there
    is one and the group bits are not all off; else the group's bits when the caller
    is in the group, else the others'; then CAP_DAC_READ_SEARCH (read; read and search
    of a directory) and CAP_DAC_OVERRIDE (anything, except executing a file that has
    no x bit).
    """
    mask &= R | W | X
    if who.uid == uid:
        granted = not mask & ~(mode >> 6) & 7
    elif acl_entries is not None and mode & 0o070:
        granted = acl.permits(acl_entries, who.uid, who.in_group, uid, gid, mask)
    else:
        bits = mode >> 3 if who.in_group(gid) else mode
        granted = not mask & ~bits & 7
    if granted:
        return True
    if stat.S_ISDIR(mode):
        if not mask & W and who.capable(CAP_DAC_READ_SEARCH):
            return True
        return who.capable(CAP_DAC_OVERRIDE)
    if mask == R and who.capable(CAP_DAC_READ_SEARCH):
        return True
    return (not mask & X or bool(mode & 0o111)) and who.capable(CAP_DAC_OVERRIDE)


def owner_or_capable(who: Creds, uid: int) -> bool:
    """inode_owner_or_capable: the owner, or CAP_FOWNER."""
    return who.uid == uid or who.capable(CAP_FOWNER)


def of(ctx) -> Creds:
    """The credentials of a request context (engine.Ctx): given, or read from /proc."""
    given = getattr(ctx, "creds", None)
    return given if given is not None else of_process(ctx.uid, ctx.gid, ctx.pid)
