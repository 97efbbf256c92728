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

A repair never changes a file silently: records that fail their checksum are restored
exactly when one explanation of the damage fits the checksum, and otherwise trusted
only as far as everything that refers to them agrees; every file a repair may have
changed is in the report's per-file list (Report.files, "files" in --json, CHANGED
lines in the text) by path, with what happened to it.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import stat as statmod
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..media import check
from ..media.check import COOKIE_END, Finding, View
from ..media.format import (
    ATTR_KNOWN,
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    BLOCK_SIZES,
    EXTENT_PACKED,
    FLAG_ORPHAN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    HWM_STEP,
    JOURNAL_OFFSET,
    JOURNAL_SIZE_DEFAULT,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_FIFO,
    KIND_KOBJ,
    KIND_NAMES,
    KIND_OF_S_IFMT,
    KIND_REG,
    KIND_SOCK,
    KIND_SYMLINK,
    MAGIC,
    NAME_MAX,
    PACK_CHUNKS,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SB_SLOT,
    SB_STRUCT,
    SMALL_CHUNKS,
    SUPERBLOCK_DTYPE,
    TABLE_NAMES,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    max_file_blocks,
    max_file_size,
)
from ..media.journal import HEADER_SIZE, JOURNAL_RECORD_HEADER, Journal, JournalFull, format_journal
from ..media.region import Region, RegionError, lock_holder, probe

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
    files: list[FileChange] = field(default_factory=list)  # what the repair may have changed, per file

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
                "findings": [f.as_dict() for f in self.findings],
                "files": [c.as_dict() for c in self.files]}


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


# ------------------------------------------------------------------ naming what changed
def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def display(path: str) -> str:
    """A path as the text report prints it (bytes that are not UTF-8 as \\xNN)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Paths:
    """Every name of every inode as a path from the root, for one state of the tables.

    A copy: the repair changes the tables under it. Paths are found on demand, by
    walking up from an inode's entries (memoised per directory), so the cost follows
    the files the report names, not the size of the tree."""

    def __init__(self, v: View):
        d = v.dirents
        self.slots = v.dir_used.copy()
        self.parent = v.d_parent.copy()
        self.ino = v.d_ino.copy()
        nlen = np.minimum(d["name_len"][self.slots].astype(np.int64), NAME_MAX)
        self.names = [bytes(n)[:k] for n, k in zip(d["name"][self.slots].tolist(), nlen.tolist(), strict=True)]
        self.is_dir = v.is_dir.copy()
        self.n = v.n
        self.order = np.argsort(self.ino, kind="stable")
        self.sorted_ino = self.ino[self.order]
        self.memo: dict[int, str | None] = {ROOT_INO: ""}

    def _entries(self, ino: int) -> list[int]:
        lo, hi = np.searchsorted(self.sorted_ino, [ino, ino + 1])
        return self.order[lo:hi].tolist()

    def _dir(self, d: int) -> str | None:
        chain: list[tuple[int, int]] = []
        seen: set[int] = set()
        x, result = d, None
        while True:
            if x in self.memo:
                result = self.memo[x]
                break
            if x in seen or not (0 < x < self.n) or not self.is_dir[x]:
                break
            seen.add(x)
            ents = self._entries(x)
            if not ents:
                break
            chain.append((x, ents[0]))
            x = int(self.parent[ents[0]])
        for x, k in reversed(chain):
            result = None if result is None else f"{result}/{_decode(self.names[k])}"
            self.memo[x] = result
        return result

    def of(self, ino: int) -> list[str]:
        """All paths naming ino, sorted ("/" for the root)."""
        if ino == ROOT_INO:
            return ["/"]
        out = set()
        for k in self._entries(ino):
            p = self._dir(int(self.parent[k]))
            if p is not None:
                out.add(f"{p}/{_decode(self.names[k])}")
        return sorted(out)

    def of_slot(self, slot: int) -> str | None:
        """The path of the entry in dirent slot `slot` (None: its directory is not reachable)."""
        k = int(np.searchsorted(self.slots, slot))
        if k >= len(self.slots) or self.slots[k] != slot:
            return None
        p = self._dir(int(self.parent[k]))
        return None if p is None else f"{p}/{_decode(self.names[k])}"


@dataclass
class FileChange:
    """One file the repair may have changed, and what happened to it."""

    inode: int
    path: str | None  # where it is now, else where it was, else None
    paths: list[str]  # every name it has after the repair
    was: list[str]  # the names it had before the repair (as far as the damaged tables tell)
    what: list[str]  # codes: see docs/FSCK.md, "Naming every changed file"
    details: list[str]

    def as_dict(self) -> dict:
        return {"path": self.path, "inode": self.inode, "paths": self.paths, "was": self.was,
                "what": self.what, "details": self.details}

    def label(self) -> str:
        return f"{display(self.path)} (inode {self.inode})" if self.path else f"inode {self.inode} (no path)"


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
        # What the report names: inode -> [(what, detail)], in the order things happened.
        self.notes: dict[int, list[tuple[str, str]]] = {}
        # Records that failed their checksum and could not be restored: trusted only as
        # far as everything else agrees with them (docs/FSCK.md).
        self.suspect: dict[str, set[int]] = {n: set() for n in TABLE_NAMES}
        self.outcome: dict[tuple[str, int], str] = {}  # (table, slot) -> what became of it
        self.lost_hints: list[tuple[int, int, int, int, int]] = []  # dropped: (owner, start, count, file block, flags)
        self.mode = "y"
        self.before: Paths | None = None

    def view(self) -> View:
        return View(self.t, self.sb, self.hwm)

    def snapshot(self) -> None:
        """Remember every file's names as the damaged tables give them."""
        self.before = Paths(self.view())

    def note(self, ino: int, what: str, detail: str) -> None:
        items = self.notes.setdefault(int(ino), [])
        if (what, detail) not in items:
            items.append((what, detail))

    def rebuilt(self, ino: int, detail: str) -> None:
        """A file's lost extents were rebuilt: what said they were lost no longer holds."""
        self.notes[int(ino)] = [(w, d) for w, d in self.notes.get(int(ino), []) if w != "lost-blocks"]
        self.note(ino, "rebuilt", detail)

    def was(self, ino: int) -> str:
        """How the report calls a file in a detail: a name it had, else "inode N"."""
        paths = self.before.of(int(ino)) if self.before else []
        return display(paths[0]) if paths else f"inode {int(ino)}"

    def slot_path(self, slot: int) -> str:
        p = self.before.of_slot(int(slot)) if self.before else None
        if p is not None:
            return display(p)
        d = self.t.dirents
        return f"{_decode(bytes(d['name'][slot])[:NAME_MAX])!r} in directory {int(d['parent'][slot])}"

    def changes(self) -> list[FileChange]:
        if not self.notes:
            return []
        v = self.view()
        now = Paths(v)
        out = []
        for ino, items in self.notes.items():
            paths = now.of(ino) if 0 < ino < v.n and v.live[ino] else []
            was = self.before.of(ino) if self.before and 0 < ino < self.before.n else []
            path = paths[0] if paths else (was[0] if was else None)
            out.append(FileChange(ino, path, paths, was, list(dict.fromkeys(w for w, _ in items)),
                                  [d for _, d in items]))
        return out

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
        key = check.KEY_FIELD[table]
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

    def put(self, table: str, index: int, raw: bytes) -> None:
        """Replace a whole record (its checksum is resealed at commit)."""
        arr = self.tables[table]
        self.save(table, index)
        arr[index] = np.frombuffer(raw, arr.dtype)[0]

    def raw(self, table: str, index: int) -> bytes:
        arr = self.tables[table]
        return arr[index : index + 1].tobytes()

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

    def quarantine(self, ino: int, why: str) -> None:
        """Take a file out of every directory: the reconnect repair then puts it in
        /lost+found (root's, mode 0700), where only the administrator can reach it."""
        v = self.view()
        for slot in v.dir_used[v.d_ino == ino].tolist():
            self.zero("dirent", slot)
        self.note(ino, "quarantined", why)


def _items(findings: list[Finding], key: str) -> list[int]:
    out: list[int] = []
    for f in findings:
        out.extend(f.data.get(key, []))
    return sorted(set(out))


# ------------------------------------------------------------------ restoring records from their checksums
# A record whose checksum fails is not trusted as it is. But CRC-32 is affine over GF(2):
# the difference between the checksum stored and the one its bytes give (the syndrome) is
# the CRC-linear image of the bits the damage flipped. fsck tries a few explanations of the
# damage, each of which predicts the whole original record: one byte of the checksum field;
# one byte anywhere else (a table of every single-byte error's syndrome); bytes that must
# be zero (padding, reserved fields, fields the record's kind does not use); one field,
# solved for (its 8 to 32 unknown bits against the checksum's 32 equations), when the
# value found is one the rest of the metadata confirms (a live owner, the file's block
# count, the link count, the allocation bitmap). A record is restored only when exactly
# one explanation predicts it; a wrong one fits by chance with a probability of about
# 2^-32 times the number of values it admits (docs/FSCK.md).
SOLVE_FIELDS = {
    "inode": ("kind", "flags", "mode", "nlink", "size", "nblocks", "parent", "next_cookie",
              "ktype", "kstate", "kversion", "kchecksum"),
    "extent": ("owner", "count", "file_block", "start_block", "flags"),
    "dirent": ("parent", "ino", "cookie", "name_len", "kind"),
    "blob": ("owner", "next", "kind", "name_len", "value_len"),
    "pack": ("block", "used"),
}
SIZELESS = (KIND_DIR, KIND_FIFO, KIND_SOCK, KIND_CHR, KIND_BLK)
EXTENT_HEAD = struct.Struct("<IIQQI")  # an extent record but its checksum
XATTR_NAMESPACES = (b"user", b"trusted", b"security")


@functools.lru_cache(maxsize=512)
def _basis(length: int, offset: int, nbits: int) -> dict[int, tuple[int, int]]:
    """Gaussian elimination over GF(2) of the CRC columns of a field's bits: pivot bit ->
    (vector, which field bits make it)."""
    cols = check.crc_bit_columns(length)[offset * 8: offset * 8 + nbits].tolist()
    basis: dict[int, tuple[int, int]] = {}
    for i, c in enumerate(cols):
        vec, combo = int(c), 1 << i
        while vec:
            b = vec.bit_length() - 1
            if b not in basis:
                basis[b] = (vec, combo)
                break
            bv, bc = basis[b]
            vec ^= bv
            combo ^= bc
    return basis


def _solve(length: int, offset: int, nbits: int, target: int) -> int | None:
    """The field value v with lin(v) == target, or None."""
    basis = _basis(length, offset, nbits)
    v = 0
    while target:
        hit = basis.get(target.bit_length() - 1)
        if hit is None:
            return None
        target ^= hit[0]
        v ^= hit[1]
    return v


