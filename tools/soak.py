#!/usr/bin/env python3
"""Soak pmemfs: round after round of varied, checked load, for a given time or count.

    nice -n 10 python tools/soak.py --minutes 20 [--json report.json]
    python tools/soak.py --hours 8 --seed 100 --json soak.json
    python tools/soak.py --rounds 5 --small             # every phase once, small (the suite's run)
    python tools/soak.py --phases fsx --seed 1012 --rounds 1   # replay the round printed with seed 1012

Each round takes the next phase in turn and the next seed (--seed, +1 a round), makes a
fresh region in /dev/shm and mounts it through FUSE with `pmemfs mount`'s default
supervisor (live update), runs the phase, and checks it:

  fsx     seeded random I/O on one to three files against an in-memory model: buffered and
          O_DIRECT writes and reads, ftruncate, posix_fallocate, the prealloc control,
          stores and reads through a shared mapping, fsync, dropping cached pages,
          reopening; one kill -9 of the daemon mid-run (the standby takes over; the
          descriptors stay open). Every read is compared with the model; at the end the
          whole files, buffered and O_DIRECT, and again after an unmount and a new mount.
  churn   fsstress-like namespace churn from several processes: create, mkdir, rename
          (to new names, over files, over empty and non-empty directories, into itself),
          link, unlink, rmdir, symlink, setxattr, removexattr, writes and truncates. Each
          process keeps a model of its own directory and checks every call's outcome;
          all of them also race in one shared directory, where only the errors a racing
          caller may get are allowed. Then: each private tree equals its model, the whole
          tree is consistent (link counts, '..', every file readable), no inode leaked, and
          the tree is the same after an unmount and a new mount.
  kill    the live-update suite's five clients (tests/test_live_update.py: a writer that
          fsyncs, a shared-mmap writer, a namespace churner, a verifying reader and a
          lister, all keeping their descriptors open) while the daemon is killed with
          kill -9 or upgraded several times, with no unmount: no client may see an error,
          the tree must equal a kill-free replay of the same seeded operations on tmpfs,
          the supervisor and the mount must be the same ones throughout.
  damage  random metadata damage to unmounted copies of a populated region
          (tools/corrupt.py random_bytes and named damages, as tools/damage_loop.py):
          fsck -n and mount fail only as they should, fsck -y repairs or refuses, a
          repaired region is clean and mounts; some repaired regions are mounted through
          FUSE and every file is read, a new file written, and fsck is clean after.
  enospc  a small region filled from several processes until ENOSPC (by blocks, by
          packed small files, by inodes, or mixed): the mount stays live, every file holds
          exactly the bytes its writes acknowledged (also after an unmount and a new
          mount), removing the files gives back all the space, and the next cycle fills
          it again.

Every round ends with an unmount after which fsck -n (pmemfs-fsck's check, run in this
process) must find nothing and the daemon's log must have no traceback and no ERROR
line. One line per round (phase, seed, result, time, what was checked), per-phase totals
and a summary at the end, --json for a report. The first problem stops the run
(--keep-going: the run goes on and the summary lists every problem): the line says what
failed, the seed and how to replay it, the end of the daemon's log follows, and the exit
status is 1. Always cleans up: mounts, daemons (by PID), region files, scratch
directories, also on SIGINT/SIGTERM. Runs the code of this checkout (PYTHONPATH is set
for the daemons it starts). docs/RELIABILITY.md has the details.
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import platform
import queue
import random
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]
# The daemons are new interpreters: they must import this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])

import conftest  # noqa: E402  (the suite's Mount: start, crash, unmount, cleanup)

from pmemfs.media.mkfs import make_filesystem  # noqa: E402
from pmemfs.serve import mountctl, mounting  # noqa: E402
from pmemfs.tools import stress  # noqa: E402

CTX = multiprocessing.get_context("fork")
KiB, MiB = 1 << 10, 1 << 20
MB2 = 2 * MiB
PHASES = ("fsx", "churn", "kill", "damage", "enospc")


class Problem(Exception):
    """A check that failed, in one line; detail: more for the report (a traceback)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def check(cond: object, message: str) -> None:
    if not cond:
        raise Problem(message)


@dataclass(frozen=True)
class Scale:
    fsx_region: int = 256 * MiB
    fsx_files: int = 3
    fsx_ops: int = 2500
    fsx_max: int = 8 * MiB
    fsx_kills: int = 1
    churn_region: int = 256 * MiB
    churn_workers: int = 4
    churn_ops: int = 500
    churn_cap: int = 150
    kill_region: int = 256 * MiB
    kill_events: int = 4
    damage_seeds: int = 40
    damage_mounts: int = 2
    enospc_region: int = 64 * MiB
    enospc_workers: int = 3
    enospc_cycles: int = 3
    enospc_remount: bool = True


SCALES = {
    "normal": Scale(),
    "small": Scale(fsx_region=64 * MiB, fsx_files=2, fsx_ops=250, fsx_max=3 * MiB, churn_region=64 * MiB,
                   churn_workers=3, churn_ops=80, churn_cap=60, kill_region=64 * MiB, kill_events=2,
                   damage_seeds=6, damage_mounts=1, enospc_region=16 * MiB, enospc_workers=3,
                   enospc_cycles=2, enospc_remount=False),
}


