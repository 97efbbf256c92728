"""The filesystem: POSIX semantics over the region's tables. No FUSE in here.

Every change of the region's metadata happens inside one journal transaction, so a
process death leaves each operation done or not done (see journal.py). In-memory
state (directory indexes, extent maps, free-slot lists, lookup counts) is derived
from the region at mount and kept in step with it; if a transaction has to be rolled
back the in-memory state is rebuilt from the region.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..media import check
from ..media.allocator import BlockAllocator, NoSpace
from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    ATTR_KNOWN,
    ATTR_NOATIME,
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    EXTENT_PACKED,
    FEATURE_COMPAT_SPARSE,
    FEATURE_RO_COMPAT_KNOWN,
    FLAG_ORPHAN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    HWM_STEP,
    INODE_DTYPE,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_FIFO,
    KIND_KOBJ,
    KIND_OF_S_IFMT,
    KIND_REG,
    KIND_SOCK,
    KIND_SYMLINK,
    MAGIC,
    NAME_MAX,
    ROOT_INO,
    STATE_CLEAN,
    STATE_DIRTY,
    SUPERBLOCK_DTYPE,
    SYMLINK_MAX,
    TABLE_NAMES,
    XATTR_VALUE_MAX,
    FormatError,
    Superblock,
    Tables,
    clamp_time_ns,
    sparse_requested,
)
from ..media.journal import JOURNAL_OFFSET, CrashPoints, Journal, Transaction
from ..media.region import BackingFull, Region, backing_free
from . import acl, creds
from .creds import CAP_FSETID, CAP_LINUX_IMMUTABLE, CAP_SYS_ADMIN, Creds
from .ctx import ROOT_CTX, Ctx, FsError
from .leases import Leases
from .replies import (
    OP_LINK,
    OP_MKDIR,
    OP_MKNOD,
    OP_REMOVEXATTR,
    OP_RENAME,
    OP_RMDIR,
    OP_SETXATTR,
    OP_SYMLINK,
    OP_UNLINK,
    Replies,
)

log = logging.getLogger("pmemfs.engine")

XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # leave a whiteout (char device 0:0) at the old name: overlayfs upper layers
FREE_BATCH = 2048
GROWTH_MIGRATE_BLOCKS = 16  # a file this many blocks long is moved to an aligned GiB run  # extents freed per transaction when a large file goes away
RELATIME_NS = 24 * 3600 * 10**9
ATIME_MODES = ("relatime", "strictatime", "noatime")
ALIGN_POLICY = b"user.pmemfs.align"  # placement policy xattr, inherited by new files

_DIRENT_KIND = {KIND_REG: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK,
                KIND_FIFO: stat.S_IFIFO, KIND_SOCK: stat.S_IFSOCK, KIND_CHR: stat.S_IFCHR,
                KIND_BLK: stat.S_IFBLK}
# The leading fields of an inode record, read in one call for stat().
_STAT = struct.Struct("<BxHIIIIIQQqqqqQ")


class _BackingShort(Exception):
    """A write's transaction ran out of backing after `blocks` blocks (rolled back)."""

    def __init__(self, blocks: int):
        self.blocks = blocks


from ..media.errors import MountError  # noqa: E402  (re-exported: engine.MountError)


@dataclass(frozen=True, slots=True)
class Stat:
    ino: int
    generation: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # in 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    flags: int
    kind: int


class FileMap:
    """A file's extents sorted by file block: parallel lists, bisect to find one."""

    __slots__ = ("cnt", "fblk", "pblk", "slot")

    def __init__(self) -> None:
        self.fblk: list[int] = []
        self.pblk: list[int] = []
        self.cnt: list[int] = []
        self.slot: list[int] = []

    def find(self, fb: int) -> int:
        """Index of the extent holding file block fb, or -1."""
        i = bisect_right(self.fblk, fb) - 1
        if i >= 0 and fb < self.fblk[i] + self.cnt[i]:
            return i
        return -1

    def end(self) -> int:
        """One past the last mapped file block (0 when empty)."""
        return self.fblk[-1] + self.cnt[-1] if self.fblk else 0

    def __len__(self) -> int:
        return len(self.fblk)