@functools.lru_cache(maxsize=8)
def _byte_errors(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Syndromes of every single-byte error in a `length`-byte message, sorted, with the
    byte's position and the XOR that undoes it; syndromes two errors share are left out."""
    cols = check.crc_bit_columns(length).reshape(length, 8)
    x = np.arange(1, 256, dtype=np.uint32)
    syn = np.zeros((length, 255), np.uint32)
    for k in range(8):
        on = ((x >> k) & 1).astype(bool)
        syn ^= np.where(on[None, :], cols[:, k:k + 1], np.uint32(0))
    flat = syn.ravel()
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    dup = np.zeros(len(s), bool)
    same = s[1:] == s[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    keep = order[~dup]
    return flat[keep], keep // 255, keep % 255 + 1


class _Evidence:
    """What the rest of the metadata says about a record: for judging explanations of
    its damage and for cross-checking records that stay unexplained."""

    def __init__(self, r: Repair):
        v = r.view()
        self.r, self.v = r, v
        g = r.sb.geometry
        self.g, self.bs = g, g.block_size
        self.chunk = g.block_size // PACK_CHUNKS
        self.n = v.n
        self.live, self.kind = v.live, v.kind
        self.expect_nlink = check.expected_nlink(v)
        self.names = v.names_per_inode()
        self.up = check.dir_name_parent(v)
        ino = v.inodes
        self.size, self.nblocks, self.flags = ino["size"], ino["nblocks"], ino["flags"]
        blk = v.e_blk
        self.b_slot, self.b_owner = v.ext_used[blk], v.e_owner[blk]
        self.b_start, self.b_count, self.b_fb = v.e_start[blk], v.e_count[blk], v.e_fb[blk]
        self.sums = np.bincount(self.b_owner, weights=self.b_count, minlength=v.n).astype(np.int64)
        pk = v.e_ok & v.e_packed
        self.p_slot, self.p_owner, self.p_block = v.ext_used[pk], v.e_owner[pk], v.e_start[pk]
        self.p_c0, self.p_count = v.e_chunk0[pk], v.e_count[pk]
        self.pack_of = {int(b): int(s) for s, b in zip(v.pack_used.tolist(),
                                                       v.packs["block"][v.pack_used].tolist(), strict=True)}
        self.bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
        b, used = v.blobs, v.blob_used
        heads = used[b["kind"][used] == BLOB_SYMLINK]
        self.target_len = dict(zip(b["owner"][heads].tolist(), b["value_len"][heads].tolist(), strict=True))
        nxt = b["next"][used].astype(np.int64)
        self.linked_by = np.full(len(b), -1, np.int64)
        ok = (nxt > 0) & (nxt < len(b))
        self.linked_by[nxt[ok]] = used[ok]
        self.d_cookie = v.dirents["cookie"][v.dir_used].astype(np.uint64)

    def data_inode(self, o: int) -> bool:
        return 0 < o < self.n and bool(self.live[o]) and int(self.kind[o]) in (KIND_REG, KIND_KOBJ)

    def need(self, o: int) -> int:
        size = int(self.size[o])
        return -(-size // self.bs)

    def own(self, o: int, slot: int) -> int:
        """Blocks extent `slot` now adds to inode o's sum."""
        k = np.flatnonzero(self.b_slot == slot)
        return int(self.b_count[k[0]]) if len(k) and int(self.b_owner[k[0]]) == o else 0

    def marked(self, s: int, n: int) -> bool:
        return bool(self.bits[s:s + n].all())

    def claimed(self, s: int, n: int, exclude: int, among: np.ndarray | None = None) -> bool:
        """Does another whole-block extent (of `among` slots, default all) or a pack block
        claim a block of [s, s + n)?"""
        m = (self.b_start < s + n) & (self.b_start + self.b_count > s) & (self.b_slot != exclude)
        if among is not None:
            m &= np.isin(self.b_slot, among)
        return bool(m.any()) or any(s <= pb < s + n for pb in self.pack_of)

    def file_overlap(self, o: int, fb: int, n: int, exclude: int) -> bool:
        m = (self.b_owner == o) & (self.b_slot != exclude) & (self.b_fb < fb + n) & (self.b_fb + self.b_count > fb)
        return bool(m.any())

    def pack_bits(self, pslot: int) -> np.ndarray:
        raw = np.frombuffer(self.r.t.packs["bitmap"][pslot].tobytes(), np.uint8)
        return np.unpackbits(raw, bitorder="little").astype(bool)

    def short_files(self) -> list[tuple[int, int, int]]:
        """(file, file block, count): files whose block count says they have more blocks
        than their extents map, with a hole where those could go (at most 100 files)."""
        if not hasattr(self, "_short"):
            deficit = self.nblocks.astype(np.int64) - self.sums
            short = np.flatnonzero(self.live & np.isin(self.kind, (KIND_REG, KIND_KOBJ)) & (deficit > 0))[:100]
            self._short = []
            for o in short.tolist():
                mine = self.b_owner == o
                for fb, gap in _gaps(self.b_fb[mine].tolist(), self.b_count[mine].tolist(), self.need(o))[:10]:
                    cnt = min(int(deficit[o]), gap)
                    if cnt <= self.g.block_count and fb + cnt <= max_file_blocks(self.bs):  # (damaged counts)
                        self._short.append((o, fb, cnt))
        return self._short

    def unowned(self, s: int, n: int) -> bool:
        """Are blocks [s, s + n) in the data area and owned by nobody? (Marked or not: for
        a record the checksum confirms whole, the bitmap, checksummed by nothing, is no
        evidence against it.)"""
        if not hasattr(self, "_unowned"):
            free = check.block_owners(self.v) == 0
            free[: self.g.data_start_block] = False
            self._unowned = free
        return n > 0 and s + n <= len(self._unowned) and bool(self._unowned[s:s + n].all())

    def orphan_chunks(self) -> list[tuple[int, int, int, int]]:
        if not hasattr(self, "_orphans"):
            self._orphans = _orphan_chunks(self)
        return self._orphans

    def chain_rest(self, slot: int) -> int:
        b = self.r.t.blobs
        total, steps = 0, 0
        while slot and 0 < slot < len(b) and steps < 300:
            total += int(b["value_len"][slot])
            slot = int(b["next"][slot])
            steps += 1
        return total


def _plausible(ev: _Evidence, table: str, idx: int, f: str, c, raw: bytes) -> bool:
    """Does the record c (field f solved for) agree with the rest of the metadata?"""
    if table == "inode":
        k, mode = int(c["kind"]), int(c["mode"])
        if f == "kind":
            return 1 <= k <= KIND_KOBJ and S_IFMT_OF_KIND[k] == mode & 0o170000
        if f == "mode":
            return k in S_IFMT_OF_KIND and mode & 0o170000 == S_IFMT_OF_KIND[k] and mode < 0o200000
        if f == "flags":
            return int(c["flags"]) & ~FLAGS_KNOWN == 0
        if f == "nlink":
            return int(c["nlink"]) == int(ev.expect_nlink[idx])
        if f == "nblocks":
            return int(c["nblocks"]) == int(ev.sums[idx])
        if f == "parent":
            return int(c["parent"]) == (int(ev.up[idx]) if k == KIND_DIR else 0)
        if f == "next_cookie":
            return k != KIND_DIR and int(c["next_cookie"]) == 0
        if f == "size":
            if k == KIND_SYMLINK:
                return int(c["size"]) == ev.target_len.get(idx, -1)
            return k in SIZELESS and int(c["size"]) == 0
        return k != KIND_KOBJ and int(c[f]) == 0  # kernel-object fields
    if table == "extent":
        o, n, fb, s, fl = (int(c[x]) for x in ("owner", "count", "file_block", "start_block", "flags"))
        if not ev.data_inode(o) or fl & 0xFFFE:
            return False
        if fl & EXTENT_PACKED:
            c0 = fl >> 16
            p = ev.pack_of.get(s)
            return (int(ev.kind[o]) == KIND_REG and fb == 0 and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS
                    and p is not None and bool(ev.pack_bits(p)[c0:c0 + n].all()))
        g = ev.g
        return (n >= 1 and g.data_start_block <= s <= g.block_count - n
                and (fb + n <= ev.need(o) or bool(int(ev.flags[o]) & FLAG_TRUNCATING))
                and ev.marked(s, n) and not ev.claimed(s, n, idx) and not ev.file_overlap(o, fb, n, idx)
                and int(ev.sums[o]) - ev.own(o, idx) + n == int(ev.nblocks[o]))
    if table == "dirent":
        parent, ino, kind = int(c["parent"]), int(c["ino"]), int(c["kind"])
        if not (0 < parent < ev.n and ev.v.is_dir[parent] and 0 < ino < ev.n and ev.live[ino]
                and int(ev.kind[ino]) == kind):
            return False
        if f == "cookie":
            cookie = int(c["cookie"])
            others = ev.d_cookie[(ev.v.d_parent == parent) & (ev.v.dir_used != idx)]
            return 3 <= cookie < int(ev.v.inodes["next_cookie"][parent]) and cookie not in set(others.tolist())
        if f == "name_len":
            nl, name = int(c["name_len"]), raw[28:28 + 256]
            return 1 <= nl <= NAME_MAX and 0 not in name[:nl] and not any(name[nl:])
        return True
    if table == "blob":
        owner, kind, nxt = int(c["owner"]), int(c["kind"]), int(c["next"])
        nl, vl = int(c["name_len"]), int(c["value_len"])
        b = ev.r.t.blobs
        linker = int(ev.linked_by[idx]) if idx < len(ev.linked_by) else -1
        if not (0 < owner < ev.n and ev.live[owner]) or kind not in (BLOB_XATTR, BLOB_SYMLINK, BLOB_CONT):
            return False
        if (kind == BLOB_CONT) != (linker > 0) or (linker > 0 and int(b["owner"][linker]) != owner):
            return False
        if kind == BLOB_SYMLINK and int(ev.kind[owner]) != KIND_SYMLINK:
            return False
        if nxt and not (0 < nxt < ev.r.hwm["blob"] and int(b["kind"][nxt]) == BLOB_CONT
                        and int(b["owner"][nxt]) == owner and int(ev.linked_by[nxt]) in (-1, idx)):
            return False
        data = raw[20:20 + BLOB_DATA]
        if kind == BLOB_XATTR:
            if not (1 <= nl <= NAME_MAX and 0 not in data[:nl] and data[:nl].split(b".")[0] in XATTR_NAMESPACES):
                return False
        elif nl:
            return False
        if kind == BLOB_CONT:
            if not 1 <= vl <= BLOB_DATA:
                return False
            used = vl
        else:
            first = BLOB_DATA - nl
            if (nxt == 0 and vl > first) or (nxt and vl != first + ev.chain_rest(nxt)):
                return False
            used = nl + min(vl, first)
        return not any(data[used:])
    if table == "pack":
        blk = int(c["block"])
        if not ev.g.data_start_block <= blk < ev.g.block_count:
            return False
        if f == "block":
            return bool((ev.p_block == blk).any()) and ev.pack_of.get(blk, idx) == idx
        raw_bits = np.frombuffer(raw[16:80], np.uint8)
        return int(c["used"]) == int(np.unpackbits(raw_bits).sum())
    return False


def _zero_known(ev: _Evidence, table: str, raw: bytes) -> bytes | None:
    """The record with every byte that must be zero set to zero (None: nothing known)."""
    b = bytearray(raw)
    size = len(raw)
    spans: list[tuple[int, int]] = []
    if table == "inode":
        k = raw[0]
        spans = [(1, 2), (108, 124)]
        if k != KIND_DIR:
            spans.append((80, 96))  # parent, next_cookie
        if k != KIND_KOBJ:
            spans.append((96, 108))  # kernel-object fields
        if k in SIZELESS:
            spans.append((24, 40))  # size, nblocks
    elif table == "dirent":
        nl = int.from_bytes(raw[24:26], "little")
        if nl > NAME_MAX:
            return None
        spans = [(27, 28), (28 + nl, 284)]
    elif table == "blob":
        kind, nl = raw[12], int.from_bytes(raw[14:16], "little")
        vl = int.from_bytes(raw[16:20], "little")
        if nl > BLOB_DATA:
            return None
        used = vl if kind == BLOB_CONT else nl + min(vl, BLOB_DATA - nl)
        spans = [(13, 14), (20 + min(used, BLOB_DATA), 20 + BLOB_DATA)]
    elif table == "pack":
        spans = [(12, 16), (80, 124)]
    elif table == "extent" and int.from_bytes(raw[24:28], "little") & EXTENT_PACKED:
        spans = [(8, 16)]  # a packed extent's file block
    if not spans:
        return None
    for lo, hi in spans:
        b[lo:min(hi, size - 4)] = bytes(max(0, min(hi, size - 4) - lo))
    return bytes(b)


def _explanations(ev: _Evidence, table: str, idx: int, raw: bytes) -> dict[bytes, str]:
    """Each original record some explanation of the damage predicts -> the explanation."""
    n = len(raw) - 4
    body, stored = raw[:n], int.from_bytes(raw[n:], "little")
    syn = zlib.crc32(body) ^ stored
    out: dict[bytes, str] = {}
    if sum(((syn >> (8 * k)) & 0xFF) != 0 for k in range(4)) == 1:
        out[raw] = "only its checksum was damaged"
    s, pos, val = _byte_errors(n)
    k = int(np.searchsorted(s, syn))
    if k < len(s) and int(s[k]) == syn:
        fixed = bytearray(body)
        fixed[int(pos[k])] ^= int(val[k])
        out.setdefault(bytes(fixed) + raw[n:], f"byte {int(pos[k])} was damaged")
    z = _zero_known(ev, table, raw)
    if z is not None and z != raw and zlib.crc32(z[:n]) == stored:
        out.setdefault(z, "bytes that must be zero were damaged")
    dt = ev.r.tables[table].dtype
    for f in SOLVE_FIELDS[table]:
        fdt, off = dt.fields[f][:2]
        w = fdt.itemsize
        base = bytearray(body)
        base[off:off + w] = bytes(w)
        v = _solve(n, off, min(32, 8 * w), stored ^ zlib.crc32(base))
        if v is None:
            continue
        base[off:off + w] = v.to_bytes(w, "little")
        cand = bytes(base) + raw[n:]
        if cand != raw and _plausible(ev, table, idx, f, np.frombuffer(cand, dt)[0], cand):
            out.setdefault(cand, f"its {f} field was damaged")
    for cand, how in _derived(ev, table, idx, raw):
        if cand != raw and zlib.crc32(cand[:n]) == stored:
            out.setdefault(cand, how)
    if table == "pack":  # the chunk bitmap is the union of the packed extents in its block
        blk = int.from_bytes(raw[0:8], "little")
        bits = np.zeros(PACK_CHUNKS, bool)
        for c0, cnt in zip(ev.p_c0[ev.p_block == blk].tolist(), ev.p_count[ev.p_block == blk].tolist(),
                           strict=True):
            bits[c0:c0 + cnt] = True
        cand = bytearray(raw)
        cand[8:12] = int(bits.sum()).to_bytes(4, "little")
        cand[16:80] = np.packbits(bits, bitorder="little").tobytes()
        cand = bytes(cand)
        if cand != raw and zlib.crc32(cand[:n]) == stored:
            out.setdefault(cand, "its chunk bitmap was damaged")
    return out


def _with(raw: bytes, dt: np.dtype, **values: int) -> bytes:
    b = bytearray(raw)
    for f, v in values.items():
        fdt, off = dt.fields[f][:2]
        b[off:off + fdt.itemsize] = int(v).to_bytes(fdt.itemsize, "little")
    return bytes(b)


def _derived(ev: _Evidence, table: str, idx: int, raw: bytes) -> list[tuple[bytes, str]]:
    """Records that damage to several fields at once would have come from, built from
    what other records say is missing: a continuation nobody links (for an xattr head),
    a file short of blocks with a hole that size and blocks nobody owns (for an extent),
    a file short of a name (for a directory entry). Each is accepted only if the
    checksum then matches, so the guesses cost nothing when wrong."""
    dt = ev.r.tables[table].dtype
    out: list[tuple[bytes, str]] = []
    if table == "blob" and idx < len(ev.linked_by) and ev.linked_by[idx] < 0:  # a head (nobody links it)
        b, hwm = ev.r.t.blobs, ev.r.hwm["blob"]
        used = ev.v.blob_used
        strays = used[(b["kind"][used] == BLOB_CONT) & (ev.linked_by[used] < 0) & (used != idx)]
        n = len(raw) - 4
        stored = int.from_bytes(raw[n:], "little")
        for nxt in [0, *strays[:100].tolist()]:
            for kind in (BLOB_XATTR, BLOB_SYMLINK):
                # owner, next and kind damaged: the owner solved for, for each next and kind it could have
                base = _with(raw, dt, owner=0, next=nxt, kind=kind)
                o = _solve(n, 0, 32, stored ^ zlib.crc32(base[:n]))
                if not (o and o < ev.n and ev.live[o]):
                    continue
                if kind == BLOB_SYMLINK and int(ev.kind[o]) != KIND_SYMLINK:
                    continue
                if nxt and not (nxt < hwm and int(b["owner"][nxt]) == o):
                    continue
                out.append((_with(base, dt, owner=o), "its owner, next and kind fields were damaged: solved "
                                                      "for, with a continuation nobody links (or none)"))
    elif table == "extent":
        n = len(raw) - 4
        stored = int.from_bytes(raw[n:], "little")
        for o, fb, cnt in ev.short_files():
            # owner, count, file block and flags from the evidence; the start block solved for.
            base = EXTENT_HEAD.pack(o, cnt, fb, 0, 0) + raw[28:n]
            st = _solve(n, 16, 32, stored ^ zlib.crc32(base))
            if st is not None and ev.unowned(st, cnt):
                out.append((EXTENT_HEAD.pack(o, cnt, fb, st, 0) + raw[28:],
                            "several of its fields were damaged: rebuilt from the file's block count and size "
                            "and blocks no file owns"))
        for blk, c0, cnt, o in ev.orphan_chunks()[:2000]:
            out.append((EXTENT_HEAD.pack(o, cnt, 0, blk, EXTENT_PACKED | (c0 << 16)) + raw[28:],
                        "several of its fields were damaged: rebuilt from chunks no file claims and a small "
                        "file with no data"))
    elif table == "dirent":
        d = ev.r.t.dirents
        n = len(raw) - 4
        nlink = ev.v.inodes["nlink"].astype(np.int64)
        missing = ev.live & ~ev.v.is_dir & (ev.names < nlink)
        missing |= ev.v.is_dir & (ev.names == 0)
        missing[: ROOT_INO + 1] = False
        base = bytearray(raw[:n])
        base[0:16] = bytes(16)  # parent and ino unknown
        t0 = int.from_bytes(raw[n:], "little") ^ zlib.crc32(bytes(base))
        cands = np.flatnonzero(missing & (ev.kind == raw[26]))[:2000]
        for i, lin_i in zip(cands.tolist(), check.crc_of_field(n, 8, cands, 32).tolist(), strict=True):
            p = _solve(n, 0, 32, t0 ^ lin_i)
            if p is not None and 0 < p < ev.n and ev.v.is_dir[p]:
                out.append((_with(raw, dt, parent=p, ino=i), "its parent and inode fields were damaged: "
                                                             "solved for, with a file that lacks a name"))
        del d
    return out


def _bare(v: View, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of small regular files with a size but no extent at all, chunks each needs)."""
    has_ext = np.zeros(v.n, bool)
    has_ext[v.e_owner[v.e_ok]] = True
    size = v.inodes["size"].astype(np.int64)
    bare = v.live & (v.kind == KIND_REG) & ~has_ext & (size > 0) & (size <= SMALL_CHUNKS * chunk)
    return bare, -(-size // chunk)


def _chunk_runs(v: View, r: Repair) -> list[tuple[int, int, int]]:
    """(block, first chunk, count) of the runs of chunks a sound pack record marks and
    no packed extent claims."""
    ok = v.e_ok & v.e_packed
    out = []
    for slot in v.pack_used.tolist():
        if slot in r.suspect["pack"]:
            continue
        blk = int(v.packs["block"][slot])
        marked = np.unpackbits(np.frombuffer(v.packs["bitmap"][slot].tobytes(), np.uint8),
                               bitorder="little").astype(bool)
        sel = ok & (v.e_start == blk)
        for c0, n in zip(v.e_chunk0[sel].tolist(), v.e_count[sel].tolist(), strict=True):
            marked[c0:c0 + n] = False
        idx = np.flatnonzero(marked)
        if len(idx):
            for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
                out.append((blk, int(run[0]), len(run)))
    return out


def _orphan_chunks(ev: _Evidence) -> list[tuple[int, int, int, int]]:
    """(block, first chunk, count, candidate owner) for every pairing of unclaimed chunks
    with a small file that has no data (a packed extent lost them)."""
    bare, need = _bare(ev.v, ev.chunk)
    out: list[tuple[int, int, int, int]] = []
    for blk, c0, n in _chunk_runs(ev.v, ev.r)[:100]:
        for o in np.flatnonzero(bare & (need <= n)).tolist()[:100]:
            for start in range(c0, c0 + n - int(need[o]) + 1):
                out.append((blk, start, int(need[o]), o))
                if len(out) >= 2000:
                    return out
    return out


def restore_records(r: Repair, targets: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Restore what can be restored exactly; returns the records left unexplained."""
    left = set(targets)
    for _ in range(2):  # a second round: restored records are evidence for the rest
        if not left:
            break
        ev = _Evidence(r)
        done = set()
        for table, idx in sorted(left):
            found = _explanations(ev, table, idx, r.raw(table, idx))
            if len(found) == 1:
                ((cand, how),) = found.items()
                r.put(table, idx, cand)
                r.outcome[(table, idx)] = f"restored exactly from its checksum ({how})"
                done.add((table, idx))
            elif len(found) > 1:
                r.outcome[(table, idx)] = f"{len(found)} different repairs would explain the damage: none is trusted"
        left -= done
        if not done:
            break
    return left


# ------------------------------------------------------------------ records no explanation restores
def _suspects(r: Repair) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(records whose checksum fails, free-looking records that are not empty)."""
    bad, free = set(), set()
    for f in check.run_check("checksums", r.view()):
        for i in f.data.get("index", []):
            (bad if f.code == "checksum" else free).add((f.data["table"], int(i)))
    return bad, free


def _kind_from_names(ev: _Evidence, i: int) -> set[int]:
    v = ev.v
    m = (v.d_ino == i) & v.idx_ok(v.d_parent)
    m[m] &= v.is_dir[v.d_parent[m]]
    return set(v.dirents["kind"][v.dir_used[m]].tolist())


def _revive(r: Repair, ev: _Evidence, table: str, i: int) -> bool:
    """A record that looks free but is not empty: rebuild its key from what refers to it."""
    t, v = r.t, ev.v
    if table == "inode":
        kinds = _kind_from_names(ev, i)
        mode = int(t.inodes["mode"][i])
        if len(kinds) == 1:
            k = kinds.pop()
            if 1 <= k <= KIND_KOBJ and S_IFMT_OF_KIND[k] == mode & 0o170000:
                r.set("inode", i, kind=k)
                r.note(i, "unverified", "its inode record failed its checksum and looked free: its kind "
                                        "was taken from its directory entries")
                return True
        return False
    if table == "extent":
        e = t.extents
        n, fb, s, fl = (int(e[x][i]) for x in ("count", "file_block", "start_block", "flags"))
        g = ev.g
        cands: list[int] = []
        if fl & EXTENT_PACKED:
            c0, p = fl >> 16, ev.pack_of.get(s)
            owners = set(v.e_owner.tolist())
            if p is not None and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS and ev.pack_bits(p)[c0:c0 + n].all():
                size = ev.size.astype(np.int64)
                m = ev.live & (ev.kind == KIND_REG) & (size > (n - 1) * ev.chunk) & (size <= n * ev.chunk)
                cands = [o for o in np.flatnonzero(m).tolist() if o not in owners]
        elif not fl and n >= 1 and g.data_start_block <= s <= g.block_count - n and ev.marked(s, n) \
                and not ev.claimed(s, n, i):
            deficit = ev.nblocks.astype(np.int64) - ev.sums
            m = ev.live & np.isin(ev.kind, (KIND_REG, KIND_KOBJ)) & (deficit == n)
            cands = [o for o in np.flatnonzero(m).tolist()
                     if fb + n <= ev.need(o) and not ev.file_overlap(o, fb, n, i)]
        if len(cands) == 1:
            r.set("extent", i, owner=cands[0])
            r.note(cands[0], "unverified", f"its extent record {i} failed its checksum and looked free: "
                                           "its owner was found from the file's size and block count")
            return True
        return False
    if table == "dirent":
        ino, kind = int(t.dirents["ino"][i]), int(t.dirents["kind"][i])
        space = _namespace_ino(r)
        if 0 < ino < ev.n and ev.live[ino] and int(ev.kind[ino]) == KIND_KOBJ == kind and space:
            r.set("dirent", i, parent=space)  # a kernel object is named in /.kernel and nowhere else
            r.note(ino, "unverified", "its directory entry failed its checksum and looked free: put back "
                                      "in /.kernel, where kernel objects live")
            return True
        if 0 < ino < ev.n and ev.live[ino] and int(ev.kind[ino]) == KIND_DIR == kind and ev.names[ino] == 0:
            p = int(t.inodes["parent"][ino])
            if 0 < p < ev.n and v.is_dir[p]:
                r.set("dirent", i, parent=p)
                r.note(ino, "unverified", "its directory entry failed its checksum and looked free: put back "
                                          "in the directory its '..' names")
                return True
        return False
    if table == "blob":
        b = t.blobs
        kind, nxt = int(b["kind"][i]), int(b["next"][i])
        owner = 0
        if kind == BLOB_CONT and ev.linked_by[i] > 0:
            owner = int(b["owner"][ev.linked_by[i]])
        elif kind in (BLOB_XATTR, BLOB_SYMLINK) and 0 < nxt < r.hwm["blob"] and int(b["kind"][nxt]) == BLOB_CONT:
            owner = int(b["owner"][nxt])
        if 0 < owner < ev.n and ev.live[owner]:
            r.set("blob", i, owner=owner)
            r.note(owner, "unverified", f"its xattr or symlink record {i} failed its checksum and looked free: "
                                        "its owner was taken from the rest of its value")
            return True
        return False
    if table == "pack":
        orphans = sorted(set(ev.p_block.tolist()) - set(ev.pack_of))
        if len(orphans) == 1:
            r.set("pack", i, block=orphans[0])
            return True
    return False


def _lost_free(r: Repair, table: str, i: int) -> str:
    """What a free-looking damaged record held, for the report, before it is cleared."""
    t = r.t
    if table == "blob" and int(t.blobs["kind"][i]) == BLOB_XATTR:
        nl = min(int(t.blobs["name_len"][i]), NAME_MAX)
        name = t.blobs["data"][i].tobytes()[:nl]
        return f"cleared: it held an xattr {_decode(name)!r} whose file cannot be told (its owner was damaged)"
    if table == "dirent":
        ino = int(t.dirents["ino"][i])
        name = _decode(bytes(t.dirents["name"][i])[:NAME_MAX])
        if 0 < ino < len(t.inodes) and int(t.inodes["kind"][ino]):
            r.note(ino, "name-removed", f"its directory entry {name!r} failed its checksum and lost the "
                                        "directory it is in: removed")
        return f"cleared: it named {name!r} (inode {ino}) in a directory that cannot be told"
    if table == "extent":
        return (f"cleared: it mapped {int(t.extents['count'][i])} block(s) for a file that cannot be told "
                "(the file's block count names it)")
    return "cleared"


def _triage(r: Repair, free_left: set[tuple[str, int]], bad_left: set[tuple[str, int]]) -> None:
    """Records that failed their checksum and that no explanation restores are trusted
    only as far as everything that refers to them agrees (docs/FSCK.md); every file
    such a record belongs to is named in the report."""
    for table, i in sorted(free_left):
        ev = _Evidence(r)
        if _revive(r, ev, table, i):
            r.suspect[table].add(i)
            r.outcome[(table, i)] = "its key field was lost: rebuilt from the records that refer to it"
        else:
            r.outcome[(table, i)] = _lost_free(r, table, i)
            r.zero(table, i, keep_generation=table == "inode")
    for table, i in bad_left:
        r.suspect[table].add(i)
    ev = _Evidence(r)
    for j in sorted(r.suspect["extent"]):  # (the evidence is rebuilt only after a change)
        if _triage_extent(r, ev, j):
            ev = _Evidence(r)
    ev = _Evidence(r)
    for i in sorted(r.suspect["inode"]):
        _triage_inode(r, ev, i)
    ev = _Evidence(r)
    for k in sorted(r.suspect["dirent"]):
        if _triage_dirent(r, ev, k):
            ev = _Evidence(r)
    for b in sorted(r.suspect["blob"]):
        _triage_blob(r, ev, b)
    for p in sorted(r.suspect["pack"]):
        _triage_pack(r, _Evidence(r), p)
    for table in TABLE_NAMES:  # what stays is resealed: its contents were judged
        key = check.KEY_FIELD[table]
        for i in sorted(r.suspect[table]):
            if r.tables[table][key][i]:
                r.save(table, i)
                r.outcome.setdefault((table, i), "kept: it agrees with everything that refers to it")


def _triage_extent(r: Repair, ev: _Evidence, j: int) -> bool:
    """Returns whether it dropped the extent."""
    e = r.t.extents
    o, n, fb, s, fl = (int(e[x][j]) for x in ("owner", "count", "file_block", "start_block", "flags"))
    if not o:
        return False
    g = ev.g
    sound = ev.b_slot[~np.isin(ev.b_slot, list(r.suspect["extent"]))]
    packed = bool(fl & EXTENT_PACKED)
    why = None
    if not ev.data_inode(o):
        why = "it names no file that can hold data"
    elif packed:
        c0, p = fl >> 16, ev.pack_of.get(s)
        others = (ev.p_block == s) & (ev.p_slot != j) & ~np.isin(ev.p_slot, list(r.suspect["extent"]))
        if not (int(ev.kind[o]) == KIND_REG and fb == 0 and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS):
            why = "its fields are invalid"
        elif p is None:
            why = "its block is not a pack block"
        elif p not in r.suspect["pack"] and not ev.pack_bits(p)[c0:c0 + n].all():
            why = "its pack block's chunk bitmap does not hold its chunks"
        elif ((ev.p_c0[others] < c0 + n) & (ev.p_c0[others] + ev.p_count[others] > c0)).any():
            why = "another file's chunks overlap it"
    elif fl:
        why = "its flags are invalid"
    elif not (n >= 1 and g.data_start_block <= s <= g.block_count - n):
        why = "it lies outside the data area"
    elif not ev.marked(s, n):
        why = "the allocation bitmap marks its blocks free"
    elif ev.claimed(s, n, j, among=sound):
        why = "another extent owns its blocks"
    elif o not in r.suspect["inode"]:
        if fb + n > ev.need(o) and not int(ev.flags[o]) & FLAG_TRUNCATING:
            why = "it maps past the file's size"
        elif ev.file_overlap(o, fb, n, j):
            why = "it overlaps another extent of the file"
        elif int(ev.sums[o]) - ev.own(o, j) + n != int(ev.nblocks[o]):
            why = "the file's block count does not count it"
    unit = "chunk" if packed else "block"
    if why:
        r.lost_hints.append((o, s, n, fb, fl))
        r.zero("extent", j)
        r.suspect["extent"].discard(j)
        r.outcome[("extent", j)] = f"dropped: {why}"
        if ev.data_inode(o):
            r.note(o, "lost-blocks", f"its extent record {j} ({n} {unit}(s) at file block {fb}) failed its "
                                     f"checksum and {why}: dropped, those bytes now read as zeros")
        return True
    r.note(o, "unverified", f"its extent record {j} failed its checksum; kept: it agrees with the "
                            "allocation bitmap and the file's size and block count")
    return False


def _namespace_ino(r: Repair) -> int:
    """The /.kernel directory (root's pinned entry named .kernel), or 0."""
    v = r.view()
    slots = v.dir_used[v.d_linked & (v.d_parent == ROOT_INO)]
    for slot in slots[v.dirents["name"][slots] == b".kernel"].tolist():
        ino = int(v.dirents["ino"][slot])
        if v.is_dir[ino] and int(v.inodes["flags"][ino]) & FLAG_PINNED:
            return ino
    return 0


def _is_namespace(ev: _Evidence, i: int) -> bool:
    """Is inode i the /.kernel directory (root's entry named .kernel)?"""
    v = ev.v
    m = (v.d_ino == i) & (v.d_parent == ROOT_INO)
    return bool((v.dirents["name"][v.dir_used[m]] == b".kernel").any())


def _triage_inode(r: Repair, ev: _Evidence, i: int) -> None:
    ino = r.t.inodes
    k, mode = int(ino["kind"][i]), int(ino["mode"][i])
    fmt = mode & 0o170000
    if not (k in S_IFMT_OF_KIND and S_IFMT_OF_KIND[k] == fmt):
        named = _kind_from_names(ev, i)
        choice = None
        if len(named) == 1:
            x = next(iter(named))
            if x in S_IFMT_OF_KIND and (S_IFMT_OF_KIND[x] == fmt or x == k):
                choice = x
        if choice is None and fmt in KIND_OF_S_IFMT and named <= {KIND_OF_S_IFMT[fmt]}:
            choice = KIND_OF_S_IFMT[fmt]
        if choice is not None and choice != KIND_KOBJ:
            r.set("inode", i, kind=choice, mode=S_IFMT_OF_KIND[choice] | (mode & 0o7777))
            k = choice
            r.note(i, "unverified", f"its kind and mode disagreed: it is a {KIND_NAMES[choice]}, as its "
                                    "directory entries and mode say")
    flags = int(ino["flags"][i])
    clear = flags & FLAG_TRUNCATING  # a damaged flag must not free the file's blocks
    if flags & FLAG_PINNED and k != KIND_KOBJ and not (k == KIND_DIR and _is_namespace(ev, i)):
        clear |= FLAG_PINNED
    if clear:
        r.set("inode", i, flags=flags & ~clear)
    # What the format fixes for the kernel namespace and its objects (KERNEL-OBJECTS.md).
    namespace = k == KIND_DIR and _is_namespace(ev, i) and int(ino["flags"][i]) & FLAG_PINNED
    if namespace and (int(ino["uid"][i]) or mode & 0o7777 != 0o700):
        r.set("inode", i, uid=0, mode=0o040700)
        r.note(i, "mode", "the kernel namespace is root's with mode 0700: set so")
    if k == KIND_KOBJ and not int(ino["flags"][i]) & FLAG_ORPHAN:
        r.set("inode", i, uid=0, flags=int(ino["flags"][i]) | FLAG_PINNED)
        run = int(ev.b_count[ev.b_owner == i].sum())
        if run and int(ino["size"][i]) > run * ev.bs:
            r.set("inode", i, size=run * ev.bs)
            r.note(i, "size", f"a kernel object's payload lies in its one run of blocks: its size "
                              f"{int(ino['size'][i])} was past it, set to {run * ev.bs}")
    if k in (KIND_REG, KIND_KOBJ):
        mine = ev.b_owner == i
        last = int((ev.b_fb[mine] + ev.b_count[mine]).max()) if mine.any() else 0
        chunks = int(ev.p_count[ev.p_owner == i].sum())
        size = int(ino["size"][i])
        new = None
        if last > ev.need(i):
            new = last * ev.bs
        elif size > max_file_size(ev.bs):
            new = max(last * ev.bs, chunks * ev.chunk)
        if new is not None:
            r.set("inode", i, size=new)
            r.note(i, "size", f"its size {size} disagreed with its blocks: set to {new} to keep them (what "
                              "lies past its true end reads as it is on the device)")
    r.note(i, "unverified", "its inode record failed its checksum; kept: its owner, permissions and "
                            "times cannot be checked against anything else")


def _triage_dirent(r: Repair, ev: _Evidence, k: int) -> bool:
    """Returns whether it changed the tables."""
    d, v = r.t.dirents, ev.v
    parent, ino = int(d["parent"][k]), int(d["ino"][k])
    if not (0 < ino < ev.n and ev.live[ino] and 0 < parent < ev.n and v.is_dir[parent]):
        return False  # names nothing, or lies nowhere: the entry checks drop it and say so
    path = r.slot_path(k)
    if ino not in r.suspect["inode"]:
        if int(ev.kind[ino]) != KIND_DIR and ev.names[ino] > int(r.t.inodes["nlink"][ino]):
            r.zero("dirent", k)
            r.suspect["dirent"].discard(k)
            r.outcome[("dirent", k)] = "dropped: the file it names does not count it"
            r.note(ino, "name-removed", f"its entry {path} failed its checksum and its link count does "
                                        "not count that name: removed")
            return True
        if int(ev.kind[ino]) == KIND_DIR:
            p = int(r.t.inodes["parent"][ino])
            if p != parent:
                twins = v.dir_used[(v.d_ino == ino) & (v.d_parent == p) & (v.dir_used != k)]
                if len(twins):
                    r.zero("dirent", k)
                    r.suspect["dirent"].discard(k)
                    r.note(ino, "name-removed", f"its extra entry {path} failed its checksum: removed")
                    return True
                if 0 < p < ev.n and v.is_dir[p] and bytes(d["name"][k]) not in r.names_in(p):
                    r.set("dirent", k, parent=p)
                    r.note(ino, "moved", f"its entry {path} failed its checksum: put back in {r.was(p)}, "
                                         "the directory its '..' names")
                    return True
    r.note(ino, "unverified", f"its directory entry {path} failed its checksum; kept: a name and its "
                              "place cannot be checked against anything else")
    return False


def _triage_blob(r: Repair, ev: _Evidence, b: int) -> None:
    bl = r.t.blobs
    head, steps = b, 0
    while int(bl["kind"][head]) == BLOB_CONT and ev.linked_by[head] > 0 and steps < 300:
        head, steps = int(ev.linked_by[head]), steps + 1
    owner = int(bl["owner"][head])
    if not (0 < owner < ev.n and ev.live[owner]) and head == b and int(bl["kind"][b]) in (BLOB_XATTR, BLOB_SYMLINK):
        # Its owner is gone: an orphaned continuation chain of the length its value needs
        # says whose it was (the chain's records carry their owner too).
        used = ev.v.blob_used
        strays = set(used[(bl["kind"][used] == BLOB_CONT) & (ev.linked_by[used] < 0)].tolist())
        nxt = int(bl["next"][b])
        if 0 < nxt < r.hwm["blob"] and int(bl["kind"][nxt]) == BLOB_CONT and ev.linked_by[nxt] == b:
            strays.add(nxt)  # the chain it still links
        nl = min(int(bl["name_len"][b]), BLOB_DATA)
        fits = [c for c in sorted(strays) if 0 < int(bl["owner"][c]) < ev.n and ev.live[int(bl["owner"][c])]
                and int(bl["value_len"][b]) == BLOB_DATA - nl + ev.chain_rest(c)]
        if len(fits) != 1:
            return  # the blob checks free it; its file cannot be told
        owner = int(bl["owner"][fits[0]])
        r.set("blob", b, owner=owner, next=fits[0])
        r.outcome[("blob", b)] = "its owner was damaged: taken from the rest of its value"

    if int(bl["kind"][head]) == BLOB_SYMLINK:
        what = "symlink target"
    else:
        nl = min(int(bl["name_len"][head]), NAME_MAX)
        what = f"xattr {_decode(bl['data'][head].tobytes()[:nl])!r}"
    r.note(owner, "unverified", f"its {what} (record {b}) failed its checksum; kept as found: nothing "
                                "else records it")


def _triage_pack(r: Repair, ev: _Evidence, p: int) -> None:
    blk = int(r.t.packs["block"][p])
    if blk and (ev.p_block == blk).any():
        return  # its files agree with its block; its bitmap is rebuilt from them
    orphans = sorted(set(ev.p_block.tolist()) - set(ev.pack_of))
    if len(orphans) == 1:
        r.set("pack", p, block=orphans[0])
        r.outcome[("pack", p)] = "its block was taken from the packed extents that point at it"


# ------------------------------------------------------------------ fixes
def fix_checksums(r: Repair, fs: list[Finding]) -> None:
    """Restore damaged records exactly where the checksum allows it, judge the rest."""
    bad, free = _suspects(r)
    left = restore_records(r, bad | free)
    r.snapshot()  # the names as the damage left them, with what was restored
    _triage(r, left & free, left - free)


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
    r.note(ROOT_INO, "recreated", "the root directory was missing or not a directory: made afresh "
                                  "(mode 0755, root's)")


CLEAR_WHY = {"bad-kind": "it has an unknown kind", "no-target": "a symlink without a target",
             "bad-target": "a symlink whose target has an impossible length",
             "orphan": "an orphan (unlinked while open), freed as mount would"}


def fix_clear_inode(r: Repair, fs: list[Finding]) -> None:
    why = {ino: CLEAR_WHY.get(f.code, f.code) for f in fs for ino in f.data.get("ino", [])}
    for ino in _items(fs, "ino"):
        if ino != ROOT_INO and r.t.inodes["kind"][ino]:
            r.note(ino, "removed", f"removed: {why[ino]}")
            r.free_inode(ino)


def fix_mode(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        kind = int(r.t.inodes["kind"][ino])
        mode = int(r.t.inodes["mode"][ino])
        new = S_IFMT_OF_KIND[kind] | (mode & 0o7777)
        r.set("inode", ino, mode=new)
        r.note(ino, "mode", f"its mode {mode:o} did not match its kind ({KIND_NAMES[kind]}): now {new:o}")


def fix_flags(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & FLAGS_KNOWN)


def fix_attr(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, attr=int(r.t.inodes["attr"][ino]) & ATTR_KNOWN)


def fix_named_orphan(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_ORPHAN)


DROP_WHY = {"bad-extent": "it has a bad owner kind, length or place", "file-overlap":
            "it overlaps another extent of the file", "bad-owned": "it holds a bad block",
            "packed-mixed": "it is a packed extent beside other extents", "overlap": "another file owns its blocks",
            "packed-nowhere": "it lies in a block that is not a pack block",
            "chunk-twice": "another file owns its chunks"}


def _drop_extent(r: Repair, slot: int, why: str) -> None:
    e = r.t.extents
    o = int(e["owner"][slot])
    if not o:
        return
    n, fb = int(e["count"][slot]), int(e["file_block"][slot])
    unit = "chunk" if int(e["flags"][slot]) & EXTENT_PACKED else "block"
    if 0 < o < r.hwm["inode"] and int(r.t.inodes["kind"][o]):
        r.note(o, "lost-blocks", f"its extent {slot} ({n} {unit}(s) at file block {fb}) was dropped: {why}; "
                                 "those bytes now read as zeros")
    r.zero("extent", slot)


def fix_drop_extents(r: Repair, fs: list[Finding]) -> None:
    why = {i: DROP_WHY.get(f.code, f.code) for f in fs for i in f.data.get("index", [])}
    for slot in _items(fs, "index"):
        _drop_extent(r, slot, why[slot])


def _free_block_mask(r: Repair, v: View) -> np.ndarray:
    """Blocks a clone may take: unowned, marked free, not bad, in the data area."""
    g = r.sb.geometry
    owners = check.block_owners(v)
    bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    free = (owners == 0) & ~bits & ~bad
    free[: g.data_start_block] = False
    return free


def _take_runs(free: np.ndarray, n: int) -> list[tuple[int, int]] | None:
    """n free blocks as (start, length) runs, fewest runs first; marks them taken."""
    blocks = np.flatnonzero(free)
    if len(blocks) < n:
        return None
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    runs = sorted(((int(r[0]), len(r)) for r in np.split(blocks, breaks)), key=lambda x: -x[1])
    out, need = [], n
    for start, length in runs:
        take = min(length, need)
        out.append((start, take))
        free[start:start + take] = False
        need -= take
        if not need:
            break
    return out


def _copy(r: Repair, dst: int, src: int, length: int) -> None:
    """Copy data bytes (not journaled: the destination is free until the extent that
    points at it commits, so a crash leaves only garbage in free blocks)."""
    u8 = np.frombuffer(r.buf, np.uint8)
    u8[dst:dst + length] = u8[src:src + length]


def _clone_extent(r: Repair, slot: int, free: np.ndarray) -> bool:
    e = r.t.extents
    n, fb, s = int(e["count"][slot]), int(e["file_block"][slot]), int(e["start_block"][slot])
    owner = int(e["owner"][slot])
    runs = _take_runs(free, n)
    if runs is None:
        return False
    bs = r.sb.geometry.block_size
    k = 0
    for i, (start, length) in enumerate(runs):
        _copy(r, start * bs, (s + k) * bs, length * bs)
        if i == 0:
            r.set("extent", slot, start_block=start, count=length)
        else:
            new = r.alloc("extent")
            r.save("extent", new)
            e[new] = (owner, length, fb + k, start, 0, 0)
        k += length
    return True


def _uid(r: Repair, ino: int) -> int:
    return int(r.t.inodes["uid"][ino])


def _settle_shared(r: Repair, later: int, partners: set[int], cloned: bool, unit: str,
                   vouched: bool = False) -> None:
    """Name both sides of a doubly claimed block or chunk; quarantine them when the
    copy went to a file of another owner, or when no copy could be made. vouched: the
    partners' claim is a pack block, which its pack record, chunk bitmap and packed
    extents all confirm: only the later claim is then in doubt."""
    inodes = r.t.inodes
    kobj = {o for o in partners | {later} if int(inodes["kind"][o]) == KIND_KOBJ}
    others = ", ".join(sorted(r.was(p) for p in partners)) or "another of its own extents"
    if cloned:
        r.note(later, "cloned", f"it shared {unit}s with {others}: it was given its own copy of them; "
                                "fsck cannot tell which file the data belonged to")
        for p in partners:
            r.note(p, "shared-blocks", f"it shared {unit}s with {r.was(later)}, which was given its own copy; "
                                       "fsck cannot tell which file the data belonged to")
    else:
        r.note(later, "lost-blocks", f"it shared {unit}s with {others} and no free space was left for a "
                                     "copy: its claim was dropped, those bytes now read as zeros")
        for p in partners:
            r.note(p, "shared-blocks", f"it shared {unit}s with {r.was(later)}, whose claim was dropped")
    foreign = any(_uid(r, p) != _uid(r, later) for p in partners)
    if (foreign or not cloned) and not kobj:
        why = ("it shared data with a file of another owner" if foreign
               else "it shared data with another file and no copy could be made")
        for o in ({later} if vouched else partners | {later}):
            r.quarantine(o, f"taken out of its directories for the administrator to inspect: {why}")


def fix_overlap(r: Repair, fs: list[Finding]) -> None:
    """Two claims on one block: neither file silently gets the other's data. The later
    claim (block order, then slot order) gets its own copy of the blocks; a pack block
    keeps its blocks and the extent over it is copied. docs/FSCK.md has the rules."""
    v = r.view()
    fs = [f for f in check.run_check("extent-overlap", v) if f.code == "overlap"]  # ("double" says only blocks)
    free = _free_block_mask(r, v)
    ok = v.e_blk
    slots, starts, counts, owners = v.ext_used[ok], v.e_start[ok], v.e_count[ok], v.e_owner[ok]
    pb = v.packs["block"][v.pack_used].astype(np.int64)
    done: set[int] = set()
    for f in fs:
        for c in f.data.get("index", []):
            if c < 0:  # a pack block overlapping an extent: copy the extent instead
                blk = int(r.t.packs["block"][-c])
                hit = slots[(starts <= blk) & (starts + counts > blk)]
                pairs = [(int(x), {int(o) for o in v.e_owner[v.e_packed & (v.e_start == blk)].tolist()}, True)
                         for x in hit.tolist()]
            else:
                k = np.flatnonzero(slots == c)
                if not len(k):
                    continue
                s, n = int(starts[k[0]]), int(counts[k[0]])
                m = (starts < s + n) & (starts + counts > s) & (slots != c)
                partners = set(owners[m].tolist())
                packed = set()
                for blk in pb[(pb >= s) & (pb < s + n)].tolist():
                    packed |= set(v.e_owner[v.e_packed & (v.e_start == blk)].tolist())
                pairs = [(int(c), {int(o) for o in partners | packed}, not partners)]
            for slot, partners, vouched in pairs:
                if slot in done or not r.t.extents["owner"][slot]:
                    continue
                done.add(slot)
                later = int(r.t.extents["owner"][slot])
                partners.discard(later)
                cloned = _clone_extent(r, slot, free)
                if not cloned:
                    r.zero("extent", slot)
                _settle_shared(r, later, partners, cloned, "block", vouched)


def fix_trim(r: Repair, fs: list[Finding]) -> None:
    """Free the blocks past what each file's size needs (finishes an interrupted truncate)."""
    v = r.view()
    bs = r.sb.geometry.block_size
    for ino in _items(fs, "ino"):
        size = int(r.t.inodes["size"][ino])
        keep = -(-size // bs)
        freed = 0
        for k in np.flatnonzero((v.e_owner == ino) & v.e_blk).tolist():
            slot, fb, cnt = int(v.ext_used[k]), int(v.e_fb[k]), int(v.e_count[k])
            if fb >= keep:
                r.zero("extent", slot)
                freed += cnt
            elif fb + cnt > keep:
                r.set("extent", slot, count=keep - fb)
                freed += fb + cnt - keep
        nblocks = int(r.t.inodes["nblocks"][ino])
        r.set("inode", ino, flags=int(r.t.inodes["flags"][ino]) & ~FLAG_TRUNCATING,
              nblocks=max(0, nblocks - freed))


def fix_nblocks(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    for ino in _items(fs, "ino"):
        if not v.live[ino]:
            continue
        have = int(r.t.inodes["nblocks"][ino])
        if have > sums[ino] and ino not in r.suspect["inode"] and v.has_data[ino]:
            r.note(ino, "lost-blocks", f"its block count says {have} block(s) but its extents map "
                                       f"{int(sums[ino])}: the rest were lost with their extent records")
        r.set("inode", ino, nblocks=int(sums[ino]))


def fix_size_zero(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "ino"):
        r.set("inode", ino, size=0)


def fix_size_limit(r: Repair, fs: list[Finding]) -> None:
    """A size past the largest file size becomes that size (bytes past it cannot be
    addressed by any file offset; extents past it are dropped by their own check)."""
    limit = max_file_size(r.sb.geometry.block_size)
    for ino in _items(fs, "ino"):
        r.note(ino, "size", f"its size {int(r.t.inodes['size'][ino])} was past the largest file size: "
                            f"set to {limit}")
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
        d = r.t.dirents
        if not d["parent"][slot]:
            continue
        ino = int(d["ino"][slot])
        live = 0 < ino < r.hwm["inode"] and int(r.t.inodes["kind"][ino]) != 0
        path = r.before.of_slot(slot) if r.before else None
        if live:
            r.note(ino, "name-removed", f"its entry {r.slot_path(slot)} was removed: its directory is missing")
        elif path is not None:  # a name a user could see vanishes (a garbage entry nowhere is no file)
            r.note(ino, "removed", f"its entry {display(path)} was removed: it named inode {ino}, "
                                   "which does not exist")
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
        if cookie + 1 >= int(COOKIE_END):
            _renumber_cookies(r, parent)
            continue
        r.set("dirent", slot, cookie=cookie)
        r.set("inode", parent, next_cookie=cookie + 1)


def fix_next_cookie(r: Repair, fs: list[Finding]) -> None:
    for ino in _items(fs, "index"):
        _renumber_cookies(r, ino)


def _renumber_cookies(r: Repair, parent: int) -> None:
    """Give a directory's entries the cookies 3, 4, ... in their old order: a damaged
    counter near 2^63 would otherwise hand out offsets readdir cannot carry. Offline,
    no directory stream is open, so nothing can notice the new numbers."""
    v = r.view()
    kids = v.dir_used[v.d_parent == parent]
    order = kids[np.argsort(r.t.dirents["cookie"][kids], kind="stable")]
    for k, slot in enumerate(order.tolist()):
        r.set("dirent", slot, cookie=3 + k)
    r.set("inode", parent, next_cookie=3 + len(order))


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
        old = r.slot_path(slot)
        r.set("dirent", slot, name=name, name_len=len(name))
        r.note(ino, "renamed", f"its name {old} was invalid or taken twice: renamed {_decode(name)!r}")


def _blob_what(r: Repair, slot: int) -> str:
    b = r.t.blobs
    if int(b["kind"][slot]) == BLOB_XATTR:
        nl = min(int(b["name_len"][slot]), NAME_MAX)
        return f"xattr {_decode(b['data'][slot].tobytes()[:nl])!r}"
    return "symlink target" if int(b["kind"][slot]) == 2 else "xattr or symlink record"


def _blob_owner_live(r: Repair, slot: int) -> int:
    o = int(r.t.blobs["owner"][slot])
    return o if 0 < o < r.hwm["inode"] and int(r.t.inodes["kind"][o]) else 0


def fix_free_blobs(r: Repair, fs: list[Finding]) -> None:
    for slot in _items(fs, "index"):
        if not r.t.blobs["owner"][slot]:
            continue
        o = _blob_owner_live(r, slot)
        if o and int(r.t.blobs["kind"][slot]) != BLOB_CONT:
            r.note(o, "xattr-removed", f"its {_blob_what(r, slot)} (record {slot}) was malformed: removed")
        elif o:  # part of a value whose first record is gone: its file lost an xattr or its target
            what = "target-removed" if int(r.t.inodes["kind"][o]) == KIND_SYMLINK else "xattr-removed"
            r.note(o, what, "part of one of its xattrs or of its target lost the record that starts it: removed")
        r.zero("blob", slot)


def fix_free_chains(r: Repair, fs: list[Finding]) -> None:
    for f in fs:
        for slot in f.data.get("index", []):
            if not r.t.blobs["owner"][slot]:
                continue
            o = _blob_owner_live(r, slot)
            # A symlink record on an inode that is not a symlink is not part of any file.
            if o and f.code != "stray-target":
                what = "target-removed" if int(r.t.blobs["kind"][slot]) == 2 else "xattr-removed"
                how = {"extra-target": "a second target", "bad-xattr-name": "its name is no xattr name (damaged)",
                       "dup-xattr": "the file has another xattr of that name"}.get(f.code, "its value chain was broken")
                r.note(o, what, f"its {_blob_what(r, slot)} (record {slot}) was removed: {how}")
            r.free_chain(slot)


def fix_dir_names(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    up = check.dir_name_parent(v)
    for ino in _items(fs, "ino"):
        slots = v.dir_used[v.d_linked & (v.d_ino == ino)]
        keep = [s for s in slots.tolist() if int(r.t.dirents["parent"][s]) == up[ino]][:1] or slots[:1].tolist()
        for s in slots.tolist():
            if s not in keep:
                r.note(ino, "name-removed", f"a directory has one name: its extra entry {r.slot_path(s)} "
                                            "was removed")
                r.zero("dirent", s)


def fix_root_named(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    for s in v.dir_used[v.d_ino == ROOT_INO].tolist():
        r.note(ROOT_INO, "name-removed", f"an entry {r.slot_path(s)} named the root: removed")
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
    space = _namespace_ino(r)
    if space:  # kernel objects are named in /.kernel and nowhere else: they go back there
        for ino in [i for i in tops if v.kind[i] == KIND_KOBJ]:
            tops.remove(ino)
            taken = r.names_in(space)
            name, k = b"#%d" % ino, 1
            while name in taken:
                name, k = b"#%d.%d" % (ino, k), k + 1
            r.add_dirent(space, name, ino)
            r.note(ino, "moved", f"it was not reachable from the root: now /.kernel/{_decode(name)}")
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
        below = " (with everything under it)" if v.is_dir[ino] else ""
        r.note(ino, "moved", f"it was not reachable from the root: now /lost+found/{_decode(name)}{below}")


def fix_nlink(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    expect = check.expected_nlink(v)
    for ino in np.flatnonzero(v.live & (v.inodes["nlink"].astype(np.int64) != expect)).tolist():
        have = int(r.t.inodes["nlink"][ino])
        if not v.is_dir[ino] and ino not in r.suspect["inode"] and not v.orphan[ino]:
            # The count is part of a sound record: a name it counts was lost, or one appeared.
            r.note(ino, "names", f"its link count said {have} name(s) but {int(expect[ino])} were found: "
                                 "a name was lost or the count was wrong")
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
    extents are then rebuilt a pack record, or dropped, as lying nowhere)."""
    for slot in _items(fs, "index"):
        if r.t.packs["block"][slot]:
            r.zero("pack", slot)


def fix_packed_nowhere(r: Repair, fs: list[Finding]) -> None:
    """Packed extents in a block with no pack record: when nothing else owns that block,
    the pack record is rebuilt (its chunk bitmap from the extents); otherwise they go."""
    v = r.view()
    g = r.sb.geometry
    owners = check.block_owners(v)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    e = r.t.extents
    by_block: dict[int, list[int]] = {}
    for slot in _items(fs, "index"):
        if e["owner"][slot]:
            by_block.setdefault(int(e["start_block"][slot]), []).append(slot)
    for blk, slots in sorted(by_block.items()):
        if g.data_start_block <= blk < g.block_count and owners[blk] == 0 and not bad[blk]:
            p = r.alloc("pack")
            r.save("pack", p)
            r.t.packs[p] = (blk, 0, 0, bytes(64), bytes(44), 0)  # the bitmap is rebuilt from the extents
            owners[blk] = 1
        else:
            for slot in slots:
                _drop_extent(r, slot, DROP_WHY["packed-nowhere"])


def _chunk_room(v: View, n: int, avoid: int) -> tuple[int, int] | None:
    """A pack block with n chunks in a row that are free by its packed extents and by
    its chunk bitmap (a chunk only the bitmap marks may hold a file's lost data)."""
    ok = v.e_ok & v.e_packed & (v.ext_used != avoid)
    for slot, blk in sorted(zip(v.pack_used.tolist(), v.packs["block"][v.pack_used].tolist(), strict=True),
                            key=lambda x: x[1]):
        used = np.zeros(PACK_CHUNKS + 1, bool)
        used[:PACK_CHUNKS] = np.unpackbits(np.frombuffer(v.packs["bitmap"][slot].tobytes(), np.uint8),
                                           bitorder="little").astype(bool)
        used[PACK_CHUNKS] = True
        sel = ok & (v.e_start == blk)
        for c0, cnt in zip(v.e_chunk0[sel].tolist(), v.e_count[sel].tolist(), strict=True):
            used[c0:c0 + cnt] = True
        run = 0
        for c in range(PACK_CHUNKS):
            run = 0 if used[c] else run + 1
            if run == n:
                return int(blk), c - n + 1
    return None


def fix_chunk_twice(r: Repair, fs: list[Finding]) -> None:
    """Two packed extents claim one chunk: the later one is given a copy (in free chunks
    of a pack block, or a new pack block), as for whole blocks (fix_overlap)."""
    g = r.sb.geometry
    chunk = g.block_size // PACK_CHUNKS
    e = r.t.extents
    for slot in _items(fs, "index"):
        if not e["owner"][slot]:
            continue
        v = r.view()
        later = int(e["owner"][slot])
        blk, n, c0 = int(e["start_block"][slot]), int(e["count"][slot]), int(e["flags"][slot]) >> 16
        sel = v.e_ok & v.e_packed & (v.e_start == blk) & (v.ext_used != slot) \
            & (v.e_chunk0 < c0 + n) & (v.e_chunk0 + v.e_count > c0)
        partners = {int(o) for o in v.e_owner[sel].tolist()} - {later}
        room = _chunk_room(v, n, slot)
        if room is None:
            runs = _take_runs(_free_block_mask(r, v), 1)
            if runs:
                p = r.alloc("pack")
                r.save("pack", p)
                r.t.packs[p] = (runs[0][0], 0, 0, bytes(64), bytes(44), 0)
                room = (runs[0][0], 0)
        if room is not None:
            nb, nc = room
            _copy(r, nb * g.block_size + nc * chunk, blk * g.block_size + c0 * chunk, n * chunk)
            r.set("extent", slot, start_block=nb, flags=EXTENT_PACKED | (nc << 16))
        else:
            r.zero("extent", slot)
        _settle_shared(r, later, partners, room is not None, "chunk")


def _gaps(fbs: list[int], counts: list[int], need: int) -> list[tuple[int, int]]:
    """The unmapped file-block ranges of [0, need), given a file's extents."""
    out, at = [], 0
    for fb, n in sorted(zip(fbs, counts, strict=True)):
        if fb > at:
            out.append((at, fb - at))
        at = max(at, fb + n)
    if need > at:
        out.append((at, need - at))
    return out


def fix_lost_extents(r: Repair, fs: list[Finding]) -> None:
    """Rebuild extent records the damage destroyed, from what still records them: a
    file whose (sound) block count says it has more blocks than its extents map, with
    a hole of exactly that many blocks, and a run of exactly that many blocks the
    bitmap marks used but nothing owns; or chunks a pack block's bitmap marks that no
    file claims, and the one small file with no data that fits them. Only pairings
    that are the one possible are made; the rest is named as lost by later repairs."""
    if r.mode != "y":
        return  # it attaches data to a file by inference: not one of -p's safe repairs
    v = r.view()
    g = r.sb.geometry
    bs, chunk = g.block_size, g.block_size // PACK_CHUNKS
    owners = check.block_owners(v)
    bits = np.unpackbits(r.t.bitmap, bitorder="little")[: g.block_count].astype(bool)
    bad = np.unpackbits(r.t.badmap, bitorder="little")[: g.block_count].astype(bool)
    leaked = bits & (owners == 0) & ~bad
    leaked[: g.data_start_block] = False
    ino = r.t.inodes
    sums = np.bincount(v.e_owner[v.e_blk], weights=v.e_count[v.e_blk], minlength=v.n).astype(np.int64)
    short = v.has_data & (ino["nblocks"][: v.n].astype(np.int64) > sums)
    # Candidate runs: where a dropped extent lay (if still unowned), then maximal leaked runs.
    taken = np.zeros(g.block_count, bool)
    # First the extents triage dropped, where the fields that survived agree with
    # everything else: their file is short of exactly that many blocks, with a hole
    # exactly there, and their blocks are marked used and owned by nobody.
    for o, s, n, fb, _ in r.lost_hints:
        if not (0 < o < v.n and short[o]) or o in r.suspect["inode"] or not (s >= 0 and s + n <= g.block_count):
            continue
        d = int(ino["nblocks"][o]) - int(sums[o])
        mine = (v.e_owner == o) & v.e_blk
        holes = _gaps(v.e_fb[mine].tolist(), v.e_count[mine].tolist(), -(-int(ino["size"][o]) // bs))
        if n == d and (fb, n) in holes and leaked[s:s + n].all() and not taken[s:s + n].any():
            taken[s:s + n] = True
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, n, fb, s, 0, 0)
            sums[o] += n
            short[o] = False
            r.rebuilt(o, f"its extent for file block {fb} ({n} block(s)) failed its checksum and was "
                         "dropped: rebuilt from what of it agrees with its block count, size and the bitmap")
    runs: dict[tuple[int, int], None] = {}
    for _, s, n, _, fl in r.lost_hints:
        if not fl & EXTENT_PACKED and s >= 0 and s + n <= g.block_count and leaked[s:s + n].all() \
                and not taken[s:s + n].any():
            runs[(s, n)] = None
    idx = np.flatnonzero(leaked & ~taken)
    if len(idx):
        for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
            runs[(int(run[0]), len(run))] = None
    wants: list[tuple[int, int, int]] = []  # (inode, file block, count)
    for o in np.flatnonzero(short).tolist():
        if o in r.suspect["inode"]:
            continue
        d = int(ino["nblocks"][o]) - int(sums[o])
        mine = (v.e_owner == o) & v.e_blk
        need = -(-int(ino["size"][o]) // bs)
        fits = [a for a, n in _gaps(v.e_fb[mine].tolist(), v.e_count[mine].tolist(), need) if n == d]
        if len(fits) == 1:
            wants.append((o, fits[0], d))
    for o, fb, d in wants:
        mates = [s for s, n in runs if n == d and not taken[s:s + n].any()]
        rivals = [w for w in wants if w[2] == d]
        if len(mates) == 1 and len(rivals) == 1:
            s = mates[0]
            taken[s:s + d] = True
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, d, fb, s, 0, 0)
            r.rebuilt(o, f"its extent record for file block {fb} ({d} block(s)) was lost: rebuilt from its "
                         "block count, its size and blocks no file owned")
    # Packed: chunks a pack bitmap marks that no packed extent claims, and the one small
    # file with no data whose size needs exactly that many.
    v = r.view()
    bare, need = _bare(v, chunk)
    runs_c = _chunk_runs(v, r)
    for blk, c0, n in runs_c:
        cands = np.flatnonzero(bare & (need == n)).tolist()
        same = [x for x in runs_c if x[2] == n]
        if len(cands) == 1 and len(same) == 1 and cands[0] not in r.suspect["inode"]:
            o = cands[0]
            slot = r.alloc("extent")
            r.save("extent", slot)
            r.t.extents[slot] = (o, n, 0, blk, EXTENT_PACKED | (c0 << 16), 0)
            bare[o] = False
            r.rebuilt(o, f"its extent record ({n} chunk(s) in a pack block) was lost: rebuilt from its size "
                         "and chunks no file claimed")


def fix_pack_bitmaps(r: Repair, fs: list[Finding]) -> None:
    """Rebuild each pack block's chunk bitmap from the packed extents in it; a pack
    block left with no chunks is given up (fix_bitmap then frees its block)."""
    v = r.view()
    chunk = r.sb.geometry.block_size // PACK_CHUNKS
    bare, need = _bare(v, chunk)
    for _, _, n in _chunk_runs(v, r):
        # Chunks no file claims: a packed extent was lost, and the file it belonged to
        # is one of those with a size but no data. Each of them is named.
        for o in np.flatnonzero(bare & (need <= n)).tolist():
            r.note(o, "lost-blocks", f"it has a size but no data, and {n} chunk(s) of a pack block that no "
                                     "file claims were given up: they may have been its data (an extent "
                                     "record was lost)")
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
    ("free-damaged", fix_checksums),
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
    ("file-overlap", fix_drop_extents),
    ("bad-owned", fix_drop_extents),
    ("packed-mixed", fix_drop_extents),
    ("past-eof", fix_trim),  # before the overlaps: a block past the end is no claim worth a copy
    ("truncating", fix_trim),
    ("overlap", fix_overlap),
    ("double", fix_overlap),
    ("pack-place", fix_drop_packs),
    ("pack-dup", fix_drop_packs),
    ("packed-nowhere", fix_packed_nowhere),
    ("chunk-twice", fix_chunk_twice),
    ("pack-bitmap", fix_lost_extents),  # before the bitmaps and block counts forget what was lost
    ("nblocks", fix_lost_extents),
    ("leaked", fix_lost_extents),
    ("pack-bitmap", fix_pack_bitmaps),
    ("nblocks", fix_nblocks),
    ("size-nonzero", fix_size_zero),
    ("size-too-big", fix_size_limit),
    ("bad-dirent", fix_drop_dirents),
    ("dirent-kind", fix_dirent_kind),
    ("bad-name", fix_rename),
    ("dup-name", fix_rename),
    ("cookie", fix_cookies),
    ("next-cookie", fix_next_cookie),
    ("bad-blob", fix_free_blobs),
    ("stray-cont", fix_free_blobs),
    ("bad-chain", fix_free_chains),
    ("bad-xattr-name", fix_free_chains),
    ("dup-xattr", fix_free_chains),
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
ONCE_PER_PASS = (fix_checksums, fix_overlap, fix_lost_extents, fix_bitmap, fix_nlink)  # they look at everything themselves


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
    undone: list[tuple[int, bytes, bytes]] = []  # (offset, bytes before, after) of a rollback
    if journal_ok and journal_active and (img.private or repair):
        before = [(off, bytes(buf[off:off + length])) for off, length, _ in pending]
        Journal(buf, img.limit).recover()  # a private copy for -n: the region is not touched
        undone = [(off, old, bytes(buf[off:off + len(old)])) for off, old in before]
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
    r.mode = mode
    for ino in _rolled_back(buf, sb, undone):
        r.note(ino, "rolled-back", "an interrupted transaction was rolled back (as mount does): "
                                   "a change it was making to this file was undone")
    if r.notes or any(_allowed(f, mode) for fs in first.values() for f in fs):
        r.snapshot()
    current = first
    # -p repairs nothing in the tables when the damage needs -y: its safe repairs (block
    # counts, the bitmap, dropping what points nowhere) would destroy evidence -y uses.
    stop = mode == "p" and any(f.fix == "y" for fs in first.values() for f in fs)
    for _ in range(0 if stop else MAX_PASSES):
        flat = [f for fs in current.values() for f in fs]
        todo = {f.code for f in flat if _allowed(f, mode)}
        if not todo:
            break
        report.passes += 1
        ran = set()
        for code, fixer in FIXERS:
            if code not in todo:
                continue
            if not (fixer in ran and fixer in ONCE_PER_PASS):
                name = next(f.check for f in flat if f.code == code)
                fresh = [f for f in check.run_check(name, r.view()) if f.code == code and _allowed(f, mode)]
                if fresh:  # (a fixer that found nothing to do for one code may still be needed by the next)
                    ran.add(fixer)
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
    final = current  # the checks after the last pass (or the first, if none ran)
    left = {f.key for fs in final.values() for f in fs}
    by_check: dict[str, list[Finding]] = {n: [] for n in check.TABLE_CHECKS}
    for f in seen.values():
        f.repaired = f.key not in left  # (one a pass left behind and a later pass undid is repaired too)
        by_check.setdefault(f.check, []).append(f)
    for fs in final.values():
        for f in fs:
            if f.key not in seen:
                by_check.setdefault(f.check, []).append(f)
    for f in seen.values():  # what became of each record that failed its checksum
        if f.code in ("checksum", "free-damaged"):
            said = [r.outcome[(f.data["table"], i)] for i in f.data.get("index", [])
                    if (f.data["table"], i) in r.outcome]
            if len(f.data.get("index", [])) == 1 and said:
                f.message += f": {said[0]}"
            elif said:
                restored = sum(s.startswith("restored") for s in said)
                f.message += f" ({restored} restored exactly from their checksums)"
    for name in check.TABLE_CHECKS:
        _note(report, name, by_check.get(name, []), on_check, progress)
    report.files = r.changes()
    del t, r


def _rolled_back(buf: memoryview, sb: Superblock, undone: list[tuple[int, bytes, bytes]]) -> list[int]:
    """The inodes whose records a journal rollback changed (before or after it)."""
    g = sb.geometry
    t = Tables(buf, sb)
    tables = {"inode": t.inodes, "extent": t.extents, "dirent": t.dirents, "blob": t.blobs}
    who = {"inode": None, "extent": "owner", "dirent": "ino", "blob": "owner"}
    out: dict[int, None] = {}
    for off, old, new in undone:
        if old == new:
            continue
        for name, arr in tables.items():
            size, base = arr.dtype.itemsize, g.offsets[name]
            lo, hi = max(off, base), min(off + len(old), base + len(arr) * size)
            for idx in range((lo - base) // size, (hi - 1 - base) // size + 1) if lo < hi else ():
                rs = base + idx * size
                a, b = max(rs, off), min(rs + size, off + len(old))
                if old[a - off:b - off] == new[a - off:b - off]:
                    continue
                now = bytearray(arr[idx:idx + 1].tobytes())
                was = bytearray(now)
                was[a - rs:b - rs] = old[a - off:b - off]
                for rec in (np.frombuffer(bytes(was), arr.dtype)[0], np.frombuffer(bytes(now), arr.dtype)[0]):
                    ino = idx if who[name] is None else int(rec[who[name]])
                    if ino and (who[name] is not None or int(rec["kind"])):
                        out[int(ino)] = None
    del t
    return list(out)


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


def format_text(report: Report, verbose: bool = False) -> list[str]:
    """The text report, line by line."""
    out = []
    if report.live:
        out.append(f"{report.region}: mounted (live image, daemon pid {report.holder}): "
                   "the findings may include changes in flight")
    if report.superblock == "backup":
        out.append(f"{report.region}: using the backup superblock")
    if verbose:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.check] = counts.get(f.check, 0) + 1
        for name in report.checks:
            out.append(f"check {name}: {counts.get(name, 0)} finding(s)")
    for f in report.findings:
        tag = "FIXED" if f.repaired else ("warning" if f.severity == "warning" else "ERROR")
        hint = "" if f.repaired or f.fix is None or report.mode == "y" else f" [repair with -{f.fix}]"
        out.append(f"{tag}: {f.check}: {f.message}{hint}")
    for c in report.files:
        out.append(f"CHANGED: {c.label()}: {', '.join(c.what)}: {'; '.join(c.details)}")
    n_err = len(report.errors)
    fixed = sum(f.repaired for f in report.findings)
    if report.backup_file:
        out.append(f"metadata saved to {report.backup_file}")
    named = f", {len(report.files)} file(s) changed" if report.files else ""
    out.append(f"{report.region}: {report.status}: {n_err} error(s) left, {fixed} repaired{named} "
               f"({len(report.checks)} checks, {report.elapsed:.2f} s)")
    return out


def check_region(path: str) -> list[Finding]:
    """Open a region read-only (no lock: allowed while mounted) and run every check.

    This is `pmemfs-fsck -n` through its Python API; the journal is rolled back in a
    private copy first, exactly as a mount would.
    """
    return fsck(path, mode="n").findings


def _print_text(report: Report, verbose: bool) -> None:
    import click

    for line in format_text(report, verbose):
        click.echo(line)


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
        from .common import progress_bar

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
    from .common import run

    run(_command(), "pmemfs-fsck", usage_status=EXIT_USAGE, errors=(FsckError, JournalFull),
        error_status=EXIT_OPERATIONAL)(argv)


__all__ = ["EXIT_CLEAN", "EXIT_CORRECTED", "EXIT_OPERATIONAL", "EXIT_UNCORRECTED", "EXIT_USAGE",
           "FileChange", "FsckError", "Report", "check_region", "display", "format_text", "fsck", "main", "save_metadata"]
