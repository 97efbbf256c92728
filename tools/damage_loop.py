#!/usr/bin/env python3
"""Random damage to a populated region, many times: fsck never crashes and never
changes a file without naming it.

    python tools/damage_loop.py [--seeds 2000] [--first 0] [--region-mib 64]

Each seed copies a populated template region (directories, files spanning blocks and
fragmented ones, packed small files, a sparse file, hard links, short and long
symlinks, small and chained xattrs, a fifo, owners other than root, a kernel object),
then damages its used metadata: random bytes or flipped bits in the superblock, the
journal header, the bitmap and the used records of every table (tools/corrupt.py).
It then checks that:

- `fsck -n` and mount fail only with their one-line errors, and mount refuses what
  `fsck -y` cannot repair; whatever `fsck -y` repairs is clean afterwards and mounts;
- issue 14's rule: after `fsck -y` every file reads exactly as before the damage (data,
  size, kind, mode, owner, xattrs, symlink target, every name), or the report names it:
  an entry in its per-file list ("files" in --json) with its inode and, when it still
  has a name, one of its paths, and a CHANGED line in the text report. A file that only
  moved with a directory the report names (the same name below it) is named by it.

tests/test_fsck.py runs a few dozen seeds of the same (`unexplained` is its judge too);
this is the long version. Exits non-zero if any seed breaks a rule (all seeds run).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import stat as statmod
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corrupt

from pmemfs.fs import creds
from pmemfs.fs.engine import ROOT_CTX, Ctx, Engine, MountError
from pmemfs.media.format import FormatError
from pmemfs.media.mkfs import make_filesystem
from pmemfs.media.region import RegionError
from pmemfs.tools.fsck import display, format_text, fsck

BS = 2 << 20


def populate(path: str, kernel_object: bool = True) -> None:
    """The template: a bit of everything the format can hold."""
    rng = random.Random(7)
    e = Engine(path)
    try:
        a = e.mkdir(1, b"a", 0o755).ino
        b = e.mkdir(a, b"b", 0o750).ino
        home = e.mkdir(1, b"home", 0o755).ino
        user = Ctx(uid=1000, gid=1000, creds=creds.Creds(1000, 1000))
        u = e.mkdir(home, b"u", 0o700, ctx=user).ino
        for parent, name, size, ctx in ((1, b"big", 2 * BS + 7, None), (a, b"small", 1000, None),
                                        (b, b"mid", 70_000, None), (1, b"tiny", 10, None),
                                        (a, b"empty", 0, None), (u, b"notes", 5000, user),
                                        (u, b"photo", BS + 1, user)):
            ino = e.create(parent, name, 0o644, ctx=ctx or ROOT_CTX).ino
            e.write(ino, 0, rng.randbytes(size))
            e.setxattr(ino, b"user.x", rng.randbytes(rng.randrange(1, 1500)))
        # Fragmented: two files written a block at a time, in turns.
        f1, f2 = e.create(b, b"frag1", 0o600).ino, e.create(b, b"frag2", 0o600).ino
        for k in range(2):
            e.write(f1, k * BS, rng.randbytes(BS))
            e.write(f2, k * BS, rng.randbytes(BS // 2 if k else BS))
        sparse = e.create(1, b"sparse", 0o644).ino
        e.write(sparse, BS + 100, b"end")
        e.setxattr(a, b"user.dir", b"d")
        e.setxattr(b, b"trusted.big", rng.randbytes(3000))
        e.link(e.lookup(1, b"big"), b, b"hard")
        e.link(e.lookup(u, b"notes"), home, b"notes-link", ctx=user)
        e.symlink(1, b"l", b"a/b/mid")
        e.symlink(b, b"long", b"../" * 300 + b"x")
        e.mknod(a, b"fifo", statmod.S_IFIFO | 0o600)
        for i in range(6):
            ino = e.create(home, b"s%d" % i, 0o640, ctx=user).ino
            e.write(ino, 0, rng.randbytes(200 + 900 * i))
        if kernel_object:
            e.kernel.create("obj", "device-state", 5000)
    finally:
        e.close()


def snapshot(path: str) -> dict:
    """Everything a user sees, through the Engine: {"paths": {path: ino}, "inodes":
    {ino: {kind, mode, uid, gid, nlink, xattrs, target (symlinks), size and the CRC-32 of
    the data (regular files)}}}."""
    e = Engine(path, readonly=True)  # (a read-write mount would write atimes as it reads)
    try:
        paths: dict[str, int] = {}
        inodes: dict[int, dict] = {}
        todo = [(1, "")]
        while todo:
            d, rel = todo.pop()
            for _, name, ino in e.readdir(d):
                if name in (b".", b".."):
                    continue
                p = f"{rel}/{name.decode(errors='surrogateescape')}"
                paths[p] = ino
                if ino in inodes:
                    continue  # a hard link: described once
                s = e.stat(ino)
                rec = {"kind": s.kind, "mode": s.mode, "uid": s.uid, "gid": s.gid, "nlink": s.nlink,
                       "xattrs": {n: e.getxattr(ino, n) for n in sorted(e.listxattr(ino))}}
                if statmod.S_ISDIR(s.mode):
                    todo.append((ino, p))
                elif statmod.S_ISLNK(s.mode):
                    rec["target"] = e.readlink(ino)
                elif statmod.S_ISREG(s.mode):
                    rec["size"] = s.size  # (a damaged size may be absurd: read what a test file can hold)
                    rec["data"] = zlib.crc32(e.read(ino, 0, min(s.size, 64 << 20) + 10))
                inodes[ino] = rec
        return {"paths": paths, "inodes": inodes}
    finally:
        e.close()


def _paths_of(tree: dict, ino: int) -> set[str]:
    return {p for p, i in tree["paths"].items() if i == ino}


def _naming_problem(ino: int, named: dict[int, dict], after: dict, changed_lines: list[str]) -> str | None:
    """None if ino is named properly (see unexplained), else why not."""
    f = named.get(ino)
    if f is None:
        return "not named"
    now = _paths_of(after, ino)
    if now and f["path"] not in now:
        return f"named by {f['path']!r}, not by one of its paths {sorted(now)}"
    label = f"{display(f['path'])} (inode {ino})" if f["path"] else f"inode {ino} (no path)"
    if not any(line.startswith(f"CHANGED: {label}: ") for line in changed_lines):
        return f"no CHANGED line for {label!r} in the text report"
    return None


def _moved_with_a_named_directory(ino: int, before: dict, after: dict, named: dict[int, dict]) -> bool:
    """Every old path of ino that is gone became a new one only because a named directory
    above it moved, keeping the names below."""
    old, new = _paths_of(before, ino), _paths_of(after, ino)
    gone, came = old - new, new - old
    for p in sorted(gone):
        parts = p.split("/")
        for k in range(len(parts) - 1, 1, -1):
            top = "/".join(parts[:k])
            d = before["paths"].get(top)
            if d is None or d not in named:
                continue
            hit = [q + p[len(top):] for q in _paths_of(after, d) if q + p[len(top):] in came]
            if hit:
                came.discard(hit[0])
                break
        else:
            return False
    return not came


def unexplained(before: dict, after: dict, report: dict, text: list[str]) -> dict[int, str]:
    """Files that changed without the report naming them: {inode: what is wrong}.

    Named means: an entry of report["files"] with the inode, whose path is one of the
    file's paths after the repair when it has any, and a CHANGED line in the text that
    shows that path (or "inode N" when there is none). A path that changed only because
    a directory above it moved or was renamed, keeping the names below, is explained by
    that directory being named."""
    named = {f["inode"]: f for f in report["files"]}
    changed_lines = [line for line in text if line.startswith("CHANGED: ")]
    out: dict[int, str] = {}
    for ino, rec in before["inodes"].items():
        got = after["inodes"].get(ino)
        if got is None:
            why = "is gone"
        else:
            diff = [k for k, v in rec.items() if k != "nlink" and got.get(k) != v]
            if diff:
                why = f"{', '.join(diff)} changed"
            elif _paths_of(before, ino) != _paths_of(after, ino):
                if ino not in named and _moved_with_a_named_directory(ino, before, after, named):
                    continue
                why = f"names {sorted(_paths_of(before, ino))} became {sorted(_paths_of(after, ino))}"
            else:
                continue
        problem = _naming_problem(ino, named, after, changed_lines)
        if problem:
            out[ino] = f"{sorted(_paths_of(before, ino))} {why}: {problem}"
    lf = after["paths"].get("/lost+found")
    for ino in after["inodes"]:
        if ino not in before["inodes"] and ino != lf:
            problem = _naming_problem(ino, named, after, changed_lines)
            if problem:
                out[ino] = f"new file {sorted(_paths_of(after, ino))}: {problem}"
    return out


def damage(path: str, seed: int) -> list[tuple[int, int]]:
    """Even seeds: random bytes (1, 2, 4 or 8 writes); odd seeds: 1 to 16 flipped bits."""
    rng = random.Random(seed)
    if seed % 2:
        return corrupt.random_bits(path, seed, flips=rng.choice([1, 2, 4, 8, 16]))
    return corrupt.random_bytes(path, seed, writes=rng.choice([1, 2, 4, 8]))


def mounts(path: str) -> bool:
    try:
        Engine(path).close()
        return True
    except (MountError, FormatError, RegionError):
        return False


class Template:
    """A populated region to restore before each seed: its metadata area only, since
    damage and fsck write nothing else but free blocks (a copy made for a file that
    shared blocks), and the whole image after a seed in which fsck made such copies."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.image = f.read()
        from pmemfs.media.format import Superblock

        g = Superblock.decode(self.image[:4096], len(self.image)).geometry
        self.meta_end = g.data_start_block * g.block_size
        self.before = snapshot(path)
        self.dirty = True

    def restore(self, path: str) -> None:
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.write(self.image if self.dirty else self.image[: self.meta_end])
        self.dirty = False


