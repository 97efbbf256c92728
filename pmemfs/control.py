"""The control channel: commands and queries as extended attributes on the mount.

As S3QL does with its control file, a live pmemfs is steered through xattrs in a
reserved namespace, so any tool that can call setxattr/getxattr can use it and the
kernel's own xattr permission rules apply (trusted.* needs CAP_SYS_ADMIN):

  setxattr(MOUNT, "trusted.pmemfs.kernel.create", JSON {name, type, size, version})
  setxattr(MOUNT, "trusted.pmemfs.kernel.<verb>", NAME)   verb: preserve, unpreserve,
           retrieve, rm;  freeze / unfreeze take "", finish takes "" or "reclaim"
  getxattr(MOUNT/.kernel/NAME, "trusted.pmemfs.kernel")  -> JSON of the object
  getxattr(FILE, "user.pmemfs.extents")                   -> JSON [[file offset, region offset, length], ...]
  setxattr(FILE, "user.pmemfs.prealloc", "SIZE[:2M|1G]")   reserve contiguous, aligned space
  setxattr(FILE|DIR, "user.pmemfs.align", "2M"|"1G")       placement policy (stored, inherited)
  setxattr(DST, "user.pmemfs.carve", JSON {src, offset, length})   src: path from the mount root
  setxattr(FILE, "user.pmemfs.lease", "rw"|"ro"|"release")  direct-access lease (pmemfs.direct)
  getxattr(FILE, "user.pmemfs.lease")                     -> JSON [{pid, mode, count}, ...] of live holders
  setxattr(MOUNT, "trusted.pmemfs.defrag", "")             then getxattr(..."trusted.pmemfs.defrag") -> report

Virtual attributes are never stored and never listed. pmemfs.kernel wraps this.
"""

from __future__ import annotations

import errno
import json

from .engine import Ctx, Engine, FsError
from .format import ROOT_INO

PREFIX = b"trusted.pmemfs."
USER_PREFIX = b"user.pmemfs."
KERNEL = b"trusted.pmemfs.kernel"
EXTENTS = b"user.pmemfs.extents"
PREALLOC = b"user.pmemfs.prealloc"
ALIGN = b"user.pmemfs.align"
CARVE = b"user.pmemfs.carve"
LEASE = b"user.pmemfs.lease"
DEFRAG = b"trusted.pmemfs.defrag"


def is_control(name: bytes) -> bool:
    return name.startswith(PREFIX) or name.startswith(USER_PREFIX)


def query(engine: Engine, ino: int, name: bytes, ctx: Ctx) -> bytes:
    if name == ALIGN:
        return engine.getxattr(ino, name)
    if name == DEFRAG and ino == ROOT_INO:
        _root(ctx)
        report = getattr(engine, "last_defrag", None)
        if report is None:
            raise FsError(errno.ENODATA)
        return json.dumps(report.as_dict()).encode()
    if name == LEASE:
        engine._check_ino(ino)
        return json.dumps([h.as_dict() for h in engine.leases.holders(ino)]).encode()
    if name == EXTENTS:
        return json.dumps([list(x) for x in engine.extent_map(ino)]).encode()
    if name == KERNEL:
        _root(ctx)
        return json.dumps(engine.kernel.info_ino(ino).as_dict()).encode()
    if name == KERNEL + b".list" and ino == ROOT_INO:
        _root(ctx)
        data = json.dumps([o.as_dict() for o in engine.kernel.list()]).encode()
        if len(data) > 65536:
            raise FsError(errno.E2BIG)
        return data
    raise FsError(errno.ENODATA)


