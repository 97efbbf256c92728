"""Random operation sequences on pmemfs and on tmpfs side by side: same results.

A hypothesis state machine applies each operation to a pmemfs mount and to a
tmpfs directory (/dev/shm), requires the same outcome (the value, or the errno of
the failure), and after every step compares both trees: names, types, modes,
sizes, link counts, contents, symlink targets, and which names are hard links of
one another. Not compared: directory st_size and timestamps (they legitimately
differ), st_blocks (2 MiB blocks vs 4 KiB pages).

One mount serves every example of the test; both trees are emptied between examples.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

MB2 = 2 << 20
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# A small namespace, so operations collide (replace, ENOTEMPTY, EEXIST...) often.
PATHS = ["a", "b", "c", "d", "e", "d/a", "d/b", "d/e", "e/a", "d/e/a", "d/e/b", "a/x"]
paths = st.sampled_from(PATHS)
# Offsets and sizes around 4 KiB pages and the 2 MiB allocation block.
offsets = st.sampled_from([0, 1, 100, 4095, 4096, MB2 - 3, MB2, MB2 + 7])
sizes = st.sampled_from([0, 1, 50, 4097, MB2 - 1, MB2 + 1, 2 * MB2 + 5])
modes = st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o4755, 0o2750, 0o1777, 0o777])
datas = st.binary(min_size=1, max_size=64) | st.sampled_from([b"\xab" * 5000, b"Z" * 70000])
# Symlink targets: relative and without "..", so nothing resolves outside the trees.
targets = st.sampled_from(["a", "d/e", "nowhere", "d", "e/a", "c"])

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno, e.errno))


def empty(root: str) -> None:
    os.chmod(root, 0o755)
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def snapshot(root: str) -> dict:
    """Everything about the tree that should match tmpfs."""
    entries = {}
    by_ino: dict[int, list[str]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        full = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(full))
        entries[rel + "/"] = names
        for n in names:
            r = f"{rel}/{n}" if rel else n
            p = os.path.join(root, r)
            s = os.lstat(p)
            rec = [stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_nlink]
            if stat.S_ISDIR(s.st_mode):
                todo.append(r)
            elif stat.S_ISLNK(s.st_mode):
                rec += [s.st_size, os.readlink(p)]
            else:
                with open(p, "rb") as f:
                    data = f.read()
                rec += [s.st_size, len(data), data]
            entries[r] = rec
            by_ino.setdefault(s.st_ino, []).append(r)
    entries["links"] = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return entries


class Model(RuleBasedStateMachine):
    def __init__(self, pm: str, ref: str):
        super().__init__()
        self.roots = (ref, pm)
        for r in self.roots:
            empty(r)

    def both(self, fn, *rel_args, extra=()):
        """Run fn on each tree (relative path arguments joined to its root); same outcome."""
        out = [outcome(fn, *[os.path.join(r, a) for a in rel_args], *extra) for r in self.roots]
        assert out[1] == out[0], f"{fn.__name__}{rel_args}{extra}: tmpfs {out[0]}, pmemfs {out[1]}"
        return out[0]

    @initialize()
    def start(self):
        """Start from a small tree, so operations meet things that exist."""
        for r in self.roots:
            for d in ("d", "d/e", "e"):
                os.mkdir(os.path.join(r, d))
            for f, off, data in (("a", 0, b"A" * 300), ("d/a", MB2 - 2, b"span"), ("d/e/b", 9, b"b")):
                fd = os.open(os.path.join(r, f), os.O_CREAT | os.O_WRONLY, 0o644)
                os.pwrite(fd, data, off)
                os.close(fd)
            os.symlink("a", os.path.join(r, "c"))

    @rule(p=paths, mode=modes)
    def create(self, p, mode):
        def create(path, mode):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
        self.both(create, p, extra=(mode,))

    @rule(p=paths, off=offsets, data=datas)
    def write(self, p, off, data):
        def write(path, off, data):
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(write, p, extra=(off, data))

    @rule(p=paths, data=datas)
    def append(self, p, data):
        def append(path, data):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(append, p, extra=(data,))

    @rule(p=paths, off=offsets, n=sizes)
    def read(self, p, off, n):
        def read(path, off, n):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(read, p, extra=(off, n))

    @rule(p=paths, size=sizes)
    def truncate(self, p, size):
        self.both(os.truncate, p, extra=(size,))

    @rule(p=paths)
    def open_trunc(self, p):
        def open_trunc(path):
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        self.both(open_trunc, p)

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src, dst, flags):
        self.both(renameat2, src, dst, extra=(flags,))

    @rule(src=st.sampled_from(["d", "e", "d/e", "e/a"]),
          dst=st.sampled_from(["e/a", "d/b", "a/x", "d/e/b", "e/d", "b"]))
    def move_dir(self, src, dst):
        """Directories moving between parents: nlink, "..", and subtree paths."""
        self.both(os.rename, src, dst)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.both(os.link, src, dst)

    @rule(p=paths)
    def unlink(self, p):
        self.both(os.unlink, p)

    @rule(p=paths, mode=modes)
    def mkdir(self, p, mode):
        self.both(os.mkdir, p, extra=(mode,))

    @rule(p=paths)
    def rmdir(self, p):
        self.both(os.rmdir, p)

    @rule(dest=targets, p=paths)
    def symlink(self, dest, p):
        def symlink(path, target):
            os.symlink(target, path)
        self.both(symlink, p, extra=(dest,))

    @rule(p=paths, mode=modes)
    def chmod(self, p, mode):
        self.both(os.chmod, p, extra=(mode,))

    @rule(p=paths)
    def stat_(self, p):
        def stat_(path):
            s = os.stat(path)
            size = None if stat.S_ISDIR(s.st_mode) else s.st_size
            return (s.st_mode, s.st_nlink, size)
        self.both(stat_, p)

    @invariant()
    def trees_match(self):
        ref, got = (snapshot(r) for r in self.roots)
        if got != ref:
            diff = {}
            for k in sorted(set(ref) | set(got)):
                a, b = ref.get(k), got.get(k)
                if a == b:
                    continue
                if a and b and len(a) == len(b) == 6 and a[:5] == b[:5]:  # same file but contents
                    at = next(i for i, (x, y) in enumerate(zip(a[5], b[5], strict=False)) if x != y)
                    diff[k] = f"contents differ at byte {at}: tmpfs {a[5][at:at + 16]!r}, pmemfs {b[5][at:at + 16]!r}"
                else:
                    diff[k] = f"tmpfs {repr(a)[:200]}, pmemfs {repr(b)[:200]}"
            raise AssertionError(f"trees differ: {diff}")


def test_random_operations_match_tmpfs(region_factory, mount_factory):
    m = mount_factory(region_factory(size=256 << 20))
    ref = tempfile.mkdtemp(dir="/dev/shm", prefix="pmemfs-model-")
    old_umask = os.umask(0o022)
    try:
        run_state_machine_as_test(
            lambda: Model(m.path, ref),
            settings=settings(max_examples=40, stateful_step_count=25, deadline=None,
                              database=None))
    finally:
        os.umask(old_umask)
        shutil.rmtree(ref, ignore_errors=True)
    # what the last example left must also survive a restart unchanged
    before = snapshot(m.path)
    m.restart()
    assert snapshot(m.path) == before
