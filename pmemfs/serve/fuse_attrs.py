"""The FUSE handlers of a file's attributes beyond stat: extended attributes (with the
control xattrs of pmemfs.serve.control, and the trusted.* and SELinux rules) and chattr
flags through ioctl. A mixin of fuse_ops.Operations, whose engine it works on.
"""

from __future__ import annotations

import errno
import os
import struct

import pyfuse3

from ..fs.engine import Ctx, Engine, FsError
from ..media.format import ATTR_APPEND, ATTR_IMMUTABLE, ATTR_NOATIME, ATTR_NODUMP
from . import control, session
from .fuse_common import (
    _admin,
    _ctx,
    _drop_cached_attrs,
    _drop_cached_pages,
    _in_bytes,
    _sync_call,
    handler,
    log,
    replying,
)

SELINUX = b"security.selinux"
SELINUX_HOST = os.path.isdir("/sys/fs/selinux/booleans")  # selinuxfs mounted: SELinux is on
# The ioctls that carry chattr flags (the kernel's fuse_fileattr_get/set send them).
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS = 0x80046601, 0x40046602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FSXATTR = struct.Struct("<IIIII8x")  # xflags, extsize, nextents, projid, cowextsize
FUSE_IOCTL_UNRESTRICTED = 2
# FS_XFLAG_* of the flags we keep, and the FS_*_FL they stand for.
XFLAGS = {0x8: ATTR_IMMUTABLE, 0x10: ATTR_APPEND, 0x40: ATTR_NOATIME, 0x80: ATTR_NODUMP}


class AttrHandlers:
    """setxattr, getxattr, listxattr, removexattr and the chattr ioctls."""

    engine: Engine
    writeback: bool

    @replying
    @handler
    async def setxattr(self, inode, name, value, ctx):
        if control.is_control(name):
            if self.writeback and name != control.ALIGN:
                # The kernel's dirty pages are the newest bytes and it trusts only its
                # own file sizes: blocks moved or grown behind it would be overwritten.
                raise FsError(errno.EOPNOTSUPP, "control commands need a mount without -o writeback")
            moved = control.command(self.engine, inode, name, value, _ctx(ctx))
            # A command may set a size behind the kernel's back (prealloc grows the file,
            # carve sizes its destination): the cached attributes go before the answer,
            # or the caller's next read stops at the old size.
            for ino in {inode, *moved}:
                _drop_cached_attrs(ino)
            for ino in moved:
                _drop_cached_pages(ino)
            return
        self.engine.setxattr(inode, name, value, 0, _ctx(ctx))

    @handler
    async def getxattr(self, inode, name, ctx):
        if control.is_control(name):
            return control.query(self.engine, inode, name, _ctx(ctx))
        if name.startswith(b"trusted.") and not _admin(ctx):
            raise FsError(errno.ENODATA)  # as the kernel answers (it asked already)
        try:
            return self.engine.getxattr(inode, name)
        except FsError as e:
            if e.errno == errno.ENODATA and name == SELINUX and not SELINUX_HOST:
                # No label, on a host without SELinux: "not supported", so that ls -l and
                # cp stop asking for this filesystem (coreutils remembers it per device).
                raise FsError(errno.EOPNOTSUPP) from None
            raise

    @handler
    async def listxattr(self, inode, ctx):
        names = self.engine.listxattr(inode)
        if any(n.startswith(b"trusted.") for n in names) and not _admin(ctx):
            # as tmpfs: trusted.* is listed only to CAP_SYS_ADMIN
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @replying
    @handler
    async def removexattr(self, inode, name, ctx):
        self.engine.removexattr(inode, name, _ctx(ctx))


    def _ioctl(self, req: int, ino: int, cmd: int, _arg, _fi, flags: int, in_buf: int | None,
               in_size: int, out_size: int) -> None:
        """chattr flags (FS_IOC_GETFLAGS/SETFLAGS, and FS_IOC_FSGETXATTR/FSSETXATTR, as
        the kernel's fileattr calls send them); any other ioctl is ENOTTY, as on tmpfs."""
        out: list[bytes] = []
        engine = self.engine

        def run() -> None:
            data = _in_bytes(in_buf, in_size)
            if flags & FUSE_IOCTL_UNRESTRICTED:
                raise FsError(errno.ENOTTY)
            if cmd in (FS_IOC_GETFLAGS, FS_IOC32_GETFLAGS):
                out.append(struct.pack("<I", engine.attr_flags(ino))[:out_size])
            elif cmd in (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS):
                if len(data) < 4:
                    raise FsError(errno.EINVAL)
                self._set_flags(req, ino, struct.unpack_from("<I", data)[0])
            elif cmd == FS_IOC_FSGETXATTR:
                attr = engine.attr_flags(ino)
                xflags = sum(x for x, a in XFLAGS.items() if attr & a)
                out.append(FSXATTR.pack(xflags, 0, 0, 0, 0)[:out_size])
            elif cmd == FS_IOC_FSSETXATTR:
                if len(data) < FSXATTR.size:
                    raise FsError(errno.EINVAL)
                xflags, extsize, _nextents, projid, cowextsize = FSXATTR.unpack_from(data)
                if xflags & ~sum(XFLAGS) or extsize or projid or cowextsize:
                    raise FsError(errno.EOPNOTSUPP)  # as tmpfs: none of XFS's extras
                self._set_flags(req, ino, sum(a for x, a in XFLAGS.items() if xflags & x))
            else:
                raise FsError(errno.ENOTTY)

        err = _sync_call("ioctl", (ino, cmd), run)
        if err:
            session.reply_err(req, err)
        else:
            session.reply_ioctl(req, out[0] if out else b"")

    def _set_flags(self, req: int, ino: int, flags: int) -> None:
        c = session.request_context(req)
        self.engine.set_attr_flags(ino, flags, Ctx(c.uid, c.gid, c.pid))
        # The ctime changed, and the kernel keeps attributes for 300 s: drop them before
        # answering. Attributes only: the kernel waits for nothing of ours to do that.
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except FileNotFoundError:
            pass  # not cached
        except OSError:  # the flags are set: a stale ctime is no reason to fail
            log.exception("invalidating the attributes of inode %d failed", ino)

