"""Several real processes on one mount at once, with the outcomes that are defined checked
exactly and the ones that are not checked for what must hold anyway.

One file, four processes (test_one_file_writer_mmapper_truncater_reader). The file is
made of 8-byte words; the word at offset o holds (o/8 XOR a file tag) in its low half and
(role, sequence number) in its high half, so any byte read can be judged alone.
  - chaos (no defined outcome for the bytes): a writer pwrites runs of words anywhere in
    [0, 3 MiB); a mapper stores words through a MAP_SHARED mapping of the first M bytes
    and msyncs now and then; a truncater ftruncates to random sizes >= M (so the mapping
    never reaches past the end: a store there would be SIGBUS); a reader preads random
    ranges, buffered and O_DIRECT. What must hold: every byte the reader sees is 0 or the
    tag byte of its own offset (nothing from another offset, another file, or garbage),
    and no call fails.
  - quiescent point: all stop, the mapper msyncs. Now the page cache and the daemon must
    agree (a buffered read equals an O_DIRECT read), and every word must be whole: 0, or
    the right tag with a role and sequence number that were really written. Call it R.
  - defined ending: the truncater's last ftruncate(T), then the writer and the mapper at
    once, in disjoint 64-byte slots of the same pages (the mapper the odd slots below M,
    the writer the even ones below M and any range above M, some past T). Defined: size =
    max(T, end of the last writes), bytes = R[:T], zeros up to the size (no stale bytes
    past T), then the writes. The same final operations (same seeds, same process
    functions, run concurrently) are replayed on a tmpfs copy of R; pmemfs, tmpfs and an
    in-memory model must agree byte for byte, buffered and O_DIRECT, and again after an
    unmount and a new mount.

Renames in a storm (test_rename_storm_under_a_lister_and_lookups). Two renamer processes
each own a set of files in two directories and rename them (to fresh names, across the
directories, over one another, RENAME_EXCHANGE, RENAME_NOREPLACE onto an existing name,
rename onto itself), create them (written in a private directory, then renamed in) and
unlink them, by a seeded model, timing every call (CLOCK_MONOTONIC before and after). Each
name belongs to one renamer, so its history is a sequence of states, each possibly
visible from its call's start and surely visible from its call's end until the next
call. Meanwhile a lister lists both directories and a lookup process opens and reads names
being renamed. What must hold:
  - the final tree is exactly the one the models predict (every name, every content), and
    the same as the renamers' operations replayed on tmpfs; nothing was lost and no inode
    leaked (statfs counts come back);
  - no listing has a name twice; every listed name was possibly present during that
    listing; every name whose file stayed the same for the whole listing is in it
    (POSIX leaves names added or removed during a pass unspecified, nothing more);
  - an open of a name returns content that is whole (exactly some file's content) and is
    that of a file the name possibly held during the open; ENOENT only when the name was
    possibly absent (rename over a name is atomic: the name never goes missing).

Both tests then unmount: `pmemfs-fsck -n` must exit 0 and the daemon's log must have no
traceback and no ERROR line.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
from conftest import wait_for

CTX = multiprocessing.get_context("fork")
KiB, MiB = 1 << 10, 1 << 20

# ----------------------------------------------------------------- shared helpers


def fsck_cli(region: str) -> subprocess.CompletedProcess:
    """`pmemfs-fsck -n REGION` with the code under test (the venv's script runs main's)."""
    return subprocess.run([sys.executable, "-c", "from pmemfs.tools.fsck import main; main()", "-n", region],
                          capture_output=True, text=True, timeout=120)


def log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line
            or " CRITICAL " in line]


def unmount_and_check(m) -> None:
    """Unmount, then what must hold of every clean run: fsck -n exits 0, a quiet log."""
    m.unmount()
    r = fsck_cli(m.region)
    assert r.returncode == 0, f"pmemfs-fsck -n exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    bad = log_problems(m.log())
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:20])


def run_children(targets: list[tuple[str, object, tuple]], timeout: float = 120) -> dict[str, object]:
    """Start one process per (role, fn, args); fn(*args) returns a result. Returns every
    role's result; fails with the child's traceback if any raised."""
    q = CTX.Queue()
    procs = {}
    for role, fn, args in targets:
        p = CTX.Process(target=_child, args=(q, role, fn, args))
        p.start()
        procs[role] = p
    return collect(q, procs, timeout)


def _child(q, role: str, fn, args: tuple) -> None:
    try:
        q.put((role, "ok", fn(*args)))
    except BaseException:
        q.put((role, "error", traceback.format_exc()))


def collect(q, procs: dict, timeout: float) -> dict[str, object]:
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < len(procs):
            try:
                role, status, value = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                missing = sorted(set(procs) - set(results) - {e[0] for e in errors})
                raise AssertionError(f"processes {missing} gave no result in {timeout} s") from None
            if status == "ok":
                results[role] = value
            else:
                errors.append((role, value))
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, "\n".join(f"{role}:\n{tb}" for role, tb in errors)
    return results


def read_all(path: str, direct: bool = False) -> bytes:
    """The whole file; direct: with O_DIRECT (past the page cache, from the daemon)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, max(size, 1) + 4096)  # page-aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)


