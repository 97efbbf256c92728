"""POSIX behaviour through a real FUSE mount, held against kernel tmpfs.

Where a failing call is checked, the same call is usually made on a tmpfs directory
(/dev/shm) as well and the errno compared, so "what tmpfs does" is measured, not
remembered. Known, legitimate differences from tmpfs:
  * st_blocks counts whole 2 MiB allocation blocks (tmpfs: 4 KiB pages);
  * a directory's st_size is not comparable (tmpfs reports entries * 20 or so);
  * f_bsize/f_frsize are the 2 MiB allocation block.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import socket
import stat
import tempfile
import time

import pytest
from conftest import drop_caches, wait_for

from pmemfs.fs.engine import Engine

MB2 = 2 << 20
BLK512 = MB2 // 512  # st_blocks of one allocation block
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NOBODY = 65534

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


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def free_blocks(path: str) -> int:
    """Free space in whole 2 MiB blocks (statfs counts 4 KiB pack chunks)."""
    s = os.statvfs(path)
    return s.f_bfree * s.f_frsize // MB2


@pytest.fixture
def shm():
    """A tmpfs directory to compare with."""
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="pmemfs-ref-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def on_both(shm: str, mnt: str, fn) -> tuple:
    """Run fn(root) on tmpfs and on pmemfs; return both results."""
    return fn(shm), fn(mnt)


def as_user(directory: str, fn, uid: int = NOBODY, gid: int = NOBODY):
    """Run fn() in a child process that has dropped root, with directory as its cwd.

    The directory is opened as root first: the unprivileged child need not be able to
    reach it by path (pytest's tmp directories are 0700). fn returns JSON-able data.
    """
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.fchdir(dfd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = json.dumps({"ok": fn()})
        except BaseException as e:  # report, never return into pytest
            out = json.dumps({"error": repr(e)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.close(dfd)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks))
    assert "error" not in res, res["error"]
    return res["ok"]


# ------------------------------------------------------------------ data
def test_create_read_write_append(mounted):
    p = mounted.p("f")
    write_file(p, b"hello")
    assert read_file(p) == b"hello"
    with open(p, "r+b") as f:
        f.seek(2)
        f.write(b"LL")
    assert read_file(p) == b"heLLo"
    with open(p, "ab") as a1, open(p, "ab") as a2:
        a1.write(b" one")
        a1.flush()
        a2.write(b" two")
        a2.flush()
        a1.write(b" three")
    assert read_file(p) == b"heLLo one two three"
    # on Linux pwrite ignores the offset of an O_APPEND descriptor
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.pwrite(fd, b"!", 0)
    finally:
        os.close(fd)
    assert read_file(p) == b"heLLo one two three!"
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 20 and st.st_nlink == 1
    # O_TRUNC empties; a read-only descriptor cannot write (EBADF from the kernel)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert outcome(os.write, fd, b"x") == "EBADF"
    finally:
        os.close(fd)
    with open(p, "wb"):
        pass
    assert os.stat(p).st_size == 0


def test_mmap_writeback_with_append_descriptor_open(mounted):
    """Pages written through a shared mapping of an O_APPEND descriptor go back at their
    own offsets: the kernel writes them back under that descriptor's handle."""
    p = mounted.p("f")
    write_file(p, b"a" * 8192)
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        try:
            m[0:4] = b"MMAP"
            m.flush()
            os.write(fd, b"tail")
        finally:
            m.close()
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(p) == b"MMAP" + b"a" * 8188 + b"tail"


def test_multi_block_file_and_spanning_writes(mounted):
    p = mounted.p("big")
    data = bytearray(os.urandom(5 * MB2 + 12345))
    write_file(p, data)
    assert os.stat(p).st_blocks == 6 * BLK512
    # a write across two block boundaries, through an fd, then read back cold
    patch = os.urandom(MB2 + 100)
    with open(p, "r+b") as f:
        f.seek(MB2 - 50)
        f.write(patch)
    data[MB2 - 50:MB2 - 50 + len(patch)] = patch
    drop_caches()
    assert read_file(p) == data
    with open(p, "rb") as f:
        f.seek(2 * MB2 - 3)
        assert f.read(6) == data[2 * MB2 - 3:2 * MB2 + 3]


def test_sparse_file(mounted, shm):
    def make(root):
        p = os.path.join(root, "sparse")
        with open(p, "wb") as f:
            f.seek(5 * MB2 + 1000)
            f.write(b"end")
        return p

    ref, p = on_both(shm, mounted.path, make)
    st = os.stat(p)
    assert st.st_size == os.stat(ref).st_size == 5 * MB2 + 1003
    # only the block holding "end" is allocated (tmpfs: only its 4 KiB page)
    assert st.st_blocks == BLK512
    drop_caches()
    got = read_file(p)
    assert got == read_file(ref)
    assert got[:5 * MB2 + 1000] == bytes(5 * MB2 + 1000) and got[-3:] == b"end"
    # filling a hole in the middle allocates one more block
    with open(p, "r+b") as f:
        f.seek(2 * MB2 + 10)
        f.write(b"mid")
    assert os.stat(p).st_blocks == 2 * BLK512
    assert read_file(p)[2 * MB2:2 * MB2 + 16] == bytes(10) + b"mid" + bytes(3)


def test_truncate_up_and_down(mounted, shm):
    def run(root):
        p = os.path.join(root, "t")
        write_file(p, b"x" * (3 * MB2))
        os.truncate(p, MB2 + 7)
        a = read_file(p)
        with open(p, "r+b") as f:
            f.truncate(3 * MB2)
        b = read_file(p)
        os.truncate(p, 10)
        with open(p, "ab") as f:  # extending by a write after truncate
            f.seek(0, os.SEEK_END)
            f.write(b"Z")
        os.truncate(p, 100)
        return p, a, b, read_file(p)

    (_, ra, rb, rc), (p, a, b, c) = on_both(shm, mounted.path, run)
    assert a == ra == b"x" * (MB2 + 7)
    assert b == rb == b"x" * (MB2 + 7) + bytes(2 * MB2 - 7)
    assert c == rc == b"x" * 10 + b"Z" + bytes(89)
    drop_caches()
    assert read_file(p) == rc
    assert os.stat(p).st_blocks == BLK512
    os.truncate(p, 0)
    assert os.stat(p).st_blocks == 0 and read_file(p) == b""


def test_truncate_to_a_petabyte_allocates_nothing(mounted):
    p = mounted.p("huge")
    write_file(p, b"abc")
    free0 = free_blocks(mounted.path)
    os.truncate(p, 1 << 50)
    st = os.stat(p)
    assert st.st_size == 1 << 50 and st.st_blocks == 4096 // 512  # 3 bytes: one packed 4 KiB chunk
    assert free_blocks(mounted.path) == free0
    with open(p, "rb") as f:
        assert f.read(5) == b"abc\0\0"
        f.seek((1 << 50) - 10)
        assert f.read(100) == bytes(10)
    os.unlink(p)
    assert wait_for(lambda: free_blocks(mounted.path) == free0 + 1)


# ------------------------------------------------------------- names
def test_hard_links(mounted):
    p, q = mounted.p("a"), mounted.p("b")
    write_file(p, b"data")
    os.link(p, q)
    assert os.stat(p).st_nlink == 2 and os.stat(p).st_ino == os.stat(q).st_ino
    os.mkdir(mounted.p("d"))
    os.link(p, mounted.p("d", "c"))
    assert os.stat(q).st_nlink == 3
    assert outcome(os.link, mounted.p("d"), mounted.p("dl")) == "EPERM"
    assert outcome(os.link, p, q) == "EEXIST"
    os.unlink(p)
    assert os.stat(q).st_nlink == 2 and read_file(mounted.p("d", "c")) == b"data"
    mounted.restart()
    assert os.stat(q).st_nlink == 2 and read_file(q) == b"data"


def test_symlinks(mounted, shm):
    target = "some/where/../far/away"
    os.symlink(target, mounted.p("s"))
    st = os.lstat(mounted.p("s"))
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len(target)
    assert os.readlink(mounted.p("s")) == target
    write_file(mounted.p("real"), b"R")
    os.symlink("real", mounted.p("rel"))
    assert read_file(mounted.p("rel")) == b"R"
    long = "d/" * 2000
    os.symlink(long, mounted.p("long"))
    assert os.readlink(mounted.p("long")) == long and os.lstat(mounted.p("long")).st_size == 4000

    def errs(root):
        return [outcome(os.readlink, os.path.join(root, "real") if os.path.exists(os.path.join(root, "real"))
                        else os.path.join(root, "nope")),
                outcome(os.symlink, "x" * 4096, os.path.join(root, "toolong")),
                outcome(os.stat, os.path.join(root, "dangling")),
                outcome(os.symlink, "real", os.path.join(root, "real"))]

    write_file(os.path.join(shm, "real"), b"R")
    os.symlink("missing", os.path.join(shm, "dangling"))
    os.symlink("missing", mounted.p("dangling"))
    ref, got = on_both(shm, mounted.path, errs)
    assert got == ref
    mounted.restart()
    assert os.readlink(mounted.p("long")) == long


def test_name_max(mounted, shm):
    def run(root):
        return [outcome(write_file, os.path.join(root, "n" * 255), b"x"),
                outcome(write_file, os.path.join(root, "n" * 256), b"x"),
                outcome(os.mkdir, os.path.join(root, "m" * 256)),
                outcome(os.stat, os.path.join(root, "n" * 256)),
                outcome(os.rename, os.path.join(root, "n" * 255), os.path.join(root, "r" * 256)),
                outcome(os.symlink, "t", os.path.join(root, "s" * 256))]

    ref, got = on_both(shm, mounted.path, run)
    assert got == ref == ["ok"] + ["ENAMETOOLONG"] * 5
    assert os.listdir(mounted.path) == ["n" * 255]


# ------------------------------------------------------------- rename
def test_rename_files_and_flags(mounted, shm):
    def run(root):
        j = lambda *a: os.path.join(root, *a)  # noqa: E731
        write_file(j("a"), b"A")
        write_file(j("b"), b"B")
        os.mkdir(j("d"))
        r = [outcome(renameat2, j("a"), j("b"), RENAME_NOREPLACE)]
        r.append(outcome(renameat2, j("a"), j("c"), RENAME_NOREPLACE))
        r.append(outcome(renameat2, j("c"), j("nope"), RENAME_EXCHANGE))
        r.append(outcome(renameat2, j("c"), j("b"), RENAME_EXCHANGE))
        r.append((read_file(j("c")), read_file(j("b"))))
        r.append(outcome(renameat2, j("c"), j("d"), RENAME_EXCHANGE))  # file <-> directory
        r.append((os.path.isdir(j("c")), read_file(j("d"))))
        r.append(outcome(renameat2, j("c"), j("d"), RENAME_EXCHANGE | RENAME_NOREPLACE))
        r.append(outcome(os.rename, j("d"), j("b")))  # plain replace
        r.append(sorted(os.listdir(root)))
        r.append(read_file(j("b")))
        r.append(outcome(os.rename, j("missing"), j("x")))
        return [list(x) if isinstance(x, tuple) else x for x in r]

    ref, got = on_both(shm, mounted.path, run)
    assert got == ref
    assert ref[0] == "EEXIST" and ref[2] == "ENOENT" and ref[7] == "EINVAL"


def test_rename_directories(mounted, shm):
    def run(root):
        j = lambda *a: os.path.join(root, *a)  # noqa: E731
        for d in ("d", "empty", "full", "d/sub", "d/sub/deeper"):
            os.mkdir(j(d))
        write_file(j("full", "x"), b"x")
        write_file(j("d", "sub", "deeper", "leaf"), b"leaf")
        write_file(j("f"), b"f")
        r = [outcome(os.rename, j("d"), j("full")),
             outcome(os.rename, j("d"), j("f")),
             outcome(os.rename, j("f"), j("empty")),
             outcome(os.rename, j("d"), j("d", "sub", "inside")),
             outcome(os.rename, j("d"), j("d", "sub")),
             outcome(os.rename, j("d", "sub"), j("d")),
             outcome(os.rename, j("d"), j("empty")),  # over an empty directory: fine
             os.path.exists(j("d")),
             read_file(j("empty", "sub", "deeper", "leaf")).decode(),
             os.stat(root).st_nlink]
        os.rename(j("empty"), j("full", "moved"))
        r += [read_file(j("full", "moved", "sub", "deeper", "leaf")).decode(),
              os.stat(root).st_nlink, os.stat(j("full")).st_nlink,
              os.stat(j("full", "moved", "sub", "..")).st_ino == os.stat(j("full", "moved")).st_ino]
        return r

    ref, got = on_both(shm, mounted.path, run)
    assert got == ref
    assert ref[:6] == ["ENOTEMPTY", "ENOTDIR", "EISDIR", "EINVAL", "EINVAL", "ENOTEMPTY"]
    # the moved tree stays intact, also for a cold kernel
    mounted.restart()
    assert read_file(mounted.p("full", "moved", "sub", "deeper", "leaf")) == b"leaf"
    assert os.stat(mounted.p("full")).st_nlink == 3


def test_rename_keeps_open_paths_below_a_moved_directory(mounted):
    os.makedirs(mounted.p("a", "b", "c"))
    write_file(mounted.p("a", "b", "c", "f"), b"1")
    fd = os.open(mounted.p("a", "b", "c"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mounted.p("a"), mounted.p("z"))
        assert os.listdir(fd) == ["f"]
        write_file(mounted.p("z", "b", "c", "g"), b"2")
        assert sorted(os.listdir(fd)) == ["f", "g"]
        assert outcome(os.stat, mounted.p("a", "b")) == "ENOENT"
    finally:
        os.close(fd)


# ------------------------------------------------------------- directories
def test_mkdir_rmdir_nlink(mounted, shm):
    def run(root):
        j = lambda *a: os.path.join(root, *a)  # noqa: E731
        os.mkdir(j("d"))
        r = [os.stat(root).st_nlink, os.stat(j("d")).st_nlink]
        os.mkdir(j("d", "s1"))
        os.mkdir(j("d", "s2"), 0o700)
        write_file(j("d", "f"), b"")
        r += [os.stat(j("d")).st_nlink, stat.S_IMODE(os.stat(j("d", "s2")).st_mode),
              outcome(os.rmdir, j("d")), outcome(os.rmdir, j("d", "f")),
              outcome(os.unlink, j("d", "s1")), outcome(os.mkdir, j("d", "s1")),
              outcome(os.rmdir, j("d", "s1", ".")), outcome(os.rmdir, j("nope"))]
        os.rmdir(j("d", "s1"))
        r.append(os.stat(j("d")).st_nlink)
        os.rmdir(j("d", "s2"))
        os.unlink(j("d", "f"))
        os.rmdir(j("d"))
        r += [os.stat(root).st_nlink, os.listdir(root)]
        return r

    os.umask(0o022)
    ref, got = on_both(shm, mounted.path, run)
    assert got == ref
    assert ref[0] == ref[-2] + 1 and ref[2] == 4


def test_mknod_fifo_socket_chardev(mounted, shm):
    def run(root):
        j = lambda *a: os.path.join(root, *a)  # noqa: E731
        os.mkfifo(j("fifo"), 0o640)
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(j("sock"))
        finally:
            s.close()
        os.mknod(j("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(j("reg"), stat.S_IFREG | 0o600)
        out = {}
        for n in ("fifo", "sock", "null", "reg"):
            st = os.lstat(j(n))
            out[n] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode) & 0o777 if n != "sock" else 0,
                      st.st_rdev, st.st_size, st.st_nlink]
        # (opening the node is not compared: FUSE mounts are nodev, as libfuse mounts them)
        # the type in each directory entry (d_type), as scandir reports it without a stat
        out["kinds"] = sorted((e.name, e.is_file(follow_symlinks=False), e.is_dir(), e.is_symlink(),
                               stat.S_IFMT(e.stat(follow_symlinks=False).st_mode))
                              for e in os.scandir(root))
        out["mknod_exists"] = outcome(os.mkfifo, j("fifo"))
        return json.loads(json.dumps(out))

    os.umask(0o022)
    ref, got = on_both(shm, mounted.path, run)
    assert got == ref
    assert ref["null"][2] == os.makedev(1, 3)
    mounted.restart()
    assert stat.S_ISFIFO(os.lstat(mounted.p("fifo")).st_mode)
    assert os.lstat(mounted.p("null")).st_rdev == os.makedev(1, 3)


# ------------------------------------------------------------- attributes
def test_chmod_chown_utime_ns(mounted, shm):
    def modes(root):
        p = os.path.join(root, "f")
        write_file(p, b"x")
        os.chmod(p, 0o6751)
        r = [stat.S_IMODE(os.stat(p).st_mode)]
        os.chown(p, 1234, 5678)  # chown clears set-uid and set-gid, even for root
        st = os.stat(p)
        r += [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
        os.chmod(p, 0o4751)
        r.append(stat.S_IMODE(os.stat(p).st_mode))
        os.mkdir(os.path.join(root, "d"), 0o755)
        os.chmod(os.path.join(root, "d"), 0o3775)
        os.chown(os.path.join(root, "d"), 7, 8)  # not for a directory
        r.append(stat.S_IMODE(os.stat(os.path.join(root, "d")).st_mode))
        return r

    ref, got = on_both(shm, mounted.path, modes)
    assert got == ref and ref[:5] == [0o6751, 0o751, 1234, 5678, 0o4751]
    p = mounted.p("f")
    a, m = 1_234_567_890_123_456_789, 1_111_111_111_987_654_321
    os.utime(p, ns=(a, m))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a, m)
    os.symlink("f", mounted.p("l"))
    os.utime(mounted.p("l"), ns=(5, 7), follow_symlinks=False)
    assert os.lstat(mounted.p("l")).st_mtime_ns == 7 and os.stat(p).st_mtime_ns == m
    mounted.restart()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_uid, st.st_gid) == (a, m, 1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o4751


def test_open_o_trunc_and_touch_update_times(mounted, shm):
    """O_TRUNC updates mtime and ctime even when the file is already empty (tmpfs does:
    the open is a truncate with ATTR_MTIME|ATTR_CTIME); utime(None) sets both to now."""
    old = 10**18  # 2001

    def run(root):
        p = os.path.join(root, "f")
        write_file(p, b"")
        os.utime(p, ns=(old, old))
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
        a = os.stat(p).st_mtime_ns > old
        write_file(p, b"data")
        os.utime(p, ns=(old, old))
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
        b = os.stat(p).st_mtime_ns > old and os.stat(p).st_size == 0
        os.utime(p, ns=(old, old))
        os.utime(p)
        s = os.stat(p)
        return [a, b, s.st_atime_ns > old, s.st_mtime_ns > old]

    ref, got = on_both(shm, mounted.path, run)
    assert got == ref == [True] * 4
    mounted.restart()  # what the daemon recorded, not the kernel's cached copy
    assert os.stat(mounted.p("f")).st_mtime_ns > old


def test_ctime_changes(mounted):
    p = mounted.p("f")
    write_file(p, b"x" * 100)
    os.mkdir(mounted.p("d"))

    def changes(op) -> bool:
        before = os.stat(p).st_ctime_ns
        time.sleep(0.01)  # let the clock move past the previous change
        op()
        mounted_ct = os.stat(p).st_ctime_ns
        return mounted_ct > before

    assert changes(lambda: os.rename(p, mounted.p("g")) or os.rename(mounted.p("g"), p))
    assert changes(lambda: os.link(p, mounted.p("d", "l")))
    assert changes(lambda: os.chmod(p, 0o600))
    assert changes(lambda: os.chown(p, 1, 1))
    assert changes(lambda: os.truncate(p, 10))
    assert changes(lambda: os.unlink(mounted.p("d", "l")))
    assert changes(lambda: os.setxattr(p, "user.x", b"1"))
    # and the daemon recorded them: a cold kernel sees the latest ctime too
    last = os.stat(p).st_ctime_ns
    mounted.restart()
    assert os.stat(p).st_ctime_ns >= last - 10**7


# ------------------------------------- set-uid and set-gid, cleared by the daemon
# pmemfs negotiates FUSE_HANDLE_KILLPRIV_V2 (one request per write): the kernel then
# leaves clearing these bits to the daemon, on every path where it would clear them.
KILL_MODES = (0o6777, 0o4766, 0o2676, 0o2666)  # sgid with and without group-exec
KILL_ACTIONS = ("write", "odirect_write", "truncate", "ftruncate", "open_trunc", "utime")


def _kill_act(name: str, action: str) -> None:
    if action == "write":
        with open(name, "ab") as f:
            f.write(b"y")
    elif action == "odirect_write":
        buf = mmap.mmap(-1, 4096)
        fd = os.open(name, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, buf, 0)
        finally:
            os.close(fd)
    elif action == "truncate":
        os.truncate(name, 1)
    elif action == "ftruncate":
        with open(name, "r+b") as f:
            os.ftruncate(f.fileno(), 2)
    elif action == "open_trunc":
        with open(name, "wb"):
            pass
    elif action == "utime":
        os.utime(name)
    elif action == "chown":
        os.chown(name, NOBODY, -1)


def _kill_round(who: str, actions) -> dict:
    modes = {}
    for mode in KILL_MODES:
        for action in actions:
            name = f"{who}-{action}-{mode:o}"
            modes[name] = [outcome(_kill_act, name, action), stat.S_IMODE(os.stat(name).st_mode)]
    return modes


def test_setuid_and_setgid_are_cleared_as_on_tmpfs(mount_factory, region, shm):
    m = mount_factory(region, {"allow_other"})

    def run(root: str) -> dict:
        os.chmod(root, 0o777)
        for mode in KILL_MODES:
            for who, actions in (("root", (*KILL_ACTIONS, "chown")), ("nobody", KILL_ACTIONS)):
                for action in actions:
                    name = os.path.join(root, f"{who}-{action}-{mode:o}")
                    write_file(name, b"x" * 4096)
                    os.chmod(name, mode)
        here = os.getcwd()
        os.chdir(root)
        try:
            modes = _kill_round("root", (*KILL_ACTIONS, "chown"))
        finally:
            os.chdir(here)
        modes.update(as_user(root, lambda: _kill_round("nobody", KILL_ACTIONS)))
        return modes

    ref, got = run(shm), run(m.path)
    assert got == ref
    # what the kernel's rules say, so that the comparison cannot pass by both doing nothing
    assert got["nobody-write-6777"] == ["ok", 0o777] and got["root-write-6777"] == ["ok", 0o6777]
    assert got["nobody-truncate-2676"] == ["ok", 0o676] and got["root-chown-4766"] == ["ok", 0o766]
    assert got["nobody-utime-6777"] == ["ok", 0o6777]
    m.restart()  # and the daemon wrote them down: a fresh kernel sees the same
    assert {k: stat.S_IMODE(os.stat(m.p(k)).st_mode) for k in got} == {k: v[1] for k, v in got.items()}


def test_a_write_is_one_request(mount_factory, region):
    """With FUSE_HANDLE_KILLPRIV_V2 the kernel stops asking for security.capability
    before each write once it knows the inode has none (SB_NOSEC)."""
    m = mount_factory(region, debug=True)
    fd = os.open(m.p("f"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(50):
            os.pwrite(fd, b"w" * 4096, i * 4096)
    finally:
        os.close(fd)
    log = m.log()
    writes = log.count("pmemfs.fuse DEBUG write(")
    asked = log.count("b'security.capability')")
    assert writes == 50 and asked <= 1, (writes, asked)


def test_setgid_directory_and_sticky_bit(mount_factory, region, shm):
    m = mount_factory(region, {"allow_other"})

    def setup(root):
        j = lambda *a: os.path.join(root, *a)  # noqa: E731
        os.mkdir(j("sgid"))
        os.chown(j("sgid"), 0, 4242)
        os.chmod(j("sgid"), 0o2777)
        os.mkdir(j("sticky"))
        os.chmod(j("sticky"), 0o1777)
        write_file(j("sticky", "rootfile"), b"r")
        os.chmod(j("sticky", "rootfile"), 0o666)
        write_file(j("ro"), b"ro")
        os.chmod(j("ro"), 0o644)
        os.setxattr(j("ro"), "trusted.t", b"root only")
        write_file(j("suid"), b"s")
        os.chmod(j("suid"), 0o6777)
        write_file(j("shared"), b"w")
        os.chmod(j("shared"), 0o666)
        os.setxattr(j("ro"), "user.u", b"everyone")
        os.chmod(root, 0o755)
        # as root, in the setgid directory
        write_file(j("sgid", "byroot"), b"")
        os.mkdir(j("sgid", "subbyroot"))

    def unprivileged():
        def st(p):
            s = os.lstat(p)
            return [s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)]

        r = {}
        with open("sgid/mine", "wb"):
            pass
        os.mkdir("sgid/mydir", 0o755)
        r["sgid_file"] = st("sgid/mine")
        r["sgid_dir"] = st("sgid/mydir")
        with open("sticky/mine", "wb"):
            pass
        r["sticky_mine"] = st("sticky/mine")
        r["unlink_root_file"] = outcome(os.unlink, "sticky/rootfile")
        r["rename_root_file"] = outcome(os.rename, "sticky/rootfile", "sticky/stolen")
        r["write_root_file"] = outcome(write_file, "sticky/rootfile", b"w")  # 0666: allowed
        r["rename_mine"] = outcome(os.rename, "sticky/mine", "sticky/mine2")
        r["unlink_mine"] = outcome(os.unlink, "sticky/mine2")
        r["write_ro"] = outcome(write_file, "ro", b"x")
        r["chmod_ro"] = outcome(os.chmod, "ro", 0o777)
        r["chown_mine"] = outcome(os.chown, "sgid/mine", 0, -1)
        r["create_in_root"] = outcome(write_file, "newfile", b"")
        r["setxattr_trusted"] = outcome(os.setxattr, "sgid/mine", "trusted.x", b"1")
        r["listing"] = sorted(os.listdir("sticky"))
        # a write by another user clears set-uid and set-gid (group-executable file)
        r["write_suid"] = outcome(write_file, "suid", b"w")
        r["suid_mode"] = st("suid")[2]
        # a writer may set the times to now, not to a chosen time; nor chown
        r["touch_shared"] = outcome(os.utime, "shared")
        r["utime_shared"] = outcome(os.utime, "shared", ns=(1, 1))
        r["truncate_shared"] = outcome(os.truncate, "shared", 0)
        r["chown_shared"] = outcome(os.chown, "shared", NOBODY, -1)
        # set-gid on a file whose group the caller is not in is dropped by chmod
        r["chmod_sgid_mine"] = outcome(os.chmod, "sgid/mine", 0o2755)
        r["mine_mode"] = st("sgid/mine")[2]
        # trusted.* is invisible without CAP_SYS_ADMIN
        r["listxattr"] = sorted(x for x in os.listxattr("ro") if x != "security.selinux")
        r["getxattr_trusted"] = outcome(os.getxattr, "ro", "trusted.t")
        return r

    setup(shm)
    setup(m.path)
    for name in ("byroot", "subbyroot"):
        st = os.stat(m.p("sgid", name))
        assert st.st_gid == 4242 and st.st_uid == 0
    assert os.stat(m.p("sgid", "subbyroot")).st_mode & stat.S_ISGID
    assert not os.stat(m.p("sgid", "byroot")).st_mode & stat.S_ISGID
    ref = as_user(shm, unprivileged)
    got = as_user(m.path, unprivileged)
    assert got == ref
    assert got["sgid_file"][:2] == [NOBODY, 4242]
    assert got["sgid_dir"][1] == 4242 and got["sgid_dir"][2] & stat.S_ISGID
    assert got["sticky_mine"][:2] == [NOBODY, NOBODY]
    assert got["unlink_root_file"] == got["rename_root_file"] == "EPERM"
    assert got["unlink_mine"] == "ok" and got["write_ro"] == "EACCES"
    assert got["listxattr"] == ["user.u"]
    assert got["suid_mode"] == 0o777 and got["utime_shared"] == "EPERM"


def test_statfs(mounted):
    s = os.statvfs(mounted.path)
    assert s.f_namemax == 255
    # f_bsize is the allocation block; space is counted in 4 KiB chunks, the unit small
    # files are packed in, so df shows what they really use
    assert s.f_bsize == MB2 and s.f_frsize == MB2 // 512
    assert s.f_blocks > 0 and s.f_bfree == s.f_bavail == s.f_blocks
    assert s.f_files > s.f_ffree > 0
    write_file(mounted.p("f"), b"x" * (MB2 + 1))
    s2 = os.statvfs(mounted.path)
    assert s2.f_bfree == s.f_bfree - 2 * 512 and s2.f_ffree == s.f_ffree - 1
    write_file(mounted.p("small"), b"y" * 5000)  # two chunks of a pack block
    s3 = os.statvfs(mounted.path)
    assert s3.f_bfree == s2.f_bfree - 2
    os.unlink(mounted.p("f"))
    os.unlink(mounted.p("small"))  # its pack block, empty now, goes back too
    assert wait_for(lambda: os.statvfs(mounted.path).f_bfree == s.f_bfree)
    assert wait_for(lambda: os.statvfs(mounted.path).f_ffree == s.f_ffree)


# ------------------------------------------------------------- xattrs
def test_xattrs(mounted, shm):
    def run(root):
        p = os.path.join(root, "f")
        write_file(p, b"")
        big = bytes(range(256)) * 40  # 10 KiB
        r = [outcome(os.setxattr, p, "user.big", big),
             outcome(os.setxattr, p, "trusted.t", b"t"),
             outcome(os.setxattr, p, "security.s", b"s"),
             outcome(os.setxattr, p, "user.empty", b""),
             os.getxattr(p, "user.big") == big,
             os.getxattr(p, "user.empty").decode(),
             sorted(x for x in os.listxattr(p) if x != "security.selinux"),
             outcome(os.setxattr, p, "user.big", b"x", os.XATTR_CREATE),
             outcome(os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE),
             outcome(os.setxattr, p, "user.big", b"small", os.XATTR_REPLACE),
             os.getxattr(p, "user.big").decode(),
             outcome(os.removexattr, p, "user.empty"),
             outcome(os.removexattr, p, "user.empty"),
             outcome(os.getxattr, p, "user.empty"),
             outcome(os.getxattr, p, "bogus.name"),
             outcome(os.setxattr, p, "bogus.name", b"1"),
             outcome(os.removexattr, p, "bogus.name"),
             outcome(os.setxattr, p, "user.", b"1"),
             outcome(os.setxattr, p, "user.x" * 60, b"1"),
             outcome(os.setxattr, p, "user.huge", b"h" * 65537)]
        os.mkfifo(os.path.join(root, "fifo"))
        r.append(outcome(os.setxattr, os.path.join(root, "fifo"), "user.x", b"1"))
        return r

    ref, got = on_both(shm, mounted.path, run)
    assert got == ref
    big = bytes(range(256)) * 40
    os.setxattr(mounted.p("f"), "user.big", big)
    mounted.restart()
    assert os.getxattr(mounted.p("f"), "user.big") == big
    assert os.getxattr(mounted.p("f"), "trusted.t") == b"t"
    assert sorted(os.listxattr(mounted.p("f"))) == ["security.s", "trusted.t", "user.big"]


# ------------------------------------------------------------- space
def test_enospc_and_recovery(mounted):
    total = free_blocks(mounted.path)
    p = mounted.p("fill")
    chunk = b"F" * (1 << 20)
    written = 0
    with pytest.raises(OSError) as ei, open(p, "wb", buffering=0) as f:
        for _ in range(2 * total + 10):
            written += f.write(chunk)
    assert ei.value.errno == errno.ENOSPC
    assert written == total * MB2
    assert free_blocks(mounted.path) == 0
    assert os.stat(p).st_size == total * MB2
    assert outcome(write_file, mounted.p("other"), b"x") == "ENOSPC"
    # a write running past the last allocated block stores what fits (short count),
    # as on tmpfs, and only the next one fails
    fd = os.open(p, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"E" * (1 << 20), total * MB2 - 4096) == 4096
        assert outcome(os.pwrite, fd, b"E", total * MB2) == "ENOSPC"
    finally:
        os.close(fd)
    assert os.stat(p).st_size == total * MB2
    assert os.stat(mounted.p("other")).st_size == 0
    # metadata operations and writes inside allocated blocks still work
    os.mkdir(mounted.p("d"))
    with open(p, "r+b") as f:
        f.write(b"ok")
    drop_caches()
    with open(p, "rb") as f:
        assert f.read(4) == b"okFF"
        f.seek(total * MB2 - 4100)
        assert f.read() == b"FFFF" + b"E" * 4096
    os.unlink(p)
    assert wait_for(lambda: free_blocks(mounted.path) == total)
    write_file(mounted.p("other"), b"y" * (3 * MB2))
    assert read_file(mounted.p("other")) == b"y" * (3 * MB2)


def test_unlink_open_file(mounted, shm):
    p = mounted.p("f")
    data = os.urandom(3 * MB2)
    write_file(p, data)
    free0 = free_blocks(mounted.path)
    f = open(p, "r+b")  # noqa: SIM115
    try:
        os.unlink(p)
        assert not os.path.exists(p)
        drop_caches()
        assert f.read() == data
        f.seek(0)
        f.write(b"still writable")
        f.flush()
        f.seek(0)
        assert f.read(14) == b"still writable"
        assert os.fstat(f.fileno()).st_nlink == 0
        assert free_blocks(mounted.path) == free0  # the blocks are still the file's
        write_file(p, b"a new file under the old name")
    finally:
        f.close()
    assert wait_for(lambda: free_blocks(mounted.path) == free0 + 3 - 1)
    assert read_file(p) == b"a new file under the old name"


def test_unlinked_open_file_is_freed_after_a_restart(mounted):
    p = mounted.p("f")
    write_file(p, b"z" * (2 * MB2))
    free0 = free_blocks(mounted.path)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        mounted.kill()
    finally:
        # the mount is dead: close() reports ENOTCONN but the descriptor is gone
        assert outcome(os.close, fd) in ("ok", "ENOTCONN")
    mounted.start()
    assert free_blocks(mounted.path) == free0 + 2
    assert "orphans=1" in mounted.status


def test_inode_numbers_survive_restart(mounted):
    os.makedirs(mounted.p("a", "b"))
    for i in range(20):
        write_file(mounted.p("a", "b", f"f{i}"), b"%d" % i)
    os.symlink("t", mounted.p("a", "s"))
    os.mkfifo(mounted.p("a", "fifo"))
    before = {}
    for dirpath, dirnames, filenames in os.walk(mounted.path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            before[p] = os.lstat(p).st_ino
    before[mounted.path] = os.stat(mounted.path).st_ino
    mounted.restart()
    after = {p: os.lstat(p).st_ino for p in before}
    assert after == before
    assert read_file(mounted.p("a", "b", "f7")) == b"7"


def test_reads_after_dropping_caches(mounted):
    files = {f"f{i}": os.urandom(n) for i, n in enumerate((0, 1, 4095, 4097, MB2 - 1, MB2 + 1, 3 * MB2))}
    for n, d in files.items():
        write_file(mounted.p(n), d)
    drop_caches()
    for n, d in files.items():
        assert read_file(mounted.p(n)) == d
        with open(mounted.p(n), "rb") as f:  # small reads at odd offsets
            for off in (0, 1, 4095, MB2 - 2):
                f.seek(off)
                assert f.read(7) == d[off:off + 7]
    mounted.restart()
    drop_caches()
    assert {n: read_file(mounted.p(n)) for n in files} == files


# ------------------------------------------------------------- big directories
ENTRIES = 4000


def test_thousands_of_entries_list_completely(region_factory, mount_factory):
    # 4,000 names of up to 52 bytes: about 80 READDIR replies of 4 KiB, each resumed
    # from a cookie (the bench lists 10,000 with ls -l).
    m = mount_factory(region_factory(inodes=5000))
    d = m.p("d")
    os.mkdir(d)
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(ENTRIES)}
    for n in names:
        os.mknod(os.path.join(d, n), stat.S_IFREG | 0o644)
    listed = os.listdir(d)
    assert len(listed) == len(set(listed)) == ENTRIES and set(listed) == names
    scanned = [e.name for e in os.scandir(d)]
    assert len(scanned) == ENTRIES and set(scanned) == names
    drop_caches()
    assert sorted(os.listdir(d)) == sorted(names)

    # change the directory while a listing is in progress
    ordered = sorted(names)
    removed = set(ordered[::7])
    added = {f"late-{i}" for i in range(500)}
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == ENTRIES // 2:
                for n in removed:
                    os.unlink(os.path.join(d, n))
                for n in added:
                    os.mknod(os.path.join(d, n), stat.S_IFREG | 0o644)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    stable = names - removed
    assert stable <= set(seen), f"{len(stable - set(seen))} unchanged entries were skipped"
    assert set(seen) <= names | added
    assert set(os.listdir(d)) == stable | added


# ------------------------------------------------------------- mmap
def test_mmap_shared_read_and_write(mounted):
    p = mounted.p("m")
    size = 2 * MB2 + 8192
    base = bytearray(os.urandom(size))
    write_file(p, base)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED)
        try:
            assert m[:] == base
            m[MB2 - 4:MB2 + 4] = b"ACROSS!!"  # across a block boundary
            m[size - 3:] = b"END"
            m.flush()
        finally:
            m.close()
    base[MB2 - 4:MB2 + 4] = b"ACROSS!!"
    base[size - 3:] = b"END"
    drop_caches()
    assert read_file(p) == base
    # a write through the file shows in a new mapping
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"write()")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        assert m[100:107] == b"write()"
    mounted.restart()
    assert read_file(p)[MB2 - 4:MB2 + 4] == b"ACROSS!!"


# ------------------------------------------------------------- layout
def test_gib_file_is_one_extent_and_unlink_returns_every_block(region_factory, mount_factory):
    region = region_factory(size=(1 << 30) + (64 << 20))
    m = mount_factory(region)
    total = free_blocks(m.path)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(m.p("g"), "wb", buffering=0) as f:
        for _ in range(1024):
            f.write(chunk)
    ino = os.stat(m.p("g")).st_ino
    assert free_blocks(m.path) == total - 512
    m.unmount()
    e = Engine(region, readonly=True)
    try:
        assert e.extents(ino)[0][2] == 512 and len(e.extents(ino)) == 1
        assert e.stat(ino).size == 1 << 30
    finally:
        e.close()
    m.start()
    with open(m.p("g"), "rb") as f:
        f.seek((1 << 30) - (1 << 20))
        assert f.read() == chunk
    os.unlink(m.p("g"))
    assert wait_for(lambda: free_blocks(m.path) == total)
    assert os.statvfs(m.path).f_bfree == os.statvfs(m.path).f_blocks
