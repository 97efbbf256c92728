"""The supervisor's use of systemd's fd store (FileDescriptorStoreMax): keeping the
connection and its FUSE_INIT there, adopting what a predecessor kept, and handing the
mount on at a restart. A mixin of supervisor.Supervisor, whose state it works on.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import systemd
from .fuseconn import abort_connection, connection_id, fuse_unmount
from .mountctl import REMOUNTABLE

if TYPE_CHECKING:
    from .children import Child

log = logging.getLogger("pmemfs.supervisor")


class FdStore:
    """Supervisor's fd-store steps; its attributes and _connected/set_options are
    Supervisor's (declared here for the reader)."""

    region: str
    mountpoint: str
    real: str
    options: set[str]
    fuse_fd: int
    init: bytes
    conn: str | None
    stored: bool
    stopping: bool
    daemon: Child | None
    standby: Child | None

    @property
    def unit(self) -> str:
        return os.environ.get("PMEMFS_UNIT", "")

    def _store(self) -> None:
        """Under a unit that keeps descriptors, put the connection and the FUSE_INIT in
        systemd's fd store: a restarted supervisor (or one after our death) takes them."""
        if not systemd.under_systemd():
            return
        state = systemd.state_memfd({"format": 1, "region": os.path.abspath(self.region),
                                     "mountpoint": self.real, "init": self.init.hex()})
        try:
            self.stored = systemd.store_fd(systemd.FUSE_FD_NAME, self.fuse_fd) and \
                systemd.store_fd(systemd.STATE_FD_NAME, state)
        except OSError as e:
            log.warning("cannot keep the connection in systemd's fd store (%s): a restart will unmount", e)
        finally:
            os.close(state)

    def _forget(self, always: bool = False) -> None:
        """The mount ends (or what the store holds is not ours to serve): systemd must
        not hand those descriptors to a next supervisor."""
        if self.stored or always:
            self.stored = False
            for name in (systemd.FUSE_FD_NAME, systemd.STATE_FD_NAME):
                try:
                    systemd.forget_fd(name)
                except OSError:
                    pass

    def _adopt(self, fds: dict[str, int]) -> bool:
        """Serve the connection a predecessor left in systemd's fd store, if it is ours
        and alive; otherwise let it go (aborted, unmounted) and return False."""
        fuse, state_fd = fds.pop(systemd.FUSE_FD_NAME, None), fds.pop(systemd.STATE_FD_NAME, None)
        for fd in fds.values():
            os.close(fd)  # not ours
        state = systemd.read_state(state_fd) if state_fd is not None else {}
        if state_fd is not None:
            os.close(state_fd)
        why = None
        if fuse is None or not state:
            why = "the store holds no connection and state of pmemfs"
        elif (state.get("region"), state.get("mountpoint")) != (os.path.abspath(self.region), self.real):
            why = f"it is the mount of {state.get('region')} on {state.get('mountpoint')}"
        elif os.fstat(fuse).st_rdev != os.makedev(10, 229):
            why = "the stored descriptor is not /dev/fuse"
        else:
            self.fuse_fd = fuse
            if not self._connected():
                why = "its connection has ended"
        if why is None:
            self.init = bytes.fromhex(state["init"])
            self.conn = connection_id(self.real)
            self.stored = True
            log.info("took the FUSE connection of %s from systemd's fd store", self.mountpoint)
            from .mounting import kernel_options_at

            now = kernel_options_at(self.real)  # a remount since the unit's options were read
            if now is not None and now != self.options & REMOUNTABLE:
                self.set_options(now)
            return True
        log.warning("not serving the connection in systemd's fd store (%s): mounting afresh", why)
        self._forget(always=True)
        if fuse is not None:
            old = state.get("mountpoint") if isinstance(state.get("mountpoint"), str) else None
            if old:  # nobody serves it: fail its waiters now, and take it away
                abort_connection(connection_id(old))
                fuse_unmount(old)
            os.close(fuse)
        self.fuse_fd = -1
        from .mounting import prepare_mountpoint

        prepare_mountpoint(self.region, self.mountpoint, force=False)
        return False

    def _hand_to_successor(self) -> int:
        """systemd restarts us: the daemon drains, the connection stays in the store,
        and the mount stays for the next supervisor. Clients wait meanwhile."""
        log.info("SIGTERM during a restart of %s: handing the mount to the next supervisor", self.unit)
        self.stopping = True
        if self.standby:
            self.standby.kill()
            self.standby = None
        if self.daemon:
            self.daemon.send("drain")
            if self.daemon.read_line(60.0) != "drained":
                log.warning("daemon %d did not drain: killed; its requests are resent", self.daemon.pid)
                self.daemon.kill()
            elif self.daemon.wait(10.0) is None:
                self.daemon.kill()
        return 0
