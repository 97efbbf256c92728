"""The FUSE daemon: owns one region and serves it on a mountpoint until unmounted.

`python -m pmemfs.daemon` is what `pmemfs mount` starts in the background; it reports
"ok" or the reason it failed on a pipe. Three ways to run:

- supervised (the default): a light supervisor (pmemfs.supervisor) holds the FUSE
  connection and runs daemons in `--standby` mode, which serve the connection it
  holds and can die or be replaced without the mount going away;
- `--single`: one process that mounts and serves (`serve()`; `pmemfs mount -f` runs
  it in the foreground); a restart is a remount;
- `--remount-on-death`: the fallback where live takeover is impossible: a supervisor
  that clears the dead mount and starts a `--single` daemon again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import pyfuse3
import trio

from . import session, supervisor, systemd
from .engine import Engine, check_magic
from .errors import MountError
from .fuse_ops import Operations
from .journal import CrashPoints
from .mounting import MOUNT_OPTIONS_ALLOWED  # noqa: F401  (re-exported)
from .supervisor import one_line, ready_pipe, setup_logging

log = logging.getLogger("pmemfs.daemon")
RESEND_WINDOW = 10.0  # seconds after a takeover in which a resent request can arrive



def fuse_options(region: str, options: set[str]) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"default_permissions", f"fsname={os.path.abspath(region)}", "subtype=pmemfs"}
    opts |= options & {"allow_other", "allow_root", "ro", "noatime", "debug"}
    return opts


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
    """The engine as the mount options ask for it."""
    return Engine(region, readonly="ro" in options, sync="sync" in options,
                  noatime="noatime" in options, crash=CrashPoints.from_env(), takeover=takeover)


def add_handlers(ops: Operations, fuse_fd: int | None) -> None:
    """fallocate and SEEK_DATA/SEEK_HOLE, which pyfuse3 lacks (session.install_operations).
    Without them the kernel answers fallocate EOPNOTSUPP and finds no holes, as before."""
    try:
        fd = session.session_fd() if fuse_fd is None else fuse_fd
        session.install_operations(fd, ops.low_level_handlers())
    except session.SessionError as e:
        log.warning("fallocate and SEEK_DATA/SEEK_HOLE are not served: %s", e)


def serve(region: str, mountpoint: str, options: set[str], *,
          ready: Callable[[str], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns an exit status."""
    supervisor.set_oom_score_adj(supervisor.OOM_SCORE_ADJ_DAEMON, "the daemon")  # also `mount -f --single`
    started = time.monotonic()
    engine = open_engine(region, options)
    if "prefault" in options and not engine.readonly:
        engine.prefault()
    ops = Operations(engine)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(region, options))
    except Exception:
        engine.close()
        raise
    add_handlers(ops, None)
    state = "clean" if engine.was_clean else (
        f"recovered: {engine.recovered_records} journal records rolled back, {engine.reclaimed} orphans freed")
    log.info("serving %s on %s (generation %d, %s) after %.1f ms", region, mountpoint,
             engine.generation, state, (time.monotonic() - started) * 1000)
    if ready:
        ready(f"ok generation={engine.generation} clean={int(engine.was_clean)} "
              f"recovered={engine.recovered_records} orphans={engine.reclaimed}")
    status = 0
    try:
        trio.run(_run_until_signalled)
    except BaseException:
        log.exception("FUSE main loop failed")
        status = 1
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session failed")
        engine.close()
        log.info("unmounted %s; region marked clean", mountpoint)
    return status


def check_can_serve(region: str) -> None:
    """What a standby checks before it says "ready": the primary superblock decodes
    here as it will for the engine (magic, version, feature masks, geometry). Read
    without the lock the live daemon holds, so a superblock caught mid-update is read
    again; the backup is not consulted (the engine does not use it either)."""
    from .format import FormatError, Superblock
    from .region import Region

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


def standby(region: str, mountpoint: str, options: set[str], fuse_fd: int, ctl_fd: int) -> int:
    """Wait, imported and checked, until the supervisor says "go"; then serve its
    connection. Exit status: 0 unmounted or stopped, EXIT_HANDED_OVER drained."""
    ctl = socket.socket(fileno=ctl_fd)
    reader = ctl.makefile("rb")

    def say(line: str) -> None:
        try:
            ctl.sendall(line.encode() + b"\n")
        except OSError:
            pass  # the supervisor is gone (its successor is told by systemd, not by us)

    try:
        check_can_serve(region)
        session.locate()  # the symbol lookup and the library load, off the takeover's path
        session._libfuse()
    except Exception as e:
        say(f"error {one_line(e)}")
        return 1
    say("ready")
    words = (reader.readline() or b"").decode().split()
    if not words or words[0] not in ("go", "go-first"):
        return 0  # the supervisor let us go, or is gone
    first, init = words[0] == "go-first", bytes.fromhex(words[1])
    started = time.monotonic()
    try:
        engine = open_engine(region, options, takeover=not first)
    except Exception as e:
        say(f"error {one_line(e)}")
        return 1
    try:
        if first and "prefault" in options and not engine.readonly:
            engine.prefault()
        ops = Operations(engine)
        pyfuse3.init(ops, f"/dev/fd/{fuse_fd}", fuse_options(region, options))
        add_handlers(ops, fuse_fd)
        session.replay_init(fuse_fd, init)
        if not first:
            session.notify_resend(fuse_fd)
    except Exception as e:
        log.error("cannot serve the connection of %s: %s", mountpoint, e)
        say(f"error {one_line(e)}")
        engine.close(handover=True)
        return 1
    log.info("serving %s on %s (generation %d, %s) after %.1f ms", region, mountpoint,
             engine.generation, "mounted" if first else "took over the connection",
             (time.monotonic() - started) * 1000)
    say(f"ok generation={engine.generation} clean={int(engine.was_clean)} "
        f"recovered={engine.recovered_records} orphans={engine.reclaimed} "
        f"mode={'mounted' if first else 'takeover'}")
    drained = False

    async def run() -> None:
        nonlocal drained
        async with trio.open_nursery() as nursery:
            async def watch_supervisor() -> None:
                nonlocal drained
                while True:
                    await trio.lowlevel.wait_readable(ctl)
                    data = ctl.recv(4096)
                    if not data:
                        if systemd.under_systemd():
                            # The unit restarts the supervisor, which takes the connection
                            # from systemd's fd store: hand over to the daemon it starts.
                            log.info("the supervisor is gone: draining for its successor")
                            drained = True
                            pyfuse3.terminate()
                        return  # else serve on while the mount lives
                    if b"drain" in data:
                        drained = True
                        pyfuse3.terminate()
                        return

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for sig in signals:
                        log.info("signal %d: unmounting", sig)  # the supervisor unmounts
                        pyfuse3.terminate()
                        return

            async def expire_resends() -> None:
                await trio.sleep(RESEND_WINDOW)
                engine.replies.expire()

            nursery.start_soon(watch_supervisor)
            nursery.start_soon(watch_signals)
            nursery.start_soon(expire_resends)
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
        engine.close(handover=drained or status != 0)
    if drained:
        log.info("drained: handing %s over", mountpoint)
        say("drained")  # the region is closed and unlocked: the successor may start now
        logging.shutdown()
        os._exit(supervisor.EXIT_HANDED_OVER)  # no interpreter teardown in the gap
    log.info("unmounted %s; region marked clean", mountpoint)
    return status


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
