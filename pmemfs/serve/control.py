"""The control channel: commands and queries as extended attributes on the mount.

As S3QL does with its control file, a live pmemfs is steered through xattrs in a
reserved namespace, so any tool that can call setxattr/getxattr can use it and the
kernel's own xattr permission rules apply (trusted.* needs CAP_SYS_ADMIN):

  setxattr(MOUNT, "trusted.pmemfs.kernel.create", JSON {name, type, size, version})
  setxattr(MOUNT, "trusted.pmemfs.kernel.<verb>", NAME)   verb: preserve, unpreserve,
           retrieve, rm;  freeze / unfreeze take "", finish takes "" or "reclaim"
  getxattr(MOUNT/.kernel/NAME, "trusted.pmemfs.kernel")  -> JSON of the object
  getxattr(MOUNT, "trusted.pmemfs.kernel.list")          -> JSON list of the objects
  getxattr(FILE, "user.pmemfs.extents")                   -> JSON [[file offset, region offset, length], ...]
  setxattr(FILE, "user.pmemfs.prealloc", "SIZE[:2M|1G]")   reserve contiguous, aligned space
  setxattr(FILE|DIR, "user.pmemfs.align", "2M"|"1G")       placement policy (stored, inherited)
  setxattr(DST, "user.pmemfs.carve", JSON {src, offset, length})   src: path from the mount root
  setxattr(FILE, "user.pmemfs.lease", "rw"|"ro"|"release")  direct-access lease (pmemfs.direct)
  getxattr(FILE, "user.pmemfs.lease")                     -> JSON [{pid, mode, count}, ...] of live holders
  setxattr(MOUNT, "trusted.pmemfs.defrag", "")             then getxattr(..."trusted.pmemfs.defrag") -> report

Virtual attributes are never stored and never listed. pmemfs.kernel wraps this.

Who may do what is the access table in docs/DESIGN.md. The kernel checks its xattr
rules before a request reaches us; every rule it checks is checked here again, with
the caller's full credentials (creds.py), and so is everything the kernel cannot
know: a path inside a request is walked as path lookup walks it (search permission
on every directory), and a verb that takes or reveals data checks the permission that
needs. Every malformed value is an errno (EINVAL, E2BIG, ENAMETOOLONG, ...) before
anything changes.
"""

from __future__ import annotations

import errno
import json
import re
import stat

from ..fs import creds
from ..fs.creds import CAP_SYS_ADMIN, Creds, R, W, X
from ..fs.engine import Ctx, Engine, FsError
from ..media.format import (
    ATTR_APPEND,
    ATTR_IMMUTABLE,
    KIND_DIR,
    KIND_SYMLINK,
    NAME_MAX,
    ROOT_INO,
    XATTR_VALUE_MAX,
)