class Engine:
    """One mounted region. Not thread-safe: the daemon calls it from one trio thread."""

    def __init__(self, path: str, *, readonly: bool = False, sync: bool = False,
                 noatime: bool = False, atime: str = "relatime", nodiratime: bool = False,
                 crash: CrashPoints | None = None, check_on_mount: bool = True,
                 takeover: bool = False, lock: bool | None = None):
        """takeover: serve a FUSE connection an earlier instance served (live update):
        the kernel may still hold any inode that exists now, with counts this instance
        never saw, so none of them is freed before the next fresh mount.

        atime: "relatime", "strictatime" or "noatime" (noatime=True is the last);
        nodiratime: directories never get atime updates. lock: take the region's lock
        (default: only read-write; a read-only mount takes it shared)."""
        self.path = path
        self.sync = sync
        # FUSE leaves atime to the daemon (the kernel marks FUSE inodes S_NOATIME), so the
        # atime mount options are ours to honour (touch_atime).
        if atime not in ATIME_MODES:
            raise ValueError(f"atime mode {atime!r} is not one of {', '.join(ATIME_MODES)}")
        self.atime = "noatime" if noatime else atime
        self.nodiratime = nodiratime
        self.takeover = takeover
        self.unsettled: int | None = None
        # POSIX ACLs are served when the kernel enforces them (FUSE_POSIX_ACL, set by the
        # daemon once negotiated); otherwise system.posix_acl_* are refused as before.
        self.acl = False
        # An overcommitted region on hugetlbfs is mapped without reserving every huge page.
        self.region = Region(path, writable=not readonly, lock=not readonly if lock is None else lock,
                             noreserve=sparse_requested)
        try:
            self._open(readonly, crash, check_on_mount)
        except BaseException:
            self.region.close()
            raise

    # ------------------------------------------------------------------ mount
    def _open(self, readonly: bool, crash: CrashPoints | None, check_on_mount: bool) -> None:
        self.leases = Leases(None if readonly else self.path)  # directly mapped files (leases.py)
        buf = self.region.buf
        check_magic(self.path, buf)
        # The journal sits at a fixed offset: roll back an interrupted transaction
        # before believing anything else, the superblock included.
        self.recovered_records = 0
        if not readonly:
            try:
                journal = Journal(buf, _metadata_end(buf, self.region.size))
                self.recovered_records = journal.recover()
            except FormatError as e:
                raise MountError(f"{self.path}: {e}; run pmemfs-fsck") from None
        try:
            sb, _ = Superblock.decode(buf, self.region.size), "primary"
        except FormatError as e:
            raise MountError(f"{self.path}: {e}; run pmemfs-fsck") from None
        self.sb = sb
        self.was_clean = sb.state == STATE_CLEAN and not self.recovered_records
        unknown_ro = sb.feature_ro_compat & ~FEATURE_RO_COMPAT_KNOWN
        if unknown_ro and not readonly:
            raise MountError(f"{self.path}: unknown read-only-compatible features 0x{unknown_ro:x}: "
                             "mount it read-only (-o ro)")
        self.readonly = readonly
        g = sb.geometry
        self.geometry = g
        self.block_size = g.block_size
        self.max_file_size = g.max_file_size  # s_maxbytes: EFBIG past it
        self.data_start = g.data_start_block * g.block_size
        self.t = Tables(buf, sb)
        self.sbv = np.frombuffer(buf, SUPERBLOCK_DTYPE, 1, 0)
        self.u8 = np.frombuffer(buf, np.uint8, self.region.size, 0)
        self.offsets = {name: g.offsets[name] for name in TABLE_NAMES}
        self.journal = Journal(buf, self.data_start)
        # Overcommitted (docs/DESIGN.md, "The backing"): blocks are reserved from the
        # backing as they are allocated and given back when freed. Made so with mkfs
        # --sparse, or found so: a memory region whose file the backing does not wholly
        # hold (an older mkfs, a copy) is served the same way, as it is safe either way.
        # (Read-only, nothing is reserved or released, but statfs is capped all the same.)
        self.sparse = self.region.memory and bool(sb.feature_compat & FEATURE_COMPAT_SPARSE
                                                  or self.region.allocated() < self.region.size)
        if readonly and self.journal.state != 0:
            raise MountError(f"{self.path}: the journal holds an interrupted transaction; "
                             "mount it read-write once (or run pmemfs-fsck) to recover")
        if check_on_mount:
            findings = [f for f in check.structure(self.t, sb) if f.severity == "error"]
            if findings:
                raise MountError(f"{self.path}: {findings[0].message} "
                                 f"({len(findings)} problem(s)); run pmemfs-fsck")
        self._load()
        self.released_runs = 0
        if self.sparse and not readonly:
            self._reserve_metadata()
            if not self.was_clean:
                # A crash may have left memory with blocks that are free now (freed by the
                # last transaction, or reserved by one that was rolled back).
                self.released_runs = self.alloc.release_free()
        kinds = self.I["kind"][: self.hwm["inode"]]
        self.inherited = (kinds != 0) if self.takeover else np.zeros(0, bool)
        self.replies = Replies(buf, int(self.sbv["mount_generation"][0]) + (0 if readonly else 1))
        if not readonly:
            self.reclaimed = self._recover_orphans(keep_orphans=self.takeover)
            with self.transaction() as tx:
                self._save_sb(tx)
                self.sbv["state"] = STATE_DIRTY
                self.sbv["mount_generation"] = int(self.sbv["mount_generation"][0]) + 1
                self.sbv["last_mount_ns"] = time.time_ns()
                if self.takeover:
                    self.replies.take_over(tx)
                else:
                    self.replies.expire()  # a fresh connection resends nothing
        else:
            self.reclaimed = 0
        self.generation = int(self.sbv["mount_generation"][0])
        from .kobj import KernelObjects

        self.kernel = KernelObjects(self)
        self.kernel_report = {} if readonly else self.kernel.on_mount()
        self.journal.crash = crash  # crash points count from the end of the mount

    def _load(self) -> None:
        """Build the in-memory indexes from the region: O(used metadata)."""
        t = self.t
        self.I = {name: t.inodes[name] for name in INODE_DTYPE.names}
        self.hwm = {name: int(self.sbv[f"{name}_hwm"][0]) for name in TABLE_NAMES}
        self.alloc = BlockAllocator(t.bitmap, t.badmap, self.geometry.offsets["bitmap"],
                                    self.geometry.block_count, self.geometry.data_start_block,
                                    self.geometry.block_size,
                                    # (a remount to ro and back keeps it: the mapping is writable)
                                    backing=self.region if self.sparse and self.region.writable else None)
        ih, eh, dh, bh, ph = (self.hwm[n] for n in TABLE_NAMES)
        kinds = t.inodes["kind"][:ih]
        self.free_slots = {
            "inode": _free_stack(kinds == 0),
            "extent": _free_stack(t.extents["owner"][:eh] == 0),
            "dirent": _free_stack(t.dirents["parent"][:dh] == 0),
            "blob": _free_stack(t.blobs["owner"][:bh] == 0),
            "pack": _free_stack(t.packs["block"][:ph] == 0),
        }
        # Directories: name -> dirent slot, in cookie order (dicts keep insertion order).
        self.children: dict[int, dict[bytes, int]] = {
            int(i): {} for i in np.flatnonzero(kinds == KIND_DIR)}
        d = t.dirents[:dh]
        used = np.flatnonzero(d["parent"] != 0)
        order = used[np.lexsort((d["cookie"][used], d["parent"][used]))]
        parents = d["parent"][order].tolist()
        names = d["name"][order].tolist()
        for slot, parent, name in zip(order.tolist(), parents, names, strict=True):
            self.children[parent][name] = slot
        # Extent maps, sorted by file block.
        self.maps: dict[int, FileMap] = {}
        e = t.extents[:eh]
        used = np.flatnonzero(e["owner"] != 0)
        packed = (e["flags"][used] & EXTENT_PACKED) != 0
        from .packing import Packer

        self.packer = Packer(self)
        p = used[packed]
        self.packer.load(p.tolist(), e["owner"][p].tolist(), e["start_block"][p].tolist(),
                         e["count"][p].tolist(), e["flags"][p].tolist())
        used = used[~packed]
        order = used[np.lexsort((e["file_block"][used], e["owner"][used]))]
        for slot, owner, fb, pb, n in zip(order.tolist(), e["owner"][order].tolist(),
                                          e["file_block"][order].tolist(),
                                          e["start_block"][order].tolist(),
                                          e["count"][order].tolist(), strict=True):
            fm = self.maps.get(owner)
            if fm is None:
                fm = self.maps[owner] = FileMap()
            fm.fblk.append(fb)
            fm.pblk.append(pb)
            fm.cnt.append(n)
            fm.slot.append(slot)
        # Blobs: xattr heads by name, symlink targets by owner.
        self.xattrs: dict[int, dict[bytes, int]] = {}
        self.symlinks: dict[int, int] = {}
        b = t.blobs[:bh]
        heads = np.flatnonzero((b["owner"] != 0) & (b["kind"] != BLOB_CONT))
        for slot, owner, kind, nlen in zip(heads.tolist(), b["owner"][heads].tolist(),
                                           b["kind"][heads].tolist(), b["name_len"][heads].tolist(),
                                           strict=True):
            if kind == BLOB_SYMLINK:
                self.symlinks[owner] = slot
            else:
                name = self._blob_bytes(slot)[:nlen]
                self.xattrs.setdefault(owner, {})[name] = slot
        self.refs: dict[int, int] = {}

    def _reserve_metadata(self) -> None:
        """Hold the metadata in use reserved (mkfs and every growth of a table do; a
        region from an older mkfs may not be). Pages already held cost a lookup each."""
        try:
            for off, n in self.geometry.metadata_in_use(self.hwm):
                self.region.reserve(off, n)
        except BackingFull as e:
            log.warning("%s; metadata that is not reserved may fault when the backing is full", e)

    def prefault(self) -> None:
        """-o prefault: populate the data area so writes never page-fault. On an
        overcommitted region only the blocks in use: the free ones are holes by design,
        and populating them would take the whole region from the backing."""
        if not self.sparse:
            self.region.prefault(self.data_start, self.region.size - self.data_start)
            return
        bs = self.block_size
        for s, n in zip(*(a.tolist() for a in self.alloc.used_runs()), strict=True):
            self.region.prefault(s * bs, n * bs)

    def blocks_available(self) -> int:
        """Free blocks that can be had now: the free blocks, and on an overcommitted
        region no more than the backing can still hold (in whole blocks)."""
        free = self.alloc.free
        if self.sparse and free:
            have = backing_free(self.path)
            if have is not None:
                free = min(free, have // self.block_size)
        return free

    def _recover_orphans(self, keep_orphans: bool = False) -> int:
        """Free what an earlier instance left half-released. Returns inodes freed.

        keep_orphans: finish interrupted truncations only; unlinked inodes stay, as the
        kernel may still have them open (a takeover of a live connection)."""
        flags = self.I["flags"][: self.hwm["inode"]]
        kinds = self.I["kind"][: self.hwm["inode"]]
        freed = 0
        for ino in np.flatnonzero((kinds != 0) & ((flags & (FLAG_ORPHAN | FLAG_TRUNCATING)) != 0)).tolist():
            if int(self.I["flags"][ino]) & FLAG_ORPHAN:
                if keep_orphans:
                    continue
                self._reap(ino)
                freed += 1
            else:
                self._free_beyond(ino, self._blocks_for(int(self.I["size"][ino])))
        return freed

    def close(self, handover: bool = False) -> None:
        """Clean unmount: free orphans, mark the superblock clean, release the region.

        handover: the connection lives on under a successor, so the kernel's references
        do too: free nothing."""
        if self.region.fd < 0:
            return
        if not self.readonly:
            if not handover:
                # Unmounted: the kernel holds nothing any more, whoever it got it from.
                self.refs.clear()
                self.inherited = np.zeros(0, bool)
                self._recover_orphans()
            with self.transaction() as tx:
                self._save_sb(tx)
                self.sbv["state"] = STATE_CLEAN
                self.sbv["last_umount_ns"] = time.time_ns()
            if not handover:  # a successor maps the same memory: nothing to flush for it
                self.region.sync()
        self.region.close()

    # ---------------------------------------------------------------- remount
    def check_remount_ro(self) -> None:
        """What a switch to read-only needs (mount -o remount,ro): no process may hold a
        read-write direct-access lease, because it writes the region past the engine
        (as the kernel refuses with open files that are being written)."""
        writers = self.leases.writers()
        if writers:
            raise FsError(errno.EBUSY, f"{len(writers)} file(s) are mapped read-write directly "
                          f"(inode {writers[0]}): release the leases first")

    def remount(self, readonly: bool) -> None:
        """Switch a live engine between read-only and read-write (mount -o remount).

        To read-only, as an unmount leaves the region: the superblock is marked clean and
        the mapping written back (msync), so a killed daemon, a copy of the region or
        fsck then see a clean filesystem; orphans stay until the next read-write mount
        (the kernel may still have them open). Back to read-write, as a mount: marked
        dirty. The mount generation does not change: it is the same mount. An engine
        whose region is mapped read-only (mounted ro) cannot be switched here: the
        daemon opens a read-write engine instead (daemon.Remounter)."""
        if readonly == self.readonly:
            return
        if readonly:
            self.check_remount_ro()
            self.settle()
            with self.transaction() as tx:
                self._save_sb(tx)
                self.sbv["state"] = STATE_CLEAN
                self.sbv["last_umount_ns"] = time.time_ns()
            self.region.sync()
            self.readonly = True
            return
        if not self.region.writable:
            raise FsError(errno.EROFS, "the region is mapped read-only")
        self.readonly = False
        try:
            with self.transaction() as tx:
                self._save_sb(tx)
                self.sbv["state"] = STATE_DIRTY
                self.sbv["last_mount_ns"] = time.time_ns()
        except BaseException:
            self.readonly = True
            raise

    # ---------------------------------------------------------- transactions
    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        if self.readonly:
            raise FsError(errno.EROFS)
        tx = self.journal.begin()
        try:
            yield tx
        except BaseException as e:
            tx.rollback()
            self.alloc.rolled_back()  # blocks it reserved are free again: give them back
            refs = self.refs  # the kernel's references are not in the region: keep them
            self._load()  # in-memory state may have run ahead of the region
            self.refs = refs
            if isinstance(e, NoSpace):  # the backing could not hold a block it needed
                raise FsError(errno.ENOSPC, "the backing is full") from None
            raise
        tx.commit()
        self.alloc.committed()  # the memory of blocks it freed goes back to the backing

    def _save_sb(self, tx: Transaction) -> None:
        tx.save_record(self.sbv, 0, 0)

    def _save_inode(self, tx: Transaction, ino: int) -> None:
        tx.save_record(self.t.inodes, self.offsets["inode"], ino)

    def _take_slot(self, tx: Transaction, table: str) -> int:
        stack = self.free_slots[table]
        if not stack:
            arr = getattr(self.t, table + "s")
            old = self.hwm[table]
            new = min(old + HWM_STEP, len(arr))
            if new == old:
                raise FsError(errno.ENOSPC, f"{table} table is full")
            if self.sparse:
                size = arr.dtype.itemsize
                try:
                    self.region.reserve(self.offsets[table] + old * size, (new - old) * size)
                except BackingFull:
                    raise FsError(errno.ENOSPC, f"the backing cannot hold more of the {table} table") from None
            self._save_sb(tx)
            self.sbv[f"{table}_hwm"] = new
            self.hwm[table] = new
            stack.extend(range(new - 1, old - 1, -1))
        return stack.pop()

    def _have_slots(self, table: str, n: int) -> bool:
        arr = getattr(self.t, table + "s")
        return len(self.free_slots[table]) + len(arr) - self.hwm[table] >= n

    # ------------------------------------------------------------- inodes
    def _exists(self, ino: int) -> bool:
        return 0 < ino < self.hwm["inode"] and self.I["kind"][ino] != 0

    def _check_ino(self, ino: int) -> None:
        if not self._exists(ino):
            raise FsError(errno.ENOENT, f"no inode {ino}")

    def stat(self, ino: int) -> Stat:
        self._check_ino(ino)
        off = self.offsets["inode"] + ino * INODE_DTYPE.itemsize
        (kind, flags, mode, uid, gid, nlink, gen, size, nblocks,
         at, mt, ct, bt, rdev) = _STAT.unpack_from(self.region.buf, off)
        blocks = nblocks * (self.block_size >> 9)
        if ino in self.packer.packed:
            blocks += self.packer.chunks(ino) * (self.packer.chunk >> 9)
        return Stat(ino, gen, mode, nlink, uid, gid, rdev, size, blocks, at, mt, ct, bt, flags, kind)

    def kind(self, ino: int) -> int:
        return int(self.I["kind"][ino])

    def _new_inode(self, tx: Transaction, kind: int, mode: int, ctx: Ctx, parent: int,
                   rdev: int = 0) -> int:
        ino = self._take_slot(tx, "inode")
        self._save_inode(tx, ino)
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
            value = self._read_blob(policy)[1]
            self.xattrs.setdefault(ino, {})[ALIGN_POLICY] = self._write_blob(tx, ino, BLOB_XATTR, ALIGN_POLICY, value)
        return ino

    def _touch(self, tx: Transaction, ino: int, *, m: bool = False, c: bool = True,
               now: int | None = None) -> None:
        self._save_inode(tx, ino)
        now = time.time_ns() if now is None else now
        if m:
            self.I["mtime_ns"][ino] = now
        if c:
            self.I["ctime_ns"][ino] = now

    # ------------------------------------------------------------ names
    def _dir(self, ino: int) -> dict[bytes, int]:
        self._check_ino(ino)
        d = self.children.get(ino)
        if d is None:
            raise FsError(errno.ENOTDIR)
        return d

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise FsError(errno.EINVAL)

    def lookup(self, parent: int, name: bytes) -> int:
        if name == b".":
            # The kernel looks up "." of any inode, by number, to decode a file handle
            # (open_by_handle_at, NFS export); an inode that is gone, or unlinked and no
            # longer known to the kernel, is stale (the kernel turns ENOENT into ESTALE).
            self._check_ino(parent)
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

    def _add_dirent(self, tx: Transaction, parent: int, name: bytes, ino: int, kind: int) -> int:
        slot = self._take_slot(tx, "dirent")
        tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
        self._save_inode(tx, parent)
        cookie = int(self.I["next_cookie"][parent])
        self.I["next_cookie"][parent] = cookie + 1
        self.t.dirents[slot] = (parent, ino, cookie, len(name), kind, 0, name, 0)
        self.children[parent][name] = slot
        return slot

    def _remove_dirent(self, tx: Transaction, parent: int, name: bytes) -> None:
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
        self._check_name(name)
        if name in d or name in (b".", b".."):
            raise FsError(errno.EEXIST)
        self._refuse(parent, ATTR_IMMUTABLE)  # as may_create: no new names in it
        if int(self.I["nlink"][parent]) == 0:
            raise FsError(errno.ENOENT)  # a removed directory that is still open
        if not ((not inode or self._have_slots("inode", 1)) and self._have_slots("dirent", 1)):
            raise FsError(errno.ENOSPC)
        if inherits and ALIGN_POLICY in self.xattrs.get(parent, ()) and not self._have_slots("blob", 1):
            raise FsError(errno.ENOSPC)  # the new inode inherits the policy (_new_inode)
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
            ino = self._new_inode(tx, kind, mode, ctx, parent, rdev)
            self._store_acls(tx, ino, acls)
            self._add_dirent(tx, parent, name, ino, kind)
            self._touch(tx, parent, m=True)
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
            ino = self._new_inode(tx, KIND_DIR, mode, ctx, parent)
            self._store_acls(tx, ino, acls)
            self._add_dirent(tx, parent, name, ino, KIND_DIR)
            self._touch(tx, parent, m=True)
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
        if not self._have_slots("blob", self._blob_slots_needed(0, len(target))):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            ino = self._new_inode(tx, KIND_SYMLINK, stat.S_IFLNK | 0o777, ctx, parent)
            self.I["size"][ino] = len(target)
            self.symlinks[ino] = self._write_blob(tx, ino, BLOB_SYMLINK, b"", target)
            self._add_dirent(tx, parent, name, ino, KIND_SYMLINK)
            self._touch(tx, parent, m=True)
            self._note(tx, OP_SYMLINK, ctx, parent, name, ino=ino)
        return self.stat(ino)

    def readlink(self, ino: int) -> bytes:
        self._check_ino(ino)
        slot = self.symlinks.get(ino)
        if slot is None:
            raise FsError(errno.EINVAL)
        return self._read_blob(slot)[1]

    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Ctx = ROOT_CTX) -> Stat:
        made = self._made_before(OP_LINK, ctx, new_parent, new_name, b=ino)
        if made:
            return made
        self._check_ino(ino)
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
            self._add_dirent(tx, new_parent, new_name, ino, self.kind(ino))
            self._touch(tx, new_parent, m=True, now=now)
            self._touch(tx, ino, now=now)
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
            self._remove_dirent(tx, parent, name)
            self._touch(tx, parent, m=True, now=now)
            self._drop_link(tx, ino, now)
            self._note(tx, OP_UNLINK, ctx, parent, name, ino=ino)
        self._maybe_reap(ino)

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
            self._remove_dirent(tx, parent, name)
            self._touch(tx, parent, m=True, now=now)
            self.I["nlink"][parent] -= 1
            self._drop_dir(tx, ino, now)
            self._note(tx, OP_RMDIR, ctx, parent, name, ino=ino)
        self._maybe_reap(ino)

    # ------------------------------------------------------------ chattr flags
    def _refuse(self, ino: int, flags: int) -> None:
        """EPERM when ino carries any of these chattr flags."""
        if int(self.I["attr"][ino]) & flags:
            raise FsError(errno.EPERM, "the inode is immutable or append-only (chattr)")

    def _check_delete(self, parent: int, ino: int) -> None:
        """may_delete's rules: no name leaves an immutable or append-only directory,
        and an immutable or append-only inode keeps its names."""
        self._refuse(parent, ATTR_IMMUTABLE | ATTR_APPEND)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)

    def attr_flags(self, ino: int) -> int:
        """The inode's FS_IOC_GETFLAGS flags."""
        self._check_ino(ino)
        return int(self.I["attr"][ino])

    def set_attr_flags(self, ino: int, flags: int, ctx: Ctx = ROOT_CTX) -> Stat:
        """FS_IOC_SETFLAGS, as tmpfs takes it: immutable, append-only, nodump and noatime
        (anything else EOPNOTSUPP); the owner (or CAP_FOWNER) sets them, and changing
        immutable or append-only needs CAP_LINUX_IMMUTABLE. The kernel checks both
        before asking; they are checked again with the caller's full credentials."""
        self._check_ino(ino)
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
            self._save_inode(tx, ino)
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

    # ------------------------------------------------------------ POSIX ACLs
    def _acl(self, ino: int, name: bytes) -> list[acl.Entry] | None:
        slot = self.xattrs.get(ino, {}).get(name) if self.acl else None
        return None if slot is None else acl.parse(self._read_blob(slot)[1])

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
            if not self._have_slots("blob", need):
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
        if keep and not self._have_slots("blob", self._blob_slots_needed(len(name), len(value)) - freed):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if old is not None:
                self._free_blob(tx, old)
                del self.xattrs[ino][name]
            if keep:
                self.xattrs.setdefault(ino, {})[name] = self._write_blob(tx, ino, BLOB_XATTR, name, value)
            self._touch(tx, ino)
            self.I["mode"][ino] = mode

    def _chmod_acl(self, tx: Transaction, ino: int, mode: int) -> None:
        """posix_acl_chmod: a chmod rewrites the access ACL's owner, mask and other."""
        entries = self._acl(ino, acl.ACCESS)
        if entries is None:
            return
        attrs = self.xattrs[ino]
        self._free_blob(tx, attrs[acl.ACCESS])  # the same size again: always fits
        attrs[acl.ACCESS] = self._write_blob(tx, ino, BLOB_XATTR, acl.ACCESS, acl.encode(acl.chmod(entries, mode)))

    def _drop_link(self, tx: Transaction, ino: int, now: int) -> None:
        self._touch(tx, ino, now=now)
        n = int(self.I["nlink"][ino]) - 1
        self.I["nlink"][ino] = n
        if n == 0:
            self.I["flags"][ino] |= FLAG_ORPHAN

    def _drop_dir(self, tx: Transaction, ino: int, now: int) -> None:
        self._touch(tx, ino, now=now)
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
        od, nd = self._dir(old_parent), self._dir(new_parent)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise FsError(errno.EINVAL)
        self._check_name(new_name)
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
        if src_dir and self._is_ancestor(src, new_parent):
            raise FsError(errno.EINVAL)
        whiteout = bool(flags & RENAME_WHITEOUT)
        # The whiteout needs an inode and an entry (a replaced target frees one entry
        # in the same transaction). No capability is needed: Linux 5.8 and later let
        # anyone make a whiteout (tmpfs does), the kernel checks the directories.
        if whiteout:
            if not (self._have_slots("inode", 1) and (dst or self._have_slots("dirent", 1))):
                raise FsError(errno.ENOSPC)
            wo_mode, wo_acls = self._creation_acls(old_parent, stat.S_IFCHR, ctx)  # as tmpfs: a default ACL applies
            self._check_acl_slots(old_parent, wo_acls, KIND_CHR)
        with self.transaction() as tx:
            now = time.time_ns()
            if dst:
                self._remove_dirent(tx, new_parent, new_name)
                if dst_dir:
                    self._drop_dir(tx, dst, now)
                    self._save_inode(tx, new_parent)
                    self.I["nlink"][new_parent] -= 1
                else:
                    self._drop_link(tx, dst, now)
            self._move_dirent(tx, old_parent, old_name, new_parent, new_name)
            self._touch(tx, old_parent, m=True, now=now)
            self._touch(tx, new_parent, m=True, now=now)
            self._touch(tx, src, now=now)
            if src_dir and old_parent != new_parent:
                self.I["nlink"][old_parent] -= 1
                self.I["nlink"][new_parent] += 1
                self.I["parent"][src] = new_parent
            if whiteout:
                wo = self._new_inode(tx, KIND_CHR, wo_mode, ctx, old_parent, rdev=0)
                self._store_acls(tx, wo, wo_acls)
                self._add_dirent(tx, old_parent, old_name, wo, KIND_CHR)
            # The record keeps a resent whiteout rename from moving the whiteout itself
            # over the file it has just renamed.
            self._note(tx, OP_RENAME, ctx, old_parent, old_name, new_parent, new_name, flags=flags)
        if dst:
            self._maybe_reap(dst)

    def _move_dirent(self, tx: Transaction, old_parent: int, old_name: bytes,
                     new_parent: int, new_name: bytes) -> None:
        slot = self.children[old_parent].pop(old_name)
        tx.save_record(self.t.dirents, self.offsets["dirent"], slot)
        self._save_inode(tx, new_parent)
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
            self._touch(tx, ino, m=ino in (p1, p2), now=now)
        if p1 != p2:
            for ino, old, new in ((i1, p1, p2), (i2, p2, p1)):
                if self.kind(ino) == KIND_DIR:
                    self.I["parent"][ino] = new
                    self.I["nlink"][old] -= 1
                    self.I["nlink"][new] += 1

    # ------------------------------------------------- exactly-once replies
    def _note(self, tx: Transaction, op: int, ctx: Ctx, a: int, name: bytes, b: int = 0,
              name2: bytes = b"", ino: int = 0, flags: int = 0) -> None:
        """Record, in the operation's own transaction, what it did (see replies.py)."""
        self.unsettled = self.replies.record(tx, op, ctx.pid, a, name, b, name2, ino, flags)

    def settle(self) -> None:
        """The answer to the last recorded operation has been sent."""
        if self.unsettled is not None:
            self.replies.settle(self.unsettled)
            self.unsettled = None

    def _done_before(self, op: int, ctx: Ctx, a: int, name: bytes, b: int = 0,
                     name2: bytes = b"", flags: int = 0) -> bool:
        """This request is the resend of one the dead predecessor carried out."""
        return self.replies.inherited and self.replies.replayed(
            op, ctx.pid, a, name, b, name2, flags) is not None

    def _made_before(self, op: int, ctx: Ctx, parent: int, name: bytes, b: int = 0) -> Stat | None:
        """The entry a resent create-like request made before, if it is still there."""
        if not self.replies.inherited:
            return None
        ino = self.replies.replayed(op, ctx.pid, parent, name, b)
        if ino and self.children.get(parent, {}).get(name) is not None \
                and int(self.t.dirents["ino"][self.children[parent][name]]) == ino:
            return self.stat(ino)
        return None

    # ------------------------------------------------------- reference counts
    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel (or another user) holds n more references to ino."""
        self.refs[ino] = self.refs.get(ino, 0) + n

    def forget(self, ino: int, n: int = 1) -> None:
        left = self.refs.get(ino, 0) - n
        if left > 0:
            self.refs[ino] = left
            return
        self.refs.pop(ino, None)
        self._maybe_reap(ino)

    def _maybe_reap(self, ino: int) -> None:
        if self.readonly:
            return  # remounted read-only: the orphan stays, the next read-write mount frees it
        if ino < len(self.inherited) and self.inherited[ino]:
            return  # the kernel may hold it with a count we never saw: the next fresh mount frees it
        if (not self.refs.get(ino) and self._exists(ino)
                and int(self.I["flags"][ino]) & FLAG_ORPHAN and int(self.I["nlink"][ino]) == 0):
            self._reap(ino)

    def _reap(self, ino: int) -> None:
        """Free an orphan inode: its blocks in batches, then the inode itself."""
        self.leases.forget(ino)
        self._free_beyond(ino, 0)
        with self.transaction() as tx:
            self.packer.free(tx, ino)
            for slot in self._blob_heads(ino):
                self._free_blob(tx, slot)
            self.xattrs.pop(ino, None)
            self.symlinks.pop(ino, None)
            self._save_inode(tx, ino)
            generation = int(self.I["generation"][ino])
            self.t.inodes[ino] = np.zeros(1, INODE_DTYPE)[0]
            self.I["generation"][ino] = generation
            self.free_slots["inode"].append(ino)
            self.children.pop(ino, None)
            self.maps.pop(ino, None)
        self.refs.pop(ino, None)

    def _blob_heads(self, ino: int) -> list[int]:
        heads = list(self.xattrs.get(ino, {}).values())
        if ino in self.symlinks:
            heads.append(self.symlinks[ino])
        return heads

    # ------------------------------------------------------------- data
    def _blocks_for(self, size: int) -> int:
        return (size + self.block_size - 1) // self.block_size

    def _map(self, ino: int) -> FileMap:
        fm = self.maps.get(ino)
        if fm is None:
            fm = self.maps[ino] = FileMap()
        return fm

    def extents(self, ino: int) -> list[tuple[int, int, int]]:
        """(file block, region block, count) of each extent, in file order."""
        self._check_ino(ino)
        fm = self.maps.get(ino)
        if fm is None:
            return []
        return list(zip(fm.fblk, fm.pblk, fm.cnt, strict=True))

    def extent_map(self, ino: int) -> list[tuple[int, int, int]]:
        """(file offset, region offset, length) in bytes of each piece of the file, a
        small file's chunks included."""
        self._check_ino(ino)
        if ino in self.packer.packed:
            return [(0, self.packer.address(ino), self.packer.covered(ino))]
        bs = self.block_size
        return [(fb * bs, pb * bs, n * bs) for fb, pb, n in self.extents(ino)]

    def _unmapped(self, fm: FileMap, b0: int, b1: int) -> list[tuple[int, int]]:
        """Runs (file block, count) in [b0, b1) that have no block yet."""
        runs = []
        fb = b0
        # i: the first extent that ends after fb (extents are sorted and disjoint).
        i = bisect_right(fm.fblk, fb) - 1
        if i < 0:
            i = 0
        elif fb >= fm.fblk[i] + fm.cnt[i]:
            i += 1
        while fb < b1:
            if i < len(fm.fblk) and fm.fblk[i] <= fb:
                fb = fm.fblk[i] + fm.cnt[i]  # mapped: skip to the extent's end
                i += 1
                continue
            end = min(fm.fblk[i] if i < len(fm.fblk) else b1, b1)
            runs.append((fb, end - fb))
            fb = end
        return runs

    def _goal(self, fm: FileMap, fb: int) -> int | None:
        """The region block that would continue the extent ending just before fb."""
        i = bisect_right(fm.fblk, fb - 1) - 1
        if i >= 0 and fm.fblk[i] + fm.cnt[i] == fb:
            return fm.pblk[i] + fm.cnt[i]
        return None

    def _allocate(self, tx: Transaction, ino: int, fm: FileMap, fb: int, count: int) -> list[tuple[int, int, int]]:
        """Give file blocks [fb, fb+count) region blocks; returns (fb, pb, n) pieces."""
        chunk = self.alloc.chunk_blocks
        goal = self._goal(fm, fb)
        if chunk > 1 and fb == GROWTH_MIGRATE_BLOCKS and goal is not None:
            goal = self._promote(tx, ino, fm, fb) or goal
        # A big file (by size, or past its first GiB) keeps each GiB of itself in one
        # aligned GiB run of the region, block i of the GiB at offset i of the run.
        big = chunk > 1 and (int(self.I["size"][ino]) >= chunk * self.block_size or fb >= chunk
                             or self._wants_gigantic(ino))
        if goal is None:
            goal = self._home(fm, fb) if big else self._beside(ino, fm, fb)
        try:
            runs = self.alloc.find(count, goal, aligned=big, phase=fb % chunk)
        except NoSpace:
            raise FsError(errno.ENOSPC) from None
        pieces = []
        for pb, n in runs:
            self.alloc.mark(tx, pb, n, True)
            self._add_extent(tx, ino, fm, fb, pb, n)
            pieces.append((fb, pb, n))
            fb += n
        self._save_inode(tx, ino)
        self.I["nblocks"][ino] += count
        return pieces

    def _wants_gigantic(self, ino: int) -> bool:
        slot = self.xattrs.get(ino, {}).get(ALIGN_POLICY)
        return slot is not None and self._read_blob(slot)[1] == b"1G"

    def _beside(self, ino: int, fm: FileMap, fb: int) -> int | None:
        """Keep a file written in random order in few extents: a block filling a hole
        goes in line with its nearest neighbour in the file, and a file's first block,
        if it is not file block 0, leaves room before it for the blocks that precede it.
        Blocks appended past the end take the ordinary path."""
        if not fm.fblk:
            if fb == 0:
                return None
            try:
                return self.alloc.find_contiguous(fb + 1) + fb
            except NoSpace:
                return None
        if fb >= self._blocks_for(int(self.I["size"][ino])):
            return None
        i = bisect_right(fm.fblk, fb) - 1
        if i >= 0:
            return fm.pblk[i] + (fb - fm.fblk[i])
        candidate = fm.pblk[0] - (fm.fblk[0] - fb)
        return candidate if candidate >= self.geometry.data_start_block else None

    def _home(self, fm: FileMap, fb: int) -> int | None:
        """Where fb goes if its GiB of the file already has blocks in an aligned run."""
        chunk = self.alloc.chunk_blocks
        g0 = fb - fb % chunk
        i = max(0, bisect_right(fm.fblk, fb) - 1)
        for j in (i, i + 1):
            if j >= len(fm.fblk):
                break
            lo, hi = max(fm.fblk[j], g0), min(fm.fblk[j] + fm.cnt[j], g0 + chunk)
            if lo >= hi:
                continue
            sibling = fm.pblk[j] + (lo - fm.fblk[j])
            candidate = sibling + (fb - lo)
            if candidate // chunk == sibling // chunk and candidate % chunk == fb % chunk:
                return candidate
        return None

    def _promote(self, tx: Transaction, ino: int, fm: FileMap, fb: int) -> int | None:
        """Move a sequentially growing file's first blocks to a free aligned GiB run.

        Its first blocks went where small files go (nobody knew it would grow); once it
        is GROWTH_MIGRATE_BLOCKS long with no holes, copying them (32 MiB at 2 MiB
        blocks) buys aligned GiB runs for the rest of it. Returns the new goal.
        """
        if self.leases.held(ino):
            return None  # mapped directly: its blocks must stay where they are
        chunk = self.alloc.chunk_blocks
        if fm.end() != fb or sum(fm.cnt) != fb or (len(fm) == 1 and fm.pblk[0] % chunk == 0):
            return None
        if self.alloc.free_chunk_count() == 0:
            return None
        ((start, _),) = self.alloc.find(chunk, None, aligned=True)[:1]
        if start % chunk:
            return None
        bs = self.block_size
        old = list(zip(fm.fblk, fm.pblk, fm.cnt, strict=True))
        try:
            self.alloc.mark(tx, start, fb, True)
        except NoSpace:
            return None  # the backing cannot hold a copy: the file stays where it is
        for f, p, n in old:
            self.u8[(start + f) * bs:(start + f + n) * bs] = self.u8[p * bs:(p + n) * bs]
        for slot in fm.slot[1:]:
            self._drop_extent_slot(tx, slot)
        first = fm.slot[0]
        self._save_extent(tx, first)
        self.t.extents[first] = (ino, fb, 0, start, 0, 0)
        fm.fblk[:], fm.pblk[:], fm.cnt[:], fm.slot[:] = [0], [start], [fb], [first]
        for _, p, n in old:
            self.alloc.mark(tx, p, n, False)
        return start + fb

    def _save_extent(self, tx: Transaction, slot: int) -> None:
        tx.save_record(self.t.extents, self.offsets["extent"], slot)

    def _add_extent(self, tx: Transaction, ino: int, fm: FileMap, fb: int, pb: int, n: int) -> None:
        i = bisect_right(fm.fblk, fb) - 1
        ext = self.t.extents
        if i >= 0 and fm.fblk[i] + fm.cnt[i] == fb and fm.pblk[i] + fm.cnt[i] == pb:
            fm.cnt[i] += n  # grow the previous extent: sequential files stay one extent
            self._save_extent(tx, fm.slot[i])
            ext["count"][fm.slot[i]] = fm.cnt[i]
        else:
            slot = self._take_slot(tx, "extent")
            self._save_extent(tx, slot)
            ext[slot] = (ino, n, fb, pb, 0, 0)
            i += 1
            fm.fblk.insert(i, fb)
            fm.pblk.insert(i, pb)
            fm.cnt.insert(i, n)
            fm.slot.insert(i, slot)
        j = i + 1  # merge with the next extent when they touch in both spaces
        if j < len(fm.fblk) and fm.fblk[i] + fm.cnt[i] == fm.fblk[j] and fm.pblk[i] + fm.cnt[i] == fm.pblk[j]:
            fm.cnt[i] += fm.cnt[j]
            self._save_extent(tx, fm.slot[i])
            ext["count"][fm.slot[i]] = fm.cnt[i]
            self._drop_extent_slot(tx, fm.slot[j])
            for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
                del lst[j]

    def _drop_extent_slot(self, tx: Transaction, slot: int) -> None:
        self._save_extent(tx, slot)
        self.t.extents[slot] = (0, 0, 0, 0, 0, 0)
        self.free_slots["extent"].append(slot)

    def _free_beyond(self, ino: int, keep_blocks: int) -> None:
        """Free every block at file block >= keep_blocks, FREE_BATCH extents per transaction."""
        fm = self.maps.get(ino)
        while fm and fm.end() > keep_blocks:
            with self.transaction() as tx:
                self._save_inode(tx, ino)
                done = 0
                while fm.fblk and fm.end() > keep_blocks and done < FREE_BATCH:
                    i = len(fm.fblk) - 1
                    fb, pb, n, slot = fm.fblk[i], fm.pblk[i], fm.cnt[i], fm.slot[i]
                    keep = max(0, keep_blocks - fb)
                    self.alloc.mark(tx, pb + keep, n - keep, False)
                    self.I["nblocks"][ino] -= n - keep
                    if keep:
                        fm.cnt[i] = keep
                        self._save_extent(tx, slot)
                        self.t.extents["count"][slot] = keep
                    else:
                        self._drop_extent_slot(tx, slot)
                        for lst in (fm.fblk, fm.pblk, fm.cnt, fm.slot):
                            lst.pop()
                    done += 1
                if fm.end() <= keep_blocks:
                    self.I["flags"][ino] = int(self.I["flags"][ino]) & ~FLAG_TRUNCATING

    def _zero_allocated(self, fm: FileMap, start: int, end: int) -> None:
        """Zero the bytes of [start, end) that lie in allocated blocks (holes stay holes)."""
        if start >= end or not fm.fblk:
            return
        bs = self.block_size
        i = max(0, bisect_right(fm.fblk, start // bs) - 1)
        while i < len(fm.fblk):
            e0 = fm.fblk[i] * bs
            e1 = e0 + fm.cnt[i] * bs
            if e0 >= end:
                break
            a, b = max(start, e0), min(end, e1)
            if a < b:
                base = fm.pblk[i] * bs - e0
                b0 = (base + a) // bs
                if not self.alloc.known_zero(b0, (base + b - 1) // bs + 1 - b0):
                    # (blocks this transaction reserved from holes read as zeros already)
                    self.region.zero(base + a, b - a)
            i += 1

    def _file(self, ino: int) -> int:
        self._check_ino(ino)
        k = self.kind(ino)
        if k == KIND_DIR:
            raise FsError(errno.EISDIR)
        if k not in (KIND_REG, KIND_KOBJ):
            raise FsError(errno.EINVAL)
        return k

    def write(self, ino: int, offset: int, data: bytes | memoryview) -> int:
        budget = None
        while True:
            try:
                return self._write(ino, offset, data, budget)
            except _BackingShort as short:
                # The backing gave fewer blocks than it had said (another user of the
                # tmpfs took some): store what fits in those, as tmpfs would. Each try
                # asks for fewer blocks, so this ends (at ENOSPC if none can be had).
                budget = short.blocks if budget is None else min(short.blocks, budget - 1)

    def _write(self, ino: int, offset: int, data: bytes | memoryview, budget: int | None) -> int:
        kind = self._file(ino)
        n = len(data)
        if n == 0:
            return 0
        attr = int(self.I["attr"][ino])
        # Immutable: no write, even through a descriptor opened before (as ext4; tmpfs
        # lets those through). Append-only: bytes are only ever added, so a descriptor
        # that lost O_APPEND (fcntl) cannot overwrite either.
        if attr & ATTR_IMMUTABLE or (attr & ATTR_APPEND and offset < int(self.I["size"][ino])):
            raise FsError(errno.EPERM, "the file is immutable or append-only (chattr)")
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset + n > self.max_file_size:
            # As the kernel's generic_write_checks: a write that starts below the
            # limit stores what fits; one starting at or past it is EFBIG.
            if offset >= self.max_file_size:
                raise FsError(errno.EFBIG)
            data = memoryview(data).cast("B")[:self.max_file_size - offset]
            n = len(data)
        if kind == KIND_KOBJ:
            self.kernel.check_write(ino, offset, n)  # fixed size, immutable while frozen
        elif (ino in self.packer.packed or not self.maps.get(ino)) and self.packer.eligible(ino, offset + n):
            done = self._write_packed(ino, offset, data)
            if done is not None:
                return done
            # The pack table is full: the file takes a whole block of its own.
        if kind == KIND_REG and not self.readonly:
            done = self._write_in_place(ino, offset, data)
            if done is not None:
                return done
        # A packed file this write makes too big moves to a block of its own, in the
        # same transaction as the write.
        unpack = ino in self.packer.packed
        bs = self.block_size
        fm = self._map(ino)
        old_size = int(self.I["size"][ino])
        end = offset + n
        new_size = max(old_size, end)
        holes = self._unmapped(fm, offset // bs, (end + bs - 1) // bs)
        need = sum(c for _, c in holes)
        avail = self.blocks_available() if need or unpack else 0
        if budget is not None:
            avail = min(avail, budget)
        if unpack and offset >= bs:
            need += 1  # block 0, for the bytes the packed file had
            if need > avail:
                raise FsError(errno.ENOSPC)
        if need > avail:
            # As tmpfs: store what fits, up to the first block that cannot be had, and
            # return a short count; only a write that can store nothing is ENOSPC.
            budget = avail
            cut = end
            for fb, count in holes:
                if count > budget:
                    cut = (fb + budget) * bs
                    break
                budget -= count
            if cut <= offset:
                raise FsError(errno.ENOSPC)
            data = memoryview(data).cast("B")[:cut - offset]
            n, end = cut - offset, cut
            new_size = max(old_size, end)
            holes = self._unmapped(fm, offset // bs, (end + bs - 1) // bs)
        # (Unpacking takes block 0's extent slot while the packed one is still held.)
        slots = len(holes) + (1 if unpack and offset >= bs else 0)
        if slots and not self._have_slots("extent", slots):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if unpack:
                self.packer.unpack(tx, ino)
                holes = self._unmapped(fm, offset // bs, (end + bs - 1) // bs)
            if offset > old_size:
                # Bytes past the old end of file are undefined: expose only zeros.
                self._zero_allocated(fm, old_size, offset)
            for fb, count in holes:
                try:
                    pieces = self._allocate(tx, ino, fm, fb, count)
                except NoSpace:
                    got = self.alloc.reserved_blocks  # what the backing did give
                    if got and need > 1:
                        raise _BackingShort(got) from None
                    raise
                for pfb, ppb, pn in pieces:
                    if self.alloc.known_zero(ppb, pn):
                        continue  # reserved from holes: reads as zeros already
                    # A fresh block holds old bytes: zero what this write does not cover
                    # below the new size; above it stays undefined until the size grows.
                    s, e = pfb * bs, (pfb + pn) * bs
                    self._zero_allocated(fm, s, min(offset, e))
                    self._zero_allocated(fm, max(s, end), min(e, new_size))
            self._copy_in(fm, offset, data)
            self._save_inode(tx, ino)
            if new_size != old_size:
                self.I["size"][ino] = new_size
            now = time.time_ns()
            self.I["mtime_ns"][ino] = now
            self.I["ctime_ns"][ino] = now
        return n

    def _write_in_place(self, ino: int, offset: int, data: bytes | memoryview) -> int | None:
        """The hot path: a write inside one extent that starts at or before the end of
        file. Nothing to allocate or zero; only the inode's size and times change, in one
        undo record (Journal.update_record). None when the write needs the general path."""
        fm = self.maps.get(ino)
        if not fm or ino in self.packer.packed:
            return None
        bs = self.block_size
        old_size = int(self.I["size"][ino])
        i = fm.find(offset // bs)
        n = len(data)
        end = offset + n
        if offset > old_size or i < 0 or end > (fm.fblk[i] + fm.cnt[i]) * bs:
            return None
        at = fm.pblk[i] * bs + offset - fm.fblk[i] * bs
        self.region.buf[at:at + n] = memoryview(data).cast("B")
        inodes = self.I

        def change() -> None:
            if end > old_size:
                inodes["size"][ino] = end
            now = time.time_ns()
            inodes["mtime_ns"][ino] = now
            inodes["ctime_ns"][ino] = now

        self.journal.update_record(self.t.inodes, self.offsets["inode"], ino, change)
        return n

    def _write_packed(self, ino: int, offset: int, data: bytes | memoryview) -> int | None:
        """A small file's write: its bytes live in chunks of a shared pack block.
        None (nothing done) when that needs a new pack block and the pack table is full."""
        packer = self.packer
        n = len(data)
        end = offset + n
        old_size = int(self.I["size"][ino])
        if packer.needs_space(ino, end):
            if not self.blocks_available():
                raise FsError(errno.ENOSPC)
            if not self._have_slots("pack", 1):
                return None
        if ino not in packer.packed and not self._have_slots("extent", 1):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            packer.cover(tx, ino, end)
            base = packer.address(ino)
            if offset > old_size:
                self.u8[base + old_size:base + offset] = 0  # past the old end: zeros only
            self.region.buf[base + offset:base + end] = memoryview(data).cast("B")
            self._save_inode(tx, ino)
            if end > old_size:
                self.I["size"][ino] = end
            now = time.time_ns()
            self.I["mtime_ns"][ino] = now
            self.I["ctime_ns"][ino] = now
        return n

    def _wants_aligned(self, ino: int) -> bool:
        return ALIGN_POLICY in self.xattrs.get(ino, ())

    def _copy_in(self, fm: FileMap, offset: int, data: bytes | memoryview) -> None:
        bs = self.block_size
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        buf = self.region.buf
        while pos < n:
            fb = (offset + pos) // bs
            i = fm.find(fb)
            run_end = (fm.fblk[i] + fm.cnt[i]) * bs
            a = offset + pos
            take = min(n - pos, run_end - a)
            at = fm.pblk[i] * bs + (a - fm.fblk[i] * bs)
            buf[at:at + take] = mv[pos:pos + take]
            pos += take

    def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """Up to size bytes at offset; a memoryview of the region when they are contiguous."""
        self._file(ino)
        fsize = int(self.I["size"][ino])
        if offset >= fsize or size <= 0:
            return b""
        end = min(fsize, offset + size)
        self.touch_atime(ino)
        if ino in self.packer.packed:
            covered, base = self.packer.covered(ino), self.packer.address(ino)
            if end <= covered:
                return self.region.buf[base + offset:base + end]  # zero copy
            out = bytearray(end - offset)
            if offset < covered:
                out[:covered - offset] = self.region.buf[base + offset:base + covered]
            return bytes(out)
        fm = self.maps.get(ino)
        bs = self.block_size
        if fm:
            i = fm.find(offset // bs)
            if i >= 0:
                run_end = (fm.fblk[i] + fm.cnt[i]) * bs
                at = fm.pblk[i] * bs + (offset - fm.fblk[i] * bs)
                if end <= run_end:
                    return self.region.buf[at:at + end - offset]  # zero copy
        out = bytearray(end - offset)
        if fm:
            pos = offset
            while pos < end:
                i = fm.find(pos // bs)
                if i < 0:
                    nxt = bisect_right(fm.fblk, pos // bs)
                    pos = min(end, fm.fblk[nxt] * bs) if nxt < len(fm.fblk) else end
                    continue
                run_end = min(end, (fm.fblk[i] + fm.cnt[i]) * bs)
                at = fm.pblk[i] * bs + (pos - fm.fblk[i] * bs)
                out[pos - offset:run_end - offset] = self.region.buf[at:at + run_end - pos]
                pos = run_end
        return bytes(out)

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
                self._save_inode(tx, ino)
                self.I["atime_ns"][ino] = now

    def truncate(self, ino: int, size: int) -> None:
        self._check_truncate(ino, size)
        with self.transaction() as tx:
            self._truncate(tx, ino, size)
        self._finish_truncate(ino)

    def _check_truncate(self, ino: int, size: int) -> None:
        self._file(ino)
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > self.max_file_size:
            raise FsError(errno.EFBIG)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)  # as do_truncate (ext4 also for old descriptors)
        if int(self.I["flags"][ino]) & FLAG_PINNED:
            raise FsError(errno.EBUSY)
        fm = self.maps.get(ino)
        if fm and fm.end() > self._blocks_for(size) and self.leases.held(ino):
            raise FsError(errno.EBUSY, "would free blocks of a directly mapped (leased) file")

    def _truncate(self, tx: Transaction, ino: int, size: int) -> None:
        old = int(self.I["size"][ino])
        fm = self._map(ino)
        self._save_inode(tx, ino)
        if ino in self.packer.packed:
            covered, base = self.packer.covered(ino), self.packer.address(ino)
            if size > old:
                self.u8[base + min(old, covered):base + min(size, covered)] = 0
            else:
                self.packer.shrink(tx, ino, size)
        if size > old:
            self._zero_allocated(fm, old, size)
        elif fm.end() > self._blocks_for(size):
            self.I["flags"][ino] |= FLAG_TRUNCATING
        self.I["size"][ino] = size
        now = time.time_ns()
        self.I["mtime_ns"][ino] = now
        self.I["ctime_ns"][ino] = now

    def _finish_truncate(self, ino: int) -> None:
        if int(self.I["flags"][ino]) & FLAG_TRUNCATING:
            self._free_beyond(ino, self._blocks_for(int(self.I["size"][ino])))

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                times_now: bool = False) -> Stat:
        """times_now: the times asked for are "now" (touch), which an append-only
        inode allows (notify_change); explicit times, mode and owner it refuses."""
        self._check_ino(ino)
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
            self._save_inode(tx, ino)
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

    def fsync(self, ino: int) -> None:
        """Data and metadata are in the region already; with sync=True push them to disk."""
        self._check_ino(ino)
        if self.sync:
            self.region.sync()

    # ----------------------------------------------------------- directories
    def resolve(self, path: bytes) -> int:
        """Inode of a path relative to the root (no symlinks followed), with no
        permission check: never for a path in a request (control.resolve checks)."""
        ino = ROOT_INO
        for part in path.strip(b"/").split(b"/"):
            if part:
                ino = self.lookup(ino, part)
        return ino

    def check_access(self, ino: int, who: Creds, mask: int) -> None:
        """EACCES unless `who` has `mask` (creds.R|W|X) on ino, as the kernel decides:
        for work the kernel cannot check for us (control commands)."""
        if not creds.permitted(who, int(self.I["mode"][ino]), int(self.I["uid"][ino]),
                               int(self.I["gid"][ino]), mask, self._acl(ino, acl.ACCESS)):
            raise FsError(errno.EACCES)

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

    # --------------------------------------------------------------- blobs
    def _blob_bytes(self, slot: int) -> bytes:
        return self.t.blobs["data"][slot].tobytes()

    @staticmethod
    def _blob_slots_needed(name_len: int, value_len: int) -> int:
        first = BLOB_DATA - name_len
        if value_len <= first:
            return 1
        return 1 + -(-(value_len - first) // BLOB_DATA)

    def _write_blob(self, tx: Transaction, owner: int, kind: int, name: bytes, value: bytes) -> int:
        head = self._take_slot(tx, "blob")
        first = BLOB_DATA - len(name)
        rest = value[first:]
        parts = [rest[i:i + BLOB_DATA] for i in range(0, len(rest), BLOB_DATA)]
        slots = [self._take_slot(tx, "blob") for _ in parts]
        links = [*slots, 0]
        off = self.offsets["blob"]
        tx.save_record(self.t.blobs, off, head)
        data = (name + value[:first]).ljust(BLOB_DATA, b"\0")
        self.t.blobs[head] = (owner, links[0], kind, 0, len(name), len(value), data, 0)
        for k, (slot, part) in enumerate(zip(slots, parts, strict=True)):
            tx.save_record(self.t.blobs, off, slot)
            self.t.blobs[slot] = (owner, links[k + 1], BLOB_CONT, 0, 0, len(part), part.ljust(BLOB_DATA, b"\0"), 0)
        return head

    def _read_blob(self, head: int) -> tuple[bytes, bytes]:
        b = self.t.blobs
        nlen, vlen = int(b["name_len"][head]), int(b["value_len"][head])
        data = self._blob_bytes(head)
        name = data[:nlen]
        value = bytearray(data[nlen:nlen + vlen])
        nxt = int(b["next"][head])
        while len(value) < vlen and nxt:
            n = int(b["value_len"][nxt])
            value += self._blob_bytes(nxt)[:n]
            nxt = int(b["next"][nxt])
        return name, bytes(value)

    def _blob_chain_length(self, head: int) -> int:
        n, slot = 0, head
        while slot and n <= self.hwm["blob"]:  # bounded: a damaged chain cannot loop
            n += 1
            slot = int(self.t.blobs["next"][slot])
        return n

    def _free_blob(self, tx: Transaction, head: int) -> None:
        off = self.offsets["blob"]
        slot = head
        while slot:
            nxt = int(self.t.blobs["next"][slot])
            tx.save_record(self.t.blobs, off, slot)
            self.t.blobs[slot] = (0, 0, 0, 0, 0, 0, b"", 0)
            self.free_slots["blob"].append(slot)
            slot = nxt

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
        self._check_ino(ino)
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
        if not self._have_slots("blob", self._blob_slots_needed(len(name), len(value)) - freed):
            raise FsError(errno.ENOSPC)
        with self.transaction() as tx:
            if old is not None:
                self._free_blob(tx, old)
            self.xattrs.setdefault(ino, {})[name] = self._write_blob(tx, ino, BLOB_XATTR, name, value)
            self._touch(tx, ino)
            if flags & XATTR_CREATE:
                self._note(tx, OP_SETXATTR, ctx, ino, name)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check_ino(ino)
        self._check_xattr_ns(name)  # a stored ACL reads back even where ACLs are off
        slot = self.xattrs.get(ino, {}).get(name)
        if slot is None:
            if not self.acl and name.startswith(b"system.posix_acl_"):
                # as a filesystem without ACLs answers: ls -l then stops asking (-o noacl)
                raise FsError(errno.EOPNOTSUPP)
            raise FsError(errno.ENODATA)
        return self._read_blob(slot)[1]

    def listxattr(self, ino: int) -> list[bytes]:
        self._check_ino(ino)
        return list(self.xattrs.get(ino, {}))

    def removexattr(self, ino: int, name: bytes, ctx: Ctx = ROOT_CTX) -> None:
        if self._done_before(OP_REMOVEXATTR, ctx, ino, name):
            return
        self._check_ino(ino)
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
            self._touch(tx, ino)
            self._note(tx, OP_REMOVEXATTR, ctx, ino, name)

    # --------------------------------------------------------------- statfs
    def statfs(self) -> dict[str, int]:
        g = self.geometry
        inodes_total = g.inode_count - 1
        inodes_free = len(self.free_slots["inode"]) + g.inode_count - self.hwm["inode"]
        per = g.block_size // self.packer.chunk
        free = self.blocks_available()  # never more than the backing can still give
        # Overcommitted, the size is what is used plus what can still be had (at most the
        # region), so that df's "Used" is what files use, not the part of the region
        # the backing cannot hold now.
        blocks = g.data_blocks - self.alloc.free + free
        return {
            "block_size": g.block_size, "blocks": blocks, "blocks_free": free,
            # In pack chunks too, so df shows what small files really use (free chunks of
            # pack blocks are reserved memory already).
            "fragment_size": self.packer.chunk, "fragments": blocks * per,
            "fragments_free": free * per + self.packer.free_chunks(),
            "files": inodes_total, "files_free": inodes_free, "namemax": NAME_MAX,
        }

    def dirent_kind(self, kind: int) -> int:
        return _DIRENT_KIND.get(kind, stat.S_IFREG)


def check_magic(path: str, buf: memoryview) -> None:
    if bytes(buf[:8]) != MAGIC:  # the magic never changes, even mid-transaction
        raise MountError(f"{path}: not a pmemfs region (no superblock magic); "
                         "make one with pmemfs-mkfs, or run pmemfs-fsck to restore a damaged one")


def _metadata_end(buf: memoryview, region_size: int) -> int:
    """Where the data area starts, read before the superblock may be trusted.

    Undo records may only restore metadata. The geometry fields never change after
    mkfs, so they are good even while a transaction that changes the superblock's
    other fields is being rolled back (its checksum may be stale until then).
    """
    block_size, = struct.unpack_from("<Q", buf, 128)
    data_start_block, = struct.unpack_from("<Q", buf, 152)
    if block_size in (2 << 20, 1 << 30) and 0 < data_start_block * block_size < region_size:
        return data_start_block * block_size
    return region_size


def _free_stack(free_mask: np.ndarray) -> list[int]:
    """Free slot indices (slot 0 excluded), highest first so pop() hands out the lowest."""
    idx = np.flatnonzero(free_mask)
    idx = idx[idx > 0]
    return idx[::-1].tolist()


__all__ = ["JOURNAL_OFFSET", "Ctx", "Engine", "FsError", "MountError", "Stat"]
