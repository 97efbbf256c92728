"""Leases on directly mapped files (see pmemfs.direct and docs/DESIGN.md).

A process that maps a file's blocks straight from the region holds a lease on the
file. While any lease on a file is held its blocks stay where they are and stay the
file's: truncate that would free blocks and the unlink that would free the inode fail
with EBUSY, carve refuses the file, defrag and the growth migration step around it.

The table lives in the daemon's memory, keyed by inode; a lease records the holder
(the process, by thread-group id and start time, so a recycled pid is not mistaken
for the holder), its mode ("ro" or "rw") and how many times that process took it. A
holder that has died is dropped lazily, whenever the table is consulted about its
inode, so a crashed client never pins a file for longer than it lives.

A direct mapping outlives the daemon (it maps the region, not the mount), so the
table is also written to a small file under /run/pmemfs at every change and read back
by the next daemon: a restart or a live takeover keeps every lease. /run is memory
and is gone after a reboot, as the mappings are.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("pmemfs.leases")
RUN_DIR = "/run/pmemfs"

MODES = ("ro", "rw")


@dataclass
class Lease:
    pid: int  # the holder's process (thread-group) id
    start: int  # the holder's start time (clock ticks after boot, /proc/PID/stat field 22)
    mode: str  # "ro" or "rw" ("rw" once the process took any rw lease)
    count: int = 1

    def as_dict(self) -> dict:
        return {"pid": self.pid, "mode": self.mode, "count": self.count}


class LeaseError(Exception):
    def __init__(self, err: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is in parentheses and may contain anything: split after the last ")".
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])


def process_of(tid: int) -> int:
    """The thread-group id of a thread (FUSE reports the calling thread's id)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _alive(lease: Lease) -> bool:
    st = _proc_stat(lease.pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == lease.start


class Leases:
    """The lease table: inode -> {holder pid: Lease}."""

    def __init__(self, region: str | None = None) -> None:
        """region: keep the table in a file beside the daemon (see the module doc)."""
        self._by_ino: dict[int, dict[int, Lease]] = {}
        self.path = None
        if region:
            digest = hashlib.sha256(os.path.realpath(region).encode()).hexdigest()[:24]
            self.path = os.path.join(RUN_DIR, f"leases-{digest}.json")
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                rows = json.load(f)
            for ino, leases in rows.items():
                self._by_ino[int(ino)] = {int(p): Lease(**v) for p, v in leases.items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring the lease table %s: %s", self.path, e)

    def _save(self) -> None:
        if self.path is None:
            return
        rows = {str(i): {str(p): asdict(v) for p, v in h.items()} for i, h in self._by_ino.items()}
        try:
            os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot keep the lease table in %s (%s): leases will not outlive "
                        "this daemon", self.path, e)
            self.path = None

    def take(self, ino: int, pid: int, mode: str) -> Lease:
        """Lease ino to the process that pid (a thread id is fine) belongs to."""
        if mode not in MODES:
            raise LeaseError(errno.EINVAL, "a lease is 'ro' or 'rw'")
        pid = process_of(pid)
        st = _proc_stat(pid)
        if st is None:
            raise LeaseError(errno.ESRCH, f"no process {pid}")
        holders = self._live(ino)
        lease = holders.get(pid)
        if lease is None:
            lease = holders[pid] = Lease(pid, st[1], mode, 0)
            self._by_ino[ino] = holders
        lease.count += 1
        if mode == "rw":
            lease.mode = "rw"
        self._save()
        return lease

    def release(self, ino: int, pid: int) -> None:
        """Give back one lease of the process pid belongs to (ENOENT if it holds none)."""
        pid = process_of(pid)
        holders = self._live(ino)
        lease = holders.get(pid)
        if lease is None:
            raise LeaseError(errno.ENOENT, "this process holds no lease on the file")
        lease.count -= 1
        if lease.count <= 0:
            del holders[pid]
        if not holders:
            self._by_ino.pop(ino, None)
        self._save()

    def held(self, ino: int) -> bool:
        """True while a live process holds a lease on ino (dead holders are dropped)."""
        if ino not in self._by_ino:  # the common case costs one dict lookup
            return False
        return bool(self._live(ino))

    def holders(self, ino: int) -> list[Lease]:
        return list(self._live(ino).values())

    def writers(self) -> list[int]:
        """Inodes a live process holds a read-write lease on."""
        return [ino for ino in list(self._by_ino)
                if any(lease.mode == "rw" for lease in self._live(ino).values())]

    def forget(self, ino: int) -> None:
        """The inode is gone (or reused): drop whatever leases it had."""
        if self._by_ino.pop(ino, None) is not None:
            self._save()

    def _live(self, ino: int) -> dict[int, Lease]:
        holders = self._by_ino.get(ino)
        if holders is None:
            return {}
        for pid in [p for p, lease in holders.items() if not _alive(lease)]:
            del holders[pid]
        if not holders:
            del self._by_ino[ino]
        return holders

    def __len__(self) -> int:
        return sum(1 for ino in list(self._by_ino) if self.held(ino))
