"""Odd paths of Linux semantics through a real mount, held against tmpfs (/dev/shm):
renameat2(RENAME_WHITEOUT), O_TMPFILE, chattr flags (FS_IOC_GETFLAGS/SETFLAGS) and
POSIX ACLs. docs/DESIGN.md, "Linux semantics at the edges", says what is done and why.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import pickle
import shutil
import stat
import struct
import subprocess
import tempfile
import time

import pytest
from conftest import SMALL, Mount, assert_clean, new_region_path

from pmemfs.fs.engine import RENAME_WHITEOUT, Engine
from pmemfs.media.mkfs import make_filesystem

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
NOBODY = 65534
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # "ENOTSUP" in Python: the same number

_libc = ctypes.CDLL(None, use_errno=True)


from test_posix import outcome, renameat2  # noqa: E402  (the same helpers as the POSIX tests)


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
    os.mkdir(f"{root}/acl")  # a whiteout gets the directory's default ACL, as any new inode
    subprocess.run(["setfacl", "-d", "-m", f"u:{NOBODY}:rwx", f"{root}/acl"], check=True)
    os.close(os.open(f"{root}/acl/f", os.O_CREAT | os.O_WRONLY, 0o644))
    renameat2(f"{root}/acl/f", f"{root}/acl/g", RENAME_WHITEOUT)
    got["acl_whiteout"] = kind(f"{root}/acl/f"), subprocess.run(
        ["getfacl", "-c", "-n", f"{root}/acl/f"], capture_output=True, text=True).stdout
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
    assert root_nlink[1] == 4  # "d" moved away and came back as d3: "." + ".." + d3 + acl


def test_resent_whiteout_rename_is_answered_once(region):
    """A rename whose answer was lost is resent to the next daemon: without the reply
    record it would move the fresh whiteout over the file it had just renamed."""
    from pmemfs.fs.engine import Ctx

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


# ------------------------------------------------------------- chattr flags
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
IMMUTABLE, APPEND, NODUMP, NOATIME, SYNC = 0x10, 0x20, 0x40, 0x80, 0x8


def getflags(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return buf[0]
    finally:
        os.close(fd)


def setflags(path: str, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags]))
    finally:
        os.close(fd)


def fsx(path: str, set_to: bytes | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if set_to is not None:
            fcntl.ioctl(fd, FS_IOC_FSSETXATTR, set_to)
            return b""
        return fcntl.ioctl(fd, FS_IOC_FSGETXATTR, b"\0" * 28)
    finally:
        os.close(fd)


def _write(path: str, data: bytes, flags: int = os.O_WRONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _file_battery(root: str, old_fd: int) -> dict:
    """Everything a user may try on `root/f`, as outcomes."""
    f = f"{root}/f"
    return {
        "open_w": outcome(lambda: os.close(os.open(f, os.O_WRONLY))),
        "open_rw": outcome(lambda: os.close(os.open(f, os.O_RDWR))),
        "open_trunc": outcome(lambda: os.close(os.open(f, os.O_RDONLY | os.O_TRUNC))),
        "open_r": outcome(lambda: os.close(os.open(f, os.O_RDONLY))),
        "append": outcome(_write, f, b"+", os.O_WRONLY | os.O_APPEND),
        "truncate": outcome(os.truncate, f, 1),
        "ftruncate_old_fd": outcome(os.ftruncate, old_fd, 100),
        "unlink": outcome(os.unlink, f),
        "rename": outcome(os.rename, f, f"{root}/f2"),
        "rename_over": outcome(os.rename, f"{root}/other", f),
        "rename_own_link": outcome(os.rename, f"{root}/f-link", f),  # two names, one inode: a no-op
        "link": outcome(os.link, f, f"{root}/f3"),
        "chmod": outcome(os.chmod, f, 0o600),
        "chown": outcome(os.chown, f, 1, 1),
        "touch": outcome(os.utime, f),
        "touch_d": outcome(os.utime, f, (1_000_000_000, 1_000_000_000)),
        "setxattr": outcome(os.setxattr, f, "user.x", b"1"),
        "fallocate": outcome(os.posix_fallocate, old_fd, 0, 4096),
        "punch": outcome(_punch, old_fd),
        "flags": hex(getflags(f)),
    }


def _punch(fd: int) -> None:
    if _libc.fallocate(fd, 3, ctypes.c_int64(0), ctypes.c_int64(1)) != 0:  # PUNCH_HOLE|KEEP_SIZE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _chattr_file(root: str) -> dict:
    with open(f"{root}/f", "w") as f:
        f.write("abc")
    with open(f"{root}/other", "w") as f:
        f.write("other")
    os.link(f"{root}/f", f"{root}/f-link")
    old_fd = os.open(f"{root}/f", os.O_RDWR)  # opened before the flag
    try:
        got = {"fresh": hex(getflags(f"{root}/f"))}
        ctime = os.stat(f"{root}/f").st_ctime_ns
        setflags(f"{root}/f", IMMUTABLE)
        got["ctime_moved"] = os.stat(f"{root}/f").st_ctime_ns > ctime
        got["immutable"] = _file_battery(root, old_fd)
        got["fsgetxattr_i"] = fsx(f"{root}/f")[:4].hex()
        setflags(f"{root}/f", APPEND)
        got["append"] = _file_battery(root, old_fd)
        got["fsgetxattr_a"] = fsx(f"{root}/f")[:4].hex()
        got["unsupported"] = outcome(setflags, f"{root}/f", APPEND | SYNC)
        got["fssetxattr_extsize"] = outcome(fsx, f"{root}/f", struct.pack("<IIIII8x", 0, 4096, 0, 0, 0))
        got["fssetxattr_clear"] = outcome(fsx, f"{root}/f", b"\0" * 28)
        got["cleared"] = hex(getflags(f"{root}/f"))
        got["nodump_noatime"] = outcome(setflags, f"{root}/f", NODUMP | NOATIME), hex(getflags(f"{root}/f"))
        setflags(f"{root}/f", 0)
        got["after"] = _file_battery(root, old_fd)
        with open(f"{root}/f", "rb") as f:
            got["content"] = f.read()[:3]
    finally:
        os.close(old_fd)
    return got


def test_chattr_file_as_tmpfs(shm, mnt):
    want, got = _chattr_file(shm), _chattr_file(mnt)
    # tmpfs lets a descriptor opened before chattr +i go on truncating; pmemfs
    # refuses, as ext4 does (DESIGN.md).
    imm = want["immutable"].pop("ftruncate_old_fd"), got["immutable"].pop("ftruncate_old_fd")
    assert imm == ("ok", "EPERM")
    assert got == want
    assert got["immutable"]["unlink"] == "EPERM" and got["append"]["append"] == "ok"


def test_immutable_refuses_writes_through_old_descriptors(mnt):
    """Stricter than tmpfs, as ext4: the bytes of an immutable file do not change, and
    an append-only file only grows, whatever descriptor or fcntl came first."""
    p = f"{mnt}/f"
    with open(p, "w") as f:
        f.write("abc")
    fd = os.open(p, os.O_RDWR)
    fa = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        setflags(p, IMMUTABLE)
        assert outcome(os.pwrite, fd, b"z", 0) == "EPERM"
        assert outcome(os.ftruncate, fd, 0) == "EPERM"
        setflags(p, APPEND)
        fcntl.fcntl(fa, fcntl.F_SETFL, 0)  # the kernel cannot know the flag: allowed here
        assert outcome(os.pwrite, fa, b"z", 0) == "EPERM"  # ...but no byte is overwritten
        assert os.pwrite(fa, b"d", 3) == 1  # at the end: fine
        assert outcome(os.ftruncate, fd, 0) == "EPERM"
        setflags(p, 0)
        with open(p, "rb") as f:
            assert f.read() == b"abcd"
    finally:
        os.close(fd)
        os.close(fa)


def _chattr_dir(root: str) -> dict:
    d = f"{root}/d"
    os.mkdir(d)
    for name in ("x", "y"):
        with open(f"{d}/{name}", "w") as f:
            f.write(name)
    os.mkdir(f"{d}/sub")
    with open(f"{root}/outside", "w") as f:
        f.write("o")
    got = {}
    for flag, name in ((APPEND, "append"), (IMMUTABLE, "immutable")):
        setflags(d, flag)
        got[name] = {
            "create": outcome(lambda n=name: os.close(os.open(f"{d}/new-{n}", os.O_CREAT | os.O_WRONLY))),
            "mkdir": outcome(os.mkdir, f"{d}/dir-{name}"),
            "mkdir_existing": outcome(os.mkdir, f"{d}/sub"),
            "symlink": outcome(os.symlink, "x", f"{d}/sym-{name}"),
            "unlink": outcome(os.unlink, f"{d}/x"),
            "rmdir": outcome(os.rmdir, f"{d}/sub"),
            "rename_within": outcome(os.rename, f"{d}/x", f"{d}/x2"),
            "rename_out": outcome(os.rename, f"{d}/y", f"{root}/y"),
            "rename_in": outcome(os.rename, f"{root}/outside", f"{d}/in-{name}"),
            "link_in": outcome(os.link, f"{d}/x", f"{d}/x-link-{name}"),
            "chmod": outcome(os.chmod, d, 0o755),
            "write_child": outcome(_write, f"{d}/x", b"X"),
            "child_flags": hex(getflags(f"{d}/x")),
        }
        setflags(d, 0)
        if os.path.exists(f"{d}/in-{name}"):
            os.rename(f"{d}/in-{name}", f"{root}/outside")
    got["tree"] = sorted(os.listdir(d))
    return got


def test_chattr_directory_as_tmpfs(shm, mnt):
    assert _chattr_dir(mnt) == _chattr_dir(shm)


def _chattr_unprivileged(root: str) -> dict:
    with open(f"{root}/roots", "w") as f:
        f.write("r")

    def work() -> dict:
        with open("mine", "w") as f:
            f.write("m")
        return {
            "own_nodump": outcome(setflags, "mine", NODUMP),
            "own_immutable": outcome(setflags, "mine", NODUMP | IMMUTABLE),  # CAP_LINUX_IMMUTABLE
            "own_append": outcome(setflags, "mine", APPEND),
            "others": outcome(setflags, "roots", NODUMP),
            "flags": hex(getflags("mine")),
        }

    got = as_user(root, work)
    setflags(f"{root}/roots", IMMUTABLE)
    got["others_clear"] = as_user(root, lambda: outcome(setflags, "roots", 0))
    got["read_immutable"] = as_user(root, lambda: outcome(lambda: os.close(os.open("roots", os.O_RDONLY))))
    setflags(f"{root}/roots", 0)
    return got


def test_chattr_needs_the_kernel_rules(shm, mnt):
    assert _chattr_unprivileged(mnt) == _chattr_unprivileged(shm)


def _noatime(root: str) -> dict:
    p = f"{root}/f"
    with open(p, "w") as f:
        f.write("data")
    got = {}
    for flags in (NOATIME, 0):
        setflags(p, flags)
        os.utime(p, ns=(1_000_000_000, time.time_ns()))  # atime older than mtime
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # FUSE: the read reaches the daemon
            os.read(fd, 10)
        finally:
            os.close(fd)
        got[hex(flags)] = os.stat(p).st_atime_ns == 1_000_000_000
    return got


def test_noatime_flag(shm, mnt):
    want, got = _noatime(shm), _noatime(mnt)
    assert got == want == {hex(NOATIME): True, "0x0": False}


def test_lsattr_chattr_tools(shm, mnt):
    """e2fsprogs's chattr and lsattr, end to end."""
    out = {}
    for root in (shm, mnt):
        p = f"{root}/f"
        open(p, "w").close()
        subprocess.run(["chattr", "+a", "+d", p], check=True)
        out[root] = subprocess.run(["lsattr", p], capture_output=True, text=True, check=True).stdout.split()[0]
        subprocess.run(["chattr", "=", p], check=True)
    assert out[mnt] == out[shm] == "-----ad---------------"


