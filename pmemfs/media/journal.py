"""Undo journal: makes every metadata change atomic with respect to process death.

The region is MAP_SHARED memory, so a killed daemon's stores stay and arrive in
program order. A transaction therefore needs no flushes, only an order:

1. begin: nrecords = 0, then state = ACTIVE (the commit word);
2. before the first change of a byte range: copy its old bytes into an undo record,
   then nrecords += 1; only then change the range in place;
3. commit: seal the checksums of the records that changed, then state = IDLE.

Recovery (at mount, or by fsck) finds state == ACTIVE and copies the undo images
back, newest first; that is idempotent, so a crash during recovery is harmless.
See docs/DESIGN.md for the argument and docs/FORMAT.md for the bytes.
"""

from __future__ import annotations

import os
import signal
import struct
import zlib
from collections.abc import Callable

import numpy as np

from .format import (
    JOURNAL_HEADER_DTYPE,
    JOURNAL_MAGIC,
    JOURNAL_OFFSET,
    JOURNAL_RECORD_HEADER,
    FormatError,
    crc,
)

STATE_IDLE = 0
STATE_ACTIVE = 1
_RECORD = struct.Struct("<QII")  # offset, length, checksum
_U32 = struct.Struct("<I")
HEADER_SIZE = JOURNAL_HEADER_DTYPE.itemsize


class JournalFull(Exception):
    """A transaction needs more undo space than the journal has (a bug: ops are batched)."""


class CrashPoints:
    """Fault injection: die at the k-th step of the journal (PMEMFS_CRASH_AT=k).

    Steps are: each undo record written, the moment before the commit word and the
    moment after it, counted from the end of the mount. PMEMFS_CRASH_MODE is "exit"
    (os._exit) or "kill" (SIGKILL, the default). Meant for tests and demos.
    """

    def __init__(self, at: int | None = None, mode: str = "kill"):
        self.remaining = at
        self.mode = mode
        self.steps = 0

    @classmethod
    def from_env(cls) -> CrashPoints | None:
        at = os.environ.get("PMEMFS_CRASH_AT")
        if not at:
            return None
        return cls(int(at), os.environ.get("PMEMFS_CRASH_MODE", "kill"))

    def step(self) -> None:
        self.steps += 1
        if self.remaining is None:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            if self.mode == "exit":
                os._exit(99)
            os.kill(os.getpid(), signal.SIGKILL)


def _header_checksum(magic: bytes, size: int) -> int:
    return crc(magic + size.to_bytes(8, "little"))


def format_journal(buf: memoryview, size: int) -> None:
    header = np.frombuffer(buf, JOURNAL_HEADER_DTYPE, 1, JOURNAL_OFFSET)
    header[0] = np.zeros(1, JOURNAL_HEADER_DTYPE)[0]
    header["magic"] = JOURNAL_MAGIC
    header["size"] = size
    header["checksum"] = _header_checksum(JOURNAL_MAGIC, size)


class Journal:
    def __init__(self, buf: memoryview, limit: int, crash: CrashPoints | None = None):
        """limit: records may restore bytes only below this offset (the data area start)."""
        self.buf = buf
        self.header = np.frombuffer(buf, JOURNAL_HEADER_DTYPE, 1, JOURNAL_OFFSET)
        magic = bytes(self.header["magic"][0])
        self.size = int(self.header["size"][0])
        if magic != JOURNAL_MAGIC:
            raise FormatError("journal header is damaged (bad magic)")
        if int(self.header["checksum"][0]) != _header_checksum(magic, self.size):
            raise FormatError("journal header checksum mismatch")
        if self.size < 4096 or JOURNAL_OFFSET + self.size > limit:
            raise FormatError(f"journal size {self.size} does not fit the metadata area")
        self.limit = limit
        self.crash = crash
        self._state = self.header["state"]
        self._nrecords = self.header["nrecords"]
        self._sequence = self.header["sequence"]
        self.active: Transaction | None = None

    @property
    def state(self) -> int:
        return int(self._state[0])

    def pending(self) -> list[tuple[int, int, bytes]]:
        """The undo records of an interrupted transaction, oldest first (validated)."""
        if self.state == STATE_IDLE:
            return []
        if self.state != STATE_ACTIVE:
            raise FormatError(f"journal state word {self.state} is neither idle nor active")
        n = int(self._nrecords[0])
        seq = int(self._sequence[0])
        pos = JOURNAL_OFFSET + HEADER_SIZE
        end = JOURNAL_OFFSET + self.size
        records = []
        for i in range(n):
            if pos + JOURNAL_RECORD_HEADER > end:
                raise FormatError(f"journal record {i} lies past the end of the journal")
            offset, length, checksum = _RECORD.unpack_from(self.buf, pos)
            data_end = pos + JOURNAL_RECORD_HEADER + length
            if data_end > end:
                raise FormatError(f"journal record {i} is truncated")
            data = bytes(self.buf[pos + JOURNAL_RECORD_HEADER:data_end])
            if _record_checksum(seq, offset, data) != checksum:
                raise FormatError(f"journal record {i} checksum mismatch")
            if offset + length > self.limit or (
                    offset < JOURNAL_OFFSET + self.size and offset + length > JOURNAL_OFFSET):
                raise FormatError(f"journal record {i} points outside the metadata tables")
            records.append((offset, length, data))
            pos = data_end + (-length % 8)
        return records

    def recover(self) -> int:
        """Roll back an interrupted transaction; returns how many records were undone."""
        records = self.pending()
        if not records and self.state == STATE_IDLE:
            return 0
        for offset, length, data in reversed(records):
            self.buf[offset:offset + length] = data
        self._state[0] = STATE_IDLE
        self._nrecords[0] = 0
        return len(records)

    def update_record(self, table: np.ndarray, table_offset: int, index: int,
                      change: Callable[[], None]) -> None:
        """One table record changed atomically, by the shortest path: the same undo
        record, crash points, seal and commit point as begin() + save_record() +
        commit(), without a Transaction. For the hot path: a write that allocates
        nothing changes only its inode (size, mtime, ctime)."""
        if self.active is not None:
            raise RuntimeError("nested transaction")
        size = table.dtype.itemsize
        offset = table_offset + index * size
        seq = self._start()
        buf = self.buf
        data_at = _put_undo(buf, JOURNAL_OFFSET + HEADER_SIZE, seq, offset, size)
        self._nrecords[0] = 1
        crash = self.crash
        if crash:
            crash.step()
        try:
            change()
        except BaseException:
            buf[offset:offset + size] = buf[data_at:data_at + size]
            self._state[0] = STATE_IDLE
            self._nrecords[0] = 0
            raise
        _seal_at(buf, offset, size)
        if crash:
            crash.step()
        self._state[0] = STATE_IDLE  # the commit point
        if crash:
            crash.step()

    def _start(self) -> int:
        """Step 1 of a transaction: a new sequence number, no records, ACTIVE."""
        seq = int(self._sequence[0]) + 1
        self._sequence[0] = seq
        self._nrecords[0] = 0
        self._state[0] = STATE_ACTIVE
        return seq

    def begin(self) -> Transaction:
        if self.active is not None:
            raise RuntimeError("nested transaction")
        self._start()
        self.active = Transaction(self)
        return self.active


