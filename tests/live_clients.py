"""Client processes for the live-update tests: each keeps its descriptors open for
its whole life, fails (exit 1, one line on stderr) at the first error, and stops
when the stop file appears. Writers print how many operations they did, so the same
seeded workload can be replayed without kills (--count) as the oracle.

    python live_clients.py ROLE DIR SEED (--stop FILE | --count N)
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import time

RECORD = 64
PATTERN_SIZE = 8 << 20
MAP_SIZE = 2 << 20
LISTED = 300


def pattern(offset: int, n: int) -> bytes:
    """Deterministic content: each 8-byte word holds its own offset."""
    first = offset // 8
    words = b"".join((first + i).to_bytes(8, "little") for i in range(-(-n // 8) + 1))
    return words[offset % 8: offset % 8 + n]


def prepare(root: str) -> None:
    """What the readers need before the workload starts (not part of the oracle)."""
    os.makedirs(os.path.join(root, "listed"), exist_ok=True)
    with open(os.path.join(root, "pattern"), "wb") as f:
        f.write(pattern(0, PATTERN_SIZE))
    for i in range(LISTED):
        with open(os.path.join(root, "listed", f"f{i:04d}"), "wb") as f:
            f.write(b"x" * (i % 7))


class Run:
    def __init__(self, stop: str | None, count: int | None):
        self.stop, self.count, self.done = stop, count, 0

    def more(self) -> bool:
        if self.count is not None:
            return self.done < self.count
        return not (self.done % 16 == 0 and os.path.exists(self.stop))


def seq_writer(root: str, rng: random.Random, run: Run) -> None:
    fd = os.open(os.path.join(root, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while run.more():
        os.write(fd, f"record {run.done:08d} {rng.getrandbits(64):016x}".ljust(RECORD - 1).encode() + b"\n")
        os.fsync(fd)
        run.done += 1
        pace(run)
    os.close(fd)


def mmap_writer(root: str, rng: random.Random, run: Run) -> None:
    fd = os.open(os.path.join(root, "mapped"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, MAP_SIZE)
    m = mmap.mmap(fd, MAP_SIZE, mmap.MAP_SHARED)
    while run.more():
        at = rng.randrange(MAP_SIZE // 8) * 8
        m[at:at + 8] = (run.done + 1).to_bytes(8, "little")
        run.done += 1
        if run.done % 64 == 0:
            m.flush()
        pace(run)
    m.flush()
    m.close()
    os.close(fd)


def churner(root: str, rng: random.Random, run: Run) -> None:
    """Creates, renames, links and unlinks in its own directory, by a model, so
    every call's outcome is known: any error is a failure."""
    d = os.path.join(root, "churn")
    os.makedirs(d, exist_ok=True)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    files: list[str] = []
    dirs: list[str] = []
    serial = 0
    while run.more():
        op = rng.choice(("create", "create", "rename", "unlink", "link", "mkdir", "rmdir", "write"))
        if op == "create" or (not files and op in ("rename", "unlink", "link", "write")):
            serial += 1
            name = f"f{serial}"
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd)
            os.write(fd, name.encode() * rng.randrange(1, 50))
            os.close(fd)
            files.append(name)
        elif op == "rename":
            old = files.pop(rng.randrange(len(files)))
            serial += 1
            new = f"r{serial}"
            os.rename(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)
            files.append(new)
        elif op == "unlink":
            os.unlink(files.pop(rng.randrange(len(files))), dir_fd=dfd)
        elif op == "link":
            serial += 1
            new = f"l{serial}"
            os.link(rng.choice(files), new, src_dir_fd=dfd, dst_dir_fd=dfd)
            files.append(new)
        elif op == "write":
            fd = os.open(rng.choice(files), os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
            os.write(fd, b"+%d" % serial)
            os.close(fd)
        elif op == "mkdir":
            serial += 1
            os.mkdir(f"d{serial}", dir_fd=dfd)
            dirs.append(f"d{serial}")
        elif op == "rmdir" and dirs:
            os.rmdir(dirs.pop(rng.randrange(len(dirs))), dir_fd=dfd)
        run.done += 1
        pace(run)
    os.close(dfd)


def reader(root: str, rng: random.Random, run: Run) -> None:
    """Reads the pattern file through one descriptor, dropping its cached pages each
    time so the reads reach the daemon."""
    fd = os.open(os.path.join(root, "pattern"), os.O_RDONLY)
    while run.more():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        at = rng.randrange(PATTERN_SIZE - 65536)
        got = os.pread(fd, 65536, at)
        if got != pattern(at, 65536):
            raise AssertionError(f"pattern differs at {at}")
        run.done += 1
        pace(run)
    os.close(fd)


def lister(root: str, rng: random.Random, run: Run) -> None:
    """Lists a directory of known content, slowly, entry by entry, so listings span
    daemon restarts: nothing may be repeated or skipped."""
    d = os.path.join(root, "listed")
    want = {f"f{i:04d}" for i in range(LISTED)}
    while run.more():
        seen = []
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                if rng.random() < 0.05:
                    time.sleep(0.002)
        if sorted(seen) != sorted(want):
            dup = len(seen) - len(set(seen))
            raise AssertionError(f"listing has {len(seen)} entries ({dup} repeated), "
                                 f"{len(want - set(seen))} missing")
        run.done += 1
        pace(run)


ROLES = {"seq": seq_writer, "mmap": mmap_writer, "churn": churner, "read": reader, "list": lister}


def pace(run: Run) -> None:
    if run.count is None:
        time.sleep(0.003)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=[*ROLES, "prepare"])
    p.add_argument("root")
    p.add_argument("seed", type=int)
    p.add_argument("--stop")
    p.add_argument("--count", type=int)
    a = p.parse_args()
    if a.role == "prepare":
        prepare(a.root)
        return 0
    run = Run(a.stop, a.count)
    try:
        ROLES[a.role](a.root, random.Random(a.seed), run)
    except BaseException as e:
        print(f"{a.role}: after {run.done} operations: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"ops={run.done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