def test_chattr_flags_persist(region):
    e = Engine(region)
    ino = e.create(1, b"f", 0o644).ino
    e.set_attr_flags(ino, IMMUTABLE | NODUMP)
    e.close()
    e = Engine(region, readonly=True)
    try:
        assert e.attr_flags(ino) == IMMUTABLE | NODUMP
    finally:
        e.close()


def test_other_ioctls_are_enotty(mnt):
    p = f"{mnt}/f"
    with open(p, "w") as f:
        f.write("x")
    fd = os.open(p, os.O_RDONLY)
    try:
        FS_IOC_GETVERSION = 0x80087601
        assert outcome(fcntl.ioctl, fd, FS_IOC_GETVERSION, array.array("l", [0])) == "ENOTTY"
        FIONREAD = 0x541B  # the kernel answers it without asking
        buf = array.array("i", [0])
        fcntl.ioctl(fd, FIONREAD, buf)
        assert buf[0] == 1
    finally:
        os.close(fd)


# ---------------------------------------------------------------- POSIX ACLs
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"


def getfacl(path: str) -> str:
    r = subprocess.run(["getfacl", "-c", "-n", path], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else "error: " + r.stderr.split(":")[-1].strip()


def setfacl(*args: str) -> str:
    r = subprocess.run(["setfacl", *args], capture_output=True, text=True)
    return "ok" if r.returncode == 0 else r.stderr.strip().split(": ")[-1]


def acl_value(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _tree(root: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            out[rel] = (oct(st.st_mode), sorted(os.listxattr(p, follow_symlinks=False)),
                        None if stat.S_ISLNK(st.st_mode) else getfacl(p))
    return out


def _acls(root: str) -> dict:
    old_umask = os.umask(0o022)
    try:
        got = {}
        d = f"{root}/d"
        os.mkdir(d, 0o755)
        got["set"] = setfacl("-m", f"u:{NOBODY}:rwx,g:{NOBODY}:r-x", d)
        got["set_default"] = setfacl("-d", "-m", f"u:{NOBODY}:rwx,o::-", d)
        os.umask(0o077)  # ignored where a default ACL applies
        os.close(os.open(f"{d}/f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(f"{d}/sub", 0o777)
        os.mkfifo(f"{d}/fifo", 0o640)
        os.symlink("f", f"{d}/sym")
        os.close(os.open(f"{root}/plain", os.O_CREAT | os.O_WRONLY, 0o666))  # umask 077 applies
        os.close(os.open(f"{d}/sub/deeper", os.O_CREAT | os.O_WRONLY, 0o644))  # inherited twice
        got["created"] = _tree(root)
        os.chmod(f"{d}/f", 0o640)  # the mask follows the group bits
        got["chmod"] = getfacl(f"{d}/f")
        got["set_mask"] = setfacl("-m", "m::rwx", f"{d}/f"), oct(os.stat(f"{d}/f").st_mode)
        got["remove_all"] = setfacl("-b", f"{d}/f"), getfacl(f"{d}/f"), os.listxattr(f"{d}/f")
        got["remove_default"] = setfacl("-k", d), sorted(os.listxattr(d))
        got["equivalent"] = setfacl("-m", "u::rwx,g::r-x,o::r--", f"{root}/plain"), \
            os.listxattr(f"{root}/plain"), oct(os.stat(f"{root}/plain").st_mode)
        minimal = acl_value((1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF))
        unsorted = acl_value((1, 7, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF))
        got["raw_garbage"] = outcome(os.setxattr, f"{root}/plain", ACL_ACCESS, b"\x02\0\0\0garbage!")
        got["raw_unsorted"] = outcome(os.setxattr, f"{root}/plain", ACL_ACCESS, unsorted)
        got["raw_default_on_file"] = outcome(os.setxattr, f"{root}/plain", ACL_DEFAULT, minimal)
        got["raw_get_missing"] = outcome(os.getxattr, f"{root}/plain", ACL_ACCESS)
        got["raw_other_system"] = outcome(os.setxattr, f"{root}/plain", "system.other", b"x")
        got["final"] = _tree(root)
        return got
    finally:
        os.umask(old_umask)


def test_acls_as_tmpfs(shm, mnt):
    want, got = _acls(shm), _acls(mnt)
    assert got == want
    assert "user:65534:rwx" in got["created"]["d/sub/deeper"][2]  # inherited by a subdirectory's file
    assert got["created"]["plain"][0] == oct(0o100600)


def _acl_access(root: str) -> dict:
    paths = {n: f"{root}/{n}" for n in ("secret", "grp", "priv", "sgid")}
    for name in ("secret", "grp"):
        with open(paths[name], "w") as f:
            f.write(name)
    os.chmod(paths["secret"], 0o600)
    setfacl("-m", f"u:{NOBODY}:r", paths["secret"])
    os.chmod(paths["grp"], 0o640)
    setfacl("-m", f"g:{NOBODY}:rw", paths["grp"])
    os.mkdir(paths["priv"], 0o700)
    with open(f"{paths['priv']}/inside", "w") as f:
        f.write("i")
    setfacl("-m", f"u:{NOBODY}:x", paths["priv"])
    with open(paths["sgid"], "w") as f:
        f.write("s")
    os.chown(paths["sgid"], NOBODY, 0)
    os.chmod(paths["sgid"], 0o2775)

    def probe() -> dict:
        def can(path: str, flags: int) -> str:
            return outcome(lambda: os.close(os.open(path, flags)))

        return {
            "secret_r": can("secret", os.O_RDONLY), "secret_w": can("secret", os.O_WRONLY),
            "grp_rw": can("grp", os.O_RDWR),
            "priv_search": can("priv/inside", os.O_RDONLY), "priv_list": outcome(os.listdir, "priv"),
            "set_on_roots": setfacl("-m", f"u:{NOBODY}:rwx", "secret"),
            # the owner, not in the file's group and without CAP_FSETID: S_ISGID goes
            "sgid": (setfacl("-m", "u::rwx,g::rwx,o::r-x", "sgid"), oct(os.stat("sgid").st_mode)),
        }

    got = {"before": as_user(root, probe)}
    os.chmod(paths["secret"], 0o600)  # mask ---: the named entry no longer grants read
    os.chmod(paths["grp"], 0o600)
    got["masked"] = as_user(root, probe)
    return got


def test_acl_access_decisions_as_tmpfs(shm, mnt):
    want, got = _acl_access(shm), _acl_access(mnt)
    assert got == want
    assert got["before"]["secret_r"] == "ok" and got["masked"]["secret_r"] == "EACCES"


def test_control_channel_honours_acls(mnt):
    """The daemon's own permission checks (control commands) read the ACL too."""
    p = f"{mnt}/f"
    with open(p, "w") as f:
        f.write("x")
    os.chmod(p, 0o644)
    prealloc = lambda: os.setxattr("f", "user.pmemfs.prealloc", b"2M") or "ok"  # noqa: E731
    assert as_user(mnt, prealloc) == "EACCES"
    setfacl("-m", f"u:{NOBODY}:rw", p)
    assert as_user(mnt, prealloc) == "ok"
    setfacl("-x", f"u:{NOBODY}", p)
    assert as_user(mnt, prealloc) == "EACCES"


def test_a_takeover_keeps_acls_flags_and_the_umask(mount, mnt):
    """kill -9 of the daemon: its successor replays the connection's INIT through the
    same negotiation, so ACLs stay on, the umask stays the daemon's job, and chattr
    flags and ACLs set before are in the region."""
    os.mkdir(f"{mnt}/d")
    assert setfacl("-m", f"u:{NOBODY}:r", f"{mnt}/d") == "ok"
    with open(f"{mnt}/f", "w") as f:
        f.write("x")
    setflags(f"{mnt}/f", IMMUTABLE)
    before = getfacl(f"{mnt}/d")
    mount.crash()
    assert getfacl(f"{mnt}/d") == before and f"user:{NOBODY}:r--" in before
    assert outcome(os.unlink, f"{mnt}/f") == "EPERM"
    setflags(f"{mnt}/f", 0)
    assert setfacl("-m", f"u:{NOBODY}:rw", f"{mnt}/d") == "ok"
    old = os.umask(0o077)
    try:
        os.close(os.open(f"{mnt}/new", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(f"{mnt}/new").st_mode) == 0o600
