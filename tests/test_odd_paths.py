"""Odd paths of Linux semantics through a real mount, held against tmpfs (/dev/shm):
renameat2(RENAME_WHITEOUT), O_TMPFILE, chattr flags (FS_IOC_GETFLAGS/SETFLAGS) and
POSIX ACLs. docs/DESIGN.md, "Linux semantics at the edges", says what is done and why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import stat
import subprocess
import tempfile

import pytest
from conftest import SMALL, Mount, assert_clean, new_region_path

from pmemfs.engine import RENAME_WHITEOUT, Engine
from pmemfs.mkfs import make_filesystem

AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
NOBODY = 65534
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # "ENOTSUP" in Python: the same number

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def outcome(fn, *args, **kw) -> str:
    """'ok' or the errno name of the OSError the call raised."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def as_user(directory: str, fn, uid: int = NOBODY, gid: int = NOBODY, groups: tuple = ()):
    """fn() in a child with these ids and no capabilities, its working directory
    `directory` (reached before dropping root: pytest's tmp directories are 0700).
    Returns what fn returned; its OSError comes back as the errno name."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        result: object = "child failed"
        try:
            os.close(r)
            os.fchdir(dfd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)  # drops every capability
            try:
                result = fn()
            except OSError as e:
                result = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(result))
            os._exit(0)
    os.close(w)
    os.close(dfd)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def kind(path: str) -> tuple:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev, st.st_nlink


@pytest.fixture
def shm():
    """A tmpfs directory to compare with (0777, so that nobody can work in it too)."""
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="pmemfs-odd-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    """One mount for the module (mounts cost seconds on a busy machine), torn down
    with the same checks as conftest's mount_factory."""
    region = new_region_path()
    make_filesystem(region, size=SMALL)
    path = tmp_path_factory.mktemp("odd") / "mnt"
    path.mkdir()
    m = Mount(region, str(path), {"allow_other"})
    try:
        yield m
    finally:
        problems = m.cleanup()
        log = m.log()
        try:
            assert not problems, "; ".join(problems) + "\n" + log[-1500:]
            assert "Traceback" not in log, log
            assert_clean(region)
        finally:
            os.unlink(region)


@pytest.fixture
def mnt(mount, request) -> str:
    """A fresh 0777 directory in the module's mount, for one test."""
    d = mount.p(request.node.name)
    os.mkdir(d)
    os.chmod(d, 0o777)
    return d


# ------------------------------------------------------------ RENAME_WHITEOUT
def _whiteouts(root: str) -> dict:
    os.mkdir(f"{root}/d")
    os.chmod(f"{root}/d", 0o777)
    for name in ("a", "b", "c", "x"):
        with open(f"{root}/{name}", "w") as f:
            f.write(name)
    got = {
        "file": outcome(renameat2, f"{root}/a", f"{root}/a2", RENAME_WHITEOUT),
        "over": outcome(renameat2, f"{root}/b", f"{root}/c", RENAME_WHITEOUT),
        "dir": outcome(renameat2, f"{root}/d", f"{root}/d2", RENAME_WHITEOUT),
        "noreplace_exists": outcome(renameat2, f"{root}/x", f"{root}/c", RENAME_WHITEOUT | RENAME_NOREPLACE),
        "noreplace": outcome(renameat2, f"{root}/x", f"{root}/x2", RENAME_WHITEOUT | RENAME_NOREPLACE),
        "exchange": outcome(renameat2, f"{root}/a2", f"{root}/c", RENAME_WHITEOUT | RENAME_EXCHANGE),
        "missing": outcome(renameat2, f"{root}/nope", f"{root}/n2", RENAME_WHITEOUT),
        # a whiteout is an ordinary char device: it can itself be renamed away, whited out
        "of_whiteout": outcome(renameat2, f"{root}/a", f"{root}/a3", RENAME_WHITEOUT),
        "nobody": as_user(root, lambda: renameat2("d2", "d3", RENAME_WHITEOUT) or "ok"),
    }
    got["tree"] = {n: kind(f"{root}/{n}") for n in sorted(os.listdir(root))}
    with open(f"{root}/c") as f:
        got["c"] = f.read()
    got["owner_of_nobody_whiteout"] = os.lstat(f"{root}/d2").st_uid
    got["root_nlink"] = os.lstat(root).st_nlink
    return got


def test_rename_whiteout_as_tmpfs(shm, mnt):
    want, got = _whiteouts(shm), _whiteouts(mnt)
    root_nlink = want.pop("root_nlink"), got.pop("root_nlink")
    assert got == want
    assert got["file"] == "ok" and got["tree"]["a"] == (stat.S_IFCHR, 0, 0, 1)
    assert got["owner_of_nobody_whiteout"] == NOBODY  # no CAP_MKNOD needed (Linux >= 5.8)
    assert root_nlink[1] == 3  # "d" moved away and came back as d3: "." + ".." + d3


def test_resent_whiteout_rename_is_answered_once(region):
    """A rename whose answer was lost is resent to the next daemon: without the reply
    record it would move the fresh whiteout over the file it had just renamed."""
    from pmemfs.engine import Ctx

    caller = Ctx(0, 0, 4242)
    e = Engine(region)
    a = e.create(1, b"a", 0o644, caller).ino
    e.rename(1, b"a", 1, b"b", RENAME_WHITEOUT, caller)
    e.close(handover=True)  # the daemon dies before the answer leaves
    e = Engine(region, takeover=True)
    try:
        e.rename(1, b"a", 1, b"b", RENAME_WHITEOUT, caller)  # the kernel's resend
        assert e.lookup(1, b"b") == a
        assert e.stat(e.lookup(1, b"a")).mode == stat.S_IFCHR
    finally:
        e.close()


def test_overlayfs_upper_layer(mnt, tmp_path):
    """What whiteouts are for: pmemfs as the upper layer of an overlay mount."""
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    lower.mkdir()
    merged.mkdir()
    (lower / "gone").write_text("lower")
    (lower / "kept").write_text("lower")
    os.mkdir(f"{mnt}/up")
    os.mkdir(f"{mnt}/work")
    opts = f"lowerdir={lower},upperdir={mnt}/up,workdir={mnt}/work"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        os.unlink(merged / "gone")
        with open(merged / "kept", "a") as f:
            f.write("+upper")
        assert sorted(os.listdir(merged)) == ["kept"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert stat.S_ISCHR(os.lstat(f"{mnt}/up/gone").st_mode) and os.lstat(f"{mnt}/up/gone").st_rdev == 0
    with open(f"{mnt}/up/kept") as f:
        assert f.read() == "lower+upper"


# ------------------------------------------------------------------ O_TMPFILE
def test_o_tmpfile_is_refused_cleanly(shm, mnt):
    """libfuse 3.14 cannot dispatch FUSE_TMPFILE: the kernel gets ENOSYS once and
    answers EOPNOTSUPP from then on, without asking again."""
    fd = os.open(shm, os.O_TMPFILE | os.O_RDWR, 0o600)  # tmpfs has it
    os.close(fd)
    for _ in range(2):
        assert outcome(os.open, mnt, os.O_TMPFILE | os.O_RDWR, 0o600) == NOTSUP
    assert outcome(os.open, mnt, os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600) == NOTSUP
    assert os.listdir(mnt) == []
    with open(f"{mnt}/after", "w") as f:  # the mount is unharmed
        f.write("ok")
