"""The FUSE daemon: owns one region and serves it on a mountpoint until unmounted.

`serve()` runs in the foreground. `python -m pmemfs.daemon` is what `pmemfs mount`
starts in the background; it reports "ok" or the reason it failed on a pipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import pyfuse3
import trio

from .engine import Engine
from .fuse_ops import Operations
from .journal import CrashPoints
from .mounting import MOUNT_OPTIONS_ALLOWED  # noqa: F401  (re-exported)

log = logging.getLogger("pmemfs.daemon")



def fuse_options(region: str, options: set[str]) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"default_permissions", f"fsname={os.path.abspath(region)}", "subtype=pmemfs"}
    opts |= options & {"allow_other", "allow_root", "ro", "noatime", "debug"}
    return opts


def setup_logging(log_file: str | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


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


def serve(region: str, mountpoint: str, options: set[str], *,
          ready: Callable[[str], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns an exit status."""
    started = time.monotonic()
    engine = Engine(region, readonly="ro" in options, sync="sync" in options,
                    noatime="noatime" in options, crash=CrashPoints.from_env())
    if "prefault" in options and not engine.readonly:
        engine.region.prefault(engine.data_start, engine.region.size - engine.data_start)
    ops = Operations(engine)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(region, options))
    except Exception:
        engine.close()
        raise
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


def supervise(region: str, mountpoint: str, options: set[str], ready: Callable[[str], None]) -> int:
    """Keep a daemon serving: fork one, and when it dies (a crash, kill -9) clear the dead
    mount and fork the next at once. The supervisor has imported everything already, so
    a replacement costs a fork and a mount, not an interpreter start. It stops when a
    daemon exits cleanly (unmounted, SIGTERM) or cannot start."""
    from .mounting import prepare_mountpoint

    child = 0

    def forward(sig, _frame) -> None:
        if child:
            os.kill(child, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    first = True
    while True:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the daemon
            os.close(r)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            try:
                code = serve(region, mountpoint, options,
                             ready=lambda msg, w=w: (os.write(w, (msg + "\n").encode()), os.close(w)))
            except Exception as e:
                log.error("cannot serve %s: %s", region, e)
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                os.write(w, f"error {msg}\n".encode())
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()
        if first:
            ready(line or "error the daemon exited without a word")
            first = False
        if not line.startswith("ok"):
            os.waitpid(child, 0)
            return 1
        _, status = os.waitpid(child, 0)
        if os.WIFEXITED(status):
            log.info("daemon %d exited with %d: supervisor done", child, os.WEXITSTATUS(status))
            return os.WEXITSTATUS(status)
        died = time.monotonic()
        log.warning("daemon %d died (signal %d): starting another", child, os.WTERMSIG(status))
        try:
            prepare_mountpoint(region, mountpoint, force=True)
        except Exception as e:
            log.error("cannot clear %s for a new daemon: %s", mountpoint, e)
            return 1
        log.info("replacement forked %.1f ms after the death", (time.monotonic() - died) * 1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pmemfs-daemon")
    p.add_argument("region")
    p.add_argument("mountpoint")
    p.add_argument("--options", default="")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--respawn", action="store_true")
    a = p.parse_args(argv)
    setup_logging(a.log, a.debug)
    options = {o for o in a.options.split(",") if o}

    def ready(msg: str) -> None:
        if a.ready_fd is not None:
            os.write(a.ready_fd, (msg + "\n").encode())
            os.close(a.ready_fd)

    try:
        if a.respawn:
            return supervise(a.region, a.mountpoint, options, ready)
        return serve(a.region, a.mountpoint, options, ready=ready)
    except Exception as e:
        log.error("cannot serve %s: %s", a.region, e)
        if a.ready_fd is not None:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            os.write(a.ready_fd, f"error {msg}\n".encode())
        return 1


if __name__ == "__main__":
    sys.exit(main())
