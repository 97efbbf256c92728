"""The FUSE daemon: owns one region and serves it on a mountpoint until unmounted.

`python -m pmemfs.serve.daemon` is what `pmemfs mount` starts in the background; it reports
"ok" or the reason it failed on a pipe. Three ways to run:

- supervised (the default): a light supervisor (pmemfs.serve.supervisor) holds the FUSE
  connection and runs daemons in `--standby` mode, which serve the connection it
  holds and can die or be replaced without the mount going away;
- `--single`: one process that mounts and serves (`serve()`; `pmemfs mount -f` runs
  it in the foreground); a restart is a remount;
- `--remount-on-death`: the fallback where live takeover is impossible: a supervisor
  that clears the dead mount and starts a `--single` daemon again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import pyfuse3
import trio

from ..fs.engine import Engine, FsError, check_magic
from ..media.errors import MountError
from ..media.journal import CrashPoints
from ..media.region import RegionError
from . import mountctl, session, supervisor, systemd
from .fuse_ops import Operations
from .mountctl import REMOUNTABLE
from .mounting import MOUNT_OPTIONS_ALLOWED  # noqa: F401  (re-exported)
from .process import one_line, ready_pipe, setup_logging

log = logging.getLogger("pmemfs.daemon")
RESEND_WINDOW = 10.0  # seconds after a takeover in which a resent request can arrive



def fuse_options(region: str, options: set[str]) -> set[str]:
    """libfuse's options: it mounts (--single) nosuid,nodev unless told suid or dev, and
    knows no strictatime or nodiratime (serve() sets those afterwards)."""
    opts = set(pyfuse3.default_options)
    opts |= {"default_permissions", f"fsname={os.path.abspath(region)}", "subtype=pmemfs"}
    opts |= options & {"allow_other", "allow_root", "ro", "noatime", "debug", "suid", "dev", "noexec"}
    return opts


def atime_mode(options: set[str]) -> str:
    return "noatime" if "noatime" in options else "strictatime" if "strictatime" in options else "relatime"


async def _run_until_signalled() -> None:
    async with trio.open_nursery() as nursery:
        async def watch_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for sig in signals:
                    log.info("signal %d: unmounting", sig)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def open_engine(region: str, options: set[str], takeover: bool = False) -> Engine:
    """The engine as the mount options ask for it. A read-only mount holds the region's
    lock shared: other read-only mounts may share the region, nothing may write it."""
    return Engine(region, readonly="ro" in options, sync="sync" in options,
                  atime=atime_mode(options), nodiratime="nodiratime" in options,
                  crash=CrashPoints.from_env(), takeover=takeover, lock=True)


class Remounter:
    """mount -o remount as the daemon takes it (mounting.remount does the kernel's side):
    the engine switches between read-only and read-write, and takes the new atime
    options. Also answers "status" for a daemon without a supervisor."""

    def __init__(self, ops: Operations, region: str, options: set[str]):
        self.ops = ops
        self.region = region
        self.options = set(options)
        self.retired: list[Engine] = []  # read-only engines replaced by read-write ones

    def handle(self, request: dict) -> dict:
        verb = request.get("verb")
        if verb == "status":
            return {"mode": "single", "daemon_pid": os.getpid(), "options": sorted(self.options),
                    "readonly": self.ops.engine.readonly}
        if verb != "remount" or not isinstance(request.get("options"), list):
            return {"ok": False, "error": f"unknown request {verb!r}"}
        try:
            self.remount({str(o) for o in request["options"]}, bool(request.get("check")))
        except FsError as e:
            return {"ok": False, "error": str(e), "errno": e.errno}
        except (MountError, RegionError, OSError) as e:
            return {"ok": False, "error": one_line(e)}
        return {"ok": True, "readonly": self.ops.engine.readonly}

    def remount(self, options: set[str], check: bool = False) -> None:
        e = self.ops.engine
        ro = "ro" in options
        if check:  # asked before the kernel turns read-only: can we follow?
            if ro and not e.readonly:
                e.check_remount_ro()
            return
        if ro != e.readonly:
            if not ro and not e.region.writable:
                e = self.ops.engine = self._reopen(e, options)
            else:
                e.remount(ro)
        e.atime, e.nodiratime = atime_mode(options), "nodiratime" in options
        self.options = (self.options - REMOUNTABLE) | (options & REMOUNTABLE)
        log.info("remounted: %s", ",".join(sorted(self.options)) or "defaults")

    def _reopen(self, old: Engine, options: set[str]) -> Engine:
        """A mount that began read-only maps the region read-only; read-write, it gets a
        read-write engine. Its lock takes the place of the shared one (refused while
        another read-only mount shares the region), and it inherits the kernel's
        references. The old engine's descriptor stays open until the end: closing any
        descriptor of the region drops this process's lock."""
        if int(old.sbv["mount_generation"][0]) != old.generation or old.journal.state != 0:
            raise MountError("the region changed since it was mounted read-only: unmount and mount it again")
        try:
            new = open_engine(self.region, (options - {"ro"}) | ({"sync"} & self.options),
                              takeover=old.takeover)
        except BaseException:
            try:  # the failed open closed a descriptor of the region, and with it our lock
                fcntl.lockf(old.region.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                log.error("the region's shared lock is lost after a failed remount")
            raise
        new.refs = old.refs
        new.acl = old.acl  # what the kernel negotiated at INIT holds for the connection
        new.replies.expire()  # resends were answered long ago, by the read-only engine
        self.retired.append(old)
        return new

    def close(self, handover: bool = False) -> None:
        self.ops.engine.close(handover=handover)
        for old in self.retired:
            old.region.close()


def expire_resends(engine: Engine) -> None:
    """The resend window is over. A read-only engine forgets the inherited record without
    writing it (its mapping may be read-only; nothing could be replayed anyway)."""
    if engine.readonly:
        engine.replies.inherited = False
    else:
        engine.replies.expire()


async def serve_control(remounter: Remounter, address: str) -> None:
    """A socket for `pmemfs mount -o remount` when no supervisor holds the mount."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(address)
    except OSError as e:
        log.warning("no control socket (%s): a remount reaches the kernel only", e)
        listener.close()
        return
    listener.listen(4)
    sock = trio.socket.from_stdlib_socket(listener)
    with sock:
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    await _answer(remounter, conn)
                except Exception:  # a client's mistake never ends the daemon
                    log.exception("control request failed")


async def _answer(remounter: Remounter, conn) -> None:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    data = b""
    with trio.move_on_after(5.0):
        while not data.endswith(b"\n"):
            chunk = await conn.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        request = json.loads(data or b"{}")
    except ValueError:
        request = None
    if not isinstance(request, dict):
        request = {}
    if request.get("verb") != "status" and uid not in (0, os.geteuid()):
        answer = {"ok": False, "error": "only root or the mount's owner may do that"}
    else:
        answer = remounter.handle(request)
    out = memoryview(json.dumps(answer).encode() + b"\n")
    try:
        while out:
            out = out[await conn.send(out):]
    except OSError:
        pass  # the client went away


def add_handlers(ops: Operations, fuse_fd: int | None) -> None:
    """fallocate, SEEK_DATA/SEEK_HOLE and ioctl (chattr), which pyfuse3 lacks, and the
    POSIX ACL negotiation at INIT (session.install_operations). Without them the kernel
    answers fallocate EOPNOTSUPP, finds no holes, has no chattr and no ACLs, as before."""
    try:
        fd = session.session_fd() if fuse_fd is None else fuse_fd
        session.install_operations(fd, ops.low_level_handlers(), after_init=ops.negotiate)
    except session.SessionError as e:
        log.warning("fallocate, SEEK_DATA/SEEK_HOLE, chattr and POSIX ACLs are not served: %s", e)


def serve(region: str, mountpoint: str, options: set[str], *,
          ready: Callable[[str], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns an exit status."""
    supervisor.set_oom_score_adj(supervisor.OOM_SCORE_ADJ_DAEMON, "the daemon")  # also `mount -f --single`
    started = time.monotonic()
    engine = open_engine(region, options)
    if "prefault" in options and not engine.readonly:
        engine.prefault()
    ops = Operations(engine, frozenset(options))
    real = os.path.realpath(mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(region, options))
        if options & {"strictatime", "nodiratime"} and os.geteuid() == 0:
            # libfuse knows neither: set the mount's own flags (no request reaches us).
            mountctl.kernel_remount(real, options, bind=True)
    except Exception:
        engine.close()
        raise
    add_handlers(ops, None)
    remounter = Remounter(ops, region, options)
    state = "clean" if engine.was_clean else (
        f"recovered: {engine.recovered_records} journal records rolled back, {engine.reclaimed} orphans freed")
    log.info("serving %s on %s (generation %d, %s) after %.1f ms", region, mountpoint,
             engine.generation, state, (time.monotonic() - started) * 1000)
    if ready:
        ready(f"ok generation={engine.generation} clean={int(engine.was_clean)} "
              f"recovered={engine.recovered_records} orphans={engine.reclaimed}")
    status = 0

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_control, remounter, mountctl.daemon_address(real))
            await _run_until_signalled()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except BaseException:
        log.exception("FUSE main loop failed")
        status = 1
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session failed")
        remounter.close()
        log.info("unmounted %s; region marked clean", mountpoint)
    return status


def check_can_serve(region: str) -> None:
    """What a standby checks before it says "ready": the primary superblock decodes
    here as it will for the engine (magic, version, feature masks, geometry). Read
    without the lock the live daemon holds, so a superblock caught mid-update is read
    again; the backup is not consulted (the engine does not use it either)."""
    from ..media.format import FormatError, Superblock
    from ..media.region import Region

    with Region(region, writable=False, lock=False) as r:
        check_magic(region, r.buf)
        for attempt in range(50):
            try:
                Superblock.decode(r.buf, r.size)
                return
            except FormatError as e:
                if attempt == 49:
                    raise MountError(f"{region}: {e}") from None
                time.sleep(0.002)


class SupervisorLink:
    """A standby's socket to the supervisor: the lines it says ("ready", "ok ...",
    "drained", "remounted ..."), the "go" it waits for, and, while serving, the watch
    for "drain" and "remount"."""

    def __init__(self, ctl_fd: int):
        self.ctl = socket.socket(fileno=ctl_fd)
        self.reader = self.ctl.makefile("rb")
        self.drained = False  # told to drain (or the supervisor died under systemd)

    def say(self, line: str) -> None:
        try:
            self.ctl.sendall(line.encode() + b"\n")
        except OSError:
            pass  # the supervisor is gone (its successor is told by systemd, not by us)

    def await_go(self) -> tuple[bool, bytes, set[str] | None] | None:
        """(first, the saved INIT, the mount's options now or None) once told "go";
        None when the supervisor let us go, or is gone."""
        words = (self.reader.readline() or b"").decode().split()
        if not words or words[0] not in ("go", "go-first"):
            return None
        options = None
        if len(words) > 2:  # the mount's options now (a remount since we started changes them)
            options = {o for o in words[2].split(",") if o and o != "-"}
        return words[0] == "go-first", bytes.fromhex(words[1]), options

    async def watch(self, remounter: Remounter) -> None:
        """Serve the supervisor's requests until it says "drain" (or goes away)."""
        pending = b""
        while True:
            await trio.lowlevel.wait_readable(self.ctl)
            data = self.ctl.recv(65536)
            if not data:
                if systemd.under_systemd():
                    # The unit restarts the supervisor, which takes the connection
                    # from systemd's fd store: hand over to the daemon it starts.
                    log.info("the supervisor is gone: draining for its successor")
                    self.drained = True
                    pyfuse3.terminate()
                return  # else serve on while the mount lives
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                if line.strip() == b"drain":
                    self.drained = True
                    pyfuse3.terminate()
                    return
                if line.startswith(b"remount "):
                    try:
                        request = json.loads(line[len(b"remount "):])
                    except ValueError:
                        request = {}
                    self.say("remounted " + json.dumps(remounter.handle(request)))


def standby(region: str, mountpoint: str, options: set[str], fuse_fd: int, ctl_fd: int) -> int:
    """Wait, imported and checked, until the supervisor says "go"; then serve its
    connection. Exit status: 0 unmounted or stopped, EXIT_HANDED_OVER drained."""
    link = SupervisorLink(ctl_fd)
    try:
        check_can_serve(region)
        session.locate()  # the symbol lookup and the library load, off the takeover's path
        session._libfuse()
    except Exception as e:
        link.say(f"error {one_line(e)}")
        return 1
    link.say("ready")
    go = link.await_go()
    if go is None:
        return 0  # the supervisor let us go, or is gone
    first, init, now = go
    if now is not None:
        options = now
    started = time.monotonic()
    remounter = _take_connection(region, mountpoint, options, fuse_fd, first, init, link)
    if remounter is None:
        return 1
    engine = remounter.ops.engine
    log.info("serving %s on %s (generation %d, %s) after %.1f ms", region, mountpoint,
             engine.generation, "mounted" if first else "took over the connection",
             (time.monotonic() - started) * 1000)
    link.say(f"ok generation={engine.generation} clean={int(engine.was_clean)} "
             f"recovered={engine.recovered_records} orphans={engine.reclaimed} "
             f"mode={'mounted' if first else 'takeover'}")
    status = _serve_connection(remounter, link)
    _exit_standby(mountpoint, status, link)


def _take_connection(region: str, mountpoint: str, options: set[str], fuse_fd: int,
                     first: bool, init: bytes, link: SupervisorLink) -> Remounter | None:
    """Open the region and start serving the supervisor's connection: the first daemon
    answers the saved INIT, a successor asks for what its predecessor had taken. None,
    with the error said to the supervisor, when it cannot."""
    try:
        engine = open_engine(region, options, takeover=not first)
    except Exception as e:
        link.say(f"error {one_line(e)}")
        return None
    try:
        if first and "prefault" in options and not engine.readonly:
            engine.prefault()
        ops = Operations(engine, frozenset(options))
        remounter = Remounter(ops, region, options)
        pyfuse3.init(ops, f"/dev/fd/{fuse_fd}", fuse_options(region, options))
        add_handlers(ops, fuse_fd)
        # The first daemon writes the kernel's one INIT reply, with KILLPRIV_V2 added.
        added = session.replay_init(fuse_fd, init, session.FUSE_HANDLE_KILLPRIV_V2 if first else 0)
        if first and not added:
            log.info("the kernel did not take FUSE_HANDLE_KILLPRIV_V2: each write costs two requests")
        if not first:
            session.notify_resend(fuse_fd)
    except Exception as e:
        log.error("cannot serve the connection of %s: %s", mountpoint, e)
        link.say(f"error {one_line(e)}")
        engine.close(handover=True)
        return None
    return remounter


async def _watch_signals_standby() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)  # the supervisor unmounts
            pyfuse3.terminate()
            return