def one_seed(path: str, template: Template, seed: int, stats: dict, thorough: bool = True) -> list[str]:
    """Damage, check, repair, compare; returns the rules this seed broke. thorough:
    also hold fsck -n and mount to their rules (the suite's test leaves that to
    test_random_damage_never_crashes)."""
    before = template.before
    template.restore(path)
    damage(path, seed)
    if not thorough:
        rep = fsck(path, "y")
        template.dirty = any("cloned" in c.what for c in rep.files)
        if rep.exit_code == 4:
            stats["refused"] += 1
            return []
        stats["repaired" if rep.exit_code == 1 else "clean"] += 1
        return _compare(path, before, rep, stats)
    first = fsck(path, "n").exit_code
    if first not in (0, 4):
        return [f"fsck -n exited {first}"]
    if first == 0 and not mounts(path):
        return ["fsck -n says clean but mount refuses"]
    rep = fsck(path, "y")
    template.dirty = any("cloned" in c.what for c in rep.files)
    if rep.exit_code == 4:
        stats["refused"] += 1
        return ["fsck -y gave up but mount accepts the region"] if mounts(path) else []
    stats["repaired" if rep.exit_code == 1 else "clean"] += 1
    again = fsck(path, "n").exit_code
    if again != 0 or not mounts(path):
        return [f"repaired, but a second fsck says {again} or mount refuses"]
    return _compare(path, before, rep, stats)