def command(engine: Engine, ino: int, name: bytes, value: bytes, ctx: Ctx) -> list[int]:
    """Carry out a command; returns inodes whose cached pages the kernel must drop."""
    from . import placement

    if name == LEASE:
        return _lease(engine, ino, value.strip(), ctx)
    if name == ALIGN:
        placement.parse_align(value)
        engine.setxattr(ino, name, value.strip().upper(), 0, ctx)
        return []
    if name == PREALLOC:
        text = value.decode(errors="replace").strip()
        size_text, _, align_text = text.partition(":")
        from .cli import parse_size

        try:
            size = parse_size(size_text)
        except Exception:
            raise FsError(errno.EINVAL) from None
        align = placement.parse_align(align_text.encode()) if align_text else 0
        placement.prealloc(engine, ino, size, align)
        return []
    if name == CARVE:
        try:
            req = json.loads(value)
            src = engine.resolve(str(req["src"]).encode(errors="surrogateescape"))
            offset, length = int(req["offset"]), int(req["length"])
        except (ValueError, KeyError, TypeError):
            raise FsError(errno.EINVAL) from None
        engine.check_access(src, ctx, write=True)
        placement.carve(engine, src, offset, length, ino)
        return [src]
    if name == DEFRAG and ino == ROOT_INO:
        _root(ctx)
        engine.last_defrag = placement.defrag(engine)
        return []
    if not name.startswith(KERNEL + b".") or ino != ROOT_INO:
        raise FsError(errno.EPERM if name.startswith(USER_PREFIX) else errno.EOPNOTSUPP)
    _root(ctx)
    verb = name[len(KERNEL) + 1:].decode(errors="replace")
    k = engine.kernel
    arg = value.decode(errors="surrogateescape")
    if verb == "create":
        try:
            req = json.loads(value)
            k.create(str(req["name"]), str(req["type"]), int(req["size"]), int(req.get("version", 1)), ctx)
        except (ValueError, KeyError, TypeError):
            raise FsError(errno.EINVAL) from None
    elif verb in ("preserve", "unpreserve", "retrieve", "rm"):
        {"preserve": k.preserve, "unpreserve": k.unpreserve, "retrieve": k.retrieve, "rm": k.remove}[verb](arg, ctx)
    elif verb == "freeze":
        k.freeze(ctx)
    elif verb == "unfreeze":
        k.unfreeze(ctx)
    elif verb == "finish":
        k.finish(reclaim=arg == "reclaim", ctx=ctx)
    else:
        raise FsError(errno.EOPNOTSUPP)
    return []


def _lease(engine: Engine, ino: int, value: bytes, ctx: Ctx) -> list[int]:
    """Take or give back a direct-access lease for the calling process.

    The kernel has checked write permission (it does for every user.* setxattr); the
    daemon checks what the mapping needs: read for "ro", read and write for "rw".
    Either way the kernel's cached pages of the file are dropped: while leased, the
    region is the only copy, and opens get direct_io (fuse_ops).
    """
    from .format import KIND_REG
    from .leases import LeaseError, sup_groups

    engine._check_ino(ino)
    try:
        if value == b"release":
            engine.leases.release(ino, ctx.pid)
            return [ino]
        if value not in (b"ro", b"rw"):
            raise FsError(errno.EINVAL, 'a lease is "ro", "rw" or "release"')
        if engine.kind(ino) != KIND_REG:
            raise FsError(errno.EINVAL, "only regular files can be mapped directly")
        if int(engine.I["nlink"][ino]) == 0:
            raise FsError(errno.ENOENT, "the file has been removed")
        if value == b"rw" and engine.readonly:
            raise FsError(errno.EROFS)
        groups = sup_groups(ctx.pid)
        engine.check_access(ino, ctx, write=False, groups=groups)
        if value == b"rw":
            engine.check_access(ino, ctx, write=True, groups=groups)
        if ino in engine.packer.packed:
            # A small file's chunks move as it grows; a mapped file's blocks must not.
            if not engine.alloc.free:
                raise FsError(errno.ENOSPC)
            with engine.transaction() as tx:
                engine.packer.unpack(tx, ino)
        engine.leases.take(ino, ctx.pid, value.decode())
    except LeaseError as e:
        raise FsError(e.errno, str(e)) from None
    return [ino]


def _root(ctx: Ctx) -> None:
    if ctx.uid != 0:
        raise FsError(errno.EPERM)
