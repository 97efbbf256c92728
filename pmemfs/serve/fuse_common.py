"""What every FUSE handler shares: the wrapper that turns an engine error into its errno
and anything unexpected into EIO (logged, for pyfuse3 would end the session), the debug
log of requests, the settling of exactly-once replies, the set-uid/set-gid rule, and
asking the kernel to drop what it cached.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable

import pyfuse3
import trio

from ..fs import creds
from ..fs.engine import Ctx, Engine, FsError

log = logging.getLogger("pmemfs.fuse")  # one logger for the adapter, whichever module


def handler(fn: Callable) -> Callable:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        if log.isEnabledFor(logging.DEBUG):  # pmemfs mount --debug: every request and its answer
            return await _logged(fn, name, self, args)
        try:
            return await fn(self, *args)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s%r failed", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _brief(args: tuple) -> str:
    """The plain arguments of a request (numbers, names, short values), for the debug log."""
    out = []
    for a in args:
        if isinstance(a, bool | int):
            out.append(str(a))
        elif isinstance(a, bytes | memoryview):
            b = bytes(a[:48])
            out.append(repr(b) + ("..." if len(a) > 48 else ""))
    return "(" + ", ".join(out) + ")"


async def _logged(fn: Callable, name: str, self, args: tuple):
    try:
        result = await fn(self, *args)
    except FsError as e:
        log.debug("%s%s -> %s", name, _brief(args), errno.errorcode.get(e.errno, e.errno))
        raise pyfuse3.FUSEError(e.errno) from None
    except pyfuse3.FUSEError as e:
        log.debug("%s%s -> %s", name, _brief(args), errno.errorcode.get(e.errno, e.errno))
        raise
    except Exception:
        log.exception("%s%r failed", name, args[:2])
        raise pyfuse3.FUSEError(errno.EIO) from None
    log.debug("%s%s -> ok", name, _brief(args))
    return result


def _ctx(ctx: pyfuse3.RequestContext) -> Ctx:
    return Ctx(ctx.uid, ctx.gid, ctx.pid, umask=ctx.umask)


def _settle_after_reply(engine: Engine) -> None:
    """pyfuse3 sends a handler's answer as soon as it returns, before the trio loop
    runs anything else: settle the operation's reply record then (see replies.py)."""
    if engine.unsettled is not None:
        trio.lowlevel.current_trio_token().run_sync_soon(engine.settle)


def replying(fn: Callable) -> Callable:
    """For handlers whose operation is recorded for exactly-once answers."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        finally:
            _settle_after_reply(self.engine)

    return wrapper


def _privs_to_drop(mode: int, *, chown: bool, fsetid: bool, in_group: bool) -> int:
    """The set-uid/set-gid bits the kernel's setattr_should_drop_suidgid (or, for a
    chown, chown_common) would clear: regular files only; set-uid always on chown, else
    without CAP_FSETID; set-gid likewise, where it means something (group exec) or the
    caller is outside the file's group."""
    if not stat.S_ISREG(mode):
        return 0
    kill = 0
    if mode & stat.S_ISUID and (chown or not fsetid):
        kill |= stat.S_ISUID
    drop_sgid = mode & stat.S_IXGRP or not (fsetid or in_group)
    if mode & stat.S_ISGID and drop_sgid and (chown or not fsetid):
        kill |= stat.S_ISGID
    return kill


def _admin(ctx: pyfuse3.RequestContext) -> bool:
    return creds.of_process(ctx.uid, ctx.gid, ctx.pid).capable(creds.CAP_SYS_ADMIN)


def _sync_call(name: str, args: tuple, fn: Callable[[], object]) -> int:
    """Run a synchronous handler; its errno (0 when it succeeded). Called from C: an
    exception must not escape (ctypes would print it and answer nothing)."""
    try:
        fn()
        err = 0
    except FsError as e:
        err = e.errno
    except Exception:
        log.exception("%s%r failed", name, args)
        err = errno.EIO
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s%s -> %s", name, _brief(args), os.strerror(err) if err else "ok")
    return err


def _in_bytes(address: int | None, size: int) -> bytes:
    """The input buffer of a low-level request (a C pointer and a size)."""
    return ctypes.string_at(address, size) if address and size else b""


def _drop_cached_attrs(ino: int) -> None:
    """Make the kernel ask for ino's attributes again. Safe from the handler itself: an
    attribute-only invalidation waits on no page and no lock the pending request holds."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except FileNotFoundError:
        pass  # the kernel has forgotten the inode: nothing cached
    except OSError:
        log.exception("invalidating the attributes of inode %d failed", ino)


def _drop_cached_pages(ino: int) -> None:
    """Ask the kernel to forget ino's cached pages (their bytes moved away).

    Done from a thread, after the request that moved them has been answered, so the
    kernel never waits on the daemon's one trio thread.
    """
    def run() -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except FileNotFoundError:
            pass  # the kernel has forgotten the inode: nothing cached to drop
        except Exception:
            log.exception("invalidating the cache of inode %d failed", ino)

    threading.Thread(target=run, daemon=True).start()


