"""pmemfs-fsck: check a region and repair it (the library and the command).

    pmemfs-fsck [-n | -p | -y] [--backup FILE] [--json] [-v] REGION

-n (the default when stdin is not a terminal) never writes: the region is mapped
privately (copy-on-write), so the journal can be rolled back exactly as a mount would
and the rolled-back image checked, without touching the region; it is allowed while
the region is mounted (the report then says it looked at a live image). -p repairs
what is safe, -y everything it can. Repairs hold the region lock and go through the
region's own undo journal, so a crash during a repair is itself recoverable.

Exit codes follow fsck(8): 0 clean, 1 errors corrected, 4 errors left uncorrected,
8 operational error, 16 usage error. docs/FSCK.md describes checks and repairs.
"""

from __future__ import annotations

import json
import mmap
import os
import stat as statmod
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import check
from .check import Finding, View
from .format import (
    ATTR_KNOWN,
    BLOB_CONT,
    BLOCK_SIZES,
    FLAG_ORPHAN,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    HWM_STEP,
    JOURNAL_OFFSET,
    JOURNAL_SIZE_DEFAULT,
    KIND_DIR,
    MAGIC,
    NAME_MAX,
    PACK_CHUNKS,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SB_SLOT,
    SB_STRUCT,
    SUPERBLOCK_DTYPE,
    TABLE_NAMES,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    max_file_size,
)
from .journal import HEADER_SIZE, JOURNAL_RECORD_HEADER, Journal, JournalFull, format_journal
from .region import Region, RegionError, lock_holder, probe

EXIT_CLEAN, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16
MAX_PASSES = 8
MODES = ("n", "p", "y")


class FsckError(Exception):
    """fsck cannot do its job (exit 8); the message is one line."""


@dataclass
class Report:
    region: str
    mode: str
    live: bool = False
    holder: int | None = None
    superblock: str | None = None  # "primary", "backup" or None (none usable)
    findings: list[Finding] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    modified: bool = False
    passes: int = 0
    backup_file: str | None = None
    elapsed: float = 0.0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.repaired]

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if self.modified else EXIT_CLEAN

    @property
    def status(self) -> str:
        return {EXIT_CLEAN: "clean", EXIT_CORRECTED: "corrected", EXIT_UNCORRECTED: "uncorrected"}[self.exit_code]

    def as_dict(self) -> dict:
        return {"region": self.region, "mode": self.mode, "live": self.live, "holder_pid": self.holder,
                "superblock": self.superblock, "status": self.status, "exit_code": self.exit_code,
                "modified": self.modified, "passes": self.passes, "backup_file": self.backup_file,
                "elapsed_seconds": round(self.elapsed, 3), "checks": self.checks,
                "findings": [f.as_dict() for f in self.findings]}


# ------------------------------------------------------------------ opening
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux x86_64/aarch64; Python 3.11 lacks it


class _Image:
    """The region mapped for fsck: private copy-on-write for -n, shared and locked to repair."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.region: Region | None = None
        self.mm = None
        if writable:
            self.region = Region(path, writable=True, lock=True)
            self.buf, self.size, self.fd = self.region.buf, self.region.size, self.region.fd
            self.private = False
            self.limit = self.size
            return
        info = probe(path)
        if info.kind == "devdax":  # no private mappings of device memory
            self.region = Region(path, writable=False, lock=False)
            self.buf, self.size, self.fd = self.region.buf, self.region.size, self.region.fd
            self.private = False
            self.limit = self.size
            return
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RegionError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise RegionError(f"{path}: region is empty")
            # Only the metadata area is mapped privately (writable, copy-on-write): a
            # private writable mapping of a huge region would be charged as memory.
            # On hugetlbfs a mapping reserves huge pages for what it might fault in (the
            # whole private copy): with none spare, -n could not even map. NORESERVE: the
            # checks only read, and a copy is made of the few pages a rollback writes.
            noreserve = MAP_NORESERVE if info.kind == "hugetlbfs" else 0
            ro = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED | noreserve, mmap.PROT_READ)
            try:
                meta_end = _metadata_end(memoryview(ro), self.size)
            finally:
                ro.close()
            self.mm = mmap.mmap(self.fd, meta_end, mmap.MAP_PRIVATE | noreserve,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise RegionError(f"{path}: cannot map: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self.mm)
        self.private = True
        self.limit = meta_end

    def holder(self) -> int | None:
        try:
            return lock_holder(self.fd)
        except OSError:
            return None

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            return
        try:
            self.buf.release()
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


def _metadata_end(buf: memoryview, size: int) -> int:
    """Bytes [0, data start) per the primary or backup superblock (everything fsck reads)."""
    sb, _ = check.check_superblock_raw(buf[:SB_STRUCT], size)
    if sb is None:
        sb, _ = find_backup(buf, size)
    if sb is None:
        return min(size, 64 << 20)
    g = sb.geometry
    return min(size, g.data_start_block * g.block_size)


def save_metadata(fd: int, length: int, dest: str) -> None:
    """Copy bytes [0, length) of the region to dest, keeping holes as holes."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(out, length)
        pos = 0
        chunk = 8 << 20
        while pos < length:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
            except OSError:  # no hole support (a device): copy everything
                start, end = pos, length
            if start >= length:
                break
            while start < end:
                n = min(chunk, end - start)
                data = os.pread(fd, n, start)
                if not data:
                    break
                if any(data):
                    os.pwrite(out, data, start)
                start += len(data)
            pos = end
        os.fsync(out)
    finally:
        os.close(out)


