"""Random operation sequences on pmemfs and on tmpfs side by side: same results.

A hypothesis state machine applies each operation to a pmemfs mount and to a
tmpfs directory (/dev/shm), requires the same outcome (the value, or the errno of
the failure), and after every step compares both trees: names, types, modes, owners,
sizes, link counts, contents, xattrs, symlink targets, and which names are hard links
of one another. Not compared: directory st_size and timestamps (they legitimately
differ), st_blocks (2 MiB blocks vs 4 KiB pages).

So that the daemon, not the kernel's caches, answers: the pmemfs side of every
comparison reads contents with O_DIRECT (and checks that the cached read agrees), a
step may drop the kernel's caches (pages, dentries, inodes), and a sequence may unmount
and mount again, or kill -9 the daemon and mount again. Some steps run as an
unprivileged user (uid/gid 65534, no groups) on both trees, so modes like 0o000 really
refuse (EACCES, EPERM) and what that user creates is theirs.

One mount serves every example of the test; both trees are emptied between examples.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from contextlib import contextmanager

import hypothesis.strategies as st
import pytest
from conftest import drop_caches
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
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
# xattrs: user.* (any owner with write access) and trusted.* (root only, hidden from others).
xattr_names = st.sampled_from(["user.a", "user.b", "user.a.longer.name", "trusted.t"])
xattr_values = st.binary(max_size=40) | st.sampled_from([b"v" * 3000])
xattr_flags = st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
NOBODY = 65534
users = st.sampled_from([False, False, True])  # True: the step runs as uid/gid 65534
OUTCOMES: Counter = Counter()  # (rule kind, outcome) seen: printed, so a run shows what it covered

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


def read_file(path: str, direct: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        out = b""
        while chunk := os.read(fd, 4 << 20):
            out += chunk
        return out
    finally:
        os.close(fd)


def snapshot(root: str, from_daemon: bool = False) -> dict:
    """Everything about the tree that should match tmpfs. from_daemon: read contents with
    O_DIRECT (past the page cache, from the daemon) and require the cached read to agree."""
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
            rec = [stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_nlink, s.st_uid, s.st_gid,
                   {x: os.getxattr(p, x, follow_symlinks=False) for x in sorted(os.listxattr(p, follow_symlinks=False))}]
            if stat.S_ISDIR(s.st_mode):
                todo.append(r)
            elif stat.S_ISLNK(s.st_mode):
                rec += [s.st_size, os.readlink(p)]
            else:
                data = read_file(p, direct=from_daemon)
                if from_daemon and read_file(p, direct=False) != data:
                    data = b"<the page cache disagrees with the daemon>" + data
                rec += [s.st_size, len(data), data]
            entries[r] = rec
            by_ino.setdefault(s.st_ino, []).append(r)
    entries["links"] = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return entries


@contextmanager
def as_nobody():
    """Run as uid/gid 65534 with no supplementary groups (the effective, i.e. file-system,
    ids: what the kernel checks and what FUSE passes to the daemon), then as root again."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


