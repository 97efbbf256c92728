"""The engine's namespace: names in directories. Lookup, create, link, unlink,
rename, readdir, and the inode a new name gets.
"""

from __future__ import annotations

import errno
import stat
import time

import numpy as np

from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    BLOB_SYMLINK,
    BLOB_XATTR,
    FLAG_ORPHAN,
    FLAG_PINNED,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_KOBJ,
    KIND_OF_S_IFMT,
    KIND_REG,
    KIND_SYMLINK,
    NAME_MAX,
    ROOT_INO,
    SYMLINK_MAX,
)
from ..media.journal import Transaction
from .core import ALIGN_POLICY, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, EngineCore, Stat
from .ctx import ROOT_CTX, Ctx, FsError
from .replies import OP_LINK, OP_MKDIR, OP_MKNOD, OP_RENAME, OP_RMDIR, OP_SYMLINK, OP_UNLINK


class Namespace(EngineCore):
    """Directories and the names in them."""

    def new_inode(self, tx: Transaction, kind: int, mode: int, ctx: Ctx, parent: int,
                   rdev: int = 0) -> int:
        ino = self.take_slot(tx, "inode")
        self.save_inode(tx, ino)
        generation = int(self.I["generation"][ino]) + 1
        pgid, pmode = int(self.I["gid"][parent]), int(self.I["mode"][parent])
        gid = ctx.gid
        if pmode & stat.S_ISGID:
            gid = pgid
            if kind == KIND_DIR:
                mode |= stat.S_ISGID
        now = time.time_ns()
        self.t.inodes[ino] = (kind, 0, 0, mode, ctx.uid, gid, 1 if kind != KIND_DIR else 2, generation & 0xFFFFFFFF,
                   0, 0, now, now, now, now, rdev, parent if kind == KIND_DIR else 0,
                   3 if kind == KIND_DIR else 0, 0, 0, 0, 0, b"\0" * 16, 0)
        if kind == KIND_DIR:
            self.children[ino] = {}
        policy = self.xattrs.get(parent, {}).get(ALIGN_POLICY)
        if policy is not None and kind in (KIND_REG, KIND_DIR):  # inherited, as XFS's extsize
            value = self.read_blob(policy)[1]
            self.xattrs.setdefault(ino, {})[ALIGN_POLICY] = self._write_blob(tx, ino, BLOB_XATTR, ALIGN_POLICY, value)
        return ino

    def _dir(self, ino: int) -> dict[bytes, int]:
        self.check_ino(ino)
        d = self.children.get(ino)
        if d is None:
            raise FsError(errno.ENOTDIR)
        return d

    @staticmethod
    def check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise FsError(errno.EINVAL)

    def lookup(self, parent: int, name: bytes) -> int:
        if name == b".":
            # The kernel looks up "." of any inode, by number, to decode a file handle
            # (open_by_handle_at, NFS export); an inode that is gone, or unlinked and no
            # longer known to the kernel, is stale (the kernel turns ENOENT into ESTALE).
            self.check_ino(parent)
            if int(self.I["nlink"][parent]) == 0:
                raise FsError(errno.ENOENT, f"inode {parent} has been removed")
            return parent
        d = self._dir(parent)
        if name == b"..":
            return int(self.I["parent"][parent])
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        slot = d.get(name)
        if slot is None:
            raise FsError(errno.ENOENT)
        return int(self.t.dirents["ino"][slot])

    def add_dirent(self, tx: Transaction, parent: int, name: bytes, ino: int, kind: int) -> int:
        slot = self.take_slot(tx, "dirent")
        tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
        self.save_inode(tx, parent)
        cookie = int(self.I["next_cookie"][parent])
        self.I["next_cookie"][parent] = cookie + 1
        self.t.dirents[slot] = (parent, ino, cookie, len(name), kind, 0, name, 0)
        self.children[parent][name] = slot
        return slot

    def remove_dirent(self, tx: Transaction, parent: int, name: bytes) -> None:
        slot = self.children[parent].pop(name)
        tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
        self.t.dirents[slot] = np.zeros(1, self.t.dirents.dtype)[0]
        self.free_slots["dirent"].append(slot)

    def _prepare_create(self, parent: int, name: bytes, inode: bool = True,
                        inherits: bool = True) -> dict[bytes, int]:
        """Checks before a new name: ENOSPC unless the slots it needs are free (a new
        inode unless `inode` is False; a blob for the inherited policy if `inherits`)."""
        d = self._dir(parent)
        if int(self.I["flags"][parent]) & FLAG_PINNED:
            raise FsError(errno.EPERM)  # /.kernel: objects are made through the control channel
        self.check_name(name)
        if name in d or name in (b".", b".."):
            raise FsError(errno.EEXIST)
        self._refuse(parent, ATTR_IMMUTABLE)  # as may_create: no new names in it
        if int(self.I["nlink"][parent]) == 0:
            raise FsError(errno.ENOENT)  # a removed directory that is still open
        if not ((not inode or self.have_slots("inode", 1)) and self.have_slots("dirent", 1)):
            raise FsError(errno.ENOSPC)
        if inherits and ALIGN_POLICY in self.xattrs.get(parent, ()) and not self.have_slots("blob", 1):
            raise FsError(errno.ENOSPC)  # the new inode inherits the policy (new_inode)
        return d

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, ctx: Ctx = ROOT_CTX) -> Stat:
        """Create a regular file, FIFO, socket or device node (mode carries the type)."""
        made = self._made_before(OP_MKNOD, ctx, parent, name)
        if made:
            return made
        self._prepare_create(parent, name, inherits=stat.S_IFMT(mode) in (0, stat.S_IFREG))
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        kind = KIND_OF_S_IFMT.get(fmt)
        if kind is None or kind in (KIND_DIR, KIND_SYMLINK):
            raise FsError(errno.EINVAL)
        if kind not in (KIND_CHR, KIND_BLK):
            rdev = 0
        mode, acls = self._creation_acls(parent, fmt | (mode & 0o7777), ctx)
        self._check_acl_slots(parent, acls, kind)
        with self.transaction() as tx:
            ino = self.new_inode(tx, kind, mode, ctx, parent, rdev)
            self._store_acls(tx, ino, acls)
            self.add_dirent(tx, parent, name, ino, kind)
            self.touch(tx, parent, m=True)
            self._note(tx, OP_MKNOD, ctx, parent, name, ino=ino)
        return self.stat(ino)

    def create(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT_CTX) -> Stat:
        return self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, ctx)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT_CTX) -> Stat:
        made = self._made_before(OP_MKDIR, ctx, parent, name)
        if made:
            return made
        self._prepare_create(parent, name)
        mode, acls = self._creation_acls(parent, stat.S_IFDIR | (mode & 0o7777), ctx)
        self._check_acl_slots(parent, acls, KIND_DIR)
        with self.transaction() as tx:
            ino = self.new_inode(tx, KIND_DIR, mode, ctx, parent)
            self._store_acls(tx, ino, acls)
            self.add_dirent(tx, parent, name, ino, KIND_DIR)
            self.touch(tx, parent, m=True)
            self.I["nlink"][parent] += 1
            self._note(tx, OP_MKDIR, ctx, parent, name, ino=ino)
        return self.stat(ino)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx = ROOT_CTX) -> Stat:
        made = self._made_before(OP_SYMLINK, ctx, parent, name)
        if made:
            return made
        self._prepare_create(parent, name, inherits=False)
        if len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not target:
            raise FsError(errno.ENOENT)
        if not self.have_slots("blob", self._blob_slots_needed(0, len(target))):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            ino = self.new_inode(tx, KIND_SYMLINK, stat.S_IFLNK | 0o777, ctx, parent)
            self.I["size"][ino] = len(target)
            self.symlinks[ino] = self._write_blob(tx, ino, BLOB_SYMLINK, b"", target)
            self.add_dirent(tx, parent, name, ino, KIND_SYMLINK)
            self.touch(tx, parent, m=True)
            self._note(tx, OP_SYMLINK, ctx, parent, name, ino=ino)
        return self.stat(ino)

    def readlink(self, ino: int) -> bytes:
        self.check_ino(ino)
        slot = self.symlinks.get(ino)
        if slot is None:
            raise FsError(errno.EINVAL)
        return self.read_blob(slot)[1]

    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Ctx = ROOT_CTX) -> Stat:
        made = self._made_before(OP_LINK, ctx, new_parent, new_name, b=ino)
        if made:
            return made
        self.check_ino(ino)
        if self.kind(ino) in (KIND_DIR, KIND_KOBJ):
            raise FsError(errno.EPERM)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)  # as vfs_link
        self._prepare_create(new_parent, new_name, inode=False, inherits=False)
        if int(self.I["nlink"][ino]) == 0:
            raise FsError(errno.ENOENT)
        if int(self.I["nlink"][ino]) >= 0xFFFFFFFF:
            raise FsError(errno.EMLINK)
        with self.transaction() as tx:
            now = time.time_ns()
            self.add_dirent(tx, new_parent, new_name, ino, self.kind(ino))
            self.touch(tx, new_parent, m=True, now=now)
            self.touch(tx, ino, now=now)
            self.I["nlink"][ino] += 1
            self._note(tx, OP_LINK, ctx, new_parent, new_name, b=ino, ino=ino)
        return self.stat(ino)

    def unlink(self, parent: int, name: bytes, ctx: Ctx = ROOT_CTX) -> None:
        if self._done_before(OP_UNLINK, ctx, parent, name):
            return
        d = self._dir(parent)
        slot = d.get(name)
        if slot is None:
            raise FsError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
        ino = int(self.t.dirents["ino"][slot])
        self._check_delete(parent, ino)
        if self.kind(ino) == KIND_DIR:
            raise FsError(errno.EISDIR)
        if int(self.I["flags"][ino]) & FLAG_PINNED:
            raise FsError(errno.EBUSY)
        if int(self.I["nlink"][ino]) == 1 and self.leases.held(ino):
            raise FsError(errno.EBUSY, "the file is mapped directly (leased)")
        with self.transaction() as tx:
            now = time.time_ns()
            self.remove_dirent(tx, parent, name)
            self.touch(tx, parent, m=True, now=now)
            self.drop_link(tx, ino, now)
            self._note(tx, OP_UNLINK, ctx, parent, name, ino=ino)
        self.maybe_reap(ino)

    def rmdir(self, parent: int, name: bytes, ctx: Ctx = ROOT_CTX) -> None:
        if self._done_before(OP_RMDIR, ctx, parent, name):
            return
        d = self._dir(parent)
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        slot = d.get(name)
        if slot is None:
            raise FsError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
        ino = int(self.t.dirents["ino"][slot])
        self._check_delete(parent, ino)
        if self.kind(ino) != KIND_DIR:
            raise FsError(errno.ENOTDIR)
        if self.children[ino]:
            raise FsError(errno.ENOTEMPTY)
        if int(self.I["flags"][ino]) & FLAG_PINNED:
            raise FsError(errno.EBUSY)  # /.kernel
        with self.transaction() as tx:
            now = time.time_ns()
            self.remove_dirent(tx, parent, name)
            self.touch(tx, parent, m=True, now=now)
            self.I["nlink"][parent] -= 1
            self._drop_dir(tx, ino, now)
            self._note(tx, OP_RMDIR, ctx, parent, name, ino=ino)
        self.maybe_reap(ino)

    def drop_link(self, tx: Transaction, ino: int, now: int) -> None:
        self.touch(tx, ino, now=now)
        n = int(self.I["nlink"][ino]) - 1
        self.I["nlink"][ino] = n
        if n == 0:
            self.I["flags"][ino] |= FLAG_ORPHAN

    def _drop_dir(self, tx: Transaction, ino: int, now: int) -> None:
        self.touch(tx, ino, now=now)
        self.I["nlink"][ino] = 0
        self.I["flags"][ino] |= FLAG_ORPHAN

    def _is_ancestor(self, maybe_ancestor: int, ino: int) -> bool:
        """True when maybe_ancestor is ino or lies on ino's path to the root."""
        seen = 0
        while True:
            if ino == maybe_ancestor:
                return True
            if ino == ROOT_INO:
                return False
            ino = int(self.I["parent"][ino])
            seen += 1
            if seen > self.hwm["inode"]:
                raise FsError(errno.EIO, "directory cycle")

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0, ctx: Ctx = ROOT_CTX) -> None:
        if self._done_before(OP_RENAME, ctx, old_parent, old_name, new_parent, new_name, flags):
            return
        src, dst = self._rename_names(old_parent, old_name, new_parent, new_name, flags)
        src_dir = self.kind(src) == KIND_DIR
        dst_dir = bool(dst) and self.kind(dst) == KIND_DIR
        if flags & RENAME_EXCHANGE:
            if not dst:
                raise FsError(errno.ENOENT)
            if src == dst:
                return
            if (src_dir and self._is_ancestor(src, new_parent)) or (dst_dir and self._is_ancestor(dst, old_parent)):
                raise FsError(errno.EINVAL)
            with self.transaction() as tx:
                self._exchange(tx, old_parent, old_name, src, new_parent, new_name, dst)
                self._note(tx, OP_RENAME, ctx, old_parent, old_name, new_parent, new_name, flags=flags)
            return
        if dst:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src == dst:
                return  # POSIX: two links to one file: do nothing
            self._check_replace(src_dir, dst, dst_dir)
        if src_dir and self._is_ancestor(src, new_parent):
            raise FsError(errno.EINVAL)
        whiteout = None
        if flags & RENAME_WHITEOUT:
            # The whiteout needs an inode and an entry (a replaced target frees one entry
            # in the same transaction). No capability is needed: Linux 5.8 and later let
            # anyone make a whiteout (tmpfs does), the kernel checks the directories.
            if not (self.have_slots("inode", 1) and (dst or self.have_slots("dirent", 1))):
                raise FsError(errno.ENOSPC)
            whiteout = self._creation_acls(old_parent, stat.S_IFCHR, ctx)  # as tmpfs: a default ACL applies
            self._check_acl_slots(old_parent, whiteout[1], KIND_CHR)
        with self.transaction() as tx:
            now = time.time_ns()
            if dst:
                self._unlink_target(tx, new_parent, new_name, dst, dst_dir, now)
            self._move_dirent(tx, old_parent, old_name, new_parent, new_name)
            self.touch(tx, old_parent, m=True, now=now)
            self.touch(tx, new_parent, m=True, now=now)
            self.touch(tx, src, now=now)
            if src_dir and old_parent != new_parent:
                self.I["nlink"][old_parent] -= 1
                self.I["nlink"][new_parent] += 1
                self.I["parent"][src] = new_parent
            if whiteout is not None:
                wo = self.new_inode(tx, KIND_CHR, whiteout[0], ctx, old_parent, rdev=0)
                self._store_acls(tx, wo, whiteout[1])
                self.add_dirent(tx, old_parent, old_name, wo, KIND_CHR)
            # The record keeps a resent whiteout rename from moving the whiteout itself
            # over the file it has just renamed.
            self._note(tx, OP_RENAME, ctx, old_parent, old_name, new_parent, new_name, flags=flags)
        if dst:
            self.maybe_reap(dst)

    def _rename_names(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                      flags: int) -> tuple[int, int]:
        """The checks every rename makes on its names; returns (source inode, target
        inode or 0)."""
        od, nd = self._dir(old_parent), self._dir(new_parent)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise FsError(errno.EINVAL)
        self.check_name(new_name)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise FsError(errno.EBUSY if old_name in (b".", b"..") else errno.EEXIST)
        src_slot = od.get(old_name)
        if src_slot is None:
            raise FsError(errno.ENOENT)
        src = int(self.t.dirents["ino"][src_slot])
        dst_slot = nd.get(new_name)
        dst = int(self.t.dirents["ino"][dst_slot]) if dst_slot is not None else 0
        if int(self.I["flags"][src]) & FLAG_PINNED or (dst and int(self.I["flags"][dst]) & FLAG_PINNED):
            raise FsError(errno.EBUSY)  # kernel objects and /.kernel stay where they are
        if int(self.I["flags"][new_parent]) & FLAG_PINNED or int(self.I["flags"][old_parent]) & FLAG_PINNED:
            raise FsError(errno.EPERM)
        # chattr flags, as the VFS's may_delete / may_create check them (after its
        # "two names of one inode: nothing to do")
        if src != dst:
            self._check_delete(old_parent, src)
            if dst:
                self._check_delete(new_parent, dst)
            else:
                self._refuse(new_parent, ATTR_IMMUTABLE)
        return src, dst

    def _check_replace(self, src_dir: bool, dst: int, dst_dir: bool) -> None:
        """May the rename's source replace the inode at its target?"""
        if src_dir and not dst_dir:
            raise FsError(errno.ENOTDIR)
        if dst_dir and not src_dir:
            raise FsError(errno.EISDIR)
        if dst_dir and self.children[dst]:
            raise FsError(errno.ENOTEMPTY)
        if int(self.I["flags"][dst]) & FLAG_PINNED:
            raise FsError(errno.EBUSY)
        if not dst_dir and int(self.I["nlink"][dst]) == 1 and self.leases.held(dst):
            raise FsError(errno.EBUSY, "the file replaced is mapped directly (leased)")

    def _unlink_target(self, tx: Transaction, parent: int, name: bytes, ino: int, is_dir: bool,
                       now: int) -> None:
        """The name a rename replaces goes, and its inode loses that link."""
        self.remove_dirent(tx, parent, name)
        if is_dir:
            self._drop_dir(tx, ino, now)
            self.save_inode(tx, parent)
            self.I["nlink"][parent] -= 1
        else:
            self.drop_link(tx, ino, now)

    def _move_dirent(self, tx: Transaction, old_parent: int, old_name: bytes,
                     new_parent: int, new_name: bytes) -> None:
        slot = self.children[old_parent].pop(old_name)
        tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
        self.save_inode(tx, new_parent)
        cookie = int(self.I["next_cookie"][new_parent])
        self.I["next_cookie"][new_parent] = cookie + 1
        rec = self.t.dirents[slot]
        rec["parent"] = new_parent
        rec["cookie"] = cookie
        rec["name_len"] = len(new_name)
        rec["name"] = new_name
        self.children[new_parent][new_name] = slot

    def _exchange(self, tx: Transaction, p1: int, n1: bytes, i1: int, p2: int, n2: bytes, i2: int) -> None:
        now = time.time_ns()
        s1, s2 = self.children[p1][n1], self.children[p2][n2]
        for slot, ino in ((s1, i2), (s2, i1)):
            tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
            self.t.dirents["ino"][slot] = ino
            self.t.dirents["kind"][slot] = self.kind(ino)
        for ino in {p1, p2, i1, i2}:
            self.touch(tx, ino, m=ino in (p1, p2), now=now)
        if p1 != p2:
            for ino, old, new in ((i1, p1, p2), (i2, p2, p1)):
                if self.kind(ino) == KIND_DIR:
                    self.I["parent"][ino] = new
                    self.I["nlink"][old] -= 1
                    self.I["nlink"][new] += 1

    def resolve(self, path: bytes) -> int:
        """Inode of a path relative to the root (no symlinks followed), with no
        permission check: never for a path in a request (control.resolve checks)."""
        ino = ROOT_INO
        for part in path.strip(b"/").split(b"/"):
            if part:
                ino = self.lookup(ino, part)
        return ino

    def opendir(self, ino: int) -> None:
        """Fail now (ENOENT, ENOTDIR) rather than at the first readdir."""
        self._dir(ino)

    def readdir(self, ino: int, after_cookie: int = 0) -> list[tuple[int, bytes, int]]:
        """(cookie, name, ino) of entries with cookie > after_cookie, in cookie order.

        Cookies are stable: they stay with an entry until it is removed or renamed, so
        a listing resumed from one never skips or repeats an entry it did not change.
        """
        d = self._dir(ino)
        out = []
        if after_cookie < 1:
            out.append((1, b".", ino))
        if after_cookie < 2:
            out.append((2, b"..", int(self.I["parent"][ino])))
        if not d:
            return out
        slots = np.fromiter(d.values(), np.int64, len(d))
        cookies = self.t.dirents["cookie"][slots]
        start = int(np.searchsorted(cookies, after_cookie, side="right"))
        sel = slots[start:]
        names = list(d.keys())[start:]
        out.extend(zip(cookies[start:].tolist(), names, self.t.dirents["ino"][sel].tolist(), strict=True))
        return out
