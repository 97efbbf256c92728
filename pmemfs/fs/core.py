"""The engine's shared core: the state every concern works on, and the few things they
all need (transactions, table slots, inode basics, blobs, the exactly-once notes).

The Engine is one object made of concerns (docs/DESIGN.md, "The engine"): lifecycle
(mount, recovery, close), namespace, extents, file data and attributes, each a class
in its own module over this one. They share the region's tables and the in-memory
indexes declared here; a method without a leading underscore is also used by the
engine's neighbours in fs/ (packing, holes, placement, kobj) or by the adapter.
"""

from __future__ import annotations

import errno
import stat
import struct
import time
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..media.allocator import BlockAllocator, NoSpace
from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    BLOB_CONT,
    BLOB_DATA,
    HWM_STEP,
    INODE_DTYPE,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_FIFO,
    KIND_REG,
    KIND_SOCK,
    KIND_SYMLINK,
    NAME_MAX,
    Geometry,
    Superblock,
    Tables,
)
from ..media.journal import Journal, Transaction
from ..media.region import BackingFull, Region, backing_free
from .ctx import Ctx, FsError
from .leases import Leases
from .replies import Replies

if TYPE_CHECKING:  # built at mount by Engine._mount; only types here
    from .kobj import KernelObjects
    from .packing import Packer

XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # leave a whiteout (char device 0:0) at the old name: overlayfs upper layers
FREE_BATCH = 2048  # extents freed per transaction when a large file goes away
GROWTH_MIGRATE_BLOCKS = 16  # a file this many blocks long is moved to an aligned GiB run
RELATIME_NS = 24 * 3600 * 10**9
ATIME_MODES = ("relatime", "strictatime", "noatime")
ALIGN_POLICY = b"user.pmemfs.align"  # placement policy xattr, inherited by new files

_DIRENT_KIND = {KIND_REG: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK,
                KIND_FIFO: stat.S_IFIFO, KIND_SOCK: stat.S_IFSOCK, KIND_CHR: stat.S_IFCHR,
                KIND_BLK: stat.S_IFBLK}
# The leading fields of an inode record, read in one call for stat().
_STAT = struct.Struct("<BxHIIIIIQQqqqqQ")

class BackingShort(Exception):
    """A write's transaction ran out of backing after `blocks` blocks (rolled back)."""

    def __init__(self, blocks: int):
        self.blocks = blocks



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