class Model(RuleBasedStateMachine):
    def __init__(self, mount, ref: str):
        super().__init__()
        self.mount = mount
        self.roots = (ref, mount.path)
        self.remounted = self.restarted = self.taken_over = False
        for r in self.roots:
            empty(r)

    def both(self, fn, *rel_args, extra=(), nobody=False):
        """Run fn on each tree (relative path arguments joined to its root); same outcome.

        nobody: as uid 65534, through /proc/self/fd/N of a descriptor of the root (the
        directories above the roots are not that user's to search)."""
        out = []
        for r in self.roots:
            if not nobody:
                out.append(outcome(fn, *[os.path.join(r, a) for a in rel_args], *extra))
                continue
            fd = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with as_nobody():
                    out.append(outcome(fn, *[f"/proc/self/fd/{fd}/{a}" for a in rel_args], *extra))
            finally:
                os.close(fd)
        who = " as nobody" if nobody else ""
        OUTCOMES[("nobody" if nobody else "root", out[0][0] if out[0][0] == "ok" else out[0][1])] += 1
        assert out[1] == out[0], f"{fn.__name__}{rel_args}{extra}{who}: tmpfs {out[0]}, pmemfs {out[1]}"
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

    @rule(p=paths, mode=modes, who=users)
    def create(self, p, mode, who):
        def create(path, mode):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
        self.both(create, p, extra=(mode,), nobody=who)

    @rule(p=paths, off=offsets, data=datas, who=users)
    def write(self, p, off, data, who):
        def write(path, off, data):
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(write, p, extra=(off, data), nobody=who)

    @rule(p=paths, data=datas, who=users)
    def append(self, p, data, who):
        def append(path, data):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(append, p, extra=(data,), nobody=who)

    @rule(p=paths, off=offsets, n=sizes, who=users)
    def read(self, p, off, n, who):
        def read(path, off, n):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(read, p, extra=(off, n), nobody=who)

    @rule(p=paths, size=sizes, who=users)
    def truncate(self, p, size, who):
        self.both(os.truncate, p, extra=(size,), nobody=who)

    @rule(p=paths, who=users)
    def open_trunc(self, p, who):
        def open_trunc(path):
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        self.both(open_trunc, p, nobody=who)

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]), who=users)
    def rename(self, src, dst, flags, who):
        self.both(renameat2, src, dst, extra=(flags,), nobody=who)

    @rule(src=st.sampled_from(["d", "e", "d/e", "e/a"]),
          dst=st.sampled_from(["e/a", "d/b", "a/x", "d/e/b", "e/d", "b"]), who=users)
    def move_dir(self, src, dst, who):
        """Directories moving between parents: nlink, "..", and subtree paths."""
        self.both(os.rename, src, dst, nobody=who)

    @rule(src=paths, dst=paths, who=users)
    def link(self, src, dst, who):
        self.both(os.link, src, dst, nobody=who)

    @rule(p=paths, who=users)
    def unlink(self, p, who):
        self.both(os.unlink, p, nobody=who)

    @rule(p=paths, mode=modes, who=users)
    def mkdir(self, p, mode, who):
        self.both(os.mkdir, p, extra=(mode,), nobody=who)

    @rule(p=paths, who=users)
    def rmdir(self, p, who):
        self.both(os.rmdir, p, nobody=who)

    @rule(dest=targets, p=paths, who=users)
    def symlink(self, dest, p, who):
        def symlink(path, target):
            os.symlink(target, path)
        self.both(symlink, p, extra=(dest,), nobody=who)

    @rule(p=paths, mode=modes, who=users)
    def chmod(self, p, mode, who):
        self.both(os.chmod, p, extra=(mode,), nobody=who)

    @rule(p=paths, who=users)
    def stat_(self, p, who):
        def stat_(path):
            s = os.stat(path)
            size = None if stat.S_ISDIR(s.st_mode) else s.st_size
            return (s.st_mode, s.st_nlink, s.st_uid, s.st_gid, size)
        self.both(stat_, p, nobody=who)

    @rule(p=paths, who=users)
    def listdir(self, p, who):
        def listdir(path):
            return sorted(os.listdir(path))
        self.both(listdir, p, nobody=who)

    # ---------------------------------------------------------------- xattrs
    @rule(p=paths, name=xattr_names, value=xattr_values, flags=xattr_flags, who=users)
    def setxattr(self, p, name, value, flags, who):
        self.both(os.setxattr, p, extra=(name, value, flags), nobody=who)

    @rule(p=paths, name=xattr_names, who=users)
    def getxattr(self, p, name, who):
        self.both(os.getxattr, p, extra=(name,), nobody=who)

    @rule(p=paths, name=xattr_names, who=users)
    def removexattr(self, p, name, who):
        self.both(os.removexattr, p, extra=(name,), nobody=who)

    @rule(p=paths, who=users)
    def listxattr(self, p, who):
        def listxattr(path):
            return sorted(os.listxattr(path))
        self.both(listxattr, p, nobody=who)

    # ---------------------------------------------------------------- the daemon
    @rule()
    def drop_kernel_caches(self):
        """Pages, dentries and inodes go: what follows is looked up and read from the daemon."""
        drop_caches()
        OUTCOMES[("daemon", "caches dropped")] += 1

    @precondition(lambda self: not self.remounted)
    @rule()
    def remount(self):
        """A clean unmount (the daemon exits 0, the region is marked clean) and a new mount."""
        self.mount.unmount()
        self.mount.start()
        self.remounted = True
        OUTCOMES[("daemon", "remounted")] += 1

    @precondition(lambda self: not self.restarted)
    @rule()
    def kill_and_restart(self):
        """kill -9 of supervisor and daemon mid-sequence (the connection ends) and a new
        mount (Mount.restart): nothing acknowledged may change."""
        self.mount.restart()
        assert "clean=0" in self.mount.status, self.mount.status
        self.restarted = True
        OUTCOMES[("daemon", "killed and restarted")] += 1

    @precondition(lambda self: not self.taken_over)
    @rule()
    def kill_and_take_over(self):
        """kill -9 of the daemon only: the supervisor's standby takes the live connection
        over (live update). The kernel keeps its caches, so the next steps also check that
        what it cached agrees with what the new daemon serves."""
        self.mount.crash()
        self.taken_over = True
        OUTCOMES[("daemon", "killed, taken over")] += 1

    @invariant()
    def trees_match(self):
        ref, got = snapshot(self.roots[0]), snapshot(self.roots[1], from_daemon=True)
        if got != ref:
            diff = {}
            for k in sorted(set(ref) | set(got)):
                a, b = ref.get(k), got.get(k)
                if a == b:
                    continue
                if a and b and len(a) == len(b) == 9 and a[:8] == b[:8]:  # same file but contents
                    at = next((i for i, (x, y) in enumerate(zip(a[8], b[8], strict=False)) if x != y),
                              min(len(a[8]), len(b[8])))
                    diff[k] = f"contents differ at byte {at}: tmpfs {a[8][at:at + 16]!r}, pmemfs {b[8][at:at + 16]!r}"
                else:
                    diff[k] = f"tmpfs {repr(a)[:200]}, pmemfs {repr(b)[:200]}"
            raise AssertionError(f"trees differ: {diff}")


