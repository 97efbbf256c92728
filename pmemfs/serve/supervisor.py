"""The supervisor: holds the FUSE connection, so a daemon can die or be replaced
while the mount, and every client's descriptors and mappings, stay alive.

It does no filesystem work and imports nothing heavy. It opens /dev/fuse, mounts,
reads the kernel's FUSE_INIT request and keeps it, then runs daemons as children:

- a *standby*: a fresh interpreter with the installed code, fully imported, that has
  checked it can serve the region, waiting for "go";
- the *daemon*: the standby it told "go". It opens the region (journal recovery, the
  mount-time check), initialises its libfuse session with the saved INIT
  (pmemfs.serve.session), asks the kernel to resend what a dead predecessor had taken, and
  serves the same connection.

When the daemon dies, the standby takes over at once and a new standby is started.
`pmemfs upgrade` (or SIGHUP) starts a standby with the code installed now, drains the
daemon and hands over. SIGTERM/SIGINT unmount. See docs/DESIGN.md, "Live update".

Where the kernel or pyfuse3 cannot hand a connection over, the supervisor falls back to
remounting: a new daemon mounts afresh after the dead mount is cleared (clients see
ENOTCONN meanwhile). It says so once in the log, and `pmemfs info` shows the mode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

from . import session, systemd
from .mountctl import (
    REMOUNTABLE,
    SupervisorError,
    control_address,
    libc,
    mount_flags,
)

log = logging.getLogger("pmemfs.supervisor")

EXIT_HANDED_OVER = 75  # a daemon that drained for a successor exits with this
# Memory pressure the mount did not cause must not end it (docs/DESIGN.md, "The
# backing"): killing the daemon frees none of the region, whose pages count in its
# RSS. The supervisor, which holds the connection, is never chosen; the daemon and its
# standby only when nothing else is left. Only root (CAP_SYS_RESOURCE) may lower these.
OOM_SCORE_ADJ_SUPERVISOR = -1000
OOM_SCORE_ADJ_DAEMON = -900


def set_oom_score_adj(value: int, who: str = "this process") -> bool:
    """Set this process's oom_score_adj; False, and a line in the log, when it may not
    (lowering it needs CAP_SYS_RESOURCE): it then keeps the value it inherited."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError as e:
        log.warning("cannot set oom_score_adj to %d (%s; lowering it needs CAP_SYS_RESOURCE): "
                    "the OOM killer may choose %s", value, e.strerror, who)
        return False


MNT_DETACH = 2
START_TIMEOUT = 120.0  # a standby that is not ready by then has failed
FAILURES_BEFORE_ABORT = 5  # replacements in a row that die young: a crash loop
YOUNG = 0.25  # a daemon dying this soon after it began serving: a request that kills every daemon


class DiedEarly(SupervisorError):
    """A standby closed its socket without a word: it died (a signal, a crash)."""


# ------------------------------------------------------------------ mounting
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


