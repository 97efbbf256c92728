"""The control channel: commands and queries as extended attributes on the mount.

As S3QL does with its control file, a live pmemfs is steered through xattrs in a
reserved namespace, so any tool that can call setxattr/getxattr can use it and the
kernel's own xattr permission rules apply (trusted.* needs CAP_SYS_ADMIN):

  setxattr(MOUNT, "trusted.pmemfs.kernel.create", JSON {name, type, size, version})
  setxattr(MOUNT, "trusted.pmemfs.kernel.<verb>", NAME)   verb: preserve, unpreserve,
           retrieve, rm;  freeze / unfreeze take "", finish takes "" or "reclaim"
  getxattr(MOUNT/.kernel/NAME, "trusted.pmemfs.kernel")  -> JSON of the object
  getxattr(FILE, "user.pmemfs.extents")                   -> JSON [[file offset, region offset, length], ...]

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


def is_control(name: bytes) -> bool:
    return name.startswith(PREFIX) or name.startswith(USER_PREFIX)


def query(engine: Engine, ino: int, name: bytes, ctx: Ctx) -> bytes:
    if name == EXTENTS:
        bs = engine.block_size
        return json.dumps([[fb * bs, pb * bs, n * bs] for fb, pb, n in engine.extents(ino)]).encode()
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


def command(engine: Engine, ino: int, name: bytes, value: bytes, ctx: Ctx) -> None:
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


def _root(ctx: Ctx) -> None:
    if ctx.uid != 0:
        raise FsError(errno.EPERM)