@pytest.mark.parametrize("extra", [set(), {"writeback"}], ids=["default", "writeback"])
def test_random_operations_match_tmpfs(region_factory, mount_factory, extra):
    m = mount_factory(region_factory(size=256 << 20), {"allow_other", *extra})  # others may use it
    ref = tempfile.mkdtemp(dir="/dev/shm", prefix="pmemfs-model-")
    old_umask = os.umask(0o022)
    started = time.monotonic()
    batches = 0
    try:
        # Up to 25 sequences of 30 steps, in batches of 5, and no new batch after 10 s:
        # the suite stays fast on a loaded machine, and every run checks at least 5.
        # (PMEMFS_MODEL_SECONDS raises the budget for a long run.)
        budget = float(os.environ.get("PMEMFS_MODEL_SECONDS", "10"))
        while batches < 5 and (batches == 0 or time.monotonic() - started < budget):
            run_state_machine_as_test(
                lambda: Model(m, ref),
                settings=settings(max_examples=5, stateful_step_count=30, deadline=None,
                                  database=None))
            batches += 1
    finally:
        os.umask(old_umask)
        shutil.rmtree(ref, ignore_errors=True)
    print(f"model: {batches * 5} sequences in {time.monotonic() - started:.1f} s; "
          f"outcomes {sorted(OUTCOMES.items())}")
    # what the last example left must also survive a restart unchanged
    before = snapshot(m.path, from_daemon=True)
    m.restart()
    assert snapshot(m.path, from_daemon=True) == before