def _compare(path: str, before: dict, rep, stats: dict) -> list[str]:
    after = snapshot(path)
    silent = unexplained(before, after, rep.as_dict(), format_text(rep))
    changed = {i for i, rec in before["inodes"].items() if after["inodes"].get(i) != rec
               or {p for p, j in before["paths"].items() if j == i} != {p for p, j in after["paths"].items() if j == i}}
    named = {c.inode for c in rep.files}
    stats["changed"] += len(changed)
    stats["named"] += len(named)
    stats["named_unchanged"] += len(named - changed)
    for f in rep.findings:
        if f.code in ("checksum", "free-damaged"):
            stats["damaged_records"] += len(f.data.get("index", []))
            many = re.search(r"\((\d+) restored exactly", f.message)
            stats["restored"] += int(many.group(1)) if many else f.message.count("restored exactly")
    stats["untouched"] += not changed
    return [f"inode {i}: {why}" for i, why in sorted(silent.items())]


def new_stats() -> dict[str, int]:
    return dict.fromkeys(("clean", "repaired", "refused", "changed", "named", "named_unchanged",
                          "damaged_records", "restored", "untouched"), 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2000)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--region-mib", type=int, default=64)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pmemfs-damage-", dir="/dev/shm")
    template, path = os.path.join(work, "template"), os.path.join(work, "victim")
    make_filesystem(template, size=a.region_mib << 20)
    populate(template)
    tpl = Template(template)
    stats = new_stats()
    broken: dict[int, list[str]] = {}
    started = time.monotonic()
    try:
        for seed in range(a.first, a.first + a.seeds):
            problems = one_seed(path, tpl, seed, stats)
            if problems:
                broken[seed] = problems
                print(f"seed {seed}: " + "; ".join(problems), flush=True)
            if (seed - a.first + 1) % 100 == 0:
                print(f"{seed - a.first + 1} seeds, {time.monotonic() - started:.0f} s: {stats}, "
                      f"{len(broken)} broke a rule", flush=True)
    finally:
        for p in (template, path):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(work)
    print(f"{a.seeds} seeds in {time.monotonic() - started:.0f} s: {stats}")
    print(f"repaired seeds whose every file reads as before: {stats['untouched']}; files changed by damage or "
          f"repair: {stats['changed']}, named: {stats['named']} ({stats['named_unchanged']} of them unchanged); "
          f"records that failed their checksum: {stats['damaged_records']}, restored exactly from it: "
          f"{stats['restored']}")
    if broken:
        print(f"{len(broken)} seed(s) broke a rule: {sorted(broken)}")
        return 1
    print("no crash, mount refused everything fsck could not repair, no file changed without being named")
    return 0


if __name__ == "__main__":
    sys.exit(main())
