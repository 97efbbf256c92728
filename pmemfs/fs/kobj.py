"""Kernel objects: typed, pinned, physically contiguous state that survives the restart.

A kernel object is an inode of kind KIND_KOBJ named in the root-only directory
/.kernel. Its payload is one contiguous, aligned run of blocks, allocated at creation
with its final size; its region offset is its "physical address". Objects move
through a lifecycle modelled on KHO/LUO:

    NORMAL --preserve--> PRESERVED --freeze--> FROZEN   (checksum sealed, immutable)
       ^                     |  ^                 |
       +----unpreserve-------+  +---unfreeze------+
    restart: FROZEN -> RESTORED (checksum verified) or DAMAGED (mismatch);
             an object only PRESERVED stays so: without a freeze there was no handover
    RESTORED --retrieve--> RETRIEVED --finish--> NORMAL
    finish: RESTORED/DAMAGED objects nobody retrieved are reported (and freed on request)

The global freeze state is kept in the /.kernel directory inode's kstate. Every
transition is one journal transaction. This module is engine-level (no FUSE); the
FUSE adapter reaches it through the control xattrs in control.py.
"""

from __future__ import annotations

import errno
import stat
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..media.format import FLAG_PINNED, KIND_DIR, KIND_KOBJ, ROOT_INO
from . import creds
from .ctx import ROOT_CTX, Ctx, FsError

if TYPE_CHECKING:  # the engine imports this module; Engine is only a type here
    from .engine import Engine

NAMESPACE = b".kernel"

# On-media type tags (inode.ktype). Add a name and a new number to extend.
TYPES: dict[str, int] = {
    "generic": 1,
    "iommu-page-table": 2,
    "dma-buffer": 3,
    "device-state": 4,
    "clock-calibration": 5,
}
TYPE_NAMES = {v: k for k, v in TYPES.items()}


def register_type(name: str, code: int) -> None:
    """Make a new type tag known (codes are stored in the region: never reuse one)."""
    if name in TYPES or code in TYPE_NAMES or not 0 < code < 0xFFFF:
        raise ValueError(f"type {name!r} or code {code} is taken or out of range")
    TYPES[name] = code
    TYPE_NAMES[code] = name


# Object states (inode.kstate of a kernel object).
NORMAL, PRESERVED, FROZEN, RESTORED, DAMAGED, RETRIEVED = range(6)
STATE_NAMES = ["normal", "preserved", "frozen", "restored", "damaged", "retrieved"]
# Namespace states (inode.kstate of /.kernel).
NS_OPEN, NS_FROZEN = 0, 1
GIB_BLOCKS_ALIGN = 1 << 30