class EngineCore:
    """The state the concerns share, and what they all use."""

    # Mount options and the mount's identity (Engine.__init__ and Engine._mount).
    path: str
    sync: bool
    readonly: bool
    atime: str
    nodiratime: bool
    acl: bool  # POSIX ACLs served (the daemon sets it once FUSE_POSIX_ACL is negotiated)
    takeover: bool
    generation: int
    # The region and its tables, as numpy views over the mapping.
    region: Region
    sb: Superblock
    geometry: Geometry
    block_size: int
    max_file_size: int
    data_start: int
    sparse: bool  # overcommitted: blocks are reserved from the backing as they are used
    t: Tables
    sbv: np.ndarray  # the superblock, one structured record
    u8: np.ndarray  # the whole region as bytes
    I: dict[str, np.ndarray]  # noqa: E741  (the inode table's columns, used everywhere)
    offsets: dict[str, int]
    hwm: dict[str, int]  # each table's high-water mark
    journal: Journal
    alloc: BlockAllocator
    # In-memory indexes, derived from the tables at mount (Lifecycle._load).
    free_slots: dict[str, list[int]]
    children: dict[int, dict[bytes, int]]  # directory -> name -> dirent slot, cookie order
    maps: dict[int, FileMap]
    xattrs: dict[int, dict[bytes, int]]  # inode -> name -> blob head
    symlinks: dict[int, int]  # inode -> blob head of the target
    refs: dict[int, int]  # the kernel's references (lookup counts, open handles)
    inherited: np.ndarray  # inodes a predecessor's kernel may hold (takeover)
    unsettled: int | None  # the exactly-once record whose reply is not yet sent
    # Neighbours in fs/ that work on the same state.
    packer: Packer
    kernel: KernelObjects
    leases: Leases
    replies: Replies

    def _load(self) -> None:
        """Rebuild the in-memory indexes from the region (Lifecycle._load): a rolled-back
        transaction's in-memory changes may have run ahead of it."""
        raise NotImplementedError

    def blocks_available(self) -> int:
        """Free blocks that can be had now: the free blocks, and on an overcommitted
        region no more than the backing can still hold (in whole blocks)."""
        free = self.alloc.free
        if self.sparse and free:
            have = backing_free(self.path)
            if have is not None:
                free = min(free, have // self.block_size)
        return free

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

    def save_inode(self, tx: Transaction, ino: int) -> None:
        tx.save_record(self.t.inodes, self.offsets["inode"], ino)

    def take_slot(self, tx: Transaction, table: str) -> int:
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

    def have_slots(self, table: str, n: int) -> bool:
        arr = getattr(self.t, table + "s")
        return len(self.free_slots[table]) + len(arr) - self.hwm[table] >= n

    def _exists(self, ino: int) -> bool:
        return 0 < ino < self.hwm["inode"] and self.I["kind"][ino] != 0

    def check_ino(self, ino: int) -> None:
        if not self._exists(ino):
            raise FsError(errno.ENOENT, f"no inode {ino}")

    def stat(self, ino: int) -> Stat:
        self.check_ino(ino)
        off = self.offsets["inode"] + ino * INODE_DTYPE.itemsize
        (kind, flags, mode, uid, gid, nlink, gen, size, nblocks,
         at, mt, ct, bt, rdev) = _STAT.unpack_from(self.region.buf, off)
        blocks = nblocks * (self.block_size >> 9)
        if ino in self.packer.packed:
            blocks += self.packer.chunks(ino) * (self.packer.chunk >> 9)
        return Stat(ino, gen, mode, nlink, uid, gid, rdev, size, blocks, at, mt, ct, bt, flags, kind)

    def kind(self, ino: int) -> int:
        return int(self.I["kind"][ino])

    def touch(self, tx: Transaction, ino: int, *, m: bool = False, c: bool = True,
               now: int | None = None) -> None:
        self.save_inode(tx, ino)
        now = time.time_ns() if now is None else now
        if m:
            self.I["mtime_ns"][ino] = now
        if c:
            self.I["ctime_ns"][ino] = now

    def _refuse(self, ino: int, flags: int) -> None:
        """EPERM when ino carries any of these chattr flags."""
        if int(self.I["attr"][ino]) & flags:
            raise FsError(errno.EPERM, "the inode is immutable or append-only (chattr)")

    def _check_delete(self, parent: int, ino: int) -> None:
        """may_delete's rules: no name leaves an immutable or append-only directory,
        and an immutable or append-only inode keeps its names."""
        self._refuse(parent, ATTR_IMMUTABLE | ATTR_APPEND)
        self._refuse(ino, ATTR_IMMUTABLE | ATTR_APPEND)

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

    def _blocks_for(self, size: int) -> int:
        return (size + self.block_size - 1) // self.block_size

    def _blob_bytes(self, slot: int) -> bytes:
        return self.t.blobs["data"][slot].tobytes()

    @staticmethod
    def _blob_slots_needed(name_len: int, value_len: int) -> int:
        first = BLOB_DATA - name_len
        if value_len <= first:
            return 1
        return 1 + -(-(value_len - first) // BLOB_DATA)

    def _write_blob(self, tx: Transaction, owner: int, kind: int, name: bytes, value: bytes) -> int:
        head = self.take_slot(tx, "blob")
        first = BLOB_DATA - len(name)
        rest = value[first:]
        parts = [rest[i:i + BLOB_DATA] for i in range(0, len(rest), BLOB_DATA)]
        slots = [self.take_slot(tx, "blob") for _ in parts]
        links = [*slots, 0]
        off = self.offsets["blob"]
        tx.save_record(self.t.blobs, off, head)
        data = (name + value[:first]).ljust(BLOB_DATA, b"\0")
        self.t.blobs[head] = (owner, links[0], kind, 0, len(name), len(value), data, 0)
        for k, (slot, part) in enumerate(zip(slots, parts, strict=True)):
            tx.save_record(self.t.blobs, off, slot)
            self.t.blobs[slot] = (owner, links[k + 1], BLOB_CONT, 0, 0, len(part), part.ljust(BLOB_DATA, b"\0"), 0)
        return head

    def read_blob(self, head: int) -> tuple[bytes, bytes]:
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

    def _blob_heads(self, ino: int) -> list[int]:
        heads = list(self.xattrs.get(ino, {}).values())
        if ino in self.symlinks:
            heads.append(self.symlinks[ino])
        return heads

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
