"""What every phase of tools/soak.py shares: the sizes (Scale), the Janitor that undoes
whatever a round made, the Round itself, the end-of-round check (unmount, fsck -n, a quiet
log), forked workers, and byte comparisons."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import queue
import shutil
import signal
import time
import traceback
import uuid
from dataclasses import dataclass, field

import conftest  # the suite's Mount: start, crash, unmount, cleanup (tools/soak.py puts tests/ on sys.path)

from pmemfs.media.mkfs import make_filesystem
from pmemfs.serve import mounting

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