# ------------------------------------------------------------------ housekeeping
class Janitor:
    """Everything a round made, so that it is all undone whatever happens: processes
    (killed by PID), mounts (unmounted; their daemons waited for, or killed by PID),
    region files and scratch directories (removed)."""

    def __init__(self, work: str, shm: str):
        self.work, self.shm = work, shm
        self.mounts: list[conftest.Mount] = []
        self.procs: list = []
        self.paths: list[str] = []

    def region(self, size: int, **kw) -> str:
        path = os.path.join(self.shm, f"{uuid.uuid4().hex[:8]}.region")
        self.paths.append(path)
        make_filesystem(path, size=size, **kw)
        return path

    def scratch(self, name: str) -> str:
        path = os.path.join(self.shm, f"{name}-{uuid.uuid4().hex[:8]}")
        self.paths.append(path)
        os.mkdir(path)
        return path

    def mount(self, region: str, mountpoint: str) -> conftest.Mount:
        os.makedirs(mountpoint, exist_ok=True)
        m = conftest.Mount.__new__(conftest.Mount)  # registered before it starts
        m.region, m.path, m.options, m.proc, m.killed = region, mountpoint, set(), None, False
        self.mounts.append(m)
        m.start()
        return m

    def release(self) -> list[str]:
        problems: list[str] = []
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
                problems.append(f"worker {p.name} (pid {p.pid}) was still running")
        for m in self.mounts:
            if m.proc is None:
                continue
            family = [m.proc.pid, *conftest.children(m.proc.pid)] if m.proc.poll() is None else []
            try:
                problems += m.cleanup()
            except Exception as e:  # cleanup must go on with the rest
                problems.append(f"{m.path}: cleanup failed: {e}")
            for pid in family:  # the supervisor's daemon and standby end with it
                if not conftest.wait_for(lambda pid=pid: not _alive(pid), 10):
                    os.kill(pid, signal.SIGKILL)
                    problems.append(f"process {pid} of {m.path} outlived its unmount (killed)")
        for path in self.paths:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        self.mounts, self.procs, self.paths = [], [], []
        return problems


def _alive(pid: int) -> bool:
    return mounting._alive(pid)  # a zombie or a dead process is not


@dataclass
class Round:
    number: int
    phase: str
    seed: int
    scale: Scale
    janitor: Janitor
    inject: bool = False
    numbers: dict = field(default_factory=dict)

    def region(self, size: int, **kw) -> str:
        return self.janitor.region(size, **kw)

    def mount(self, region: str, name: str = "mnt") -> conftest.Mount:
        return self.janitor.mount(region, os.path.join(self.janitor.work, f"r{self.number}-{self.phase}", name))


def fsck_clean(region: str) -> None:
    """What `pmemfs-fsck -n REGION` does, in this process (an interpreter start per round
    would cost more than the check): it must find nothing (exit status 0)."""
    from pmemfs.tools.fsck import fsck

    rep = fsck(region, "n")
    check(rep.exit_code == 0, f"fsck -n after the unmount: exit status {rep.exit_code}: "
                              + "; ".join(f.message for f in rep.findings[:3]))


def log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


def unmount_check(m: conftest.Mount) -> None:
    """Unmount; then fsck -n must exit 0 and the daemon's log must be quiet."""
    try:
        m.unmount()
    except AssertionError as e:
        raise Problem(f"unmount: {e}") from None
    fsck_clean(m.region)
    bad = log_problems(m.log())
    check(not bad, f"the daemon's log has {len(bad)} error line(s), first: {bad[0] if bad else ''}")


def run_workers(j: Janitor, targets: list[tuple[str, object, tuple]], timeout: float = 600) -> dict:
    """One forked process per (name, fn, args); every fn's result, or the first failure."""
    q = CTX.Queue()
    procs = {}
    for name, fn, args in targets:
        p = CTX.Process(target=_child, args=(q, name, fn, args), name=name)
        j.procs.append(p)
        p.start()
        procs[name] = p
    results, failed = {}, []
    deadline = time.monotonic() + timeout
    while len(results) + len(failed) < len(procs):
        try:
            name, ok, value = q.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            stuck = sorted(set(procs) - set(results) - {f[0] for f in failed})
            raise Problem(f"workers {stuck} did not finish within {timeout:.0f} s") from None
        if ok:
            results[name] = value
        else:
            failed.append((name, value))
    for p in procs.values():
        p.join(30)
    if failed:
        name, tb = failed[0]
        raise Problem(f"{name}: {tb.strip().splitlines()[-1]}", tb)
    return results


def _child(q, name: str, fn, args: tuple) -> None:
    try:
        q.put((name, True, fn(*args)))
    except BaseException:
        q.put((name, False, traceback.format_exc()))


def _difference(got: bytes, want: bytes) -> str | None:
    if got == want:
        return None
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return (f"{len(got)} bytes where the model has {len(want)}; first difference at +{i}: "
            f"got {got[i:i + 8].hex() or 'EOF'}, model {want[i:i + 8].hex() or 'EOF'}")


def read_all(path: str, direct: bool = False) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, size + 4096)  # page-aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], 0) if size else 0
        return bytes(buf[:n])
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- fsx
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
    if op in ("write", "dwrite"):
        off = _fsx_offset(rng, limit)
        data = rng.randbytes(min(_fsx_length(rng), limit - off))
        n = os.pwrite(f.fd if op == "write" else f.dfd, data, off)
        if n != len(data):
            raise Mismatch(f"{op} of {len(data)} at {off} wrote {n}")
        f.store(off, data)
        return f"{op} {len(data)}@{off}"
    if op in ("read", "dread"):
        off, n = _fsx_offset(rng, limit + 64 * KiB), _fsx_length(rng)
        f.compare(op, os.pread(f.fd if op == "read" else f.dfd, n, off), off, n)
        count["reads compared"] += 1
        return f"{op} {n}@{off}"
    if op in ("mapwrite", "mapread"):
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
    if op == "prealloc":  # fallocate(2) mode 0 through the control channel: blocks move
        new = rng.randint(1, limit)
        if reference:
            os.posix_fallocate(f.fd, 0, new)
        else:
            os.setxattr(f.path, "user.pmemfs.prealloc", str(new).encode())
        if new > size:
            f.resize(new)
        return f"prealloc {new}"
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


