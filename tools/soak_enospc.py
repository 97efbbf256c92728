"""The enospc phase of tools/soak.py: a small region filled from several processes until
ENOSPC, checked, emptied and filled again."""

from __future__ import annotations

import errno
import os
import random

import conftest
from soak_common import (
    MB2,
    KiB,
    MiB,
    Round,
    _difference,
    _write_new,
    check,
    read_all,
    run_workers,
    unmount_check,
)

from pmemfs.tools import stress


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