PREFIX = b"trusted.pmemfs."
USER_PREFIX = b"user.pmemfs."
KERNEL = b"trusted.pmemfs.kernel"
EXTENTS = b"user.pmemfs.extents"
PREALLOC = b"user.pmemfs.prealloc"
ALIGN = b"user.pmemfs.align"
CARVE = b"user.pmemfs.carve"
LEASE = b"user.pmemfs.lease"
DEFRAG = b"trusted.pmemfs.defrag"
PATH_MAX = 4096  # with its NUL, as the kernel's
INT_MAX = (1 << 63) - 1  # numbers in requests: offsets and sizes fit an off_t
_SIZE = re.compile(rb"\s*(\d{1,20})\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_SUFFIX = {b"": 0, b"K": 10, b"M": 20, b"G": 30, b"T": 40, b"P": 50}


def is_control(name: bytes) -> bool:
    return name.startswith(PREFIX) or name.startswith(USER_PREFIX)


# ----------------------------------------------------------------- access
def _user_xattr(engine: Engine, ino: int, who: Creds, write: bool) -> None:
    """What the kernel checks for a user.* xattr (xattr_permission), checked again:
    regular files and directories only (EPERM to set, ENODATA to get, elsewhere); on a
    sticky directory only the owner may set; then write (set) or read (get) permission."""
    engine.check_ino(ino)
    mode = int(engine.I["mode"][ino])
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FsError(errno.EPERM if write else errno.ENODATA)
    if (write and stat.S_ISDIR(mode) and mode & stat.S_ISVTX
            and not creds.owner_or_capable(who, int(engine.I["uid"][ino]))):
        raise FsError(errno.EPERM)
    engine.check_access(ino, who, W if write else R)


def _admin(who: Creds, write: bool) -> None:
    """trusted.*: CAP_SYS_ADMIN, as the kernel asks (EPERM to set, ENODATA to get)."""
    if not who.capable(CAP_SYS_ADMIN):
        raise FsError(errno.EPERM if write else errno.ENODATA)


def resolve(engine: Engine, path: bytes, who: Creds) -> int:
    """The inode a path from the mount root names, walked as the caller's path lookup
    would walk it: search permission on every directory it passes through (EACCES),
    ENOTDIR through a non-directory, ENAMETOOLONG for a name or path too long.
    Symbolic links are not followed (ELOOP): clients resolve them (pmemfs carve does).
    """
    if len(path) >= PATH_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"\0" in path:
        raise FsError(errno.EINVAL)
    ino = ROOT_INO
    for part in path.split(b"/"):
        if not part:
            continue
        if engine.kind(ino) != KIND_DIR:
            raise FsError(errno.ENOTDIR)
        engine.check_access(ino, who, X)
        if len(part) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ino = engine.lookup(ino, part)
        if engine.kind(ino) == KIND_SYMLINK:
            raise FsError(errno.ELOOP, "symbolic links in a control request are not followed")
    if path.endswith(b"/") and engine.kind(ino) != KIND_DIR:
        raise FsError(errno.ENOTDIR)
    return ino


# ---------------------------------------------------------- value parsing
def _number(v: object) -> int:
    """A JSON number that is a whole offset or size: an int in [0, 2**63)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INT_MAX:
        raise FsError(errno.EINVAL, "offsets and sizes are whole numbers from 0 to 2**63-1")
    return v


def _json_object(value: bytes, fields: dict[str, type], optional: dict[str, type] | None = None) -> dict:
    """Parse a JSON object with these required and optional fields (others are refused)."""
    optional = optional or {}
    try:
        req = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise FsError(errno.EINVAL, "the value is not JSON") from None
    if not isinstance(req, dict) or not set(fields) <= set(req) <= set(fields) | set(optional):
        raise FsError(errno.EINVAL, f"the value is a JSON object with {', '.join(fields)}")
    for k, t in {**fields, **optional}.items():
        if k not in req:
            continue
        if t is int:
            _number(req[k])
        elif not isinstance(req[k], t):
            raise FsError(errno.EINVAL, f"{k} must be a {t.__name__}")
    return req


def _text(s: str) -> bytes:
    """A JSON string as bytes (non-UTF-8 names travel as surrogate escapes)."""
    try:
        return s.encode(errors="surrogateescape")
    except UnicodeEncodeError:
        raise FsError(errno.EINVAL, "a name with an unpaired surrogate") from None


def parse_size(value: bytes) -> int:
    """"SIZE" with an optional K/M/G/T/P suffix (powers of 1024), as the CLI writes it."""
    m = _SIZE.fullmatch(value)
    if not m:
        raise FsError(errno.EINVAL, "a size is a number with K, M, G, T or P")
    return _number(int(m.group(1)) << _SUFFIX[m.group(2).upper()])


# ----------------------------------------------------------------- queries
def query(engine: Engine, ino: int, name: bytes, ctx: Ctx) -> bytes:
    who = creds.of(ctx)
    if name.startswith(USER_PREFIX):
        _user_xattr(engine, ino, who, write=False)
        if name == ALIGN:
            return engine.getxattr(ino, name)
        if name == LEASE:
            return _fit(json.dumps([h.as_dict() for h in engine.leases.holders(ino)]))
        if name == EXTENTS:
            return _fit(json.dumps(_extents(engine, ino, who)))
        raise FsError(errno.ENODATA)
    _admin(who, write=False)
    engine.check_ino(ino)
    if name == DEFRAG and ino == ROOT_INO:
        report = getattr(engine, "last_defrag", None)
        if report is None:
            raise FsError(errno.ENODATA)
        return _fit(json.dumps(report.as_dict()))
    if name == KERNEL:
        return _fit(json.dumps(engine.kernel.info_ino(ino).as_dict()))
    if name == KERNEL + b".list" and ino == ROOT_INO:
        return _fit(json.dumps([o.as_dict() for o in engine.kernel.list()]))
    raise FsError(errno.ENODATA)


def _fit(text: str) -> bytes:
    data = text.encode()
    if len(data) > XATTR_VALUE_MAX:  # more than any getxattr can take
        raise FsError(errno.E2BIG)
    return data


def _extents(engine: Engine, ino: int, who: Creds) -> list[list[int | None]]:
    """[file offset, region offset, length] per extent. The region offset is the
    "physical address" of the data (as a PFN in /proc/PID/pagemap): it is given only
    to a caller who may read the region file itself, which could find it anyway; to
    anyone else it is null."""
    import os

    try:
        st = os.stat(engine.path)  # never on our own mount (mounting refuses that)
        show = creds.permitted(who, st.st_mode, st.st_uid, st.st_gid, R)
    except OSError:
        show = False
    return [[fo, ro if show else None, n] for fo, ro, n in engine.extent_map(ino)]


# ---------------------------------------------------------------- commands
def command(engine: Engine, ino: int, name: bytes, value: bytes, ctx: Ctx) -> list[int]:
    """Carry out a command; returns inodes whose cached pages the kernel must drop."""
    from ..fs import placement

    who = creds.of(ctx)
    if len(value) > XATTR_VALUE_MAX:
        raise FsError(errno.E2BIG)
    if engine.readonly:
        # Every command is a setxattr, refused on a read-only mount: the kernel refuses
        # it first, and a daemon remounted read-only before the kernel (or after it,
        # mount -o remount) must not change the region either.
        raise FsError(errno.EROFS)
    if name.startswith(USER_PREFIX):
        _user_xattr(engine, ino, who, write=True)
        if engine.attr_flags(ino) & (ATTR_IMMUTABLE | ATTR_APPEND) and not (
                name == LEASE and value.strip() in (b"ro", b"release")):
            # As the kernel's xattr_permission for any xattr write: a command changes
            # the file (a lease only for reading, or giving one back, does not).
            raise FsError(errno.EPERM, "the file is immutable or append-only (chattr)")
        if name == LEASE:
            return _lease(engine, ino, value.strip(), who, ctx.pid)
        if name == ALIGN:
            placement.parse_align(value)
            engine.setxattr(ino, name, value.strip().upper(), 0, ctx)
            return []
        if name == PREALLOC:
            size_text, _, align_text = value.partition(b":")
            size = parse_size(size_text)
            align = placement.parse_align(align_text) if align_text else 0
            placement.prealloc(engine, ino, size, align)
            return []
        if name == CARVE:
            return _carve(engine, ino, value, who)
        raise FsError(errno.EPERM, "reserved for pmemfs")  # user.pmemfs.* is not stored
    _admin(who, write=True)
    engine.check_ino(ino)
    if name == DEFRAG and ino == ROOT_INO:
        engine.last_defrag = placement.defrag(engine)
        return []
    if not name.startswith(KERNEL + b".") or ino != ROOT_INO:
        raise FsError(errno.EOPNOTSUPP)
    _kernel_verb(engine, name[len(KERNEL) + 1:], value, ctx)
    return []


def _kernel_verb(engine: Engine, verb: bytes, value: bytes, ctx: Ctx) -> None:
    """trusted.pmemfs.kernel.<verb> on the root: the kernel-object commands (kobj.py)."""
    k = engine.kernel
    if verb == b"create":
        req = _json_object(value, {"name": str, "type": str, "size": int}, {"version": int})
        _text(req["name"])
        k.create(req["name"], req["type"], req["size"], req.get("version", 1), ctx)
    elif verb in (b"preserve", b"unpreserve", b"retrieve", b"rm"):
        arg = value.decode(errors="surrogateescape")
        {b"preserve": k.preserve, b"unpreserve": k.unpreserve, b"retrieve": k.retrieve,
         b"rm": k.remove}[verb](arg, ctx)
    elif verb == b"freeze":
        k.freeze(ctx)
    elif verb == b"unfreeze":
        k.unfreeze(ctx)
    elif verb == b"finish":
        if value not in (b"", b"reclaim"):
            raise FsError(errno.EINVAL, 'finish takes "" or "reclaim"')
        k.finish(reclaim=value == b"reclaim", ctx=ctx)
    else:
        raise FsError(errno.EOPNOTSUPP)


def _carve(engine: Engine, dst: int, value: bytes, who: Creds) -> list[int]:
    """Move blocks of src into the empty file dst. The caller takes src's bytes (read)
    and leaves a hole in src, as truncating it would (write); dst gets them (write,
    checked by _user_xattr). src is a path walked with the caller's credentials."""
    from ..fs import placement

    req = _json_object(value, {"src": str, "offset": int, "length": int})
    src = resolve(engine, _text(req["src"]), who)
    engine.check_access(src, who, R | W)
    if engine.attr_flags(src) & (ATTR_IMMUTABLE | ATTR_APPEND):
        raise FsError(errno.EPERM, "the source is immutable or append-only (chattr)")  # it loses bytes
    placement.carve(engine, src, req["offset"], req["length"], dst)
    return [src]


def _lease(engine: Engine, ino: int, value: bytes, who: Creds, pid: int) -> list[int]:
    """Take or give back a direct-access lease for the calling process.

    The kernel has checked write permission (it does for every user.* setxattr, and
    _user_xattr checked it again); what the mapping needs is checked too: read for
    "ro", read and write for "rw". Either way the kernel's cached pages of the file are
    dropped: while leased, the region is the only copy, and opens get direct_io.
    """
    from ..fs.leases import LeaseError
    from ..media.format import KIND_REG

    try:
        if value == b"release":
            engine.leases.release(ino, pid)
            return [ino]
        if value not in (b"ro", b"rw"):
            raise FsError(errno.EINVAL, 'a lease is "ro", "rw" or "release"')
        if engine.kind(ino) != KIND_REG:
            raise FsError(errno.EINVAL, "only regular files can be mapped directly")
        if int(engine.I["nlink"][ino]) == 0:
            raise FsError(errno.ENOENT, "the file has been removed")
        if value == b"rw" and engine.readonly:
            raise FsError(errno.EROFS)
        engine.check_access(ino, who, R | (W if value == b"rw" else 0))
        if ino in engine.packer.packed:
            # A small file's chunks move as it grows; a mapped file's blocks must not.
            if not engine.blocks_available() or not engine.have_slots("extent", 1):
                raise FsError(errno.ENOSPC)
            with engine.transaction() as tx:
                engine.packer.unpack(tx, ino)
        engine.leases.take(ino, pid, value.decode())
    except LeaseError as e:
        raise FsError(e.errno, str(e)) from None
    return [ino]