# ------------------------------------------------------- one file, four processes

TAG = 0x5A3C9E11
R_INIT, R_WRITER, R_MAPPER = 1, 2, 3
M = 48 * KiB  # the mapped window, and the smallest size the truncater sets
MAX = 3 * MiB  # where the chaos writes go
SLOT = 64
SEQ_BITS = 28


def words(offset: int, n: int, role: int, seq: int) -> bytes:
    idx = np.arange(offset // 8, (offset + n) // 8, dtype=np.uint64)
    w = ((idx ^ np.uint64(TAG)) & np.uint64(0xFFFFFFFF)) | np.uint64(((role << SEQ_BITS) | seq) << 32)
    return w.astype("<u8").tobytes()


def _tags(offset: int, count: int) -> np.ndarray:
    idx = np.arange(offset // 8, offset // 8 + count, dtype=np.uint64)
    return ((idx ^ np.uint64(TAG)) & np.uint64(0xFFFFFFFF)).astype("<u4").view(np.uint8).reshape(-1, 4)


def first_bad_byte(buf: bytes, offset: int) -> int | None:
    """Tear-proof check (racing reads may mix two writes within a word): every byte of a
    word's low half is 0 or its tag byte, and the role nibble is 0 or a real role."""
    n = len(buf) // 8
    if len(buf) % 8:
        return n * 8
    a = np.frombuffer(buf, np.uint8).reshape(-1, 8)
    low_ok = (a[:, :4] == 0) | (a[:, :4] == _tags(offset, n))
    role_ok = np.isin(a[:, 7] >> 4, (0, R_INIT, R_WRITER, R_MAPPER))
    bad = np.flatnonzero(~(low_ok.all(axis=1) & role_ok))
    return None if not len(bad) else offset + int(bad[0]) * 8


def bad_words(buf: bytes, offset: int, max_seq: dict[int, int]) -> list[str]:
    """Strict check of a quiet file: every word is 0 or whole and was really written."""
    a = np.frombuffer(buf, "<u8")
    idx = np.arange(offset // 8, offset // 8 + len(a), dtype=np.uint64)
    low = a & np.uint64(0xFFFFFFFF)
    role = (a >> np.uint64(32 + SEQ_BITS)).astype(np.int64)
    seq = ((a >> np.uint64(32)) & np.uint64((1 << SEQ_BITS) - 1)).astype(np.int64)
    ok = a == 0
    for r, top in max_seq.items():
        ok |= (low == ((idx ^ np.uint64(TAG)) & np.uint64(0xFFFFFFFF))) & (role == r) & (seq >= 1) & (seq <= top)
    return [f"word at {offset + int(i) * 8}: {int(a[i]):#018x}" for i in np.flatnonzero(~ok)[:5]]


@dataclass
class Sync:
    """The events the parent uses to step the four processes through the phases."""

    stop_chaos: object = field(default_factory=CTX.Event)
    go_final: object = field(default_factory=CTX.Event)
    do_truncate: object = field(default_factory=CTX.Event)
    end: object = field(default_factory=CTX.Event)
    quiet: dict = field(default_factory=lambda: {r: CTX.Event() for r in ("writer", "mapper", "truncater")})
    seqs: dict = field(default_factory=lambda: {r: CTX.Value("q", 0) for r in (R_WRITER, R_MAPPER)})


def final_writes(seed: int) -> list[tuple[int, int, int]]:
    """The writer's writes after the last truncate: (offset, length, seq)."""
    rng = random.Random(seed * 7 + 1)
    out = []
    for i in range(150):
        if rng.random() < 0.6:  # one even slot below M: shares pages with the mapper's slots
            off = rng.randrange(0, M // SLOT // 2) * 2 * SLOT
            out.append((off, SLOT, (1 << 20) + i))
        else:  # anywhere above M, some past the last truncate (a gap that must read as zeros)
            off = rng.randrange(M // 8, (MAX + 512 * KiB) // 8) * 8
            out.append((off, rng.randrange(1, 2048) * 8, (1 << 20) + i))
    return out


def final_stores(seed: int) -> list[tuple[int, int]]:
    """The mapper's stores after the last truncate: (offset of an odd slot, seq)."""
    rng = random.Random(seed * 7 + 2)
    return [(rng.randrange(0, M // SLOT // 2) * 2 * SLOT + SLOT, (1 << 20) + i) for i in range(300)]


def final_size(seed: int) -> int:
    return random.Random(seed * 7 + 3).randrange(M // 8, MAX // 8) * 8


def writer(path: str, seed: int, s: Sync | None) -> int:
    fd = os.open(path, os.O_WRONLY)
    n = 0
    if s is not None:
        rng = random.Random(seed)
        while not s.stop_chaos.is_set():
            n += 1
            off = rng.randrange(0, MAX // 8) * 8
            length = min(rng.choice((8, 64, 512, 4096, 20000, 70000)) // 8 * 8, MAX - off) or 8
            s.seqs[R_WRITER].value = n
            os.pwrite(fd, words(off, length, R_WRITER, n), off)
        s.quiet["writer"].set()
        s.go_final.wait()
    for off, length, seq in final_writes(seed):
        os.pwrite(fd, words(off, length, R_WRITER, seq), off)
    os.close(fd)
    return n


def mapper(path: str, seed: int, s: Sync | None) -> int:
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, M, mmap.MAP_SHARED)
    n = 0
    if s is not None:
        rng = random.Random(seed + 1)
        while not s.stop_chaos.is_set():
            n += 1
            off = rng.randrange(0, M // 8) * 8
            length = min(rng.choice((8, 8, 64, 4096)), M - off)
            s.seqs[R_MAPPER].value = n
            m[off:off + length] = words(off, length, R_MAPPER, n)
            if n % 50 == 0:
                m.flush()
        m.flush()  # msync(MS_SYNC): the daemon has every store now
        s.quiet["mapper"].set()
        s.go_final.wait()
    for off, seq in final_stores(seed):
        m[off:off + SLOT] = words(off, SLOT, R_MAPPER, seq)
    m.flush()
    m.close()
    os.close(fd)
    return n


def truncater(path: str, seed: int, s: Sync) -> int:
    rng = random.Random(seed + 2)
    n = 0
    while not s.stop_chaos.is_set():
        n += 1
        size = rng.randrange(M // 8, 64 * KiB // 8) * 8 if rng.random() < 0.3 else rng.randrange(M // 8, MAX // 8) * 8
        os.truncate(path, size)
        time.sleep(0.002)
    s.quiet["truncater"].set()
    s.do_truncate.wait()
    os.truncate(path, final_size(seed))  # the last truncate
    return n


def reader(path: str, seed: int, s: Sync) -> int:
    rng = random.Random(seed + 3)
    fds = [os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY | os.O_DIRECT)]
    buf = mmap.mmap(-1, 256 * KiB)  # aligned for O_DIRECT
    n = 0
    while not s.end.is_set():
        n += 1
        off = rng.randrange(0, (MAX + 256 * KiB) // 4096) * 4096
        length = rng.choice((4096, 65536, 256 * KiB))
        direct = rng.random() < 0.3
        got = os.preadv(fds[direct], [memoryview(buf)[:length]], off)
        data = bytes(buf[:got])
        bad = first_bad_byte(data, off)
        if bad is not None:
            raise AssertionError(f"read {n} ({'O_DIRECT' if direct else 'buffered'}, {length} at {off}): "
                                 f"the word at {bad} is neither 0 nor its own: {data[bad - off:bad - off + 8].hex()}")
    for fd in fds:
        os.close(fd)
    return n


def model_final(r: bytes, seed: int) -> bytes:
    t = final_size(seed)
    out = bytearray(r[:t].ljust(t, b"\0"))
    for off, length, seq in final_writes(seed):
        if off + length > len(out):
            out.extend(bytes(off + length - len(out)))
        out[off:off + length] = words(off, length, R_WRITER, seq)
    for off, seq in final_stores(seed):
        out[off:off + SLOT] = words(off, SLOT, R_MAPPER, seq)
    return bytes(out)


def replay_on_tmpfs(r: bytes, seed: int) -> bytes:
    d = tempfile.mkdtemp(prefix="pmemfs-conc-", dir="/dev/shm")
    try:
        path = os.path.join(d, "f")
        with open(path, "wb") as f:
            f.write(r)
        os.truncate(path, final_size(seed))
        run_children([("writer", writer, (path, seed, None)), ("mapper", mapper, (path, seed, None))])
        with open(path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d)


def test_one_file_writer_mmapper_truncater_reader(mounted):
    seed = 1
    path = mounted.p("shared")
    with open(path, "wb") as f:
        f.write(words(0, M, R_INIT, 1))
    s = Sync()
    q = CTX.Queue()
    roles = {"writer": writer, "mapper": mapper, "truncater": truncater, "reader": reader}
    procs = {role: CTX.Process(target=_child, args=(q, role, fn, (path, seed, s))) for role, fn in roles.items()}
    for p in procs.values():
        p.start()
    try:
        time.sleep(2.5)  # the chaos phase
        s.stop_chaos.set()
        for role, ev in s.quiet.items():
            assert ev.wait(60), f"{role} did not stop"
        # Quiet: the page cache and the daemon must agree, and every word must be whole.
        r = read_all(path)
        assert read_all(path, direct=True) == r, "after msync, an O_DIRECT read differs from the page cache"
        assert len(r) == os.stat(path).st_size and len(r) >= M
        bad = bad_words(r, 0, {R_INIT: 1, R_WRITER: s.seqs[R_WRITER].value, R_MAPPER: s.seqs[R_MAPPER].value})
        assert not bad, f"at the quiet point: {bad}"
        s.do_truncate.set()
        procs["truncater"].join(60)  # its last truncate has returned
        assert os.stat(path).st_size == final_size(seed)
        s.go_final.set()
        for role in ("writer", "mapper", "truncater"):
            procs[role].join(60)
        s.end.set()
    finally:
        s.stop_chaos.set()
        s.do_truncate.set()
        s.go_final.set()
        s.end.set()
        counts = collect(q, procs, 60)
    assert all(counts[role] > 10 for role in roles), counts  # each really ran in the chaos
    want = model_final(r, seed)
    tmpfs = replay_on_tmpfs(r, seed)
    assert tmpfs == want, "the model of the final state disagrees with tmpfs (the test is wrong)"
    got = read_all(path)
    assert len(got) == len(want) == os.stat(path).st_size, (len(got), len(want))
    assert got == want, f"final contents differ first at byte {_first_difference(got, want)}"
    assert read_all(path, direct=True) == want, "the daemon's copy differs from the page cache"
    unmount_and_check(mounted)
    mounted.start()
    assert read_all(path) == want, "lost after an unmount and a new mount"


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ------------------------------------------------------------------ rename storm

RENAMERS = 2
OWNED = 80
STABLE = 50
DIRS = ("A", "B")
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def content(ident: int) -> bytes:
    """A file's whole content, from which its identity can be read back."""
    unit = f"id {ident:07d}\n".encode()
    return unit * (7000 if ident % 41 == 0 else 1 + ident % 37)  # a few above the packed size


def identity(data: bytes) -> int | None:
    """The file whose content data is, or None when it is no file's whole content."""
    try:
        ident = int(data[3:10])
    except ValueError:
        return None
    return ident if data == content(ident) else None


def initial(r: int) -> dict[int, tuple[str, str]]:
    """Renamer r's files at the start: id -> (directory, name)."""
    return {r * 100_000 + i: (DIRS[i % 2], f"{r}_{i:06d}") for i in range(OWNED)}


def stable_names() -> dict[int, tuple[str, str]]:
    return {900_000 + i: (DIRS[i % 2], f"s{i:03d}") for i in range(STABLE)}


def setup_tree(root: str) -> None:
    for d in (*DIRS, *(f"tmp{r}" for r in range(RENAMERS))):
        os.mkdir(os.path.join(root, d))
    files = dict(stable_names())
    for r in range(RENAMERS):
        files.update(initial(r))
    for ident, (d, name) in files.items():
        with open(os.path.join(root, d, name), "wb") as f:
            f.write(content(ident))


def renamer(root: str, r: int, seed: int, stop, count: int | None = None, latest=None) -> tuple[int, list]:
    """Renames, creates and unlinks renamer r's files by its model until stop is set (or
    count operations). Returns (operations, log): each entry (t0, t1, changes) with
    changes [(dir, name, id or None)], the state each touched name has afterwards."""
    rng = random.Random(seed * 10 + r)
    files = initial(r)  # id -> (dir, name)
    serial, next_id, n, log = OWNED, r * 100_000 + OWNED, 0, []

    def p(loc: tuple[str, str]) -> str:
        return os.path.join(root, *loc)

    def fresh() -> tuple[str, str]:
        nonlocal serial
        serial += 1
        if latest is not None:  # tells the lookup process which names are fresh
            latest[r] = serial
        return (rng.choice(DIRS), f"{r}_{serial:06d}")

    while (count is None and not stop.is_set()) or (count is not None and n < count):
        n += 1
        ids = sorted(files)
        op = rng.random()
        if len(ids) < 40:
            op = 0.95
        elif len(ids) > 120:
            op = 0.9 if op < 0.5 else 0.5
        t0 = time.monotonic()
        if op < 0.40:  # to a fresh name, maybe in the other directory
            x = rng.choice(ids)
            old, new = files[x], fresh()
            os.rename(p(old), p(new))
            files[x] = new
            changes = [(*old, None), (*new, x)]
        elif op < 0.55:  # over another of its files, which is gone then
            x, y = rng.sample(ids, 2)
            old, new = files[x], files.pop(y)
            os.rename(p(old), p(new))
            files[x] = new
            changes = [(*old, None), (*new, x)]
        elif op < 0.70:
            x, y = rng.sample(ids, 2)
            renameat2(p(files[x]), p(files[y]), RENAME_EXCHANGE)
            files[x], files[y] = files[y], files[x]
            changes = [(*files[x], x), (*files[y], y)]
        elif op < 0.75:
            x, y = rng.sample(ids, 2)
            try:
                renameat2(p(files[x]), p(files[y]), RENAME_NOREPLACE)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            else:
                raise AssertionError(f"RENAME_NOREPLACE onto the existing {files[y]} succeeded")
            changes = []
        elif op < 0.80:
            x = rng.choice(ids)
            os.rename(p(files[x]), p(files[x]))
            changes = []
        elif op < 0.90:
            loc = files.pop(rng.choice(ids))
            os.unlink(p(loc))
            changes = [(*loc, None)]
        else:  # a new file appears whole: written aside, then renamed in
            x = next_id
            next_id += 1
            tmp = os.path.join(root, f"tmp{r}", "new")
            with open(tmp, "wb") as f:
                f.write(content(x))
            new = fresh()
            os.rename(tmp, p(new))
            files[x] = new
            changes = [(*new, x)]
        log.append((t0, time.monotonic(), changes))
    return n, log


def lister(root: str, stop) -> list:
    out = []
    while not stop.is_set():
        for d in DIRS:
            t0 = time.monotonic()
            with os.scandir(os.path.join(root, d)) as it:
                names = [e.name for e in it]
            out.append((t0, time.monotonic(), d, names))
    return out


def looker(root: str, seed: int, stop, latest) -> list:
    """Opens and reads names that are being renamed: recent fresh names of a renamer, names
    just listed, stable names. Records (t0, t1, dir, name, id or None for ENOENT) where
    [t0, t1] spans the open."""
    rng = random.Random(seed * 10 + 9)
    out = []
    listed: list[tuple[str, str]] = []
    while not stop.is_set():
        if not listed or rng.random() < 0.05:
            d = rng.choice(DIRS)
            listed = [(d, n) for n in os.listdir(os.path.join(root, d))]
        pick = rng.random()
        if pick < 0.6:
            loc = rng.choice(listed)
        elif pick < 0.9:
            r = rng.randrange(RENAMERS)
            loc = (rng.choice(DIRS), f"{r}_{max(latest[r] - rng.randrange(-1, 20), 0):06d}")
        else:
            loc = stable_names()[900_000 + rng.randrange(STABLE)]
        t0 = time.monotonic()
        try:
            fd = os.open(os.path.join(root, *loc), os.O_RDONLY)
        except FileNotFoundError:
            out.append((t0, time.monotonic(), *loc, None))
            continue
        t1 = time.monotonic()
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        ident = identity(data)
        if ident is None:
            raise AssertionError(f"{loc}: the content read is no file's whole content: {data[:40]!r}")
        out.append((t0, t1, *loc, ident))
    return out


class History:
    """For every (dir, name): its states in order, each (id or None, start, end) where start
    is the call that made it (t0, t1) and end the call that ended it (None: never)."""

    def __init__(self, logs: list[list]):
        self.states: dict[tuple[str, str], list[list]] = {}
        start = {**stable_names()}
        for r in range(RENAMERS):
            start.update(initial(r))
        for ident, loc in start.items():
            self.states[loc] = [[ident, (-1.0, -1.0), None]]
        for log in logs:
            for t0, t1, changes in log:
                for d, name, ident in changes:
                    s = self.states.setdefault((d, name), [[None, (-1.0, -1.0), None]])
                    s[-1][2] = (t0, t1)
                    s.append([ident, (t0, t1), None])

    def possible(self, loc: tuple[str, str], a: float, b: float) -> set:
        """The states the name possibly had at some moment of [a, b]."""
        out = set()
        for ident, start, end in self.states.get(loc, [[None, (-1.0, -1.0), None]]):
            if start[0] <= b and (end is None or end[1] >= a):
                out.add(ident)
        return out

    def sure(self, d: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The spans in which a name of directory d surely held one file: (from, to, name)."""
        rows = [(start[1], np.inf if end is None else end[0], name)
                for (dd, name), s in self.states.items() if dd == d
                for ident, start, end in s if ident is not None]
        return (np.array([x[0] for x in rows]), np.array([x[1] for x in rows]),
                np.array([x[2] for x in rows], dtype=object))

    def final(self) -> dict[tuple[str, str], int]:
        return {loc: s[-1][0] for loc, s in self.states.items() if s[-1][0] is not None}


def tree_of(root: str) -> dict[tuple[str, str], int | None]:
    out = {}
    for d in DIRS:
        for name in os.listdir(os.path.join(root, d)):
            with open(os.path.join(root, d, name), "rb") as f:
                out[(d, name)] = identity(f.read())
    return out


def test_rename_storm_under_a_lister_and_lookups(mounted):
    seed = 3
    setup_tree(mounted.path)
    st = os.statvfs(mounted.path)
    used_at_start = st.f_files - st.f_ffree
    files_at_start = STABLE + RENAMERS * OWNED
    stop = CTX.Event()
    latest = CTX.Array("q", [OWNED] * RENAMERS)
    q = CTX.Queue()
    targets = [(f"renamer{r}", renamer, (mounted.path, r, seed, stop, None, latest)) for r in range(RENAMERS)]
    targets += [("lister", lister, (mounted.path, stop)), ("looker", looker, (mounted.path, seed, stop, latest))]
    procs = {role: CTX.Process(target=_child, args=(q, role, fn, args)) for role, fn, args in targets}
    for p in procs.values():
        p.start()
    try:
        time.sleep(3.0)
    finally:
        stop.set()
        res = collect(q, procs, 120)
    logs = [res[f"renamer{r}"][1] for r in range(RENAMERS)]
    counts = [res[f"renamer{r}"][0] for r in range(RENAMERS)]
    listings, lookups = res["lister"], res["looker"]
    assert min(counts) > 50 and len(listings) > 10 and len(lookups) > 50, (counts, len(listings), len(lookups))
    h = History(logs)

    problems = []
    sure = {d: h.sure(d) for d in DIRS}
    for a, b, d, names in listings:
        if len(names) != len(set(names)):
            problems.append(f"a listing of {d} has {sorted(n for n in set(names) if names.count(n) > 1)[:5]} twice")
        for n in names:
            if not h.possible((d, n), a, b) - {None}:
                problems.append(f"a listing of {d} has {n}, which did not exist then")
        seen = set(names)
        s_from, s_to, s_name = sure[d]
        missing = [n for n in s_name[(s_from <= a) & (s_to >= b)] if n not in seen]
        if missing:
            problems.append(f"a listing of {d} lacks {missing[:5]}, which stayed put throughout")
    for a, b, d, name, ident in lookups:
        if ident not in h.possible((d, name), a, b):
            what = "ENOENT" if ident is None else f"the content of file {ident}"
            problems.append(f"open {d}/{name} gave {what}; possible: {h.possible((d, name), a, b)}")
    assert not problems, f"{len(problems)} problems: " + "; ".join(problems[:10])

    want = h.final()
    got = tree_of(mounted.path)
    assert got == want, f"differs from the model: missing {sorted(set(want) - set(got))[:5]}, " \
                        f"extra {sorted(set(got) - set(want))[:5]}, " \
                        f"wrong {[k for k in want if k in got and got[k] != want[k]][:5]}"
    with tempfile.TemporaryDirectory(prefix="pmemfs-conc-", dir="/dev/shm") as ref:
        setup_tree(ref)
        for r in range(RENAMERS):
            renamer(ref, r, seed, None, count=counts[r])
        assert tree_of(ref) == want, "tmpfs disagrees with the model (the test is wrong)"
    for r in range(RENAMERS):
        assert os.listdir(mounted.p(f"tmp{r}")) == []
    # Replaced and unlinked files are freed once the kernel forgets them: no inode leaks.
    live = len(want)

    def inodes_used() -> int:
        s = os.statvfs(mounted.path)
        return s.f_files - s.f_ffree

    assert wait_for(lambda: inodes_used() == used_at_start - files_at_start + live, 20), \
        (inodes_used(), used_at_start - files_at_start + live)
    unmount_and_check(mounted)
    mounted.start()
    assert tree_of(mounted.path) == want, "lost after an unmount and a new mount"
