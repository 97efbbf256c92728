"""POSIX ACLs in their xattr form, and the kernel's rules for them (fs/posix_acl.c).

With FUSE_POSIX_ACL the kernel enforces ACLs itself and caches them, but leaves the
rest to the filesystem: storing system.posix_acl_access/_default, keeping the mode in
step with the access ACL (and the ACL with chmod), and giving new files their parent's
default ACL. These are the pure parts of that: no engine state in here.

The xattr value is a little-endian u32 version (2) followed by 8-byte entries
(u16 tag, u16 perm, u32 id); the kernel sends entries valid and sorted, and every
value is checked again here before it is stored.
"""

from __future__ import annotations

import errno
import stat
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_ORDER = {USER_OBJ: 0, USER: 1, GROUP_OBJ: 2, GROUP: 3, MASK: 4, OTHER: 5}

Entry = tuple[int, int, int]  # tag, perm (rwx bits), id (UNDEFINED_ID unless USER/GROUP)


class AclError(Exception):
    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


def parse(value: bytes) -> list[Entry]:
    """The entries of an ACL xattr value; AclError(EINVAL) unless posix_acl_valid holds."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise AclError(errno.EINVAL, "an ACL is a 4-byte header and 8-byte entries")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise AclError(errno.EOPNOTSUPP, "unknown ACL version")
    entries = [_ENTRY.unpack_from(value, off) for off in range(_HEADER.size, len(value), _ENTRY.size)]
    entries = [(tag, perm, i if tag in (USER, GROUP) else UNDEFINED_ID) for tag, perm, i in entries]
    _check(entries)
    return entries


def _check(entries: list[Entry]) -> None:
    count = {tag: 0 for tag in _ORDER}
    last = (-1, -1)
    for tag, perm, i in entries:
        if tag not in _ORDER or perm & ~7:
            raise AclError(errno.EINVAL, f"bad ACL entry tag 0x{tag:x} perm 0{perm:o}")
        key = (_ORDER[tag], i if tag in (USER, GROUP) else 0)
        if key <= last:  # out of order, or a duplicate
            raise AclError(errno.EINVAL, "ACL entries out of order or repeated")
        last = key
        count[tag] += 1
    if count[USER_OBJ] != 1 or count[GROUP_OBJ] != 1 or count[OTHER] != 1 or count[MASK] > 1:
        raise AclError(errno.EINVAL, "an ACL needs one user::, group:: and other:: entry")
    if (count[USER] or count[GROUP]) and not count[MASK]:
        raise AclError(errno.EINVAL, "an ACL with named entries needs a mask")


def encode(entries: list[Entry]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def _perm(entries: list[Entry], tag: int) -> int | None:
    return next((p for t, p, _ in entries if t == tag), None)


def mode_bits(entries: list[Entry]) -> int:
    """The rwxrwxrwx bits the mode shows for an ACL: owner, mask (else group), other."""
    group = _perm(entries, MASK)
    if group is None:
        group = _perm(entries, GROUP_OBJ)
    return (_perm(entries, USER_OBJ) << 6) | (group << 3) | _perm(entries, OTHER)


def is_minimal(entries: list[Entry]) -> bool:
    """Only user::, group:: and other::: the mode says it all (posix_acl_equiv_mode)."""
    return len(entries) == 3


def chmod(entries: list[Entry], mode: int) -> list[Entry]:
    """posix_acl_chmod: the ACL after a chmod to `mode` (the mask stands for group)."""
    has_mask = _perm(entries, MASK) is not None
    out = []
    for tag, perm, i in entries:
        if tag == USER_OBJ:
            perm = (mode >> 6) & 7
        elif tag == MASK or (tag == GROUP_OBJ and not has_mask):
            perm = (mode >> 3) & 7
        elif tag == OTHER:
            perm = mode & 7
        out.append((tag, perm, i))
    return out


def create(default: list[Entry], mode: int) -> tuple[int, list[Entry]]:
    """posix_acl_create_masq: a new inode's mode and access ACL from its directory's
    default ACL and the mode asked for (the umask does not apply)."""
    acl = chmod_masq(default, mode)
    return (mode & ~0o777) | mode_bits(acl), acl


def chmod_masq(entries: list[Entry], mode: int) -> list[Entry]:
    has_mask = _perm(entries, MASK) is not None
    out = []
    for tag, perm, i in entries:
        if tag == USER_OBJ:
            perm &= (mode >> 6) & 7
        elif tag == MASK or (tag == GROUP_OBJ and not has_mask):
            perm &= (mode >> 3) & 7
        elif tag == OTHER:
            perm &= mode & 7
        out.append((tag, perm, i))
    return out


def permits(entries: list[Entry], uid: int, in_group, owner: int, group: int, mask: int) -> bool:
    """posix_acl_permission: does the ACL grant `mask` (rwx bits) to caller `uid`
    (in_group(gid) tells its groups)? Capabilities are the caller's business."""
    mask &= 7
    mask_perm = _perm(entries, MASK)
    limit = 7 if mask_perm is None else mask_perm
    found_group = False
    for tag, perm, i in entries:
        if tag == USER_OBJ and uid == owner:
            return mask & ~perm == 0
        if tag == USER and uid == i:
            return mask & ~(perm & limit) == 0
    for tag, perm, i in entries:
        if (tag == GROUP_OBJ and in_group(group)) or (tag == GROUP and in_group(i)):
            found_group = True
            if mask & ~(perm & limit) == 0:
                return True
    if found_group:
        return False
    return mask & ~_perm(entries, OTHER) == 0


def applies_to(mode: int) -> bool:
    """Symlinks have no ACLs (their mode is always 0777)."""
    return not stat.S_ISLNK(mode)