# ------------------------------------------------------------------------- churn
class Node:
    __slots__ = ("data", "kind", "target", "xattrs")

    def __init__(self, kind: str, data: bytes = b"", target: str = ""):
        self.kind, self.data, self.target, self.xattrs = kind, bytearray(data), target, {}


def _parent(p: str) -> str:
    return p.rpartition("/")[0]


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _under(p: str, d: str) -> bool:
    return p == d or p.startswith(d + "/")


def expected_tree(names: dict[str, Node]) -> dict:
    """What a walk of the tree must find (see observed_tree)."""
    out: dict = {}
    links = collections.Counter(id(n) for n in names.values())
    for p, n in names.items():
        if n.kind == "f":
            out[p] = ("f", links[id(n)], hashlib.sha256(n.data).hexdigest()[:16], sorted(n.xattrs.items()))
        elif n.kind == "d":
            subdirs = sum(1 for q, c in names.items() if c.kind == "d" and _parent(q) == p)
            out[p] = ("d", 2 + subdirs, sorted(n.xattrs.items()))
        else:
            out[p] = ("l", n.target)
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for p, n in names.items():
        if links[id(n)] > 1:
            groups[id(n)].append(p)
    out["<links>"] = sorted(sorted(g) for g in groups.values())
    return out


def observed_tree(root: str) -> dict:
    out: dict = {}
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
                continue
            xattrs = sorted((x, os.getxattr(full, x, follow_symlinks=False))
                            for x in os.listxattr(full, follow_symlinks=False))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", st.st_nlink, xattrs)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("f", st.st_nlink, hashlib.sha256(f.read()).hexdigest()[:16], xattrs)
                groups[st.st_ino].append(rel)
    out["<links>"] = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    return out


SHARED = ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "c/a", "a/a/a"]
SHARED_OK = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ELOOP,
             errno.ENODATA, errno.EPERM}


