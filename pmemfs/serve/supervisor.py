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

Here: the Supervisor and its loop. Beside it: fuseconn (mounting, the connection's
number, abort, FUSE_INIT), children (a daemon as the supervisor sees it), fdstore
(systemd's fd store), remount_loop (the fallback) and process (what the supervisor and
every daemon set up for themselves).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

from . import session, systemd
from .children import EXIT_HANDED_OVER, Child, DiedEarly
from .fdstore import FdStore
from .fuseconn import (
    MNT_DETACH,
    abort_connection,
    connection_id,
    fuse_mount,
    fuse_unmount,
    kernel_mount_options,
    read_init,
)
from .mountctl import REMOUNTABLE, SupervisorError, control_address
from .process import (
    OOM_SCORE_ADJ_DAEMON,
    OOM_SCORE_ADJ_SUPERVISOR,
    arguments,
    one_line,
    ready_pipe,
    set_oom_score_adj,
    setup_logging,
)
from .remount_loop import remount_on_death

# What moved to the modules above stays importable from here, where daemon, the CLI and
# the tests have always found it.
__all__ = [
    "EXIT_HANDED_OVER", "MNT_DETACH", "OOM_SCORE_ADJ_DAEMON", "OOM_SCORE_ADJ_SUPERVISOR",
    "Child", "DiedEarly", "Supervisor", "SupervisorError", "abort_connection", "arguments",
    "connection_id", "fuse_mount", "fuse_unmount", "kernel_mount_options", "main", "one_line",
    "read_init", "ready_pipe", "remount_on_death", "set_oom_score_adj", "setup_logging",
    "supervise",
]

log = logging.getLogger("pmemfs.supervisor")

START_TIMEOUT = 120.0  # a standby that is not ready by then has failed
FAILURES_BEFORE_ABORT = 5  # replacements in a row that die young: a crash loop
YOUNG = 0.25  # a daemon dying this soon after it began serving: a request that kills every daemon


class Supervisor(FdStore):
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


def main(argv: list[str] | None = None) -> int:
    a = arguments("pmemfs-supervisor").parse_args(argv)
    setup_logging(a.log, a.debug)
    options = {o for o in a.options.split(",") if o}
    return supervise(a.region, a.mountpoint, options, ready_pipe(a.ready_fd), a.log, a.debug)


if __name__ == "__main__":
    sys.exit(main())