@dataclass
class ObjectInfo:
    name: str
    ino: int
    type: str
    version: int
    size: int
    phys_offset: int
    phys_length: int
    pinned: bool
    state: str
    checksum: str  # "sealed", "verified", "mismatch", "unsealed"
    checksum_value: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class KernelObjects:
    def __init__(self, engine: Engine):
        self.e = engine

    # ----------------------------------------------------------- namespace
    def namespace(self, create: bool = False, tx=None) -> int:
        """Inode of /.kernel (0 when it does not exist and create is False)."""
        e = self.e
        slot = e.children[ROOT_INO].get(NAMESPACE)
        if slot is not None:
            ino = int(e.t.dirents["ino"][slot])
            if e.kind(ino) != KIND_DIR or not int(e.I["flags"][ino]) & FLAG_PINNED:
                raise FsError(errno.EEXIST, "/.kernel exists but is not pmemfs's kernel namespace")
            return ino
        if not create:
            return 0
        ino = e.new_inode(tx, KIND_DIR, stat.S_IFDIR | 0o700, ROOT_CTX, ROOT_INO)
        e.I["flags"][ino] = FLAG_PINNED
        e.I["uid"][ino] = 0
        e.I["gid"][ino] = 0
        e.add_dirent(tx, ROOT_INO, NAMESPACE, ino, KIND_DIR)
        e.touch(tx, ROOT_INO, m=True)
        e.I["nlink"][ROOT_INO] += 1
        return ino

    def is_namespace(self, ino: int) -> bool:
        return self.e.kind(ino) == KIND_DIR and bool(int(self.e.I["flags"][ino]) & FLAG_PINNED)

    def frozen(self) -> bool:
        ns = self.namespace()
        return bool(ns) and int(self.e.I["kstate"][ns]) == NS_FROZEN

    def objects(self) -> dict[str, int]:
        ns = self.namespace()
        if not ns:
            return {}
        e = self.e
        return {name.decode(errors="surrogateescape"): int(e.t.dirents["ino"][slot])
                for name, slot in e.children[ns].items()}

    def _lookup(self, name: str) -> int:
        ino = self.objects().get(name)
        if ino is None:
            raise FsError(errno.ENOENT, f"no kernel object {name!r}")
        return ino

    @staticmethod
    def _root(ctx: Ctx) -> None:
        if not creds.of(ctx).capable(creds.CAP_SYS_ADMIN):  # as trusted.* xattrs need
            raise FsError(errno.EPERM, "kernel objects are root's")

    # -------------------------------------------------------------- create
    def create(self, name: str, type_name: str, size: int, version: int = 1, ctx: Ctx = ROOT_CTX) -> ObjectInfo:
        self._root(ctx)
        e = self.e
        raw = name.encode(errors="surrogateescape")
        e.check_name(raw)
        if raw in (b".", b".."):
            raise FsError(errno.EINVAL, "a kernel object cannot be called . or ..")
        if type_name not in TYPES:
            raise FsError(errno.EINVAL, f"unknown kernel object type {type_name!r} (known: {', '.join(TYPES)})")
        if size <= 0 or not 0 <= version < 1 << 32:
            raise FsError(errno.EINVAL, "size must be positive and version a u32")
        if size > e.max_file_size:
            raise FsError(errno.EFBIG, f"larger than the largest file size {e.max_file_size}")
        ns = self.namespace()
        if ns and raw in e.children[ns]:
            raise FsError(errno.EEXIST, f"kernel object {name!r} exists")
        bs = e.block_size
        count = -(-size // bs)
        # Devices want contiguity and alignment: runs of 1 GiB or more start on a 1 GiB line.
        align = max(1, GIB_BLOCKS_ALIGN // bs) if count * bs >= GIB_BLOCKS_ALIGN else 1
        from ..media.allocator import NoSpace

        try:
            if count > e.blocks_available():  # an overcommitted region's backing may hold fewer
                raise NoSpace
            start = e.alloc.find_contiguous(count, align)
        except NoSpace:
            raise FsError(errno.ENOSPC, f"no free contiguous run of {count} blocks") from None
        if not (e.have_slots("inode", 2) and e.have_slots("dirent", 2) and e.have_slots("extent", 1)):
            raise FsError(errno.ENOSPC)
        with e.transaction() as tx:
            ns = self.namespace(create=True, tx=tx)
            ino = e.new_inode(tx, KIND_KOBJ, stat.S_IFREG | 0o600, ROOT_CTX, ns)
            e.alloc.mark(tx, start, count, True)
            e.add_extent(tx, ino, e.file_map(ino), 0, start, count)
            e.I["nblocks"][ino] = count
            e.I["size"][ino] = size
            e.I["flags"][ino] = FLAG_PINNED
            e.I["ktype"][ino] = TYPES[type_name]
            e.I["kversion"][ino] = version
            e.I["kstate"][ino] = NORMAL
            if not e.alloc.known_zero(start, count):  # fresh blocks may hold old bytes
                e.region.zero(start * bs, count * bs)
            e.add_dirent(tx, ns, raw, ino, KIND_KOBJ)
            e.touch(tx, ns, m=True)
        return self.info(name)

    # --------------------------------------------------------------- query
    def info(self, name: str) -> ObjectInfo:
        return self.info_ino(self._lookup(name), name)

    def info_ino(self, ino: int, name: str | None = None) -> ObjectInfo:
        e = self.e
        if e.kind(ino) != KIND_KOBJ:
            raise FsError(errno.EINVAL, "not a kernel object")
        if name is None:
            name = next((n for n, i in self.objects().items() if i == ino), "?")
        fm = e.maps.get(ino)
        start = fm.pblk[0] * e.block_size if fm and fm.fblk else 0
        length = sum(fm.cnt) * e.block_size if fm else 0
        state = int(e.I["kstate"][ino])
        value = int(e.I["kchecksum"][ino])
        checksum = {FROZEN: "sealed", RESTORED: "verified", DAMAGED: "mismatch",
                    RETRIEVED: "verified"}.get(state, "none")
        return ObjectInfo(name, ino, TYPE_NAMES.get(int(e.I["ktype"][ino]), f"unknown-{int(e.I['ktype'][ino])}"),
                          int(e.I["kversion"][ino]), int(e.I["size"][ino]), start, length,
                          bool(int(e.I["flags"][ino]) & FLAG_PINNED),
                          STATE_NAMES[state] if state < len(STATE_NAMES) else f"unknown-{state}",
                          checksum, value)

    def list(self) -> list[ObjectInfo]:
        return [self.info_ino(ino, name) for name, ino in sorted(self.objects().items())]

    def payload_checksum(self, ino: int) -> int:
        """CRC-32 of the payload [0, size), read straight from the contiguous run."""
        e = self.e
        fm = e.maps[ino]
        start = fm.pblk[0] * e.block_size
        size = int(e.I["size"][ino])
        c = 0
        for pos in range(0, size, 64 << 20):
            n = min(64 << 20, size - pos)
            c = zlib.crc32(e.region.buf[start + pos:start + pos + n], c)
        return c & 0xFFFFFFFF or 1  # 0 means "not sealed"

    # ----------------------------------------------------------- lifecycle
    def _set_state(self, changes: dict[int, tuple[int, int | None]], ns_state: int | None = None) -> None:
        e = self.e
        with e.transaction() as tx:
            now = time.time_ns()
            for ino, (state, checksum) in changes.items():
                e.save_inode(tx, ino)
                e.I["kstate"][ino] = state
                if checksum is not None:
                    e.I["kchecksum"][ino] = checksum
                e.I["ctime_ns"][ino] = now
            if ns_state is not None:
                ns = self.namespace(create=True, tx=tx)
                e.save_inode(tx, ns)
                e.I["kstate"][ns] = ns_state

    def _state(self, ino: int) -> int:
        return int(self.e.I["kstate"][ino])

    def preserve(self, name: str, ctx: Ctx = ROOT_CTX) -> None:
        self._root(ctx)
        ino = self._lookup(name)
        if self.frozen():
            raise FsError(errno.EBUSY, "frozen: no new preserves until unfreeze or finish")
        if self._state(ino) not in (NORMAL, PRESERVED, RETRIEVED):
            raise FsError(errno.EBUSY, f"{name} is {STATE_NAMES[self._state(ino)]}")
        self._set_state({ino: (PRESERVED, 0)})

    def unpreserve(self, name: str, ctx: Ctx = ROOT_CTX) -> None:
        self._root(ctx)
        ino = self._lookup(name)
        if self._state(ino) != PRESERVED or self.frozen():
            raise FsError(errno.EBUSY, f"{name} is not preserved (or the namespace is frozen)")
        self._set_state({ino: (NORMAL, 0)})

    def freeze(self, ctx: Ctx = ROOT_CTX) -> list[str]:
        """Seal every preserved object's checksum; they are immutable until unfreeze."""
        self._root(ctx)
        if self.frozen():
            raise FsError(errno.EBUSY, "already frozen")
        objs = self.objects()
        preserved = {n: i for n, i in objs.items() if self._state(i) == PRESERVED}
        changes = {i: (FROZEN, self.payload_checksum(i)) for i in preserved.values()}
        self._set_state(changes, NS_FROZEN)
        return sorted(preserved)

    def unfreeze(self, ctx: Ctx = ROOT_CTX) -> None:
        """Abort: back to preserved, nothing else changed."""
        self._root(ctx)
        if not self.frozen():
            raise FsError(errno.EINVAL, "not frozen")
        changes = {i: (PRESERVED, 0) for i in self.objects().values() if self._state(i) == FROZEN}
        self._set_state(changes, NS_OPEN)

    def on_mount(self) -> dict[str, str]:
        """A new instance: verify what the last one froze. Returns name -> new state."""
        ns = self.namespace()
        if not ns:
            return {}
        changes: dict[int, tuple[int, int | None]] = {}
        report = {}
        for name, ino in self.objects().items():
            state = self._state(ino)
            if state == FROZEN:
                ok = self.payload_checksum(ino) == int(self.e.I["kchecksum"][ino])
                changes[ino] = (RESTORED if ok else DAMAGED, None)
                report[name] = "restored" if ok else "damaged"
        if changes or self.frozen():
            self._set_state(changes, NS_OPEN)
        return report

    def retrieve(self, name: str, ctx: Ctx = ROOT_CTX) -> ObjectInfo:
        self._root(ctx)
        ino = self._lookup(name)
        state = self._state(ino)
        if state == DAMAGED:
            raise FsError(errno.EIO, f"{name}: payload checksum mismatch after the restart")
        if state != RESTORED:
            raise FsError(errno.EINVAL, f"{name} is {STATE_NAMES[state]}, not restored")
        self._set_state({ino: (RETRIEVED, None)})
        return self.info_ino(ino, name)

    def finish(self, reclaim: bool = False, ctx: Ctx = ROOT_CTX) -> list[str]:
        """End the cycle: retrieved objects become normal; returns the unclaimed ones."""
        self._root(ctx)
        if self.frozen():
            raise FsError(errno.EBUSY, "frozen: unfreeze first")
        objs = self.objects()
        unclaimed = sorted(n for n, i in objs.items() if self._state(i) in (RESTORED, DAMAGED))
        self._set_state({i: (NORMAL, 0) for i in objs.values() if self._state(i) == RETRIEVED})
        if reclaim:
            for name in unclaimed:
                self._remove(name, objs[name])
        return unclaimed

    def remove(self, name: str, ctx: Ctx = ROOT_CTX) -> None:
        self._root(ctx)
        ino = self._lookup(name)
        if self._state(ino) == FROZEN:
            raise FsError(errno.EBUSY, f"{name} is frozen")
        self._remove(name, ino)

    def _remove(self, name: str, ino: int) -> None:
        e = self.e
        ns = self.namespace()
        with e.transaction() as tx:
            e.save_inode(tx, ino)
            e.I["flags"][ino] = int(e.I["flags"][ino]) & ~FLAG_PINNED
            now = time.time_ns()
            e.remove_dirent(tx, ns, name.encode(errors="surrogateescape"))
            e.touch(tx, ns, m=True, now=now)
            e.drop_link(tx, ino, now)
        e.maybe_reap(ino)

    # ----------------------------------------------------- guards for the engine
    def check_write(self, ino: int, offset: int, length: int) -> None:
        state = self._state(ino)
        if state in (FROZEN, DAMAGED, RESTORED):
            raise FsError(errno.EBUSY)
        if offset + length > int(self.e.I["size"][ino]):
            raise FsError(errno.EFBIG)
