"""FUSE adapter: translates pyfuse3 requests into engine calls, nothing more.

Every handler is wrapped so that an unexpected exception is logged with its
traceback and answered with EIO: in pyfuse3 any other exception would abort the
whole session (fuse_common.handler). Here: the namespace, data, directory and low-level
handlers; the xattr and chattr handlers are the AttrHandlers mixin (fuse_attrs).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

import pyfuse3
import trio

from ..fs import creds, holes
from ..fs.engine import Engine, FsError, Stat
from . import session
from .fuse_attrs import AttrHandlers
from .fuse_common import (
    _ctx,
    _drop_cached_attrs,
    _privs_to_drop,
    _sync_call,
    handler,
    replying,
)
from .pagecache import DirectWriters

log = logging.getLogger("pmemfs.fuse")

# The kernel is the only client, and it tells us about every change it makes, so
# long timeouts are safe and spare the daemon a request per stat().
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
ST_BLKSIZE = 1 << 20  # invites 1 MiB I/O (the largest FUSE request)
# A file handle is the inode number, plus FH_DIRECT for an O_DIRECT open: derived from
# the request alone, so a new daemon can serve handles an old one gave out. O_APPEND
# needs nothing here: the kernel puts each append at its i_size before sending the
# write, and it also writes dirty pages of a shared mapping back under an O_APPEND
# handle, which must land at their own offsets.
FH_DIRECT = 1 << 63
# An O_DIRECT handle opened by a caller without CAP_FSETID: its writes clear set-uid and
# set-gid. The kernel's direct write path never calls file_remove_privs; with
# KILLPRIV_V2 it flags such writes for the daemon, a flag libfuse 3.14 drops.
FH_KILL = 1 << 62
FH_OUTSIDE = 1 << 61  # ... and who was not in the file's group: set-gid goes even without g+x
FH_FLAGS = FH_DIRECT | FH_KILL | FH_OUTSIDE
# pyfuse3 turns FATTR_ATIME_NOW/MTIME_NOW (touch) into the current time; a time this
# close to it is taken as "now" (an append-only inode allows those, not others).
NOW_SLACK_NS = 1_000_000_000


class Operations(AttrHandlers, pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: Engine, options: frozenset[str] = frozenset()):
        super().__init__()
        self.engine = engine
        # -o writeback: the kernel's writeback cache (docs/DESIGN.md "Writeback cache").
        self.writeback = "writeback" in options
        # -o noacl: no POSIX ACLs, so `ls -l` stops asking for them after one answer.
        self.want_acl = "noacl" not in options
        # Directory handles carry their inode in the low 32 bits, so a handle that an
        # earlier daemon gave the kernel still works here (live update); the listing
        # snapshot is only a cache, rebuilt on demand, and cookies live in the region.
        self.dir_handles: dict[int, tuple[int, list | None]] = {}
        self.next_dir_handle = (os.getpid() & 0xFFFF) << 16
        self.direct = DirectWriters()  # page-cache bookkeeping for O_DIRECT writers

    def attrs(self, st: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = st.ino
        a.generation = st.generation
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = st.mode
        a.st_nlink = st.nlink
        a.st_uid = st.uid
        a.st_gid = st.gid
        a.st_rdev = st.rdev
        a.st_size = st.size
        a.st_blksize = ST_BLKSIZE
        a.st_blocks = st.blocks
        a.st_atime_ns = st.atime_ns
        a.st_mtime_ns = st.mtime_ns
        a.st_ctime_ns = st.ctime_ns
        return a

    def entry(self, st: Stat) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a new reference."""
        self.engine.ref(st.ino)
        return self.attrs(st)

    @handler
    async def lookup(self, parent_inode, name, ctx):
        return self.entry(self.engine.stat(self.engine.lookup(parent_inode, name)))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.engine.forget(ino, n)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, n)

    @handler
    async def getattr(self, inode, ctx):
        return self.attrs(self.engine.stat(inode))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        killed = self._killed_mode(inode, kw, ctx)
        if killed is not None:
            kw["mode"] = killed
        if not kw:  # nothing to change (see _killed_mode): no transaction, no new ctime
            return self.attrs(self.engine.stat(inode))
        now = time.time_ns()
        times_now = all(abs(kw[k] - now) < NOW_SLACK_NS for k in ("atime_ns", "mtime_ns") if k in kw)
        return self.attrs(self.engine.setattr(inode, times_now=times_now, **kw))

    def _kill_on_write(self, ino: int, fh: int) -> None:
        """A write through an FH_KILL handle (its opener lacked CAP_FSETID) clears what
        file_remove_privs would have."""
        st = self.engine.stat(ino)
        kill = _privs_to_drop(st.mode, chown=False, fsetid=False, in_group=not fh & FH_OUTSIDE)
        if kill:
            self.engine.setattr(ino, mode=stat.S_IMODE(st.mode) & ~kill)
            _drop_cached_attrs(ino)

    def _killed_mode(self, inode: int, kw: dict, ctx) -> int | None:
        """The mode with set-uid/set-gid cleared where the kernel would clear them, or
        None: with FUSE_HANDLE_KILLPRIV_V2 (negotiated at INIT, docs/DESIGN.md "One
        request per write") the kernel leaves that to us, and libfuse 3.14 drops the
        flags that say so. A chown, a truncate, or the empty SETATTR the kernel sends
        before a write to such a file. Without KILLPRIV_V2 the kernel sends the same
        mode itself; this agrees with it."""
        if "mode" in kw or not ({"uid", "gid", "size"} >= kw.keys()):
            return None  # chmod says what it wants; times alone clear nothing
        st = self.engine.stat(inode)
        if not stat.S_ISREG(st.mode) or not st.mode & (stat.S_ISUID | stat.S_ISGID):
            return None  # the common case: no credentials to read
        who = creds.of_process(ctx.uid, ctx.gid, ctx.pid)
        kill = _privs_to_drop(st.mode, chown="uid" in kw or "gid" in kw,
                              fsetid=who.capable(creds.CAP_FSETID), in_group=who.in_group(st.gid))
        return stat.S_IMODE(st.mode) & ~kill if kill else None

    @handler
    async def readlink(self, inode, ctx):
        target = self.engine.readlink(inode)
        self.engine.touch_atime(inode)  # following a link accesses it, as on tmpfs
        return target

    @replying
    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self.entry(self.engine.mknod(parent_inode, name, mode, rdev, _ctx(ctx)))

    @replying
    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.entry(self.engine.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @replying
    @handler
    async def unlink(self, parent_inode, name, ctx):
        self.engine.unlink(parent_inode, name, _ctx(ctx))

    @replying
    @handler
    async def rmdir(self, parent_inode, name, ctx):
        self.engine.rmdir(parent_inode, name, _ctx(ctx))

    @replying
    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        return self.entry(self.engine.symlink(parent_inode, name, target, _ctx(ctx)))

    @replying
    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.engine.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, _ctx(ctx))

    @replying
    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self.entry(self.engine.link(inode, new_parent_inode, new_name, _ctx(ctx)))

    def _file_info(self, ino: int, flags: int, ctx) -> pyfuse3.FileInfo:
        if self.engine.leases.held(ino):
            # Mapped directly (pmemfs.direct): the region is the only copy, so the
            # kernel must not cache it. A shared mmap of such an open fails (ENODEV).
            return pyfuse3.FileInfo(fh=ino, keep_cache=False, direct_io=True)
        if flags & os.O_DIRECT and not self.writeback:
            # Bypass the page cache in the kernel too (FOPEN_DIRECT_IO), so this handle
            # never caches pages and is never used to write dirty ones back: the
            # invalidations its writes wait for (write()) cannot wait on themselves.
            # With the writeback cache the kernel writes dirty pages back through any
            # writable handle, so there O_DIRECT stays the kernel's own (it flushes and
            # drops the range around each direct write itself).
            self.direct.opened(ino)
            kill = 0
            if flags & os.O_ACCMODE != os.O_RDONLY:
                who = creds.of_process(ctx.uid, ctx.gid, ctx.pid)
                if not who.capable(creds.CAP_FSETID):
                    kill = FH_KILL | (0 if who.in_group(self.engine.stat(ino).gid) else FH_OUTSIDE)
            return pyfuse3.FileInfo(fh=ino | FH_DIRECT | kill, keep_cache=True, direct_io=True)
        return pyfuse3.FileInfo(fh=ino, keep_cache=True, direct_io=False)

    @handler
    async def open(self, inode, flags, ctx):
        self.engine.check_open(inode, flags)  # chattr +i / +a (the kernel cannot know them)
        if flags & os.O_TRUNC:
            # Also when already empty: an O_TRUNC open updates mtime and ctime (as tmpfs).
            # The kernel truncates through OPEN (atomic O_TRUNC) and leaves set-uid to us.
            self.engine.setattr(inode, size=0, mode=self._killed_mode(inode, {"size": 0}, ctx))
        else:
            self.engine.stat(inode)  # ENOENT for an inode that is gone
        return self._file_info(inode, flags, ctx)

    @replying
    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        st = self.engine.create(parent_inode, name, mode, _ctx(ctx))
        return self._file_info(st.ino, flags, ctx), self.entry(st)

    @handler
    async def read(self, fh, off, size):
        if fh & FH_DIRECT:
            return self.engine.read(fh & ~FH_FLAGS, off, size)
        self.direct.buffered_io(fh)
        return self.engine.read(fh, off, size)

    @handler
    async def write(self, fh, off, buf):
        if not fh & FH_DIRECT:
            self.direct.buffered_io(fh)
            return self.engine.write(fh, off, buf)
        # An O_DIRECT write: no page the kernel cached before it, or while it was in
        # flight, may outlive it. Dropping pages first also writes back dirty pages of a
        # shared mapping, so they land before this write, not over it.
        ino = fh & ~FH_FLAGS
        if fh & FH_KILL:
            self._kill_on_write(ino, fh)
        if self.direct.may_be_cached(ino):
            await self._drop_pages_now(ino)
        n = self.engine.write(ino, off, buf)
        if self.direct.may_be_cached(ino):  # buffered I/O was served while we waited
            await self._drop_pages_now(ino)
        return n

    async def _drop_pages_now(self, ino: int) -> None:
        """Invalidate ino's cached pages and wait for it, from a worker thread: the kernel
        may wait on pages whose reads other requests answer meanwhile."""
        mark = self.direct.begin(ino)
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except FileNotFoundError:
            pass  # the kernel has forgotten the inode: nothing is cached
        except OSError:
            log.exception("invalidating the cache of inode %d failed", ino)
            return
        self.direct.done(ino, mark)

    async def flush(self, fh):
        # Nothing to do at close (data is in the region, or, with -o writeback, the kernel
        # writes its dirty pages back before it would send FLUSH). ENOSYS once makes the
        # kernel stop sending FLUSH for the connection's life: a request less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        if fh & FH_DIRECT:
            self.direct.released(fh & ~FH_FLAGS)

    @handler
    async def fsync(self, fh, datasync):
        self.engine.fsync(fh & ~FH_FLAGS)

    @handler
    async def opendir(self, inode, ctx):
        self.engine.opendir(inode)
        self.next_dir_handle = (self.next_dir_handle + 1) & 0xFFFFFFFF
        fh = (self.next_dir_handle << 32) | inode
        self.dir_handles[fh] = (inode, None)
        return fh

    @handler
    async def readdir(self, fh, start_id, token):
        ino, snapshot = self.dir_handles.get(fh) or (fh & 0xFFFFFFFF, None)
        if snapshot is None or start_id == 0:
            # One listing per pass over the directory; later calls resume by cookie.
            snapshot = self.engine.readdir(ino)
            self.dir_handles[fh] = (ino, snapshot)
        # Every getdents reads the directory (iterate_dir's file_accessed): the kernel
        # leaves atime to us, under the mount's atime options.
        self.engine.touch_atime(ino)
        i = _after(snapshot, start_id)
        engine = self.engine
        for cookie, name, child in snapshot[i:]:
            dot = name in (b".", b"..")
            if not dot:
                try:
                    if engine.lookup(ino, name) != child:
                        continue  # renamed or replaced since the listing began
                except FsError:
                    continue  # removed since the listing began
            try:
                st = engine.stat(child)
            except FsError:
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(st), cookie):
                break
            if not dot:
                engine.ref(child)

    async def releasedir(self, fh):
        self.dir_handles.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        self.engine.fsync(fh & 0xFFFFFFFF)

    @handler
    async def statfs(self, ctx):
        s = self.engine.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = s["block_size"]
        st.f_frsize = s["fragment_size"]  # counted in pack chunks: df shows real usage
        st.f_blocks = s["fragments"]
        st.f_bfree = s["fragments_free"]
        st.f_bavail = s["fragments_free"]
        st.f_files = s["files"]
        st.f_ffree = s["files_free"]
        st.f_favail = s["files_free"]
        st.f_namemax = s["namemax"]
        return st

    # ------------------------------------------- handlers pyfuse3 does not have
    def low_level_handlers(self) -> dict[str, Callable]:
        """fallocate, lseek and ioctl, installed into libfuse's session by session.py."""
        return {"fallocate": self._fallocate, "lseek": self._lseek, "ioctl": self._ioctl}

    def negotiate(self, conn: session.ConnInfo) -> None:
        """At FUSE_INIT, after pyfuse3's own init: POSIX ACLs, enforced by the kernel,
        with the umask left to us (FUSE_DONT_MASK), so that a default ACL can replace
        it as on tmpfs. Both or neither."""
        try:
            both = session.FUSE_CAP_POSIX_ACL | session.FUSE_CAP_DONT_MASK
            if self.want_acl and conn.capable & both == both:
                conn.want |= both
            self.engine.acl = conn.want & both == both
            if self.writeback:
                if not conn.capable & session.FUSE_CAP_WRITEBACK_CACHE:
                    log.warning("the kernel offers no writeback cache: -o writeback has no effect")
                conn.want |= conn.capable & session.FUSE_CAP_WRITEBACK_CACHE
                self.writeback = bool(conn.want & session.FUSE_CAP_WRITEBACK_CACHE)
        except Exception:
            log.exception("negotiating POSIX ACLs and the writeback cache failed")

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, _fi) -> None:
        session.reply_err(req, _sync_call("fallocate", (ino, mode, offset, length),
                                          lambda: holes.fallocate(self.engine, ino, mode, offset, length)))

    def _lseek(self, req: int, ino: int, offset: int, whence: int, _fi) -> None:
        found: list[int] = []
        err = _sync_call("lseek", (ino, offset, whence),
                         lambda: found.append(holes.seek(self.engine, ino, offset, whence)))
        if err:
            session.reply_err(req, err)
        else:
            session.reply_lseek(req, found[0])


def _after(snapshot: list[tuple[int, bytes, int]], cookie: int) -> int:
    """Index of the first entry whose cookie is greater than `cookie` (binary search)."""
    lo, hi = 0, len(snapshot)
    while lo < hi:
        mid = (lo + hi) // 2
        if snapshot[mid][0] <= cookie:
            lo = mid + 1
        else:
            hi = mid
    return lo