# ---------------------------------------------------------------- children
class Child:
    """A daemon process (standby or serving) and the socket we talk to it over."""

    def __init__(self, cmd: list[str], fuse_fd: int, env: dict | None = None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        os.set_inheritable(theirs.fileno(), True)
        self.proc = subprocess.Popen(
            [*cmd, "--fuse-fd", str(fuse_fd), "--ctl-fd", str(theirs.fileno())],
            pass_fds=(fuse_fd, theirs.fileno()), stdin=subprocess.DEVNULL, cwd="/", env=env,
            start_new_session=False)
        theirs.close()
        self.sock = ours
        self.buf = b""
        self.started = time.monotonic()
        self.ready = False  # a standby that said "ready"
        self.serving_since: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # it died; its exit is noticed by the caller

    def read_line(self, timeout: float) -> str | None:
        """Next line from the child; "" when it closed the socket, None on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return None
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class Supervisor:
    def __init__(self, region: str, mountpoint: str, options: set[str], daemon_cmd: list[str],
                 ready: Callable[[str], None], inherited: dict[str, int] | None = None):
        self.inherited = inherited or {}  # from systemd's fd store: a predecessor's connection
        self.stored = False  # our connection is in systemd's fd store
        self.region = region
        self.mountpoint = mountpoint
        self.real = os.path.realpath(mountpoint)  # before mounting: after, a stat may block
        self.options = options
        self.daemon_cmd = daemon_cmd
        self.ready = ready
        self.fuse_fd = -1
        self.init = b""
        self.conn: str | None = None
        self.daemon: Child | None = None
        self.standby: Child | None = None
        self.restarts = 0
        self.upgrades = 0
        self.failures = 0
        self.last_gap_ms: float | None = None
        self.stopping = False
        self.mode = "live"
        self.retired: list[Child] = []  # drained daemons still exiting
        self.next_standby_try = 0.0

    # ---------------------------------------------------------------- start
    def run(self) -> int:
        # Signals are noted from the start and acted on in the loop.
        self.pending: list[int] = []
        self.sigr, sigw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sigw)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda s, _f: self.pending.append(s))
        adopted = self._adopt(self.inherited) if self.inherited else False
        if not adopted:
            self.fuse_fd = fuse_mount(self.region, self.mountpoint, self.options)
            self.conn = connection_id(self.real)
        try:
            if not adopted:
                self.init = read_init(self.fuse_fd)
                self._store()
            self.standby = self._start_standby()
            line = self._activate(first=not adopted)
        except BaseException as e:
            self._give_up(f"{e}")
            raise
        if not line.startswith("ok"):
            self._give_up(line)
            self.ready(line or "error the daemon exited without a word")
            return 1
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(control_address(self.real, resolved=True))
        self.listener.listen(8)
        self.ready(line)
        # Fault injection (journal.CrashPoints) is for the first daemon only: its
        # successor is what a test of the takeover wants to see survive.
        os.environ.pop("PMEMFS_CRASH_AT", None)
        self.standby = self._start_standby_async()
        return self._loop()

    def _start_standby(self) -> Child:
        """A standby, waited for until it is ready (or SupervisorError saying why not)."""
        return self._await_ready(Child([*self.daemon_cmd, "--standby"], self.fuse_fd))

    def _await_ready(self, child: Child) -> Child:
        line = child.read_line(max(1.0, START_TIMEOUT - (time.monotonic() - child.started)))
        if line is None:
            line = f"error not ready within {START_TIMEOUT:.0f} s"
        if line != "ready":
            child.kill()
            if line == "":
                raise DiedEarly("the new daemon exited before it was ready")
            raise SupervisorError(line[len("error "):] if line.startswith("error ") else line)
        child.ready = True
        return child

    def _start_standby_async(self) -> Child | None:
        """Start the next standby without waiting: the loop hears its "ready", so a
        daemon death meanwhile is handled at once."""
        return Child([*self.daemon_cmd, "--standby"], self.fuse_fd)

    def _standby_spoke(self) -> None:
        child = self.standby
        assert child is not None
        line = child.read_line(0.0)
        if line is None:
            return  # half a line so far
        if line == "ready":
            child.ready = True
            return
        log.error("no standby daemon: %s", line[len("error "):] if line.startswith("error ")
                  else (line or "it exited before it was ready"))
        child.kill()
        self.standby = None

    def _activate(self, first: bool) -> str:
        """Tell the standby to serve; its "ok ..." line, or why not."""
        child, self.standby = self.standby, None
        assert child is not None
        # The options travel with "go": a standby started before a remount serves as
        # the mount is now, not as it was.
        child.send(("go-first " if first else "go ") + self.init.hex() + " "
                   + (",".join(sorted(self.options)) or "-"))
        line = child.read_line(START_TIMEOUT)
        if line is None:
            line = f"error no answer within {START_TIMEOUT:.0f} s"
        if line.startswith("ok"):
            child.serving_since = time.monotonic()
            self.daemon = child
        else:
            child.kill()
        return line

    # ----------------------------------------------------------------- loop
    def _loop(self) -> int:
        sigr, pending, listener = self.sigr, self.pending, self.listener
        try:
            while True:
                watch = [sigr, listener] + ([self.daemon.sock] if self.daemon else [])
                if self.standby and not self.standby.ready:
                    watch.append(self.standby.sock)
                r, _, _ = select.select(watch, [], [], 1.0)
                if sigr in r:
                    try:
                        os.read(sigr, 512)
                    except BlockingIOError:
                        pass
                for sig in pending[:]:
                    pending.remove(sig)
                    if sig in (signal.SIGTERM, signal.SIGINT):
                        if sig == signal.SIGTERM and self.stored and systemd.restart_pending(self.unit, 2):
                            return self._hand_to_successor()
                        log.info("signal %d: unmounting %s", sig, self.mountpoint)
                        self.stopping = True
                        self._forget()
                        fuse_unmount(self.real)
                    elif sig == signal.SIGHUP:
                        log.info("SIGHUP: upgrading the daemon")
                        log.info("upgrade: %s", self.upgrade())
                if self.standby and not self.standby.ready and self.standby.sock in r:
                    self._standby_spoke()
                if self.standby is None and self.daemon and time.monotonic() >= self.next_standby_try:
                    self.next_standby_try = time.monotonic() + 5.0  # retry a failed one slowly
                    self.standby = self._start_standby_async()
                if listener in r:
                    self._serve_client(listener)
                for child in [c for c in self.retired if c.proc.poll() is not None]:
                    child.sock.close()
                    self.retired.remove(child)
                if self.daemon and (self.daemon.sock in r or self.daemon.proc.poll() is not None):
                    line = self.daemon.read_line(0.0) if self.daemon.sock in r else ""
                    if line:
                        self._note(line)
                    elif line == "" and (self.daemon.proc.poll() is not None or self.daemon.sock in r):
                        status = self._daemon_ended()
                        if status is not None:
                            return status
        finally:
            signal.set_wakeup_fd(-1)
            listener.close()
            if self.standby:
                self.standby.kill()
            os.close(self.fuse_fd)

    def _note(self, line: str) -> None:
        log.info("daemon %d: %s", self.daemon.pid if self.daemon else 0, line)

    def _daemon_ended(self) -> int | None:
        """The daemon closed its socket: it exited or died. Returns an exit status to
        end the supervisor with, or None to go on (a replacement serves)."""
        dead = self.daemon
        assert dead is not None
        code = dead.wait(30.0)
        if code is None:
            dead.kill()
            code = -signal.SIGKILL
        dead.sock.close()
        self.daemon = None
        mounted = self._connected()
        if code == 0 or self.stopping or not mounted:
            log.info("daemon %d exited with %d: supervisor done", dead.pid, code)
            if mounted:
                fuse_unmount(self.real)
            return 0 if code == 0 else 1
        died = time.monotonic()
        young = dead.serving_since is None or died - dead.serving_since < YOUNG
        self.failures = self.failures + 1 if young else 1
        how = f"signal {-code}" if code < 0 else f"status {code}"
        log.warning("daemon %d died (%s): the standby takes over", dead.pid, how)
        if self.failures > FAILURES_BEFORE_ABORT:
            self._give_up(f"{self.failures} daemons in a row died within {YOUNG:.0f} s of starting")
            return 1
        line = self._take_over()
        while line == "" and self.failures < FAILURES_BEFORE_ABORT:
            # The replacement died without a word before it served (killed as well, by
            # the same hand or the OOM killer): one more crash, not a region nobody can
            # serve. A fresh standby takes over; the crash-loop rule still bounds this.
            self.failures += 1
            log.warning("the replacement died before it served: another one takes over")
            line = self._take_over()
        if not line.startswith("ok"):
            self._give_up(f"no daemon can serve {self.region}: {line or 'each replacement died before serving'}")
            return 1
        self.restarts += 1
        self.last_gap_ms = (time.monotonic() - died) * 1000
        log.info("replacement %d serving %.1f ms after the death (%s)", self.daemon.pid,
                 self.last_gap_ms, line)
        self.standby = self._start_standby_async()
        return None

    def _take_over(self) -> str:
        """Make the standby (or a fresh one) serve: its "ok ..." line, "error ..." when it
        cannot, "" when it died without a word before serving."""
        try:
            if self.standby is None or self.standby.proc.poll() is not None:
                self.standby = self._start_standby()
            elif not self.standby.ready:
                self.standby = self._await_ready(self.standby)  # it is nearly there
        except DiedEarly:
            self.standby = None
            return ""
        except SupervisorError as e:
            self.standby = None
            return f"error {e}"
        return self._activate(first=False)

    def _give_up(self, why: str) -> None:
        """Nobody can serve the connection: fail its clients instead of leaving them blocked."""
        log.error("giving up the mount of %s: %s; clients now get ENOTCONN", self.region, why)
        self._forget()
        if self._connected():
            abort_connection(self.conn)
            fuse_unmount(self.real)

    def _connected(self) -> bool:
        """Our connection still stands. Asked of our own /dev/fuse descriptor (a dead
        connection polls POLLERR), never of the mountpoint: after an unmount another
        mount may sit there, even with the same connection number (minors are reused)."""
        p = select.poll()
        p.register(self.fuse_fd, select.POLLIN)
        return not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))

    # ------------------------------------------------------ systemd's fd store
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

    # -------------------------------------------------------------- upgrade
    def upgrade(self) -> dict:
        """Replace the daemon with one running the code installed now."""
        if self.standby:
            self.standby.kill()
            self.standby = None
        try:
            self.standby = self._start_standby()  # the code installed now
        except SupervisorError as e:
            return {"ok": False, "error": f"the new daemon cannot serve {self.region}: {e}; "
                    "the old one goes on serving"}
        old = self.daemon
        started = time.monotonic()
        if old is not None:
            old.send("drain")
            if old.read_line(60.0) != "drained":
                old.kill()  # stuck: its requests are resent to the successor anyway
            self.daemon = None
            self.retired.append(old)
        line = self._activate(first=False)
        if not line.startswith("ok"):  # once more with a fresh standby before giving up
            log.error("the new daemon failed after the handover (%s): trying another", line)
            line = self._take_over()
        gap = (time.monotonic() - started) * 1000
        if not line.startswith("ok"):
            why = line or "it died before serving"
            self._give_up(f"the new daemon failed after the old one had handed over: {why}")
            return {"ok": False, "error": f"the new daemon failed after the handover: {why}"}
        self.upgrades += 1
        self.last_gap_ms = gap
        self.standby = self._start_standby_async()
        return {"ok": True, "daemon_pid": self.daemon.pid, "gap_ms": round(gap, 1),
                "old_pid": old.pid if old else None}

    def remount(self, request: dict) -> dict:
        """Pass a remount (mounting.remount) to the daemon; on success, later daemons
        (a takeover, an upgrade) start with the new options."""
        if self.daemon is None:
            return {"ok": False, "error": "no daemon serves the mount right now"}
        self.daemon.send("remount " + json.dumps(request))
        line = self.daemon.read_line(120.0)
        if not line or not line.startswith("remounted "):
            return {"ok": False, "error": "the daemon did not answer the remount"}
        answer = json.loads(line[len("remounted "):])
        if answer.get("ok") and not request.get("check"):
            self.set_options(set(request.get("options", ())))
        return answer

    def set_options(self, options: set[str]) -> None:
        self.options = (self.options - REMOUNTABLE) | (options & REMOUNTABLE)
        i = self.daemon_cmd.index("--options")
        self.daemon_cmd[i + 1] = ",".join(sorted(self.options))
        log.info("options of %s now %s", self.mountpoint, ",".join(sorted(self.options)) or "defaults")

    def status(self) -> dict:
        return {"mode": self.mode, "supervisor_pid": os.getpid(), "options": sorted(self.options),
                "daemon_pid": self.daemon.pid if self.daemon else None,
                "standby_pid": self.standby.pid if self.standby and self.standby.ready else None,
                "restarts": self.restarts, "upgrades": self.upgrades,
                "last_gap_ms": self.last_gap_ms, "connection": self.conn}

    def _serve_client(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5.0)
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            try:
                request = json.loads(conn.makefile("rb").readline() or b"{}")
                verb = request.get("verb")
            except (ValueError, AttributeError, OSError):
                verb = None
            if verb == "status":
                answer = self.status()
            elif uid not in (0, os.geteuid()):
                answer = {"ok": False, "error": "only root or the mount's owner may do that"}
            elif verb == "upgrade":
                conn.settimeout(None)
                answer = self.upgrade()
            elif verb == "remount" and isinstance(request.get("options"), list):
                conn.settimeout(None)
                answer = self.remount({"verb": "remount", "options": request["options"],
                                       "check": bool(request.get("check"))})
            else:
                answer = {"ok": False, "error": f"unknown request {verb!r}"}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass


def setup_logging(log_file: str | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def ready_pipe(fd: int | None) -> Callable[[str], None]:
    """Report "ok ..." or "error ..." once on the pipe `pmemfs mount` waits on."""
    def ready(msg: str) -> None:
        if fd is not None:
            try:
                os.write(fd, (msg + "\n").encode())
                os.close(fd)
            except OSError:
                pass

    return ready


def remount_on_death(region: str, mountpoint: str, options: set[str], single_cmd: list[str],
                     ready: Callable[[str], None]) -> int:
    """The fallback supervisor: when the daemon dies, clear the dead mount and mount
    again with a new one. Clients see ENOTCONN in between."""
    from .mounting import kernel_options_at, prepare_mountpoint

    first = True
    real = os.path.realpath(mountpoint)
    while True:
        r, w = os.pipe()
        cmd = [*single_cmd]
        cmd[cmd.index("--options") + 1] = ",".join(sorted(options))
        proc = subprocess.Popen([*cmd, "--ready-fd", str(w)], pass_fds=(w,), cwd="/",
                                stdin=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()
        if first:
            ready(line or "error the daemon exited without a word")
            first = False
        if not line.startswith("ok"):
            proc.wait()
            return 1
        code = proc.wait()
        if code >= 0:
            log.info("daemon %d exited with %d: supervisor done", proc.pid, code)
            return code
        log.warning("daemon %d died (signal %d): remounting", proc.pid, -code)
        now = kernel_options_at(real)  # the dead mount's flags: a remount may have changed them
        if now is not None:
            options = (options - REMOUNTABLE) | now
        try:
            prepare_mountpoint(region, mountpoint, force=True)
        except Exception as e:
            log.error("cannot clear %s for a new daemon: %s", mountpoint, e)
            return 1


def supervise(region: str, mountpoint: str, options: set[str], ready: Callable[[str], None],
              log_file: str | None = None, debug: bool = False,
              inherited: dict[str, int] | None = None) -> int:
    """Hold the connection and keep a daemon serving it (or, where a takeover cannot
    work here, remount on a death). Returns when the mount ends."""
    set_oom_score_adj(OOM_SCORE_ADJ_SUPERVISOR, "the supervisor")  # its daemons set their own
    daemon = [sys.executable, "-m", "pmemfs.serve.daemon", os.path.abspath(region), os.path.abspath(mountpoint)]
    tail = ["--log", os.path.abspath(log_file)] if log_file else []
    if debug:
        tail.append("--debug")
    why = "live=off was asked for" if "live=off" in options else session.takeover_unavailable()
    options = options - {"live=off", "live=on"}
    opts = ["--options", ",".join(sorted(options))]
    try:
        if why:
            log.warning("live update unavailable (%s): a daemon that dies is replaced by a remount", why)
            return remount_on_death(region, mountpoint, options, [*daemon, "--single", *opts, *tail], ready)
        return Supervisor(region, mountpoint, options, [*daemon, *opts, *tail], ready, inherited).run()
    except Exception as e:
        log.error("cannot serve %s: %s", region, e)
        ready(f"error {one_line(e)}")
        return 1


def arguments(prog: str):
    """The arguments `pmemfs mount` passes to the supervisor and to a daemon alike."""
    import argparse

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("region")
    p.add_argument("mountpoint")
    p.add_argument("--options", default="")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = arguments("pmemfs-supervisor").parse_args(argv)
    setup_logging(a.log, a.debug)
    options = {o for o in a.options.split(",") if o}
    return supervise(a.region, a.mountpoint, options, ready_pipe(a.ready_fd), a.log, a.debug)


if __name__ == "__main__":
    sys.exit(main())
