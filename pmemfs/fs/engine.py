"""The filesystem: POSIX semantics over the region's tables. No FUSE in here.

Every change of the region's metadata happens inside one journal transaction, so a
process death leaves each operation done or not done (see journal.py). In-memory
state (directory indexes, extent maps, free-slot lists, lookup counts) is derived
from the region at mount and kept in step with it; if a transaction has to be rolled
back the in-memory state is rebuilt from the region.

The Engine is put together here from its concerns, one module each (docs/DESIGN.md,
"The engine"): core.py (the shared state, transactions, slots, blobs), lifecycle.py
(mount, recovery, close, reaping), namespace.py, extents.py, filedata.py and
attributes.py.
"""

from __future__ import annotations

from ..media.errors import MountError
from ..media.format import sparse_requested
from ..media.journal import JOURNAL_OFFSET, CrashPoints
from ..media.region import Region
from .attributes import Attributes
from .core import (
    ALIGN_POLICY,
    ATIME_MODES,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    XATTR_CREATE,
    XATTR_REPLACE,
    EngineCore,
    FileMap,
    Stat,
)
from .ctx import ROOT_CTX, Ctx, FsError
from .extents import Extents
from .filedata import FileData
from .kobj import KernelObjects
from .lifecycle import Lifecycle, check_magic
from .namespace import Namespace


class Engine(Lifecycle, Namespace, FileData, Extents, Attributes, EngineCore):
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
            self._mount(readonly, crash, check_on_mount)
        except BaseException:
            self.region.close()
            raise

    def _mount(self, readonly: bool, crash: CrashPoints | None, check_on_mount: bool) -> None:
        """The mount, in order: O(metadata), never O(data) (docs/DESIGN.md, "How a
        restart finds its state"). Each step lives with its concern (lifecycle.py)."""
        self._recover_journal(readonly)
        self._read_superblock(readonly)
        self._map_tables()
        if check_on_mount:
            self._check_structure()
        self._load()  # the in-memory indexes
        self._settle_backing()
        self._start_mount()
        self.kernel = KernelObjects(self)
        self.kernel_report = {} if readonly else self.kernel.on_mount()
        self.journal.crash = crash  # crash points count from the end of the mount


__all__ = ["ALIGN_POLICY", "JOURNAL_OFFSET", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT",
           "ROOT_CTX", "XATTR_CREATE", "XATTR_REPLACE", "Ctx", "Engine", "FileMap", "FsError",
           "MountError", "Stat", "check_magic"]
