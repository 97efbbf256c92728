"""The engine's lifecycle: mounting a region (recover the journal, decode, check, build
the indexes, finish what a dead instance left), remounting, closing, and the life of
an inode after its last name is gone (the kernel's references, reaping orphans).
"""

from __future__ import annotations

import errno
import logging
import struct
import time

import numpy as np

from ..media import check
from ..media.allocator import BlockAllocator
from ..media.errors import MountError
from ..media.format import (
    BLOB_CONT,
    BLOB_SYMLINK,
    EXTENT_PACKED,
    FEATURE_COMPAT_SPARSE,
    FEATURE_RO_COMPAT_KNOWN,
    FLAG_ORPHAN,
    FLAG_TRUNCATING,
    INODE_DTYPE,
    KIND_DIR,
    MAGIC,
    STATE_CLEAN,
    STATE_DIRTY,
    SUPERBLOCK_DTYPE,
    TABLE_NAMES,
    FormatError,
    Superblock,
    Tables,
)
from ..media.journal import Journal
from ..media.region import BackingFull
from .core import EngineCore, FileMap
from .ctx import FsError
from .leases import Leases
from .packing import Packer
from .replies import Replies

log = logging.getLogger("pmemfs.engine")


class Lifecycle(EngineCore):
    """Mounting, remounting and closing a region; reference counts and reaping."""

    # The mount, step by step; Engine.__init__ runs them in this order.
    def _recover_journal(self, readonly: bool) -> None:
        """Roll back an interrupted transaction before believing anything else, the
        superblock included: the journal sits at a fixed offset."""
        self.leases = Leases(None if readonly else self.path)  # directly mapped files (leases.py)
        buf = self.region.buf
        check_magic(self.path, buf)
        self.recovered_records = 0
        if not readonly:
            try:
                journal = Journal(buf, _metadata_end(buf, self.region.size))
                self.recovered_records = journal.recover()
            except FormatError as e:
                raise MountError(f"{self.path}: {e}; run pmemfs-fsck") from None

    def _read_superblock(self, readonly: bool) -> None:
        """Decode and validate the superblock; refuse features this version cannot write."""
        try:
            sb = Superblock.decode(self.region.buf, self.region.size)
        except FormatError as e:
            raise MountError(f"{self.path}: {e}; run pmemfs-fsck") from None
        self.sb = sb
        self.was_clean = sb.state == STATE_CLEAN and not self.recovered_records
        unknown_ro = sb.feature_ro_compat & ~FEATURE_RO_COMPAT_KNOWN
        if unknown_ro and not readonly:
            raise MountError(f"{self.path}: unknown read-only-compatible features 0x{unknown_ro:x}: "
                             "mount it read-only (-o ro)")
        self.readonly = readonly

    def _map_tables(self) -> None:
        """The tables as numpy views over the mapping, and the journal over them."""
        buf, sb = self.region.buf, self.sb
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
        if self.readonly and self.journal.state != 0:
            raise MountError(f"{self.path}: the journal holds an interrupted transaction; "
                             "mount it read-write once (or run pmemfs-fsck) to recover")

    def _check_structure(self) -> None:
        """Refuse, with the first reason, a region whose tables do not hold together."""
        findings = [f for f in check.structure(self.t, self.sb) if f.severity == "error"]
        if findings:
            raise MountError(f"{self.path}: {findings[0].message} "
                             f"({len(findings)} problem(s)); run pmemfs-fsck")

    def _settle_backing(self) -> None:
        """Overcommitted: hold the metadata reserved, and after a crash give back the
        memory of blocks that are free now (freed by the last transaction, or reserved
        by one that was rolled back)."""
        self.released_runs = 0
        if self.sparse and not self.readonly:
            self._reserve_metadata()
            if not self.was_clean:
                self.released_runs = self.alloc.release_free()

    def _start_mount(self) -> None:
        """Finish what an earlier instance left, and mark the region mounted: dirty,
        with the next mount generation (which the exactly-once records are keyed on)."""
        readonly = self.readonly
        kinds = self.I["kind"][: self.hwm["inode"]]
        self.inherited = (kinds != 0) if self.takeover else np.zeros(0, bool)
        self.replies = Replies(self.region.buf, int(self.sbv["mount_generation"][0]) + (0 if readonly else 1))
        self.reclaimed = 0
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
        self.generation = int(self.sbv["mount_generation"][0])

    def _load(self) -> None:
        """Build the in-memory indexes from the region: O(used metadata). Also run after
        a rolled-back transaction, whose in-memory changes may have run ahead."""
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
        self._index_directories(np.flatnonzero(kinds == KIND_DIR), dh)
        self._index_extents(eh)
        self._index_blobs(bh)
        self.refs = {}

    def _index_directories(self, dirs: np.ndarray, dh: int) -> None:
        """Directories: name -> dirent slot, in cookie order (dicts keep insertion order)."""
        self.children = {int(i): {} for i in dirs}
        d = self.t.dirents[:dh]
        used = np.flatnonzero(d["parent"] != 0)
        order = used[np.lexsort((d["cookie"][used], d["parent"][used]))]
        parents = d["parent"][order].tolist()
        names = d["name"][order].tolist()
        for slot, parent, name in zip(order.tolist(), parents, names, strict=True):
            self.children[parent][name] = slot

    def _index_extents(self, eh: int) -> None:
        """Extent maps, sorted by file block; packed extents go to the Packer."""
        self.maps = {}
        e = self.t.extents[:eh]
        used = np.flatnonzero(e["owner"] != 0)
        packed = (e["flags"][used] & EXTENT_PACKED) != 0
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

    def _index_blobs(self, bh: int) -> None:
        """Blobs: xattr heads by name, symlink targets by owner."""
        self.xattrs = {}
        self.symlinks = {}
        b = self.t.blobs[:bh]
        heads = np.flatnonzero((b["owner"] != 0) & (b["kind"] != BLOB_CONT))
        for slot, owner, kind, nlen in zip(heads.tolist(), b["owner"][heads].tolist(),
                                           b["kind"][heads].tolist(), b["name_len"][heads].tolist(),
                                           strict=True):
            if kind == BLOB_SYMLINK:
                self.symlinks[owner] = slot
            else:
                name = self._blob_bytes(slot)[:nlen]
                self.xattrs.setdefault(owner, {})[name] = slot

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

    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel (or another user) holds n more references to ino."""
        self.refs[ino] = self.refs.get(ino, 0) + n

    def forget(self, ino: int, n: int = 1) -> None:
        left = self.refs.get(ino, 0) - n
        if left > 0:
            self.refs[ino] = left
            return
        self.refs.pop(ino, None)
        self.maybe_reap(ino)

    def maybe_reap(self, ino: int) -> None:
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
            self.save_inode(tx, ino)
            generation = int(self.I["generation"][ino])
            self.t.inodes[ino] = np.zeros(1, INODE_DTYPE)[0]
            self.I["generation"][ino] = generation
            self.free_slots["inode"].append(ino)
            self.children.pop(ino, None)
            self.maps.pop(ino, None)
        self.refs.pop(ino, None)


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

