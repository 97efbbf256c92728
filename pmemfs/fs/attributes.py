"""The engine's attributes: setattr, chattr flags, atime, POSIX ACLs and extended
attributes (stored as blob chains, core.py).
"""

from __future__ import annotations

import errno
import os
import stat
import time

from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    ATTR_KNOWN,
    ATTR_NOATIME,
    BLOB_XATTR,
    FLAG_PINNED,
    KIND_DIR,
    KIND_KOBJ,
    KIND_REG,
    KIND_SYMLINK,
    NAME_MAX,
    XATTR_VALUE_MAX,
    clamp_time_ns,
)
from ..media.journal import Transaction
from . import acl, creds
from .core import ALIGN_POLICY, RELATIME_NS, XATTR_CREATE, XATTR_REPLACE, EngineCore, Stat
from .creds import CAP_FSETID, CAP_LINUX_IMMUTABLE, CAP_SYS_ADMIN, Creds
from .ctx import ROOT_CTX, Ctx, FsError
from .replies import OP_REMOVEXATTR, OP_SETXATTR


class Attributes(EngineCore):
    """Mode, owner, times, chattr flags, ACLs and extended attributes."""

    def attr_flags(self, ino: int) -> int:
        """The inode's FS_IOC_GETFLAGS flags."""
        self.check_ino(ino)
        return int(self.I["attr"][ino])

    def set_attr_flags(self, ino: int, flags: int, ctx: Ctx = ROOT_CTX) -> Stat:
        """FS_IOC_SETFLAGS, as tmpfs takes it: immutable, append-only, nodump and noatime
        (anything else EOPNOTSUPP); the owner (or CAP_FOWNER) sets them, and changing
        immutable or append-only needs CAP_LINUX_IMMUTABLE. The kernel checks both
        before asking; they are checked again with the caller's full credentials."""
        self.check_ino(ino)
        if self.kind(ino) not in (KIND_REG, KIND_DIR, KIND_KOBJ):
            raise FsError(errno.ENOTTY)
        if flags & ~ATTR_KNOWN:
            raise FsError(errno.EOPNOTSUPP)
        who = creds.of(ctx)
        if not creds.owner_or_capable(who, int(self.I["uid"][ino])):
            raise FsError(errno.EPERM)
        if (flags ^ int(self.I["attr"][ino])) & (ATTR_IMMUTABLE | ATTR_APPEND) \
                and not who.capable(CAP_LINUX_IMMUTABLE):
            raise FsError(errno.EPERM)
        with self.transaction() as tx:
            self.save_inode(tx, ino)
            self.I["attr"][ino] = flags
            self.I["ctime_ns"][ino] = time.time_ns()
        return self.stat(ino)

    def check_open(self, ino: int, flags: int) -> None:
        """may_open's flag rules: an immutable inode is not opened for writing or
        truncation; an append-only one only with O_APPEND, and never truncated."""
        attr = int(self.I["attr"][ino])
        if not attr & (ATTR_IMMUTABLE | ATTR_APPEND):
            return
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TRUNC or (writing and (attr & ATTR_IMMUTABLE or not flags & os.O_APPEND)):
            raise FsError(errno.EPERM, "the inode is immutable or append-only (chattr)")

    def _acl(self, ino: int, name: bytes) -> list[acl.Entry] | None:
        slot = self.xattrs.get(ino, {}).get(name) if self.acl else None
        return None if slot is None else acl.parse(self.read_blob(slot)[1])

    def _creation_acls(self, parent: int, mode: int, ctx: Ctx) -> tuple[int, list[tuple[bytes, bytes]]]:
        """A new inode's mode and ACLs (posix_acl_create): from the directory's default
        ACL if it has one, else the mode less the caller's umask (the kernel leaves the
        umask to us when ACLs are on: FUSE_DONT_MASK)."""
        default = self._acl(parent, acl.DEFAULT)
        if default is None:
            return mode & ~(ctx.umask & 0o777), []
        mode, access = acl.create(default, mode)
        out = [] if acl.is_minimal(access) else [(acl.ACCESS, acl.encode(access))]
        if stat.S_ISDIR(mode):
            out.append((acl.DEFAULT, acl.encode(default)))
        return mode, out

    def _check_acl_slots(self, parent: int, acls: list[tuple[bytes, bytes]], kind: int) -> None:
        """ENOSPC unless the blob table holds the inherited ACLs (and the policy)."""
        if acls:
            need = sum(self._blob_slots_needed(len(n), len(v)) for n, v in acls)
            need += kind in (KIND_REG, KIND_DIR) and ALIGN_POLICY in self.xattrs.get(parent, ())
            if not self.have_slots("blob", need):
                raise FsError(errno.ENOSPC)

    def _store_acls(self, tx: Transaction, ino: int, acls: list[tuple[bytes, bytes]]) -> None:
        for name, value in acls:
            self.xattrs.setdefault(ino, {})[name] = self._write_blob(tx, ino, BLOB_XATTR, name, value)

    def _set_acl(self, ino: int, name: bytes, value: bytes, ctx: Ctx) -> None:
        """setxattr of an ACL: store it unless the mode says it all, and keep the mode
        in step (posix_acl_update_mode: the owner, mask and other entries become the
        mode's bits; S_ISGID goes unless the caller is in the group or has CAP_FSETID)."""
        kind = self.kind(ino)
        if kind == KIND_SYMLINK:
            raise FsError(errno.EOPNOTSUPP)
        if name == acl.DEFAULT and kind != KIND_DIR:
            raise FsError(errno.EACCES)
        try:
            entries = acl.parse(value)
        except acl.AclError as e:
            raise FsError(e.errno, str(e)) from None
        who = creds.of(ctx)
        if not creds.owner_or_capable(who, int(self.I["uid"][ino])):
            raise FsError(errno.EPERM)
        mode = int(self.I["mode"][ino])
        keep = True
        if name == acl.ACCESS:
            mode = (mode & ~0o777) | acl.mode_bits(entries)
            if not who.in_group(int(self.I["gid"][ino])) and not who.capable(CAP_FSETID):
                mode &= ~stat.S_ISGID
            keep = not acl.is_minimal(entries)
        value = acl.encode(entries)
        old = self.xattrs.get(ino, {}).get(name)
        freed = self._blob_chain_length(old) if old is not None else 0
        if keep and not self.have_slots("blob", self._blob_slots_needed(len(name), len(value)) - freed):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if old is not None:
                self._free_blob(tx, old)
                del self.xattrs[ino][name]
            if keep:
                self.xattrs.setdefault(ino, {})[name] = self._write_blob(tx, ino, BLOB_XATTR, name, value)
            self.touch(tx, ino)
            self.I["mode"][ino] = mode

    def _chmod_acl(self, tx: Transaction, ino: int, mode: int) -> None:
        """posix_acl_chmod: a chmod rewrites the access ACL's owner, mask and other."""
        entries = self._acl(ino, acl.ACCESS)
        if entries is None:
            return
        attrs = self.xattrs[ino]
        self._free_blob(tx, attrs[acl.ACCESS])  # the same size again: always fits
        attrs[acl.ACCESS] = self._write_blob(tx, ino, BLOB_XATTR, acl.ACCESS, acl.encode(acl.chmod(entries, mode)))

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                times_now: bool = False) -> Stat:
        """times_now: the times asked for are "now" (touch), which an append-only
        inode allows (notify_change); explicit times, mode and owner it refuses."""
        self.check_ino(ino)
        attr = int(self.I["attr"][ino])
        if attr & ATTR_IMMUTABLE or (attr & ATTR_APPEND and (
                mode is not None or uid is not None or gid is not None
                or (not times_now and (atime_ns is not None or mtime_ns is not None)))):
            raise FsError(errno.EPERM, "the inode is immutable or append-only (chattr)")
        if size is not None:
            self._check_truncate(ino, size)
        if (mode is not None or uid is not None or gid is not None) and int(self.I["flags"][ino]) & FLAG_PINNED:
            raise FsError(errno.EPERM)  # kernel objects and /.kernel stay root's, 0600/0700
        with self.transaction() as tx:
            now = time.time_ns()
            self.save_inode(tx, ino)
            if size is not None:
                self._truncate(tx, ino, size)
            if mode is not None:
                self.I["mode"][ino] = (int(self.I["mode"][ino]) & stat.S_IFMT(0o177777)) | (mode & 0o7777)
                self._chmod_acl(tx, ino, mode)
            if uid is not None:
                self.I["uid"][ino] = uid
            if gid is not None:
                self.I["gid"][ino] = gid
            # Times from callers are clamped to the format's range (as the kernel's
            # timestamp_truncate does for s_time_min/s_time_max): never an error.
            if atime_ns is not None:
                self.I["atime_ns"][ino] = clamp_time_ns(atime_ns)
            if mtime_ns is not None:
                self.I["mtime_ns"][ino] = clamp_time_ns(mtime_ns)
            self.I["ctime_ns"][ino] = clamp_time_ns(ctime_ns) if ctime_ns is not None else now
        if size is not None:
            self._finish_truncate(ino)
        return self.stat(ino)

    def check_access(self, ino: int, who: Creds, mask: int) -> None:
        """EACCES unless `who` has `mask` (creds.R|W|X) on ino, as the kernel decides:
        for work the kernel cannot check for us (control commands)."""
        if not creds.permitted(who, int(self.I["mode"][ino]), int(self.I["uid"][ino]),
                               int(self.I["gid"][ino]), mask, self._acl(ino, acl.ACCESS)):
            raise FsError(errno.EACCES)

    def touch_atime(self, ino: int) -> None:
        """An access (a read, a directory listing, a symlink followed): update atime as
        the mount's atime options say (the kernel's touch_atime and relatime rule), unless
        the file has the chattr noatime flag."""
        if self.readonly or self.atime == "noatime" or int(self.I["attr"][ino]) & ATTR_NOATIME:
            return
        if self.nodiratime and int(self.I["kind"][ino]) == KIND_DIR:
            return
        at = int(self.I["atime_ns"][ino])
        now = time.time_ns()
        if (self.atime == "strictatime" or at <= int(self.I["mtime_ns"][ino])
                or at <= int(self.I["ctime_ns"][ino]) or now - at > RELATIME_NS):
            with self.transaction() as tx:
                self.save_inode(tx, ino)
                self.I["atime_ns"][ino] = now

    @staticmethod
    def _check_xattr_ns(name: bytes) -> bytes:
        """The namespace of name. As tmpfs: EOPNOTSUPP outside user/trusted/security,
        EINVAL for an empty name after the prefix ("user.")."""
        if not name or len(name) > NAME_MAX:
            raise FsError(errno.ERANGE)
        ns, dot, rest = name.partition(b".")
        if not dot or (ns not in (b"user", b"trusted", b"security") and name not in acl.NAMES):
            raise FsError(errno.EOPNOTSUPP)  # system.*: only the two ACLs
        if not rest:
            raise FsError(errno.EINVAL)
        return ns

    @classmethod
    def _check_xattr_name(cls, name: bytes, ctx: Ctx, kind: int) -> None:
        ns = cls._check_xattr_ns(name)
        if ns == b"trusted" and not creds.of(ctx).capable(CAP_SYS_ADMIN):
            raise FsError(errno.EPERM)
        if ns == b"user" and kind not in (KIND_REG, KIND_DIR):
            raise FsError(errno.EPERM)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, ctx: Ctx = ROOT_CTX) -> None:
        if flags & XATTR_CREATE and self._done_before(OP_SETXATTR, ctx, ino, name):
            return
        self.check_ino(ino)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)  # xattr_permission, before anything
        self._check_xattr_name(name, ctx, self.kind(ino))
        if len(value) > XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG)
        if name in acl.NAMES:
            if not self.acl:
                raise FsError(errno.EOPNOTSUPP)
            return self._set_acl(ino, name, value, ctx)
        attrs = self.xattrs.get(ino, {})
        old = attrs.get(name)
        if flags & XATTR_CREATE and old is not None:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and old is None:
            raise FsError(errno.ENODATA)
        freed = self._blob_chain_length(old) if old is not None else 0  # a replaced value's
        if not self.have_slots("blob", self._blob_slots_needed(len(name), len(value)) - freed):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if old is not None:
                self._free_blob(tx, old)
            self.xattrs.setdefault(ino, {})[name] = self._write_blob(tx, ino, BLOB_XATTR, name, value)
            self.touch(tx, ino)
            if flags & XATTR_CREATE:
                self._note(tx, OP_SETXATTR, ctx, ino, name)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.check_ino(ino)
        self._check_xattr_ns(name)  # a stored ACL reads back even where ACLs are off
        slot = self.xattrs.get(ino, {}).get(name)
        if slot is None:
            if not self.acl and name.startswith(b"system.posix_acl_"):
                # as a filesystem without ACLs answers: ls -l then stops asking (-o noacl)
                raise FsError(errno.EOPNOTSUPP)
            raise FsError(errno.ENODATA)
        return self.read_blob(slot)[1]

    def listxattr(self, ino: int) -> list[bytes]:
        self.check_ino(ino)
        return list(self.xattrs.get(ino, {}))

    def removexattr(self, ino: int, name: bytes, ctx: Ctx = ROOT_CTX) -> None:
        if self._done_before(OP_REMOVEXATTR, ctx, ino, name):
            return
        self.check_ino(ino)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)
        self._check_xattr_name(name, ctx, self.kind(ino))
        if name in acl.NAMES:
            if not self.acl:
                raise FsError(errno.EOPNOTSUPP)
            if not creds.owner_or_capable(creds.of(ctx), int(self.I["uid"][ino])):
                raise FsError(errno.EPERM)  # as set_posix_acl (the mode stays as it is)
        attrs = self.xattrs.get(ino, {})
        slot = attrs.get(name)
        if slot is None:
            raise FsError(errno.ENODATA)
        with self.transaction() as tx:
            self._free_blob(tx, slot)
            del attrs[name]
            self.touch(tx, ino)
            self._note(tx, OP_REMOVEXATTR, ctx, ino, name)