def _outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pwrite(path: str, data: bytes, off: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def churn_worker(mount: str, wid: int, seed: int, nops: int, cap: int) -> tuple[dict, dict]:
    """Namespace churn in mount/pWID by a model (every outcome must be the model's), and
    in mount/shared with everyone else (only a racing caller's errors allowed). Returns
    the tree the model expects and counts of operations."""
    rng = random.Random(seed * 100 + wid)
    root = os.path.join(mount, f"p{wid}")
    shared = os.path.join(mount, "shared")
    os.makedirs(root)
    names: dict[str, Node] = {}
    serial = 0
    count: collections.Counter = collections.Counter()

    def fresh(kind: str) -> str:
        nonlocal serial
        serial += 1
        d = rng.choice([""] + [p for p, n in names.items() if n.kind == "d"])
        return _join(d, f"{kind}{serial}")

    def a(p: str) -> str:
        return os.path.join(root, p)

    ops = {"create": 15, "mkdir": 8, "symlink": 5, "link": 7, "unlink": 10, "rmdir": 6, "rename": 22,
           "setxattr": 8, "removexattr": 4, "write": 10, "truncate": 5, "shared": 20}
    for n in range(1, nops + 1):
        op = rng.choices(list(ops), list(ops.values()))[0]
        if len(names) > cap and op in ("create", "mkdir", "symlink", "link"):
            op = rng.choice(("unlink", "rmdir"))
        files = [p for p, x in names.items() if x.kind == "f"]
        dirs = [p for p, x in names.items() if x.kind == "d"]
        others = [p for p, x in names.items() if x.kind != "d"]
        if op != "shared" and not names:
            op = "create"
        want, desc = "ok", op
        if op == "create":
            p = fresh("f")
            data = rng.randbytes(rng.choice([0, rng.randint(1, 4096), rng.randint(4096, 100_000)]))
            got = _outcome(_write_new, a(p), data)
            names[p] = Node("f", data)
        elif op == "mkdir":
            p = fresh("d")
            got = _outcome(os.mkdir, a(p))
            names[p] = Node("d")
        elif op == "symlink":
            p = fresh("l")
            target = rng.choice([*names, "nowhere/x"])
            got = _outcome(os.symlink, target, a(p))
            names[p] = Node("l", target=target)
        elif op == "link" and files and rng.random() < 0.95:
            src, p = rng.choice(files), fresh("h")
            got = _outcome(os.link, a(src), a(p))
            names[p] = names[src]
            desc = f"link {src} {p}"
        elif op == "link" and dirs:
            src = rng.choice(dirs)
            got, want, desc = _outcome(os.link, a(src), a(src + ".link")), "EPERM", f"link of directory {src}"
        elif op == "unlink" and others and rng.random() < 0.95:
            p = rng.choice(others)
            got = _outcome(os.unlink, a(p))
            del names[p]
            desc = f"unlink {p}"
        elif op in ("unlink", "rmdir") and dirs:
            p = rng.choice(dirs)
            empty = not any(_parent(q) == p for q in names)
            if op == "unlink":
                got, want = _outcome(os.unlink, a(p)), "EISDIR"
            else:
                got, want = _outcome(os.rmdir, a(p)), "ok" if empty else "ENOTEMPTY"
                if empty:
                    del names[p]
            desc = f"{op} {p}"
        elif op == "rename":
            src = rng.choice(list(names))
            node = names[src]
            if rng.random() < 0.6:  # to a new name, maybe into its own subtree
                dst = fresh(node.kind)
                bad = node.kind == "d" and _under(_parent(dst), src)
                got, want = _outcome(os.rename, a(src), a(dst)), "EINVAL" if bad else "ok"
                if not bad:
                    _move(names, src, dst)
            else:  # over an existing name that is neither above nor below it
                cands = [q for q in names if q != src and not _under(q, src) and not _under(src, q)]
                if not cands:
                    continue
                dst = rng.choice(cands)
                victim = names[dst]
                if victim is node:
                    want = "ok"  # two names of one file: nothing happens
                elif node.kind == "d" and victim.kind != "d":
                    want = "ENOTDIR"
                elif node.kind != "d" and victim.kind == "d":
                    want = "EISDIR"
                elif node.kind == "d" and any(_parent(q) == dst for q in names):
                    want = "ENOTEMPTY"
                got = _outcome(os.rename, a(src), a(dst))
                if want == "ok" and victim is not node:
                    for q in [q for q in names if _under(q, dst)]:
                        del names[q]
                    _move(names, src, dst)
            desc = f"rename {src} {dst}"
        elif op in ("setxattr", "removexattr"):
            cands = files + dirs
            if not cands:
                continue
            p = rng.choice(cands)
            key = f"user.k{rng.randrange(4)}"
            if op == "setxattr":
                value = rng.randbytes(rng.randint(1, 200))
                got = _outcome(os.setxattr, a(p), key, value)
                names[p].xattrs[key] = value
            else:
                want = "ok" if key in names[p].xattrs else "ENODATA"
                got = _outcome(os.removexattr, a(p), key)
                names[p].xattrs.pop(key, None)
            desc = f"{op} {p} {key}"
        elif op in ("write", "truncate") and files:
            p = rng.choice(files)
            node = names[p]
            if op == "write":
                off = rng.randint(0, min(len(node.data) + 100, 200_000))
                data = rng.randbytes(rng.randint(1, 20_000))
                got = _outcome(_pwrite, a(p), data, off)
                node.data.extend(bytes(max(off + len(data) - len(node.data), 0)))
                node.data[off:off + len(data)] = data
            else:
                size = rng.randint(0, 150_000)
                got = _outcome(os.truncate, a(p), size)
                del node.data[size:]
                node.data.extend(bytes(size - len(node.data)))
            desc = f"{op} {p}"
        elif op == "shared":
            desc = _shared_op(rng, shared, count)
            continue
        else:
            continue
        count[op] += 1
        if got != want:
            raise AssertionError(f"p{wid} op {n} ({desc}): got {got}, the model says {want}")
    return expected_tree(names), dict(count)


def _move(names: dict[str, Node], src: str, dst: str) -> None:
    for q in sorted((q for q in names if _under(q, src)), key=len):
        names[dst + q[len(src):]] = names.pop(q)


def _shared_op(rng: random.Random, shared: str, count: collections.Counter) -> str:
    p = os.path.join(shared, rng.choice(SHARED))
    q = os.path.join(shared, rng.choice(SHARED))
    op = rng.choice(("create", "mkdir", "mkdir", "rename", "rename", "unlink", "rmdir", "link", "symlink",
                     "setxattr", "write"))
    fns = {"create": lambda: _write_new(p, b"s" * rng.randint(0, 5000)), "mkdir": lambda: os.mkdir(p),
           "rename": lambda: os.rename(p, q), "unlink": lambda: os.unlink(p), "rmdir": lambda: os.rmdir(p),
           "link": lambda: os.link(p, q), "symlink": lambda: os.symlink(rng.choice(SHARED), p),
           "setxattr": lambda: os.setxattr(p, "user.s", b"v"), "write": lambda: _pwrite(p, b"w", 10)}
    try:
        fns[op]()
        count["shared ok"] += 1
    except OSError as e:
        if e.errno not in SHARED_OK:
            raise AssertionError(f"shared {op} {p} {q}: {e}") from None
        count["shared refused"] += 1
    return op


def consistency(root: str) -> list[str]:
    """What holds of any tree, whoever made it: directory link counts, '..', file link
    counts, every file readable to its size, xattrs and symlinks readable."""
    problems = []
    names_of: collections.Counter = collections.Counter()
    nlink: dict[int, int] = {}
    todo = [root]
    while todo:
        d = todo.pop()
        subdirs = 0
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            s = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(s.st_mode):
                subdirs += 1
                todo.append(e.path)
                if os.stat(os.path.join(e.path, "..")).st_ino != os.lstat(d).st_ino:
                    problems.append(f"{e.path}: '..' is not its parent")
            elif stat.S_ISLNK(s.st_mode):
                os.readlink(e.path)
            else:
                names_of[s.st_ino] += 1
                nlink[s.st_ino] = s.st_nlink
                with open(e.path, "rb") as f:
                    if len(f.read()) != s.st_size:
                        problems.append(f"{e.path}: a read gives other than st_size {s.st_size} bytes")
            if not stat.S_ISLNK(s.st_mode):
                for x in os.listxattr(e.path):
                    os.getxattr(e.path, x)
        if os.lstat(d).st_nlink != 2 + subdirs:
            problems.append(f"{d}: {os.lstat(d).st_nlink} links with {subdirs} subdirectories")
    for ino, n in names_of.items():
        if nlink[ino] != n:
            problems.append(f"inode {ino}: st_nlink {nlink[ino]} but {n} names")
    return problems


def inodes_used(path: str) -> int:
    s = os.statvfs(path)
    return s.f_files - s.f_ffree


def phase_churn(r: Round) -> str:
    s = r.scale
    m = r.mount(r.region(s.churn_region))
    base = inodes_used(m.path)
    os.mkdir(m.p("shared"))
    for d in ("a", "b", "c"):
        os.mkdir(m.p("shared", d))
    res = run_workers(r.janitor, [(f"p{w}", churn_worker, (m.path, w, r.seed, s.churn_ops, s.churn_cap))
                                  for w in range(s.churn_workers)])
    count: collections.Counter = collections.Counter()
    for w in range(s.churn_workers):
        want, c = res[f"p{w}"]
        count.update(c)
        got = observed_tree(m.p(f"p{w}"))
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise Problem(f"p{w}'s tree differs from its model at {diff[:4]}: "
                          f"got {[got.get(k) for k in diff[:2]]}, model {[want.get(k) for k in diff[:2]]}")
    bad = consistency(m.path)
    check(not bad, f"inconsistent tree: {bad[:3]}")
    # Every inode in use is in the tree once the kernel has forgotten the removed ones.
    live = len({os.lstat(os.path.join(d, n)).st_ino for d, ds, fs in os.walk(m.path) for n in ds + fs})
    check(conftest.wait_for(lambda: inodes_used(m.path) == base + live, 20),
          f"{inodes_used(m.path) - base} inodes in use, {live} in the tree (leak)")
    before = observed_tree(m.path)
    m.unmount()
    m.start()
    after = observed_tree(m.path)
    check(after == before, "the tree changed across an unmount and a new mount: "
                           f"{sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:4]}")
    unmount_check(m)
    ops = sum(v for k, v in count.items() if not k.startswith("shared"))
    r.numbers.update(ops=ops, shared=count["shared ok"] + count["shared refused"], entries=len(before) - 1)
    return (f"{s.churn_workers} processes, {ops} modelled calls (every outcome as the model said: "
            f"{count['rename']} rename, {count['link']} link, {count['rmdir']} rmdir...), "
            f"{count['shared ok'] + count['shared refused']} racing calls in a shared directory "
            f"({count['shared refused']} refused as allowed); trees equal their models, tree consistent, "
            f"no inode leaked, same after remount, {len(before) - 1} entries")


# -------------------------------------------------------------------------- kill
def phase_kill(r: Round) -> str:
    import test_live_update as live

    s, rng = r.scale, random.Random(r.seed)
    m = r.mount(r.region(s.kill_region))
    sup, entry = m.proc.pid, mounting.pmemfs_mount_at(m.path)
    kinds = [rng.choice(("kill", "kill", "upgrade")) for _ in range(s.kill_events)]
    todo = iter(kinds)
    daemons = {m.pid}

    def event() -> None:
        if next(todo) == "kill":
            daemons.add(m.crash())
        else:
            answer = mountctl.ask(m.path, {"verb": "upgrade"})
            check(answer.get("ok"), f"upgrade refused: {answer}")
            daemons.add(answer["daemon_pid"])

    work = Path(r.janitor.scratch("live"))  # the kill-free replay is on tmpfs
    try:
        took = live.interrupt_workload(m, work, s.kill_events, event, seed=r.seed)
    except AssertionError as e:
        raise Problem(f"live-update workload: {str(e).strip()[:600]}") from None
    check(m.proc.poll() is None and m.proc.pid == sup, "the supervisor did not survive the kills")
    check(mounting.pmemfs_mount_at(m.path) == entry and not mounting.is_stale(m.path),
          "the mount was replaced or went dead")
    kills, upgrades = kinds.count("kill"), kinds.count("upgrade")
    check(len(daemons) == len(kinds) + 1, f"{len(daemons)} daemons served {len(kinds)} events")
    log = m.log()
    check(log.count("the standby takes over") == kills and log.count("drained: handing") == upgrades,
          f"the log shows {log.count('the standby takes over')} takeovers and "
          f"{log.count('drained: handing')} drains for {kills} kills and {upgrades} upgrades")
    unmount_check(m)
    r.numbers.update(kills=kills, upgrades=upgrades, max_event_ms=round(max(took) * 1000))
    return (f"{kills} kill -9 + {upgrades} upgrade under 5 clients, no unmount: no client error, "
            f"tree equals the kill-free replay on tmpfs, one supervisor and mount throughout "
            f"(slowest event {max(took) * 1000:.0f} ms)")


# ------------------------------------------------------------------------ damage
def _populate(path: str, seed: int) -> None:
    """damage_loop's template, plus a seeded handful of entries so rounds differ."""
    import damage_loop

    from pmemfs.fs.engine import Engine

    damage_loop.populate(path)
    rng = random.Random(seed)
    e = Engine(path)
    try:
        dirs = [1]
        for k in range(rng.randint(5, 25)):
            parent = rng.choice(dirs)
            if rng.random() < 0.3:
                dirs.append(e.mkdir(parent, b"d%d" % k, 0o755).ino)
            else:
                ino = e.create(parent, b"f%d" % k, 0o644).ino
                e.write(ino, 0, rng.randbytes(rng.choice([10, 5000, 70_000, 2_500_000])))
                if rng.random() < 0.3:
                    e.setxattr(ino, b"user.k", rng.randbytes(rng.randint(1, 300)))
    finally:
        e.close()


def _walk_mount(root: str) -> tuple[int, int]:
    """Read every file of a repaired tree (a damaged size may make one huge and sparse:
    then its first and last MiB). Returns (entries, largest size)."""
    n = largest = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                largest = max(largest, st.st_size)
                fd = os.open(full, os.O_RDONLY)
                try:
                    if st.st_size <= 64 * MiB:
                        got = len(read_all(full))
                        want = st.st_size
                    else:
                        got = len(os.pread(fd, MiB, 0)) + len(os.pread(fd, MiB, st.st_size - MiB))
                        want = 2 * MiB
                finally:
                    os.close(fd)
                check(got == want, f"{full}: read {got} bytes of {want} after a repair (size {st.st_size})")
            elif stat.S_ISLNK(st.st_mode):
                os.readlink(full)
            n += 1
    return n, largest


def phase_damage(r: Round) -> str:
    import corrupt
    import damage_loop

    from pmemfs.tools.fsck import fsck

    s, rng = r.scale, random.Random(r.seed)
    template = r.region(96 * MiB)  # damage_loop.populate fills 64 MiB: leave room for a new file
    _populate(template, r.seed)
    with open(template, "rb") as f:
        image = f.read()
    victim = os.path.join(r.janitor.scratch("damage"), "victim")
    outcome: collections.Counter = collections.Counter()
    fuse_checked = 0
    for k in range(s.damage_seeds):
        dseed = r.seed * 1000 + k
        with open(victim, "wb") as f:
            f.write(image)
        what = "random bytes"
        if k % 3 == 2:
            what = rng.choice(sorted(corrupt.DAMAGES))
            try:
                corrupt.apply(victim, what, dseed)
            except SystemExit:  # this damage needs what the template lacks
                what = "random bytes"
        if what == "random bytes":
            corrupt.random_bytes(victim, dseed, writes=rng.choice([1, 2, 4, 8]))
        where = f"damage seed {dseed} ({what})"
        first = fsck(victim, "n").exit_code
        check(first in (0, 4), f"{where}: fsck -n exited {first}")
        check(first == 4 or damage_loop.mounts(victim), f"{where}: fsck -n says clean but mount refuses")
        rep = fsck(victim, "y").exit_code
        if rep == 4:
            outcome["refused"] += 1
            check(not damage_loop.mounts(victim), f"{where}: fsck -y gave up but mount accepts the region")
            continue
        outcome["repaired" if rep == 1 else "clean"] += 1
        again = fsck(victim, "n").exit_code
        check(again == 0, f"{where}: repaired, but a second fsck -n exits {again}")
        check(damage_loop.mounts(victim), f"{where}: repaired, but mount refuses it")
        if fuse_checked < s.damage_mounts and (rep == 1 or k == s.damage_seeds - 1):
            fuse_checked += 1
            m = r.mount(victim, f"mnt{k}")
            entries, largest = _walk_mount(m.path)
            outcome["largest size read"] = max(outcome["largest size read"], largest)
            try:
                with open(m.p("after-repair"), "wb") as f:
                    f.write(b"x" * 100_000)
            except OSError as e:
                # A repair may fill the region (a doubly claimed block is cloned): then a
                # new file may not fit, and ENOSPC is right, but only if nothing is free.
                if e.errno != errno.ENOSPC:
                    raise
                from pmemfs.tools.info import describe

                free = describe(victim)["free_blocks"]
                check(free == 0, f"{where}: ENOSPC for a new 100 kB file after the repair with "
                                 f"{free} free blocks")
                outcome["full after repair"] += 1
            else:
                check(read_all(m.p("after-repair")) == b"x" * 100_000, f"{where}: a new file reads back wrong")
            unmount_check(m)
            outcome["entries read through FUSE"] += entries
    r.numbers.update(seeds=s.damage_seeds, fuse_mounts=fuse_checked, **dict(outcome))
    return (f"{s.damage_seeds} damaged copies: {outcome['repaired']} repaired, {outcome['clean']} clean, "
            f"{outcome['refused']} refused (mount refuses them too); every repair fsck-clean and mountable; "
            f"{fuse_checked} mounted through FUSE, every file read, a file written, fsck clean")


# ------------------------------------------------------------------------ enospc
def enospc_fill(root: str, wid: int, seed: int, kind: str) -> tuple[dict[str, int], str]:
    """Write files until the filesystem says ENOSPC; returns {name: bytes acknowledged}
    and what refused (a write or a create)."""
    rng = random.Random(seed)
    files: dict[str, int] = {}
    for n in range(1, 1_000_000):
        name = f"w{wid}_{n}"
        size = {"big": rng.randint(MiB // 4, 3 * MiB), "small": rng.randint(1, 60 * KiB),
                "tiny": rng.randint(0, 4096)}[kind]
        data = memoryview(stress.payload(f"{seed}:{name}", size))
        try:
            fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return files, "create"
        acked = 0
        try:
            while acked < size:
                try:
                    acked += os.write(fd, data[acked:acked + MiB])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    files[name] = acked
                    return files, "write"
        finally:
            os.close(fd)
        files[name] = acked
    raise AssertionError("never full")


def enospc_remove(root: str, names: list[str]) -> int:
    for name in names:
        os.unlink(os.path.join(root, name))
    return len(names)


def phase_enospc(r: Round) -> str:
    s, rng = r.scale, random.Random(r.seed)
    mode = rng.choice(("blocks", "packed", "inodes", "mixed"))
    kinds = {"blocks": ["big"], "packed": ["small"], "inodes": ["tiny"], "mixed": ["big", "small"]}[mode]
    kw = {"inodes": 64} if mode == "inodes" else {}
    m = r.mount(r.region(s.enospc_region, **kw))
    free0 = os.statvfs(m.path)
    stored = []
    for cycle in range(s.enospc_cycles):
        targets = []
        for w in range(s.enospc_workers):
            wseed = r.seed * 100 + cycle * 10 + w
            targets.append((f"{wseed}", enospc_fill, (m.path, w, wseed, kinds[w % len(kinds)])))
        res = run_workers(r.janitor, targets)
        # Names are per cycle: w{worker}_{n} with the worker's own seed in the payload.
        written = {k: v[0] for k, v in res.items()}
        st = os.statvfs(m.path)  # the mount is alive and answers
        where = f"cycle {cycle + 1} ({mode})"
        if mode == "inodes":
            check(st.f_ffree == 0, f"{where}: full, but {st.f_ffree} inodes free")
            check(_raises(errno.ENOSPC, _write_new, m.p("probe"), b""), f"{where}: a create succeeds when full")
        else:
            check(_raises(errno.ENOSPC, _probe_block, m.p("probe")), f"{where}: a new 2 MiB write succeeds when full")
            os.unlink(m.p("probe"))
            os.mkdir(m.p("meta-only"))  # metadata needs no block
            os.rmdir(m.p("meta-only"))
        if mode == "blocks":
            check(st.f_bfree == 0, f"{where}: full of whole-block files, but {st.f_bfree} chunks free")
        total = sum(_verify_one(m.path, k, v, where) for k, v in written.items())
        if cycle == 0 and s.enospc_remount:  # what was acknowledged while full survives an unmount
            m.unmount()
            m.start()
            total = sum(_verify_one(m.path, k, v, where + " after a remount") for k, v in written.items())
        stored.append(total)
        run_workers(r.janitor, [(k, enospc_remove, (m.path, sorted(v))) for k, v in written.items()])
        back = conftest.wait_for(lambda: (os.statvfs(m.path).f_bfree, os.statvfs(m.path).f_ffree)
                                 == (free0.f_bfree, free0.f_ffree), 20)
        now = os.statvfs(m.path)
        check(back, f"{where}: after removing everything {now.f_bfree} chunks and {now.f_ffree} inodes "
                    f"are free, {free0.f_bfree} and {free0.f_ffree} before (space not given back)")
    unmount_check(m)
    r.numbers.update(mode=mode, cycles=s.enospc_cycles, stored_mib=[round(x / MiB, 1) for x in stored])
    return (f"{mode}: {s.enospc_cycles} fill/empty cycles by {s.enospc_workers} processes, "
            f"{'/'.join(f'{x / MiB:.1f}' for x in stored)} MiB acknowledged when full; mount live when full, "
            f"every byte as acknowledged{' (also after a remount)' if s.enospc_remount else ''}, all space and inodes back after removal")


def _verify_one(root: str, wseed: str, files: dict[str, int], where: str) -> int:
    total = 0
    for name, acked in files.items():
        path = os.path.join(root, name)
        got = read_all(path)
        diff = _difference(got, stress.payload(f"{wseed}:{name}", acked))
        check(not diff, f"{name} {where}: {diff}")
        check(os.stat(path).st_size == acked, f"{name} {where}: size {os.stat(path).st_size}, {acked} acknowledged")
        total += acked
    return total


def _probe_block(path: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"p" * MB2)
    finally:
        os.close(fd)


def _raises(code: int, fn, *args) -> bool:
    try:
        fn(*args)
    except OSError as e:
        return e.errno == code
    return False


PHASE_FUNCS = {"fsx": phase_fsx, "churn": phase_churn, "kill": phase_kill, "damage": phase_damage,
               "enospc": phase_enospc}


# ------------------------------------------------------------------------ runner
def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    distro = ""
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            distro = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line).get("PRETTY_NAME", "").strip('"')
    return {"cpus": os.cpu_count(), "mem_gib": round(mem / (1 << 30), 1), "kernel": platform.release(),
            "os": distro, "python": platform.python_version()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every pmemfs command
        print(f"soak.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--hours", type=float, help="run this long (a round under way finishes)")
    p.add_argument("--minutes", type=float, help="run this long (a round under way finishes)")
    p.add_argument("--rounds", type=int, help="run this many rounds (default: each phase once)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in turn (default {','.join(PHASES)})")
    p.add_argument("--seed", type=int, default=1, help="seed of the first round; each round adds 1")
    p.add_argument("--small", action="store_true", help="small sizes (the suite's representative run)")
    p.add_argument("--json", help="write a report here")
    p.add_argument("--keep-going", action="store_true",
                   help="after a problem, go on with the next round (the exit status is still 1)")
    p.add_argument("--workdir", help="where mountpoints and logs go (default: a new directory in /tmp)")
    p.add_argument("--inject-fault", action="store_true",
                   help="self-test: the fsx phase changes a byte behind its model, which must be caught")
    a = p.parse_args(argv)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    unknown = sorted(set(a.phases) - set(PHASES))
    if unknown or not a.phases:
        p.error(f"unknown phase(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    if a.hours is not None and a.minutes is not None:
        p.error("give --hours or --minutes, not both")
    if any(x is not None and x <= 0 for x in (a.hours, a.minutes, a.rounds)):
        p.error("--hours, --minutes and --rounds must be positive")
    return a


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: must run as root (FUSE mounts with allow_other, kernel caches, fsck of regions)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    scale_name = "small" if a.small else "normal"
    scale = SCALES[scale_name]
    seconds = (a.hours or 0) * 3600 + (a.minutes or 0) * 60
    rounds = a.rounds if a.rounds is not None else (None if seconds else len(a.phases))
    if a.workdir and not os.path.isdir(a.workdir):
        print(f"soak.py: --workdir {a.workdir}: no such directory", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="pmemfs-soak-", dir=a.workdir)
    shm = tempfile.mkdtemp(prefix="pmemfs-soak-", dir="/dev/shm")
    janitor = Janitor(work, shm)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    report: dict = {"tool": "tools/soak.py", "started": started, "machine": machine(),
                    "args": {k: v for k, v in vars(a).items()}, "scale": scale_name, "work_dir": work,
                    "shm_dir": shm, "rounds": [], "problem": None, "problem_rounds": []}
    per: dict[str, dict] = {ph: {"rounds": 0, "seconds": 0.0, "problems": 0} for ph in a.phases}
    status = 0
    print(f"soak: phases {','.join(a.phases)}, {scale_name} sizes, first seed {a.seed}, "
          + (f"{rounds} rounds" if rounds else "") + (" or " if rounds and seconds else "")
          + (f"{seconds / 60:g} minutes" if seconds else "") + f"; mounts in {work}, regions in {shm}; "
          + ", ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    k = 0
    try:
        while (rounds is None or k < rounds) and (not seconds or time.monotonic() - t0 < seconds):
            phase = a.phases[k % len(a.phases)]
            r = Round(k + 1, phase, a.seed + k, scale, janitor, inject=a.inject_fault)
            began = time.monotonic()
            problem: Problem | None = None
            checked = ""
            try:
                checked = PHASE_FUNCS[phase](r)
            except Problem as e:
                problem = e
            except Exception as e:
                problem = Problem(f"{type(e).__name__}: {e}", traceback.format_exc())
            finally:
                logs = {m.path: m.log() for m in janitor.mounts} if problem else {}
                leftovers = janitor.release()
            for path, text in logs.items():  # the daemons' last words go into the report
                tail = "\n".join(text.splitlines()[-25:])
                problem.detail += f"\n--- end of the daemon log of {path}:\n{tail}"
            if leftovers and problem is None:
                problem = Problem("cleanup: " + "; ".join(leftovers))
            secs = time.monotonic() - began
            per[phase]["rounds"] += 1
            per[phase]["seconds"] += secs
            entry = {"round": r.number, "phase": phase, "seed": r.seed, "seconds": round(secs, 1),
                     "result": "ok" if problem is None else "problem", "checked": checked, "numbers": r.numbers}
            report["rounds"].append(entry)
            if problem is not None:
                replay = (f"python tools/soak.py --phases {phase} --seed {r.seed} --rounds 1"
                          + (" --small" if a.small else "") + (" --inject-fault" if a.inject_fault else ""))
                print(f"round {r.number:4d}  {phase:<7} seed {r.seed:<7d} PROBLEM {secs:6.1f} s  {problem}",
                      flush=True)
                if problem.detail:
                    print("  " + problem.detail.strip().replace("\n", "\n  ")[-3000:], flush=True)
                print(f"  replay: {replay}", flush=True)
                entry.update(problem=str(problem), detail=problem.detail, replay=replay)
                report["problem"] = report["problem"] or entry
                report["problem_rounds"].append(entry)
                per[phase]["problems"] += 1
                status = 1
                if not a.keep_going:
                    break
                k += 1
                continue
            print(f"round {r.number:4d}  {phase:<7} seed {r.seed:<7d} ok {secs:6.1f} s  {checked}", flush=True)
            k += 1
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        print(f"soak: interrupted (status {code}) in round {k + 1}; cleaning up", flush=True)
        status = code
        report["interrupted"] = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # the cleanup runs to its end
            signal.signal(sig, signal.SIG_IGN)
        leftovers = janitor.release()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        if leftovers:
            print("soak: cleanup at exit: " + "; ".join(leftovers), flush=True)
    elapsed = time.monotonic() - t0
    done = sum(v["rounds"] for v in per.values())
    for ph, v in per.items():  # what each phase checked in all, over its rounds that passed
        totals: collections.Counter = collections.Counter()
        for x in report["rounds"]:
            if x["phase"] == ph and x["result"] == "ok":
                totals.update({k: n for k, n in x["numbers"].items()
                               if isinstance(n, int) and not isinstance(n, bool) and not k.startswith(("max", "largest"))})
                if "mode" in x["numbers"]:
                    totals[f"{x['numbers']['mode']} rounds"] += 1
        v["totals"] = {k: n for k, n in totals.items() if n}
        if v["rounds"]:
            print(f"  {ph:<7} {v['rounds']} rounds, {v['seconds'] / 60:.1f} min, {v['problems']} problem(s); "
                  + ", ".join(f"{k} {n}" for k, n in v["totals"].items()), flush=True)
    problems = len(report["problem_rounds"])
    report.update(elapsed_seconds=round(elapsed, 1), per_phase={p: {**v, "seconds": round(v["seconds"], 1)}
                                                                  for p, v in per.items()},
                  problems=problems, status=status)
    print(f"soak: {done} rounds in {elapsed / 60:.1f} min ("
          + ", ".join(f"{p} {v['rounds']}" for p, v in per.items()) + f"); {problems} problem(s)"
          + "".join(f"; round {x['round']} {x['phase']} seed {x['seed']}: {x['problem'][:200]}"
                    for x in report["problem_rounds"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
