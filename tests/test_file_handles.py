"""name_to_handle_at / open_by_handle_at through a real mount, held against tmpfs.

A FUSE file handle is (node id, generation). When the kernel no longer has the inode
cached it asks the daemon for "." of that node id (the export support pyfuse3 turns on
with supports_dot_lookup); directories are then reconnected with ".." and readdir. Inode
numbers and generations live in the region, so a handle outlives a daemon restart.
open_by_handle_at needs CAP_DAC_READ_SEARCH (these tests run as root).
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile

import pytest
from conftest import drop_caches

from pmemfs.fs.engine import FsError

AT_FDCWD = -100
MAX_HANDLE_SZ = 128
NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path: str) -> FileHandle:
    fh = FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), 0):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fh


def open_handle(mountpoint: str, fh: FileHandle, flags: int = os.O_RDONLY) -> int:
    mfd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def outcome(fn, *args) -> str:
    try:
        fd = fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    os.close(fd)
    return "ok"


def read_by_handle(mountpoint: str, fh: FileHandle) -> bytes:
    fd = open_handle(mountpoint, fh)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


@pytest.fixture
def shm_dir():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="pmemfs-test-") as d:
        yield d


def scenario(root: str, mountpoint: str) -> dict[str, str]:
    """The same sequence on tmpfs and on pmemfs; returns what each step gave."""
    out = {}
    os.makedirs(os.path.join(root, "d", "e"))
    f = os.path.join(root, "d", "e", "f")
    with open(f, "wb") as w:
        w.write(b"hello")
    os.link(f, os.path.join(root, "hard"))
    fh, dh = name_to_handle(f), name_to_handle(os.path.join(root, "d", "e"))
    out["file"] = read_by_handle(mountpoint, fh).decode()
    out["dir"] = outcome(open_handle, mountpoint, dh, os.O_RDONLY | os.O_DIRECTORY)
    drop_caches()  # the kernel forgets the inodes: it must ask the filesystem
    out["file_uncached"] = read_by_handle(mountpoint, fh).decode()
    fd = open_handle(mountpoint, dh, os.O_RDONLY | os.O_DIRECTORY)
    out["dir_uncached"] = ",".join(sorted(os.listdir(fd)))
    # A handle to a directory is connected again: its path is known.
    out["dir_path"] = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root)
    os.close(fd)
    fd = open_handle(mountpoint, fh, os.O_WRONLY | os.O_APPEND)
    out["write"] = str(os.write(fd, b"!"))
    os.close(fd)
    os.unlink(os.path.join(root, "hard"))  # one link left: still valid
    drop_caches()
    out["after_one_unlink"] = read_by_handle(mountpoint, fh).decode()
    os.unlink(f)
    drop_caches()
    out["after_last_unlink"] = outcome(open_handle, mountpoint, fh)
    # A new file may take the freed inode number; the old handle must not open it.
    with open(os.path.join(root, "d", "e", "g"), "wb") as w:
        w.write(b"new")
    out["reused_number"] = outcome(open_handle, mountpoint, fh)
    return out


def test_handles_work_as_on_tmpfs(mounted, shm_dir):
    theirs = scenario(shm_dir, shm_dir)
    ours = scenario(mounted.path, mounted.path)
    expected = {"file": "hello", "dir": "ok", "file_uncached": "hello", "dir_uncached": "f",
                "dir_path": "d/e", "write": "1", "after_one_unlink": "hello!",
                "after_last_unlink": "ESTALE", "reused_number": "ESTALE"}
    assert theirs == expected
    assert ours == expected


def test_handle_of_a_reused_inode_number_is_stale(mounted):
    """Generations: the freed number, reused, has generation + 1; the old handle is stale."""
    p = mounted.p("a")
    open(p, "w").close()
    old_ino, old = os.stat(p).st_ino, name_to_handle(p)
    os.unlink(p)
    drop_caches()
    with open(mounted.p("b"), "wb") as w:
        w.write(b"b")
    assert os.stat(mounted.p("b")).st_ino == old_ino  # the lowest free number comes back
    new = name_to_handle(mounted.p("b"))
    assert bytes(new.f_handle[:new.handle_bytes]) != bytes(old.f_handle[:old.handle_bytes])
    for dropped in (False, True):
        if dropped:
            drop_caches()
        assert outcome(open_handle, mounted.path, old) == "ESTALE"
        assert read_by_handle(mounted.path, new) == b"b"


def test_handles_survive_a_daemon_restart(mounted):
    os.makedirs(mounted.p("x", "y"))
    with open(mounted.p("x", "y", "f"), "wb") as w:
        w.write(b"persistent")
    fh, dh, rh = name_to_handle(mounted.p("x", "y", "f")), name_to_handle(mounted.p("x", "y")), \
        name_to_handle(mounted.path)
    mounted.restart()  # kill -9, mount again: a new connection, nothing cached
    assert read_by_handle(mounted.path, fh) == b"persistent"
    fd = open_handle(mounted.path, dh, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["f"]
        assert os.readlink(f"/proc/self/fd/{fd}") == mounted.p("x", "y")
    finally:
        os.close(fd)
    assert outcome(open_handle, mounted.path, rh, os.O_RDONLY | os.O_DIRECTORY) == "ok"
    # And after a clean unmount and mount.
    mounted.unmount()
    mounted.start()
    drop_caches()
    assert read_by_handle(mounted.path, fh) == b"persistent"


def test_handle_of_an_open_unlinked_file(mounted, shm_dir):
    """While a descriptor keeps an unlinked file alive, the kernel still has the inode:
    its handle opens it, on tmpfs and on pmemfs alike; once closed, it is stale."""
    results = []
    for root in (shm_dir, mounted.path):
        p = os.path.join(root, "u")
        with open(p, "wb") as w:
            w.write(b"alive")
        fh = name_to_handle(p)
        keep = os.open(p, os.O_RDONLY)
        os.unlink(p)
        drop_caches()
        results.append(read_by_handle(root, fh))
        os.close(keep)
        drop_caches()
        results.append(outcome(open_handle, root, fh))
    assert results == [b"alive", "ESTALE"] * 2


def as_nobody(directory: str, fn) -> str:
    """fn() in a forked child that has dropped root, with directory as its cwd (opened
    as root first: pytest's tmp directories are 0700)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.fchdir(dfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = str(fn())
        except BaseException as e:  # report, never return into pytest
            out = f"error {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.close(dfd)
    data = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return data


def test_opening_by_handle_needs_the_capability(region, mount_factory, shm_dir):
    """Unprivileged: name_to_handle_at works, open_by_handle_at is EPERM, on both (the
    kernel checks CAP_DAC_READ_SEARCH before anything reaches the daemon)."""
    mounted = mount_factory(region, {"allow_other"})
    def attempt() -> str:
        fh = name_to_handle("pub")
        return outcome(open_handle, ".", fh)

    got = []
    for root in (shm_dir, mounted.path):
        with open(os.path.join(root, "pub"), "w") as w:
            w.write("x")
        os.chmod(root, 0o755)
        got.append(as_nobody(root, attempt))
    assert got == ["EPERM", "EPERM"]


def test_engine_dot_lookup(engine):
    """What the kernel asks: "." of a file or directory by number; ".." of a directory."""
    d = engine.mkdir(1, b"d", 0o755).ino
    f = engine.create(d, b"f", 0o644).ino
    assert engine.lookup(f, b".") == f and engine.lookup(d, b".") == d
    assert engine.lookup(d, b"..") == 1 and engine.lookup(1, b"..") == 1
    with pytest.raises(FsError) as exc:
        engine.lookup(f, b"..")
    assert exc.value.errno == errno.ENOTDIR
    engine.ref(f)  # the kernel still holds it
    engine.unlink(d, b"f")
    with pytest.raises(FsError) as exc:
        engine.lookup(f, b".")  # unlinked: stale, even though not freed yet
    assert exc.value.errno == errno.ENOENT
    engine.forget(f)
    with pytest.raises(FsError) as exc:
        engine.lookup(f, b".")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(FsError) as exc:
        engine.lookup(10**6, b".")
    assert exc.value.errno == errno.ENOENT