def _backup_candidates(buf: memoryview, size: int) -> list[int]:
    """Where the backup superblock probably is: the primary's own field, then mkfs defaults."""
    cands = []
    raw = np.frombuffer(bytes(buf[:SB_STRUCT]), SUPERBLOCK_DTYPE)[0]
    cands.append(int(raw["backup_offset"]))
    for bs in BLOCK_SIZES:
        if size % bs == 0:
            try:
                cands.append(Geometry.plan(size, bs).backup_offset)
            except FormatError:
                pass
    return cands


def find_backup(buf: memoryview, size: int) -> tuple[Superblock | None, int]:
    for off in _backup_candidates(buf, size):
        if 0 < off <= size - SB_SLOT and off % 4096 == 0 and bytes(buf[off:off + 8]) == MAGIC:
            sb, _ = check.check_superblock_raw(buf[off:off + SB_STRUCT], size)
            if sb is not None and sb.geometry.backup_offset == off:
                return sb, off
    for bs in BLOCK_SIZES:  # scan every block boundary, as read_superblock does
        for k in range(1, size // bs):
            off = k * bs - SB_SLOT
            if bytes(buf[off:off + 8]) != MAGIC:
                continue
            sb, _ = check.check_superblock_raw(buf[off:off + SB_STRUCT], size)
            if sb is not None and sb.geometry.backup_offset == off:
                return sb, off
    return None, 0


# ------------------------------------------------------------------ repairs
class Repair:
    """Writes to the region, always inside journal transactions that fit the journal."""

    def __init__(self, buf: memoryview, sb: Superblock, hwm: dict[str, int]):
        self.buf = buf
        self.sb = sb
        g = sb.geometry
        self.t = Tables(buf, sb)
        self.sbv = np.frombuffer(buf, SUPERBLOCK_DTYPE, 1, 0)
        self.journal = Journal(buf, g.data_start_block * g.block_size)
        self.tx = None
        self.hwm = dict(hwm)
        self.tables = {"inode": self.t.inodes, "extent": self.t.extents, "dirent": self.t.dirents,
                       "blob": self.t.blobs, "pack": self.t.packs}
        self.offsets = {n: g.offsets[n] for n in TABLE_NAMES}
        self.changed = False

    def view(self) -> View:
        return View(self.t, self.sb, self.hwm)

    def _room(self, need: int) -> None:
        if self.tx is not None and self.tx.room() < need:
            self.commit()
        if self.tx is None:
            self.tx = self.journal.begin()
        if self.tx.room() < need:
            raise JournalFull(f"a repair step needs {need} bytes of journal")
        self.changed = True

    def save(self, table: str, index: int) -> None:
        arr = self.tables[table]
        size = arr.dtype.itemsize
        self._room(JOURNAL_RECORD_HEADER + size + 8)
        self.tx.save_record(arr, self.offsets[table], int(index))

    def save_sb(self) -> None:
        self._room(JOURNAL_RECORD_HEADER + SB_STRUCT + 8)
        self.tx.save_record(self.sbv, 0, 0)

    def save_bytes(self, offset: int, length: int) -> None:
        self._room(JOURNAL_RECORD_HEADER + length + 8)
        self.tx.save(offset, length)

    def commit(self) -> None:
        if self.tx is not None:
            self.tx.commit()
            self.tx = None

    def alloc(self, table: str) -> int:
        """A free slot of a table (below the high-water mark, or by raising it)."""
        arr = self.tables[table]
        key = {"inode": "kind", "extent": "owner", "dirent": "parent", "blob": "owner", "pack": "block"}[table]
        h = self.hwm[table]
        free = np.flatnonzero(arr[key][1:h] == 0)
        if len(free):
            return int(free[0]) + 1
        new = min(h + HWM_STEP, len(arr))
        if new == h:
            raise FsckError(f"the {table} table is full: cannot repair")
        self.save_sb()
        self.sbv[f"{table}_hwm"] = new
        self.hwm[table] = new
        self.sb.hwm[table] = new
        return h

    # -- table record helpers
    def zero(self, table: str, index: int, keep_generation: bool = False) -> None:
        arr = self.tables[table]
        self.save(table, index)
        gen = int(arr["generation"][index]) if keep_generation else 0
        arr[index] = np.zeros(1, arr.dtype)[0]
        if keep_generation:
            arr["generation"][index] = gen

    def set(self, table: str, index: int, **values) -> None:
        arr = self.tables[table]
        self.save(table, index)
        for k, val in values.items():
            arr[k][index] = val

    def free_inode(self, ino: int) -> None:
        """Drop an inode with its names, its children's entries, extents and blobs."""
        v = self.view()
        for slot in v.dir_used[(v.d_ino == ino) | (v.d_parent == ino)].tolist():
            self.zero("dirent", slot)
        for slot in v.ext_used[v.e_owner == ino].tolist():
            self.zero("extent", slot)
        owners = v.blobs["owner"][v.blob_used].astype(np.int64)
        for slot in v.blob_used[owners == ino].tolist():
            self.zero("blob", slot)
        self.zero("inode", ino, keep_generation=True)

    def free_chain(self, head: int) -> None:
        b = self.t.blobs
        owner = int(b["owner"][head])
        seen = set()
        slot = head
        while slot and slot not in seen and 0 < slot < self.hwm["blob"]:
            seen.add(slot)
            nxt = int(b["next"][slot])
            self.zero("blob", slot)
            slot = nxt
            if not (0 < slot < self.hwm["blob"]) or int(b["kind"][slot]) != BLOB_CONT \
                    or int(b["owner"][slot]) != owner:
                break

    def add_dirent(self, parent: int, name: bytes, ino: int) -> None:
        slot = self.alloc("dirent")
        cookie = int(self.t.inodes["next_cookie"][parent])
        self.set("inode", parent, next_cookie=cookie + 1)
        self.save("dirent", slot)
        self.t.dirents[slot] = (parent, ino, cookie, len(name), int(self.t.inodes["kind"][ino]), 0, name, 0)

    def new_dir(self, parent: int, mode: int = 0o040700) -> int:
        ino = self.alloc("inode")
        self.save("inode", ino)
        gen = int(self.t.inodes["generation"][ino]) + 1
        now = time.time_ns()
        self.t.inodes[ino] = (KIND_DIR, 0, 0, mode, 0, 0, 2, gen & 0xFFFFFFFF, 0, 0, now, now, now, now,
                              0, parent, 3, 0, 0, 0, 0, b"\0" * 16, 0)
        return ino

    def names_in(self, parent: int) -> set[bytes]:
        v = self.view()
        slots = v.dir_used[v.d_parent == parent]
        return set(self.t.dirents["name"][slots].tolist())

    def lost_and_found(self) -> int:
        v = self.view()
        slots = v.dir_used[v.d_linked & (v.d_parent == ROOT_INO)]
        names = self.t.dirents["name"][slots]
        for slot in slots[names == b"lost+found"].tolist():
            ino = int(self.t.dirents["ino"][slot])
            if v.is_dir[ino]:
                return ino
        taken = set(names.tolist())
        name = b"lost+found"
        k = 1
        while name in taken:
            name = b"lost+found.%d" % k
            k += 1
        ino = self.new_dir(ROOT_INO)
        self.add_dirent(ROOT_INO, name, ino)
        self.set("inode", ROOT_INO, nlink=int(self.t.inodes["nlink"][ROOT_INO]) + 1)
        return ino


def _items(findings: list[Finding], key: str) -> list[int]:
    out: list[int] = []
    for f in findings:
        out.extend(f.data.get(key, []))
    return sorted(set(out))


def fix_checksums(r: Repair, fs: list[Finding]) -> None:
    for f in fs:
        for i in f.data["index"]:
            r.save(f.data["table"], i)  # commit reseals it


def fix_root(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    kids = v.dir_used[v.d_parent == ROOT_INO]
    cookie = int(r.t.dirents["cookie"][kids].max()) + 1 if len(kids) else 3
    r.save("inode", ROOT_INO)
    if v.live[ROOT_INO] and v.kind[ROOT_INO] != KIND_DIR:
        for slot in v.ext_used[v.e_owner == ROOT_INO].tolist():
            r.zero("extent", slot)
    now = time.time_ns()
    gen = int(r.t.inodes["generation"][ROOT_INO]) + 1
    r.t.inodes[ROOT_INO] = (KIND_DIR, 0, 0, 0o040755, 0, 0, 2, gen & 0xFFFFFFFF, 0, 0, now, now, now, now,
                            0, ROOT_INO, max(cookie, 3), 0, 0, 0, 0, b"\0" * 16, 0)


def fix_clear_inode(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        if ino != ROOT_INO and r.t.inodes["kind"][ino]:
            r.free_inode(ino)


def fix_mode(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        kind = int(r.t.inodes["kind"][ino])
        mode = int(r.t.inodes["mode"][ino])
        r.set("inode", ino, mode=S_IFMT_OF_KIND[kind] | (mode & 0o7777))


def fix_flags(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & FLAGS_KNOWN)


def fix_attr(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, attr=int(r.t.inodes["attr"][ino]) & ATTR_KNOWN)


def fix_named_orphan(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_ORPHAN)


def fix_drop_extents(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        if r.t.extents["owner"][slot]:
            r.zero("extent", slot)


def fix_double(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    fix_drop_extents(r, check.run_check("extent-overlap", v))


def fix_trim(r: Repair, fs: list[Finding]) -> None:
    """Free the blocks past what each file's size needs (finishes an interrupted truncate)."""
    v = r.view()
    bs = r.sb.geometry.block_size
    for ino in _items(fs, "ino"):
        size = int(r.t.inodes["size"][ino])
        keep = -(-size // bs)
        for k in np.flatnonzero((v.e_owner == ino) & v.e_blk).tolist():
            slot, fb, cnt = int(v.ext_used[k]), int(v.e_fb[k]), int(v.e_count[k])
            if fb >= keep:
                r.zero("extent", slot)
            elif fb + cnt > keep:
                r.set("extent", slot, count=keep - fb)
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_TRUNCATING)


def fix_nblocks(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    for ino in _items(fs, "ino"):
        if v.live[ino]:
            r.set("inode", ino, nblocks=int(sums[ino]))


def fix_size_zero(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, size=0)


def fix_size_limit(r: Repair, fs: list[Finding]) -> None:
    """A size past the largest file size becomes that size (bytes past it cannot be
    addressed by any file offset; extents past it are dropped by their own check)."""
    limit = max_file_size(r.sb.geometry.block_size)
    for ino in _items(fs, "ino"):
        r.set("inode", ino, size=limit)


def fix_symlink_size(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    b = r.t.blobs
    heads = v.blob_used[b["kind"][v.blob_used] == 2]
    length = dict(zip(b["owner"][heads].tolist(), b["value_len"][heads].tolist(), strict=True))
    for ino in _items(fs, "ino"):
        if ino in length:
            r.set("inode", ino, size=int(length[ino]))


def fix_drop_dirents(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        if r.t.dirents["parent"][slot]:
            r.zero("dirent", slot)


def fix_dirent_kind(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        r.set("dirent", slot, kind=int(r.t.inodes["kind"][int(r.t.dirents["ino"][slot])]))


def fix_cookies(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        parent = int(r.t.dirents["parent"][slot])
        if not parent:
            continue
        v = r.view()
        top = int(r.t.dirents["cookie"][v.dir_used[v.d_parent == parent]].max())
        cookie = max(int(r.t.inodes["next_cookie"][parent]), top + 1, 3)
        r.set("dirent", slot, cookie=cookie)
        r.set("inode", parent, next_cookie=cookie + 1)


def _sanitize(raw: bytes, nlen: int) -> bytes:
    name = raw[:min(nlen, NAME_MAX)].replace(b"/", b"_").replace(b"\0", b"_")
    return b"" if name in (b".", b"..") else name


def fix_rename(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        d = r.t.dirents
        parent, ino = int(d["parent"][slot]), int(d["ino"][slot])
        if not parent:
            continue
        raw = bytes(d["name"][slot].tobytes()) if hasattr(d["name"][slot], "tobytes") else bytes(d["name"][slot])
        taken = r.names_in(parent)
        name = _sanitize(raw, int(d["name_len"][slot]))
        if not name or (name in taken and name != bytes(d["name"][slot])) or name == bytes(d["name"][slot]):
            base = name[:200] if name else b""
            k = 0
            while True:
                name = base + (b"#%d" % ino if not k else b"#%d.%d" % (ino, k))
                if name not in taken:
                    break
                k += 1
        r.set("dirent", slot, name=name, name_len=len(name))


def fix_free_blobs(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        if r.t.blobs["owner"][slot]:
            r.zero("blob", slot)


def fix_free_chains(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        if r.t.blobs["owner"][slot]:
            r.free_chain(slot)


def fix_dir_names(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    up = check.dir_name_parent(v)
    for ino in _items(fs, "ino"):
        slots = v.dir_used[v.d_linked & (v.d_ino == ino)]
        keep = [s for s in slots.tolist() if int(r.t.dirents["parent"][s]) == up[ino]][:1] or slots[:1].tolist()
        for s in slots.tolist():
            if s not in keep:
                r.zero("dirent", s)


def fix_root_named(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    for s in v.dir_used[v.d_ino == ROOT_INO].tolist():
        r.zero("dirent", s)


def fix_dotdot(r: Repair, fs: list[Finding]) -> None:
    up = check.dir_name_parent(r.view())
    for ino in _items(fs, "ino"):
        r.set("inode", ino, parent=ROOT_INO if ino == ROOT_INO else int(up[ino]))


def fix_reconnect(r: Repair, fs: list[Finding]) -> None:
    """Put the tops of unreachable subtrees (and break directory cycles) into /lost+found."""
    v = r.view()
    reached, up, _ = check.reachability(v)
    unreachable = v.live & ~reached & ~v.orphan
    names = v.names_per_inode()
    tops: list[int] = []
    done: set[int] = set()
    for d in np.flatnonzero(unreachable & v.is_dir).tolist():
        path: list[int] = []
        onpath: set[int] = set()
        x = d
        while x not in done:
            if x in onpath:
                tops.append(x)  # a cycle: detach it here
                break
            p = int(up[x])
            if p <= 0 or not unreachable[p]:
                tops.append(x)
                break
            onpath.add(x)
            path.append(x)
            x = p
        done.update(path)
        done.add(x)
    tops.extend(np.flatnonzero(unreachable & ~v.is_dir & (names == 0)).tolist())
    if not tops:
        return
    lf = r.lost_and_found()
    taken = r.names_in(lf)
    for ino in dict.fromkeys(tops):
        if ino == lf:
            continue
        if v.is_dir[ino]:
            for s in v.dir_used[v.d_ino == ino].tolist():
                r.zero("dirent", s)
        name = b"#%d" % ino
        k = 1
        while name in taken:
            name = b"#%d.%d" % (ino, k)
            k += 1
        taken.add(name)
        r.add_dirent(lf, name, ino)
        if v.is_dir[ino]:
            r.set("inode", ino, parent=lf)


def fix_nlink(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    expect = check.expected_nlink(v)
    for ino in np.flatnonzero(v.live & (v.inodes["nlink"].astype(np.int64) != expect)).tolist():
        r.set("inode", ino, nlink=int(expect[ino]))


def fix_bitmap(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    want = check.expected_bitmap(v, check.block_owners(v))
    have = r.t.bitmap
    diff = np.flatnonzero(want != have)
    if not len(diff):
        return
    base = r.sb.geometry.offsets["bitmap"]
    # Contiguous runs of changed bytes, each saved (in pieces that fit the journal) then written.
    breaks = np.flatnonzero(np.diff(diff) > 64) + 1
    for run in np.split(diff, breaks):
        a, b = int(run[0]), int(run[-1]) + 1
        for lo in range(a, b, 65536):
            hi = min(b, lo + 65536)
            r.save_bytes(base + lo, hi - lo)
            have[lo:hi] = want[lo:hi]


def fix_drop_packs(r: Repair, fs: list[Finding]) -> None:
    """Pack records that point nowhere or repeat a block: drop them (their files' packed
    extents are then dropped as lying nowhere, and the block bitmap is rebuilt)."""
    for slot in _items(fs, "index"):
        if r.t.packs["block"][slot]:
            r.zero("pack", slot)


def fix_pack_bitmaps(r: Repair, fs: list[Finding]) -> None:
    """Rebuild each pack block's chunk bitmap from the packed extents in it; a pack
    block left with no chunks is given up (fix_bitmap then frees its block)."""
    v = r.view()
    ok = v.e_ok & v.e_packed
    want: dict[int, np.ndarray] = {int(b): np.zeros(PACK_CHUNKS, bool)
                                   for b in v.packs["block"][v.pack_used].tolist()}
    for b, c0, n in zip(v.e_start[ok].tolist(), v.e_chunk0[ok].tolist(), v.e_count[ok].tolist(), strict=True):
        if b in want:
            want[b][c0:c0 + n] = True
    for slot in v.pack_used.tolist():
        bits = want[int(r.t.packs["block"][slot])]
        if not bits.any():
            r.zero("pack", slot)
        else:
            r.set("pack", slot, bitmap=np.packbits(bits, bitorder="little").tobytes(), used=int(bits.sum()))


# Repairs in the order they run within a pass: code -> fixer.
FIXERS: list[tuple[str, Callable[[Repair, list[Finding]], None]]] = [
    ("checksum", fix_checksums),
    ("root", fix_root),
    ("bad-kind", fix_clear_inode),
    ("no-target", fix_clear_inode),
    ("bad-target", fix_clear_inode),
    ("bad-mode", fix_mode),
    ("bad-flags", fix_flags),
    ("bad-attr", fix_attr),
    ("named-orphan", fix_named_orphan),
    ("root-orphan", fix_named_orphan),
    ("orphan", fix_clear_inode),
    ("bad-extent", fix_drop_extents),
    ("overlap", fix_drop_extents),
    ("double", fix_double),
    ("file-overlap", fix_drop_extents),
    ("bad-owned", fix_drop_extents),
    ("pack-place", fix_drop_packs),
    ("pack-dup", fix_drop_packs),
    ("packed-nowhere", fix_drop_extents),
    ("packed-mixed", fix_drop_extents),
    ("chunk-twice", fix_drop_extents),
    ("pack-bitmap", fix_pack_bitmaps),
    ("past-eof", fix_trim),
    ("truncating", fix_trim),
    ("nblocks", fix_nblocks),
    ("size-nonzero", fix_size_zero),
    ("size-too-big", fix_size_limit),
    ("bad-dirent", fix_drop_dirents),
    ("dirent-kind", fix_dirent_kind),
    ("bad-name", fix_rename),
    ("dup-name", fix_rename),
    ("cookie", fix_cookies),
    ("bad-blob", fix_free_blobs),
    ("stray-cont", fix_free_blobs),
    ("bad-chain", fix_free_chains),
    ("stray-target", fix_free_chains),
    ("extra-target", fix_free_chains),
    ("symlink-size", fix_symlink_size),
    ("root-named", fix_root_named),
    ("dir-names", fix_dir_names),
    ("dotdot", fix_dotdot),
    ("unreachable", fix_reconnect),
    ("nlink", fix_nlink),
    ("leaked", fix_bitmap),
    ("unmarked", fix_bitmap),
]
CODE_CHECK: dict[str, str] = {}  # filled lazily: which check yields a code


def _allowed(f: Finding, mode: str) -> bool:
    return f.fix is not None and (f.fix == "p" or mode == "y") and mode in ("p", "y")


# ------------------------------------------------------------------ the run
def fsck(path: str, mode: str = "n", backup: str | None = None,
         progress: Callable[[int], None] | None = None,
         on_check: Callable[[str, list[Finding]], None] | None = None) -> Report:
    """Check (mode "n") or repair ("p", "y") the region at path; returns the report.

    Raises RegionError/FsckError (exit 8) when the region cannot be opened or is locked.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of n, p, y")
    started = time.monotonic()
    report = Report(path, mode)
    img = _Image(path, writable=mode != "n")
    try:
        if mode == "n":
            report.holder = img.holder()
            report.live = report.holder is not None
        _run(img, report, backup, progress, on_check)
    finally:
        img.close()
    report.elapsed = time.monotonic() - started
    return report


def _note(report: Report, name: str, found: list[Finding], on_check, progress) -> None:
    report.checks.append(name)
    report.findings.extend(found)
    if on_check:
        on_check(name, found)
    if progress:
        progress(1)


def _run(img: _Image, report: Report, backup: str | None, progress, on_check) -> None:
    buf, size, mode = img.buf, img.size, report.mode
    repair = mode != "n"
    # 1. The journal sits at a fixed offset: roll back an interrupted transaction first,
    #    as mount does (Journal.recover), before believing the superblock.
    jfind: list[Finding] = []
    journal_ok = False
    journal_active = False
    try:
        j = Journal(buf, img.limit)
        pending = j.pending()
        journal_ok = True
        if j.state != 0:
            journal_active = True
            jfind.append(Finding("journal", "warning", "journal",
                                 f"an interrupted transaction ({len(pending)} undo record(s)) is rolled back",
                                 code="journal-active", fix="p"))
    except FormatError as e:
        jfind.append(Finding("journal", "error", "journal", f"journal: {e}", code="journal-damaged", fix="y"))
    # The superblock tells where the metadata ends: needed for --backup before any write.
    sb, sb_find = check.check_superblock_raw(buf[:SB_STRUCT], size)
    bsb, boff = (None, 0)
    if sb is None:
        bsb, boff = find_backup(buf, size)
    use = sb or bsb
    if backup and use is not None:
        g = use.geometry
        save_metadata(img.fd, g.data_start_block * g.block_size, backup)
        report.backup_file = backup
    if journal_ok and journal_active and (img.private or repair):
        Journal(buf, img.limit).recover()  # a private copy for -n: the region is not touched
        if repair:
            jfind[0].repaired = True
            report.modified = True
        sb, sb_find = check.check_superblock_raw(buf[:SB_STRUCT], size)
        if sb is None and bsb is None:
            bsb, boff = find_backup(buf, size)
    _note(report, "journal", jfind, on_check, progress)
    # 2. Superblock, layout, backup superblock.
    hwm_full = False
    if sb is None:
        report.superblock = "backup" if bsb is not None else None
        if bsb is None:
            for f in sb_find:
                f.fix = None
            sb_find.append(Finding("superblock", "error", "backup superblock",
                                   "no valid backup superblock found: nothing to check", code="no-backup"))
            _note(report, "superblock", sb_find, on_check, progress)
            return
        for f in sb_find:
            f.message += "; the backup superblock is valid"
        sb, hwm_full = bsb, True
    else:
        report.superblock = "primary"
    sup = [f for f in sb_find if f.check == "superblock"]
    lay = [f for f in sb_find if f.check == "layout"]
    g = sb.geometry
    bfind: list[Finding] = []
    if report.superblock == "primary":
        raw_b = bytes(buf[g.backup_offset:g.backup_offset + SB_STRUCT])
        b_sb, _ = check.check_superblock_raw(raw_b, size)
        if b_sb is None:
            bfind.append(Finding("backup-superblock", "error", "backup superblock",
                                 f"backup superblock at {g.backup_offset} is damaged", code="backup", fix="p"))
        else:
            differ = check.compare_backup(bytes(buf[:SB_STRUCT]), raw_b)
            if differ:
                bfind.append(Finding("backup-superblock", "error", "backup superblock",
                                     f"backup superblock differs from the primary in {', '.join(differ[:5])}",
                                     code="backup", fix="p"))
    data_start = g.data_start_block * g.block_size
    # Damaged journal: -y starts it afresh (its undo records are lost).
    if not journal_ok and mode == "y":
        jsize = g.journal_size if JOURNAL_OFFSET + g.journal_size <= data_start else JOURNAL_SIZE_DEFAULT
        np.frombuffer(buf, np.uint8, HEADER_SIZE, JOURNAL_OFFSET)[:] = 0
        format_journal(buf, jsize)
        jfind[0].repaired = True
        report.modified = journal_ok = True
    can_write = repair and journal_ok
    hwm = {n: (getattr(g, f"{n}_count") if hwm_full else int(sb.hwm[n])) for n in TABLE_NAMES}
    if hwm_full:
        hwm = _true_hwm(Tables(buf, sb), hwm)
    if (sup or lay) and can_write:
        r = Repair(buf, sb, hwm)
        r.save_bytes(0, SB_STRUCT)
        raw = bytearray(buf[boff:boff + SB_STRUCT])
        buf[0:SB_STRUCT] = bytes(raw)
        for n in TABLE_NAMES:
            r.sbv[f"{n}_hwm"] = hwm[n]
        check.format_seal_sb(r.sbv)
        r.commit()
        for f in sup + lay:
            f.repaired = True
        report.modified = True
        report.superblock = "backup"
    _note(report, "superblock", sup, on_check, progress)
    _note(report, "layout", lay, on_check, progress)
    if bfind and can_write:
        raw = bytes(buf[:SB_STRUCT])
        r = Repair(buf, sb, hwm)
        r.save_bytes(g.backup_offset, SB_STRUCT)
        buf[g.backup_offset:g.backup_offset + SB_STRUCT] = raw
        r.commit()
        for f in bfind:
            f.repaired = True
        report.modified = True
    _note(report, "backup-superblock", bfind, on_check, progress)
    # 3. The tables.
    t = Tables(buf, sb)
    first = _table_checks(t, sb, hwm)
    if not can_write:
        for name in check.TABLE_CHECKS:
            _note(report, name, first[name], on_check, progress)
        return
    seen: dict[tuple, Finding] = {}
    for name in check.TABLE_CHECKS:
        for f in first[name]:
            seen.setdefault(f.key, f)
    r = Repair(buf, sb, hwm)
    current = first
    for _ in range(MAX_PASSES):
        flat = [f for fs in current.values() for f in fs]
        todo = {f.code for f in flat if _allowed(f, mode)}
        if not todo:
            break
        report.passes += 1
        ran = set()
        for code, fixer in FIXERS:
            if code not in todo:
                continue
            if not (fixer in ran and fixer in (fix_bitmap, fix_nlink, fix_double)):
                ran.add(fixer)
                name = next(f.check for f in flat if f.code == code)
                fresh = [f for f in check.run_check(name, r.view()) if f.code == code and _allowed(f, mode)]
                if fresh:
                    fixer(r, fresh)
            for f in flat:
                if f.code == code and _allowed(f, mode):
                    seen.setdefault(f.key, f).repaired = True
                    f.repaired = True
        r.commit()
        report.modified = report.modified or r.changed
        current = _table_checks(t, sb, r.hwm)
        for fs in current.values():
            for f in fs:
                seen.setdefault(f.key, f)
    r.commit()
    final = _table_checks(t, sb, r.hwm) if report.passes else first
    left = {f.key for fs in final.values() for f in fs}
    by_check: dict[str, list[Finding]] = {n: [] for n in check.TABLE_CHECKS}
    for f in seen.values():
        if f.key in left:
            f.repaired = False
        by_check.setdefault(f.check, []).append(f)
    for fs in final.values():
        for f in fs:
            if f.key not in seen:
                by_check.setdefault(f.check, []).append(f)
    for name in check.TABLE_CHECKS:
        _note(report, name, by_check.get(name, []), on_check, progress)
    del t, r


def _table_checks(t: Tables, sb: Superblock, hwm: dict[str, int]) -> dict[str, list[Finding]]:
    v = View(t, sb, hwm)
    return {name: list(fn(v)) for name, fn in check.CHECKS}


def _true_hwm(t: Tables, full: dict[str, int]) -> dict[str, int]:
    """High-water marks recomputed from the tables (used when the backup's may be stale)."""
    keys = {"inode": t.inodes["kind"], "extent": t.extents["owner"], "dirent": t.dirents["parent"],
            "blob": t.blobs["owner"], "pack": t.packs["block"]}
    out = {}
    for n, arr in keys.items():
        used = np.flatnonzero(arr[: full[n]] != 0)
        top = int(used[-1]) + 1 if len(used) else 1
        out[n] = min(full[n], max(HWM_STEP, -(-top // HWM_STEP) * HWM_STEP))
    return out


# ------------------------------------------------------------------ CLI
def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _print_text(report: Report, verbose: bool) -> None:
    import click

    if report.live:
        click.echo(f"{report.region}: mounted (live image, daemon pid {report.holder}): "
                   "the findings may include changes in flight")
    if report.superblock == "backup":
        click.echo(f"{report.region}: using the backup superblock")
    if verbose:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.check] = counts.get(f.check, 0) + 1
        for name in report.checks:
            click.echo(f"check {name}: {counts.get(name, 0)} finding(s)")
    for f in report.findings:
        tag = "FIXED" if f.repaired else ("warning" if f.severity == "warning" else "ERROR")
        hint = "" if f.repaired or f.fix is None or report.mode == "y" else f" [repair with -{f.fix}]"
        click.echo(f"{tag}: {f.check}: {f.message}{hint}")
    n_err = len(report.errors)
    fixed = sum(f.repaired for f in report.findings)
    if report.backup_file:
        click.echo(f"metadata saved to {report.backup_file}")
    click.echo(f"{report.region}: {report.status}: {n_err} error(s) left, {fixed} repaired "
               f"({len(report.checks)} checks, {report.elapsed:.2f} s)")


def _command():
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("-n", "no", is_flag=True, help="Check only; never write (default when stdin is not a terminal).")
    @click.option("-p", "-a", "preen", is_flag=True, help="Repair what is safe without asking.")
    @click.option("-y", "yes", is_flag=True, help="Repair everything that can be repaired.")
    @click.option("-f", "force", is_flag=True, hidden=True, help="Accepted for fsck(8); checks always run.")
    @click.option("--backup", type=click.Path(dir_okay=False), help="Save the metadata area here before repairing.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("-v", "--verbose", is_flag=True, help="List every check run.")
    @click.argument("region")
    def fsck_command(no, preen, yes, force, backup, as_json, verbose, region):
        """Check a pmemfs REGION and repair it (-p safe repairs, -y all)."""
        if no + preen + yes > 1:
            raise click.UsageError("only one of -n, -p and -y may be given")
        mode = "p" if preen else "y" if yes else "n"
        interactive = not (no or preen or yes) and _is_tty(sys.stdin)
        if not os.path.exists(region):
            raise RegionError(f"{region}: no such region")
        if statmod.S_ISDIR(os.stat(region).st_mode):
            raise RegionError(f"{region}: is a directory, not a region")
        from .cli import progress_bar

        tick = None if as_json else progress_bar("checking", len(check.CHECK_NAMES), unit="checks")
        try:
            report = fsck(region, mode, backup, progress=tick)
            if (interactive and report.errors and any(f.fix for f in report.errors)
                    and click.confirm(f"{len(report.errors)} error(s); repair them (as -y)?", default=False)):
                report = fsck(region, "y", backup)
        except (RegionError, FormatError, FsckError, JournalFull):
            raise
        except OSError:
            raise
        except Exception as e:  # a bug here must still end in one line
            raise FsckError(f"internal error: {type(e).__name__}: {e}") from None
        if as_json:
            click.echo(json.dumps(report.as_dict(), indent=2))
        else:
            _print_text(report, verbose)
        return report.exit_code

    return fsck_command


def main(argv: list[str] | None = None) -> None:
    from .cli import run

    run(_command(), "pmemfs-fsck", usage_status=EXIT_USAGE, errors=(FsckError, JournalFull),
        error_status=EXIT_OPERATIONAL)(argv)


__all__ = ["EXIT_CLEAN", "EXIT_CORRECTED", "EXIT_OPERATIONAL", "EXIT_UNCORRECTED", "EXIT_USAGE",
           "FsckError", "Report", "fsck", "main", "save_metadata"]