def _put_undo(buf: memoryview, pos: int, seq: int, offset: int, length: int) -> int:
    """Write the undo record of buf[offset:offset+length] at journal position pos (its
    old bytes, then the header with their checksum); returns where the bytes went."""
    data_at = pos + JOURNAL_RECORD_HEADER
    buf[data_at:data_at + length] = buf[offset:offset + length]
    _RECORD.pack_into(buf, pos, offset, length, _record_checksum(seq, offset, buf[data_at:data_at + length]))
    return data_at


def _seal_at(buf: memoryview, offset: int, size: int) -> None:
    """format.seal for the record at buf[offset:offset+size], by its bytes: every
    record ends with its CRC-32 (a numpy view per call costs more than the CRC)."""
    _U32.pack_into(buf, offset + size - 4, zlib.crc32(buf[offset:offset + size - 4]))


def _record_checksum(seq: int, offset: int, data: bytes | memoryview) -> int:
    c = zlib.crc32(struct.pack("<QQI", seq, offset, len(data)))
    return zlib.crc32(data, c) & 0xFFFFFFFF


class Transaction:
    """One atomic metadata change. Use as a context manager: commit or roll back."""

    def __init__(self, journal: Journal):
        self.j = journal
        self.pos = JOURNAL_OFFSET + HEADER_SIZE
        self.end = JOURNAL_OFFSET + journal.size
        self.saved: set[tuple[int, int]] = set()
        self.records: list[tuple[int, int, int]] = []  # (offset, length, journal position)
        self.to_seal: dict[tuple[int, int], np.ndarray] = {}
        self.seq = int(journal._sequence[0])
        self.on_commit: list[Callable[[], None]] = []

    def room(self) -> int:
        return self.end - self.pos

    def save(self, offset: int, length: int) -> None:
        """Record the old bytes of [offset, offset+length) before they change."""
        key = (offset, length)
        if key in self.saved:
            return
        need = JOURNAL_RECORD_HEADER + length + (-length % 8)
        if self.pos + need > self.end:
            raise JournalFull(f"transaction needs more than {self.j.size} bytes of journal")
        _put_undo(self.j.buf, self.pos, self.seq, offset, length)
        self.records.append((offset, length, self.pos))
        self.pos += need
        self.j._nrecords[0] = len(self.records)  # the record counts from here on
        self.saved.add(key)
        if self.j.crash:
            self.j.crash.step()

    def save_record(self, table: np.ndarray, table_offset: int, index: int) -> None:
        """Save a whole table record and reseal its checksum at commit."""
        size = table.dtype.itemsize
        self.save(table_offset + index * size, size)
        self.to_seal[(table_offset, index)] = table

    def commit(self) -> None:
        buf = self.j.buf
        for (table_offset, index), table in self.to_seal.items():
            size = table.dtype.itemsize
            _seal_at(buf, table_offset + index * size, size)
        crash = self.j.crash
        if crash:
            crash.step()
        self.j._state[0] = STATE_IDLE  # the commit point
        self.j.active = None
        if crash:
            crash.step()
        for fn in self.on_commit:
            fn()

    def rollback(self) -> None:
        buf = self.j.buf
        for offset, length, pos in reversed(self.records):
            data_at = pos + JOURNAL_RECORD_HEADER
            buf[offset:offset + length] = buf[data_at:data_at + length]
        self.j._state[0] = STATE_IDLE
        self.j._nrecords[0] = 0
        self.j.active = None

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
