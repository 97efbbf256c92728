"""The request-counting pass of tools/bench.py: FUSE requests per operation.

Never part of the timed runs: each pmemfs target is mounted again on a small region of
its own with `pmemfs mount --debug --log FILE` (one `pmemfs.fuse DEBUG opname(...)`
line per request its handlers answer), and passthrough_ll, the reference, with -d (one
`opcode: NAME` line per request libfuse receives). Each workload runs a few hundred
operations with plain os calls (fio's psync calls are the same system calls), and the
lines the daemon wrote meanwhile are counted by kind.

pmemfs does not log flush, release, releasedir and forget (they do nothing or have no
answer); they are left out of passthrough_ll's counts too, so the two compare.
"""

from __future__ import annotations

import collections
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable

from bench_targets import Target, drop_caches

MiB = 1 << 20
PMEMFS_LINE = re.compile(r" pmemfs\.fuse DEBUG (\w+)\(")
LIBFUSE_LINE = re.compile(r"opcode: (\w+) \(")
NOT_LOGGED = {"flush", "release", "releasedir", "forget", "batch_forget", "interrupt"}


def requests_in(log: str, offset: int, pattern: re.Pattern) -> collections.Counter:
    """The requests a daemon logged after offset, by kind (lower case)."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        kinds = (m.group(1).lower() for line in f if (m := pattern.search(line)))
        return collections.Counter(k for k in kinds if k not in NOT_LOGGED)


class _Windows:
    """The request log of one mounted target, read in windows: one per workload."""

    def __init__(self, t: Target, name: str, log: str, pattern: re.Pattern):
        self.t, self.name, self.log, self.pattern = t, name, log, pattern
        self.out: list[dict] = []

    def window(self, label: str, n: int, fn: Callable[[], None],
               prepare: Callable[[], None] | None = None) -> None:
        if prepare:
            prepare()
        time.sleep(0.05)  # what the preparation still sends (forgets, readahead) lands before the mark
        mark = os.path.getsize(self.log)
        fn()
        time.sleep(0.1)  # and what this workload sends after its last call returned lands inside
        got = requests_in(self.log, mark, self.pattern)
        self.out.append({"workload": label, "target": self.name, "ops": n, "per_op": sum(got.values()) / n,
                         "by_kind": {k: v / n for k, v in sorted(got.items())}})

    def write_file(self, name: str, bs: int, n: int) -> None:
        buf = b"x" * bs
        fd = os.open(self.t.p(name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            for _ in range(n):
                os.write(fd, buf)
        finally:
            os.close(fd)


def count_requests(t: Target, name: str, log: str, pattern: re.Pattern, ops: int) -> list[dict]:
    """Run the short workloads on t (mounted with its request log at log); one dict per
    workload: {workload, target: name, ops, per_op, by_kind}. `ops` 4 KiB / 128 KiB /
    metadata operations; a quarter as many 1 MiB ones."""
    w = _Windows(t, name, log, pattern)
    _io_requests(w, ops)
    _meta_requests(w, ops)
    return w.out


def _io_requests(w: _Windows, ops: int) -> None:
    t, window, write_file = w.t, w.window, w.write_file
    big = max(4, ops // 4)
    for label, bs, n in (("write 4 KiB, new file", 4096, ops), ("write 128 KiB, new file", 128 << 10, ops),
                         ("write 1 MiB, new file", MiB, big)):
        window(label, n, lambda bs=bs, n=n: write_file("new.dat", bs, n))
        os.unlink(t.p("new.dat"))

    data = t.p("data.dat")

    def overwrite() -> None:
        fd = os.open(data, os.O_WRONLY)
        try:
            for i in range(big):
                os.pwrite(fd, b"y" * MiB, i * MiB)
        finally:
            os.close(fd)

    window("overwrite 1 MiB", big, overwrite, prepare=lambda: write_file("data.dat", MiB, big))

    def read_all(bs: int) -> Callable[[], None]:
        def go() -> None:
            fd = os.open(data, os.O_RDONLY)
            try:
                while os.read(fd, bs):
                    pass
            finally:
                os.close(fd)
        return go

    window("cold read 128 KiB", big * 8, read_all(128 << 10), prepare=drop_caches)
    window("cold read 1 MiB", big, read_all(MiB), prepare=drop_caches)

    def rand_read() -> None:
        rnd = random.Random(1)
        fd = os.open(data, os.O_RDONLY)
        try:
            for _ in range(ops):
                os.pread(fd, 4096, rnd.randrange(big * MiB // 4096) * 4096)
        finally:
            os.close(fd)

    window("random read 4 KiB, cold", ops, rand_read, prepare=drop_caches)
    os.unlink(data)


def _meta_requests(w: _Windows, ops: int) -> None:
    window = w.window
    d = w.t.p("meta")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(ops)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    window("create", ops, lambda: [os.close(os.open(p, flags, 0o644)) for p in names])
    window("stat, cold dentries", ops, lambda: [os.stat(p) for p in names], prepare=lambda: drop_caches(2))

    def ls() -> None:
        subprocess.run(["ls", "-l", d], stdout=subprocess.DEVNULL, check=True)

    window("ls -l, cold (per file)", ops, ls, prepare=drop_caches)
    window("ls -l, warm (per file)", ops, ls)
    window("unlink", ops, lambda: [os.unlink(p) for p in names])
    shutil.rmtree(d, ignore_errors=True)
