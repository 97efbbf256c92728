"""A random workload whose acknowledged effects can be verified after a crash.

Workers write, append, truncate, rename and unlink files on a mount and, after each
call that the filesystem acknowledged (fsync or close returned), append a line to an
acknowledgement log outside the mount. Before changing a file they already own they
log their intent, so that an operation cut short by a crash may be found either done
or not done. `verify()` replays the logs against the mount.

Used by tests/test_crash_kill.py, tools/crash_loop.py and examples/.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field

MiB = 1 << 20


def payload(seed: str, size: int) -> bytes:
    """Deterministic bytes for a (seed, size): verification recomputes them."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=64).digest() * 64
        counter += 1
    return bytes(out[:size])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the worker

    def write(self, **rec) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def worker(mountpoint: str, log_path: str, wid: int, seed: int, deadline: float,
           max_file: int = 3 * MiB) -> int:
    """Run until the deadline or until the mount dies (ENOTCONN); returns ops acknowledged.

    Any other failure raises: a worker that ends early without a dead mount is a bug.
    """
    rng = random.Random(seed)
    log = Log(log_path)
    root = os.path.join(mountpoint, f"w{wid}")
    w = _Worker(root, log, rng, wid, seed, max_file, old=_settled(log_path))
    n = 0
    acked = 0
    try:
        os.makedirs(root, exist_ok=True)
        while time.monotonic() < deadline:
            n += 1
            try:
                w.step(n)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                w.make_room()
                continue
            acked += 1
    except OSError as e:
        # Only a dead mount ends a worker quietly: ENOTCONN, or ECONNABORTED for the call
        # in flight when the daemon died, and then the mountpoint must really answer
        # ENOTCONN. Anything else (ENOENT, EIO...) from a live filesystem is a bug to report.
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED) or not _mount_is_dead(mountpoint):
            raise
    return acked