async def _resend_window(ops: Operations) -> None:
    await trio.sleep(RESEND_WINDOW)
    expire_resends(ops.engine)  # the engine now: a remount may have replaced it


def _serve_connection(remounter: Remounter, link: SupervisorLink) -> int:
    """Serve until drained, signalled or unmounted; the session closed (the mount stays:
    the supervisor owns it), the region closed. Returns the exit status."""

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.watch, remounter)
            nursery.start_soon(_watch_signals_standby)
            nursery.start_soon(_resend_window, remounter.ops)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    status = 0
    try:
        trio.run(run)
    except BaseException:
        log.exception("FUSE main loop failed")
        status = 1
    finally:
        try:
            pyfuse3.close(unmount=False)
        except Exception:
            log.exception("closing the FUSE session failed")
        remounter.close(handover=link.drained or status != 0)
    return status


def _exit_standby(mountpoint: str, status: int, link: SupervisorLink) -> NoReturn:
    if link.drained:
        log.info("drained: handing %s over", mountpoint)
        link.say("drained")  # the region is closed and unlocked: the successor may start now
        logging.shutdown()
        os._exit(supervisor.EXIT_HANDED_OVER)  # no interpreter teardown in the gap
    log.info("unmounted %s; region marked clean", mountpoint)
    # The region is closed and clean: tearing down numpy, trio and pyfuse3 would only
    # make the unmount wait (~0.1 s) for the daemon's exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    p = supervisor.arguments("pmemfs-daemon")
    p.add_argument("--single", action="store_true", help="mount and serve in this process (default)")
    p.add_argument("--standby", action="store_true", help="serve the supervisor's connection")
    p.add_argument("--fuse-fd", type=int)
    p.add_argument("--ctl-fd", type=int)
    a = p.parse_args(argv)
    setup_logging(a.log, a.debug)
    supervisor.set_oom_score_adj(supervisor.OOM_SCORE_ADJ_DAEMON, "the daemon")
    options = {o for o in a.options.split(",") if o}
    try:
        if a.standby:
            return standby(a.region, a.mountpoint, options, a.fuse_fd, a.ctl_fd)
        return serve(a.region, a.mountpoint, options, ready=ready_pipe(a.ready_fd))
    except Exception as e:
        log.error("cannot serve %s: %s", a.region, e)
        ready_pipe(a.ready_fd)(f"error {one_line(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
