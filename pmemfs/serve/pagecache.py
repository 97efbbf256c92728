"""What the daemon knows about the kernel's page cache of files that have O_DIRECT writers.

The FUSE kernel module caches pages of a file for buffered readers (pmemfs opens files
with keep_cache). An O_DIRECT write bypasses that cache, and the kernel does not always
drop the pages it covers: its generic direct-write path invalidates once before the
write and, for an asynchronous (AIO) write, not after, so a buffered read served while
the write is in flight leaves old bytes cached for good; and not every kernel drops
pages for writes through a FOPEN_DIRECT_IO handle (this one, 6.18, does, before each
request). So the daemon drops the cached pages itself around a direct write whenever
buffered I/O of the file may have cached some since the last time it dropped them, and
depends on no kernel version (docs/DESIGN.md, "O_DIRECT coherence").

This table is the bookkeeping: per inode with O_DIRECT handles open, how many buffered
reads and writes were served, and that count when the last invalidation began. It is
in memory only; a new daemon starts knowing nothing, which means "may be cached", so
the first direct write to each file invalidates once.
"""

from __future__ import annotations


class DirectWriters:
    def __init__(self) -> None:
        self.opens: dict[int, int] = {}  # ino -> O_DIRECT handles open
        self.touched: dict[int, int] = {}  # ino -> buffered reads/writes served meanwhile
        self.clean: dict[int, int] = {}  # ino -> `touched` when its last invalidation began

    def opened(self, ino: int) -> None:
        self.opens[ino] = self.opens.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        left = self.opens.get(ino, 0) - 1
        if left > 0:
            self.opens[ino] = left
            return
        for table in (self.opens, self.touched, self.clean):
            table.pop(ino, None)

    def buffered_io(self, ino: int) -> None:
        """A read or write through the page cache: it may leave pages cached."""
        if ino in self.opens:
            self.touched[ino] = self.touched.get(ino, 0) + 1

    def may_be_cached(self, ino: int) -> bool:
        return self.clean.get(ino) != self.touched.get(ino, 0)

    def begin(self, ino: int) -> int:
        """An invalidation of ino's pages starts; returns its mark for done()."""
        return self.touched.get(ino, 0)

    def done(self, ino: int, mark: int) -> None:
        """The invalidation that began at mark finished: pages cached after it began may
        hold bytes from before a write, so only I/O counted before the mark is covered."""
        if ino in self.opens:
            self.clean[ino] = mark
