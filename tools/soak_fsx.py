"""The fsx phase of tools/soak.py: seeded random I/O on a few files against an in-memory
model, with a kill -9 of the daemon mid-run."""

from __future__ import annotations

import collections
import mmap
import os
import random

from soak_common import (
    MB2,
    KiB,
    MiB,
    Problem,
    Round,
    Scale,
    _difference,
    check,
    read_all,
    unmount_check,
)

FSX_OPS = {"write": 20, "dwrite": 6, "read": 18, "dread": 8, "mapwrite": 8, "mapread": 8, "truncate": 8,
           "fallocate": 5, "prealloc": 3, "fsync": 3, "dontneed": 5, "reopen": 3, "stat": 5}


class Mismatch(Exception):
    pass


class FsxFile:
    def __init__(self, path: str):
        self.path = path
        self.model = bytearray()
        self.fd = self.dfd = -1
        self.open(os.O_CREAT | os.O_EXCL)

    def open(self, extra: int = 0) -> None:
        self.fd = os.open(self.path, os.O_RDWR | extra, 0o644)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1

    def resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def store(self, off: int, data: bytes) -> None:
        if off + len(data) > len(self.model):
            self.resize(off + len(data))
        self.model[off:off + len(data)] = data

    def compare(self, what: str, got: bytes, off: int, n: int) -> None:
        diff = _difference(got, bytes(self.model[off:off + n]))
        if diff:
            raise Mismatch(f"{what} of {n} at {off}: {diff}")


