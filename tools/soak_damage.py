"""The damage phase of tools/soak.py: random metadata damage to unmounted copies of a
populated region, then fsck -n, fsck -y, mount and a FUSE read of what was repaired."""

from __future__ import annotations

import collections
import errno
import os
import random
import stat

from soak_common import MiB, Round, check, read_all, unmount_check


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


def _damage(victim: str, image: bytes, rng: random.Random, dseed: int, k: int) -> str:
    """A fresh copy of the template at victim, damaged: every third seed a named damage
    (tools/corrupt.py), else random bytes. Returns what was done."""
    import corrupt

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
    return what


def _use_repaired(r: Round, victim: str, k: int, where: str, outcome: collections.Counter) -> None:
    """Mount a repaired region through FUSE: every file reads, a new file can be written
    (or ENOSPC, only when nothing is free), and the end-of-round check passes."""
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


def phase_damage(r: Round) -> str:
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
        where = f"damage seed {dseed} ({_damage(victim, image, rng, dseed, k)})"
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
            _use_repaired(r, victim, k, where, outcome)
    r.numbers.update(seeds=s.damage_seeds, fuse_mounts=fuse_checked, **dict(outcome))
    return (f"{s.damage_seeds} damaged copies: {outcome['repaired']} repaired, {outcome['clean']} clean, "
            f"{outcome['refused']} refused (mount refuses them too); every repair fsck-clean and mountable; "
            f"{fuse_checked} mounted through FUSE, every file read, a file written, fsck clean")
