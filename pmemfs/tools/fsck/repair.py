"""Writing repairs: every change goes through a journal transaction that fits the
journal, and every file a change touches is noted for the report (with the paths it had
before the repair, from `Paths`)."""

from __future__ import annotations

import time

import numpy as np

from ...media import check
from ...media.check import Finding, View
from ...media.format import (
    BLOB_CONT,
    FLAG_PINNED,
    HWM_STEP,
    KIND_DIR,
    NAME_MAX,
    ROOT_INO,
    SB_STRUCT,
    SUPERBLOCK_DTYPE,
    TABLE_NAMES,
    Superblock,
    Tables,
)
from ...media.journal import JOURNAL_RECORD_HEADER, Journal, JournalFull
from .report import FileChange, FsckError, decode_name, display


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
            result = None if result is None else f"{result}/{decode_name(self.names[k])}"
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
                out.add(f"{p}/{decode_name(self.names[k])}")
        return sorted(out)

    def of_slot(self, slot: int) -> str | None:
        """The path of the entry in dirent slot `slot` (None: its directory is not reachable)."""
        k = int(np.searchsorted(self.slots, slot))
        if k >= len(self.slots) or self.slots[k] != slot:
            return None
        p = self._dir(int(self.parent[k]))
        return None if p is None else f"{p}/{decode_name(self.names[k])}"


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
        return f"{decode_name(bytes(d['name'][slot])[:NAME_MAX])!r} in directory {int(d['parent'][slot])}"

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


def finding_items(findings: list[Finding], key: str) -> list[int]:
    out: list[int] = []
    for f in findings:
        out.extend(f.data.get(key, []))
    return sorted(set(out))


def namespace_ino(r: Repair) -> int:
    """The /.kernel directory (root's pinned entry named .kernel), or 0."""
    v = r.view()
    slots = v.dir_used[v.d_linked & (v.d_parent == ROOT_INO)]
    for slot in slots[v.dirents["name"][slots] == b".kernel"].tolist():
        ino = int(v.dirents["ino"][slot])
        if v.is_dir[ino] and int(v.inodes["flags"][ino]) & FLAG_PINNED:
            return ino
    return 0