def _fsx_offset(rng: random.Random, limit: int) -> int:
    """Uniform half the time, else near a page, the packed-file limit or a block boundary."""
    if limit <= 1:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(limit)
    base = rng.choice([4096 * rng.randint(1, 16), 64 * KiB, MB2 * rng.randint(1, max(1, limit // MB2))])
    return min(max(base + rng.randint(-16, 16), 0), limit - 1)


def _fsx_length(rng: random.Random) -> int:
    k = rng.random()
    if k < 0.2:
        return rng.randint(1, 16)
    if k < 0.6:
        return rng.randint(1, 4096)
    if k < 0.9:
        return rng.randint(4096, 64 * KiB)
    return rng.randint(64 * KiB, MiB)


def fsx_op(rng: random.Random, f: FsxFile, op: str, limit: int, count: collections.Counter,
           reference: bool = False) -> str:
    """Do one operation on f and on its model; compare what it reads. Returns a description."""
    size = len(f.model)
    if op in ("mapwrite", "mapread") and size == 0:
        op = "write"
    count[op] += 1
    if op in ("write", "dwrite", "read", "dread"):
        return _fsx_rw(rng, f, op, limit, count)
    if op in ("mapwrite", "mapread"):
        return _fsx_map(rng, f, op, count)
    if op in ("truncate", "fallocate", "prealloc"):
        return _fsx_size(rng, f, op, limit, reference)
    if op == "fsync":
        os.fsync(f.fd)
        return "fsync"
    if op == "dontneed":  # drop clean cached pages: the next reads come from the daemon
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return "fadvise DONTNEED"
    if op == "reopen":
        f.close()
        f.open()
        return "reopen"
    got = (os.fstat(f.fd).st_size, os.fstat(f.dfd).st_size, os.stat(f.path).st_size)
    if got != (size,) * 3:
        raise Mismatch(f"sizes (fstat, fstat of the O_DIRECT descriptor, stat) are {got}, the model has {size}")
    return "stat"


def _fsx_rw(rng: random.Random, f: FsxFile, op: str, limit: int, count: collections.Counter) -> str:
    """pwrite or pread, buffered or O_DIRECT."""
    if op in ("write", "dwrite"):
        off = _fsx_offset(rng, limit)
        data = rng.randbytes(min(_fsx_length(rng), limit - off))
        n = os.pwrite(f.fd if op == "write" else f.dfd, data, off)
        if n != len(data):
            raise Mismatch(f"{op} of {len(data)} at {off} wrote {n}")
        f.store(off, data)
        return f"{op} {len(data)}@{off}"
    off, n = _fsx_offset(rng, limit + 64 * KiB), _fsx_length(rng)
    f.compare(op, os.pread(f.fd if op == "read" else f.dfd, n, off), off, n)
    count["reads compared"] += 1
    return f"{op} {n}@{off}"


def _fsx_map(rng: random.Random, f: FsxFile, op: str, count: collections.Counter) -> str:
    """A store or a read through a shared mapping of the whole file (not empty)."""
    size = len(f.model)
    off = rng.randrange(size)
    n = min(_fsx_length(rng), size - off)
    with mmap.mmap(f.fd, size, mmap.MAP_SHARED) as m:
        if op == "mapwrite":
            data = rng.randbytes(n)
            m[off:off + n] = data
            f.store(off, data)
            if rng.random() < 0.5:
                m.flush()
        else:
            f.compare("read through a shared mapping", m[off:off + n], off, n)
            count["reads compared"] += 1
    return f"{op} {n}@{off}"


def _fsx_size(rng: random.Random, f: FsxFile, op: str, limit: int, reference: bool) -> str:
    """ftruncate, posix_fallocate or the prealloc control: the size changes, no byte does."""
    size = len(f.model)
    if op == "truncate":
        new = rng.choice([rng.randrange(size + 1), rng.randrange(limit + 1), _fsx_offset(rng, limit + 1)])
        os.ftruncate(f.fd, new)
        f.resize(new)
        return f"truncate {new}"
    if op == "fallocate":
        # pyfuse3 has no fallocate: glibc's posix_fallocate then writes a zero byte into
        # every 4 KiB where a zero is (or past the end): the size grows, no byte changes.
        # That costs two requests per 4 KiB, so ranges stay short.
        off = _fsx_offset(rng, limit)
        n = min(rng.randint(1, rng.choice([16 * KiB, 128 * KiB])), limit - off)
        os.posix_fallocate(f.fd, off, n)
        if off + n > size:
            f.resize(off + n)
        return f"posix_fallocate {n}@{off}"
    # prealloc: fallocate(2) mode 0 through the control channel: blocks move
    new = rng.randint(1, limit)
    if reference:
        os.posix_fallocate(f.fd, 0, new)
    else:
        os.setxattr(f.path, "user.pmemfs.prealloc", str(new).encode())
    if new > size:
        f.resize(new)
    return f"prealloc {new}"


def fsx_sequence(seed: int, s: Scale, root: str, crash=None, inject: bool = False,
                 reference: bool = False) -> tuple[list[FsxFile], collections.Counter]:
    """The fsx operations of a seed on files in root, each checked against the model, then
    the whole files, buffered and O_DIRECT. crash() is called at the kill points; reference:
    the run is on tmpfs (prealloc becomes posix_fallocate). Raises Mismatch saying where."""
    rng = random.Random(seed)
    files = [FsxFile(os.path.join(root, f"f{i}")) for i in range(rng.randint(1, s.fsx_files))]
    ops, weights = list(FSX_OPS), list(FSX_OPS.values())
    kill_at = set(rng.sample(range(s.fsx_ops // 4, s.fsx_ops), s.fsx_kills))
    count: collections.Counter = collections.Counter()
    recent: collections.deque = collections.deque(maxlen=6)
    n, i = 0, 0
    try:
        for n in range(1, s.fsx_ops + 1):
            i = rng.randrange(len(files))
            op = fsx_op(rng, files[i], rng.choices(ops, weights)[0], s.fsx_max, count, reference)
            recent.append(f"{n}: {op} f{i}")
            if n in kill_at and crash is not None:
                crash()
                count["kill -9"] += 1
        n = "end"
        if inject:  # --inject-fault: one byte changed behind the model, which must notice
            f = max(files, key=lambda f: len(f.model))
            at = len(f.model) // 2
            os.pwrite(f.fd, bytes([f.model[at] ^ 0xFF]) if f.model else b"x", at)
        for i in range(len(files)):
            f = files[i]
            f.compare("whole-file read", read_all(f.path), 0, len(f.model))
            f.compare("whole-file O_DIRECT read", read_all(f.path, direct=True), 0, len(f.model))
    except Mismatch as e:
        raise Mismatch(f"op {n} on f{i}: {e} (ops before: {'; '.join(recent)})") from None
    finally:
        for f in files:
            f.close()
    return files, count


def phase_fsx(r: Round) -> str:
    s = r.scale
    m = r.mount(r.region(s.fsx_region))
    try:
        # A kill -9 on the way: the standby takes over, every descriptor stays open.
        files, count = fsx_sequence(r.seed, s, m.path, crash=m.crash, inject=r.inject)
    except Mismatch as e:
        # Whose fault: the same operations on tmpfs tell a pmemfs bug from a model bug.
        try:
            fsx_sequence(r.seed, s, r.janitor.scratch("fsx-reference"), reference=True)
            verdict = "the same operations on tmpfs agree with the model"
        except Mismatch as ref:
            verdict = f"the same operations on tmpfs disagree with the model too (the model is wrong): {ref}"
        raise Problem(f"{e}; {verdict}") from None
    m.unmount()
    m.start()
    for i, f in enumerate(files):
        diff = _difference(read_all(f.path), bytes(f.model))
        check(not diff, f"f{i} after an unmount and a new mount: {diff}")
    unmount_check(m)
    r.numbers.update(ops=s.fsx_ops, files=len(files), reads=count["reads compared"], kills=count["kill -9"])
    mix = ", ".join(f"{count[o]} {o}" for o in ("dwrite", "dread", "mapwrite", "mapread", "truncate",
                                                "fallocate", "prealloc"))
    return (f"{s.fsx_ops} ops on {len(files)} file(s), {count['reads compared']} reads compared "
            f"({mix}), {count['kill -9']} kill -9 mid-run, whole files buffered+O_DIRECT, "
            f"again after remount")