class _Worker:
    """One worker's files and its random operations, each logged once acknowledged."""

    def __init__(self, root: str, log: Log, rng: random.Random, wid: int, seed: int,
                 max_file: int, old: list[str]):
        self.root, self.log, self.rng = root, log, rng
        self.wid, self.seed, self.max_file = wid, seed, max_file
        # Only files made in this run are changed: one cut short by an earlier crash may be
        # in either of two states, and the log must stay the whole truth about each file.
        self.owned: dict[str, int] = {}  # name -> acknowledged size
        # Files of earlier runs whose last word in the log is an acknowledgement: their state
        # is known, so they may be removed (never changed) to make room.
        self.old = old
        self.name: str | None = None  # the file the current call changes

    def step(self, n: int) -> None:
        op = self.rng.random()
        self.name = None
        if op < 0.35 or not self.owned:
            self._create(n)
        elif op < 0.5:
            self._create_by_rename(n)
        elif op < 0.7:
            self._append()
        elif op < 0.85:
            self._truncate()
        else:
            self._unlink()

    def _create(self, n: int) -> None:
        name = self.name = f"f{self.seed}_{n}"
        data = payload(f"{self.wid}:{name}:0", self.rng.randrange(0, self.max_file))
        with open(os.path.join(self.root, name), "wb") as f:
            for pos in range(0, len(data), MiB):
                f.write(data[pos:pos + MiB])
            f.flush()
            os.fsync(f.fileno())
        self.log.write(op="create", name=name, size=len(data), seed=f"{self.wid}:{name}:0")
        self.owned[name] = len(data)

    def _create_by_rename(self, n: int) -> None:
        name = self.name = f"r{self.seed}_{n}"
        tmp = os.path.join(self.root, f"tmp{n}")
        data = payload(f"{self.wid}:{name}:0", self.rng.randrange(0, self.max_file // 4))
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.root, name))
        self.log.write(op="create", name=name, size=len(data), seed=f"{self.wid}:{name}:0")
        self.owned[name] = len(data)

    def _append(self) -> None:
        name = self.name = self.rng.choice(sorted(self.owned))
        size = self.owned[name]
        extra = self.rng.randrange(1, MiB)
        self.log.write(op="intent-append", name=name, old=size, new=size + extra)
        with open(os.path.join(self.root, name), "ab") as f:
            f.write(payload(f"{self.wid}:{name}:append:{size}", extra))
            os.fsync(f.fileno())
        self.log.write(op="append", name=name, old=size, new=size + extra)
        self.owned[name] = size + extra

    def _truncate(self) -> None:
        name = self.name = self.rng.choice(sorted(self.owned))
        new = self.rng.randrange(0, self.owned[name] + 1)
        self.log.write(op="intent-truncate", name=name, old=self.owned[name], new=new)
        os.truncate(os.path.join(self.root, name), new)
        fd = os.open(os.path.join(self.root, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.log.write(op="truncate", name=name, old=self.owned[name], new=new)
        self.owned[name] = new

    def _unlink(self) -> None:
        name = self.name = self.rng.choice(sorted(self.owned))
        self.log.write(op="intent-unlink", name=name)
        os.unlink(os.path.join(self.root, name))
        self.log.write(op="unlink", name=name)
        del self.owned[name]

    def make_room(self) -> None:
        """Full. The file the call was changing is in an unknown state now: leave it
        alone from here on, and make room by removing one of the others."""
        self.owned.pop(self.name, None)
        if not self.owned and not self.old:
            time.sleep(0.01)
            return
        victim = self.old.pop() if self.old else self.rng.choice(sorted(self.owned))
        self.log.write(op="intent-unlink", name=victim)
        os.unlink(os.path.join(self.root, victim))
        self.log.write(op="unlink", name=victim)
        self.owned.pop(victim, None)


def _mount_is_dead(mountpoint: str) -> bool:
    try:
        os.statvfs(mountpoint)  # always forwarded to the daemon (stat may come from a cache)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _settled(log_path: str) -> list[str]:
    """Names whose last record in the log is an acknowledged create/append/truncate."""
    last: dict[str, str] = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                rec = json.loads(line)
                last[rec["name"]] = rec["op"]
    return sorted(n for n, op in last.items() if op in ("create", "append", "truncate"))


@dataclass
class FileModel:
    """What a file must look like: its pieces, each (seed, offset-in-piece, length)."""

    pieces: list[tuple[str, int]] = field(default_factory=list)  # (seed, length)

    def size(self) -> int:
        return sum(n for _, n in self.pieces)

    def bytes(self, limit: int | None = None) -> bytes:
        out = b"".join(payload(seed, n) for seed, n in self.pieces)
        return out if limit is None else out[:limit]

    def truncated(self, new: int) -> FileModel:
        pieces, left = [], new
        for seed, n in self.pieces:
            if left <= 0:
                break
            pieces.append((seed, min(n, left)))
            left -= n
        if left > 0:
            pieces.append(("zeros", left))
        return FileModel(pieces)


def _payload_or_zeros(seed: str, n: int) -> bytes:
    return bytes(n) if seed == "zeros" else payload(seed, n)


def _render(m: FileModel) -> bytes:
    return b"".join(_payload_or_zeros(s, n) for s, n in m.pieces)


def verify(mountpoint: str, log_paths: dict[int, str]) -> list[str]:
    """Problems found (empty when every acknowledged effect is intact)."""
    problems = []
    for wid, log_path in log_paths.items():
        files: dict[str, FileModel | None] = {}
        pending: dict[str, dict] = {}
        with open(log_path) as f:
            for line in f:
                rec = json.loads(line)
                name, op = rec["name"], rec["op"]
                if op.startswith("intent-"):
                    pending[name] = rec
                    continue
                pending.pop(name, None)
                if op == "create":
                    files[name] = FileModel([(rec["seed"], rec["size"])])
                elif op == "append":
                    files[name] = FileModel([*files[name].pieces,
                                             (f"{wid}:{name}:append:{rec['old']}", rec["new"] - rec["old"])])
                elif op == "truncate":
                    files[name] = files[name].truncated(rec["new"])
                elif op == "unlink":
                    files[name] = None
        root = os.path.join(mountpoint, f"w{wid}")
        for name, model in files.items():
            path = os.path.join(root, name)
            intent = pending.get(name)
            try:
                with open(path, "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                got = None
            if model is None:
                if got is not None:
                    problems.append(f"w{wid}/{name}: unlinked (acknowledged) but still there")
                continue
            want = _render(model)
            if got == want:
                continue
            if intent and intent["op"] == "intent-unlink" and got is None:
                continue
            if intent and intent["op"] == "intent-truncate" and got == _render(model.truncated(intent["new"])):
                continue
            if intent and intent["op"] == "intent-append" and got is not None:
                full = want + payload(f"{wid}:{name}:append:{intent['old']}", intent["new"] - intent["old"])
                if len(want) <= len(got) <= len(full) and got == full[: len(got)]:
                    continue
                # A torn append may also leave zeros where a later 1 MiB piece had not landed.
                if len(got) <= len(full) and got[: len(want)] == want:
                    tail_ok = all(g == w or g == 0 for g, w in zip(got[len(want):], full[len(want):], strict=False))
                    if tail_ok:
                        continue
            if got is None:
                problems.append(f"w{wid}/{name}: acknowledged but missing")
            else:
                problems.append(f"w{wid}/{name}: {len(got)} bytes differ from the acknowledged "
                                f"{len(want)} bytes" + (f" (intent {intent['op']})" if intent else ""))
    return problems
