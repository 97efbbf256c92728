"""Exactly-once answers across a daemon's death: the reply record.

When a daemon dies, the kernel resends the requests it had read but not answered
(FUSE_NOTIFY_RESEND). Most are harmless to carry out again: a write stores the same
bytes, a setattr sets the same values. Namespace operations are not: a resent mkdir
whose first execution was committed would get EEXIST, a resent unlink ENOENT, and a
resent RENAME_EXCHANGE would swap the names back. pyfuse3 hides the request id and
its resend bit, so the daemon remembers in the region itself what it last did.

The daemon runs one handler at a time and answers it before the next starts, so at
most one operation is ever committed but unanswered. Each namespace operation writes
the *current* record (what it was, who asked, what it made) inside its own
transaction, so the record and the change commit or roll back together; once the
answer is on its way the record is settled (state 0). A successor that takes over the
connection moves a record still pending to the *inherited* slot, and a request that
matches it exactly (operation, caller's thread id, names, inodes) is answered with the
recorded result instead of being carried out again. The inherited record is used once
and expires soon after the takeover. Layout: docs/FORMAT.md, "Reply record".
"""

from __future__ import annotations

import zlib

import numpy as np

from ..media.journal import Transaction

REPLY_OFFSET = 2048  # in the superblock's 4 KiB slot, after the 512 defined bytes
CURRENT, INHERITED = 0, 1
PENDING = 1

OP_MKNOD, OP_MKDIR, OP_SYMLINK, OP_LINK, OP_UNLINK, OP_RMDIR, OP_RENAME, OP_SETXATTR, \
    OP_REMOVEXATTR = range(1, 10)

REPLY_DTYPE = np.dtype([
    ("state", "<u4"), ("op", "<u4"), ("pid", "<u4"), ("seq", "<u4"),
    ("generation", "<u8"),
    ("a", "<u8"), ("b", "<u8"), ("ino", "<u8"),
    ("name_crc", "<u4"), ("name2_crc", "<u4"), ("flags", "<u4"),
    ("checksum", "<u4"),
])
assert REPLY_DTYPE.itemsize == 64


def _crc(name: bytes) -> int:
    return zlib.crc32(name) & 0xFFFFFFFF


class Replies:
    def __init__(self, buf: memoryview, generation: int):
        self.slots = np.frombuffer(buf, REPLY_DTYPE, 2, REPLY_OFFSET)
        self.generation = generation
        self.seq = int(self.slots["seq"][CURRENT])
        self.inherited = self._valid(INHERITED)

    def _valid(self, i: int) -> bool:
        raw = self.slots[i:i + 1].view(np.uint8)
        return (int(self.slots["state"][i]) == PENDING
                and zlib.crc32(raw[:60].tobytes()) == int(self.slots["checksum"][i]))

    def take_over(self, tx: Transaction) -> None:
        """At a takeover: what the dead daemon had not answered becomes inherited."""
        if self._valid(CURRENT):
            tx.save_record(self.slots, REPLY_OFFSET, INHERITED)
            tx.save_record(self.slots, REPLY_OFFSET, CURRENT)
            self.slots[INHERITED] = self.slots[CURRENT]
            self.slots["state"][CURRENT] = 0
        self.inherited = self._valid(INHERITED)

    def record(self, tx: Transaction, op: int, pid: int, a: int, name: bytes = b"", b: int = 0,
               name2: bytes = b"", ino: int = 0, flags: int = 0) -> int:
        """Note, inside the operation's transaction, what it does; returns its seq."""
        tx.save_record(self.slots, REPLY_OFFSET, CURRENT)
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.slots[CURRENT] = (PENDING, op, pid, self.seq, self.generation, a, b, ino,
                               _crc(name), _crc(name2), flags, 0)
        return self.seq

    def settle(self, seq: int) -> None:
        """The answer to operation `seq` is on its way: forget it (a 4-byte store)."""
        if int(self.slots["seq"][CURRENT]) == seq:
            self.slots["state"][CURRENT] = 0

    def replayed(self, op: int, pid: int, a: int, name: bytes = b"", b: int = 0,
                 name2: bytes = b"", flags: int = 0) -> int | None:
        """If this request is the resend of the inherited record: its result (the inode
        it made, or 0), consuming the record. Otherwise None."""
        if not self.inherited:
            return None
        s = self.slots[INHERITED]
        if (int(s["op"]), int(s["pid"]), int(s["a"]), int(s["b"]), int(s["name_crc"]),
                int(s["name2_crc"]), int(s["flags"])) != (op, pid, a, b, _crc(name), _crc(name2), flags):
            return None
        self.expire()
        return int(s["ino"])

    def expire(self) -> None:
        """The window for resends is over (or the record was used)."""
        self.slots["state"][INHERITED] = 0
        self.inherited = False
