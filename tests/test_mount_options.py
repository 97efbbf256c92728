"""Mount options and daemon lifecycle through a real mount: ro, sync, prefault, noatime,
force, SIGTERM/SIGINT, --log/--debug, regions on hugetlbfs and with 1 GiB blocks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import drop_caches, superblock_state, wait_for, written_bytes

from pmemfs import mounting
from pmemfs.format import STATE_CLEAN
from pmemfs.mkfs import make_filesystem

MiB, GiB = 1 << 20, 1 << 30
BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pmemfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def mount_options(mp: str) -> set[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == mp:
                return set(fields[3].split(","))
    raise AssertionError(f"{mp} is not mounted")


def region_digest(region: str) -> str:
    with open(region, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------ ro
def test_ro_refuses_every_write_path_and_changes_no_byte(region, mount_factory):
    rw = mount_factory(region)
    with open(rw.p("f"), "wb") as f:
        f.write(b"kept" * 1000)
    os.mkdir(rw.p("d"))
    os.symlink("f", rw.p("l"))
    os.setxattr(rw.p("f"), "user.x", b"1")
    rw.unmount()
    before = region_digest(region)
    m = mount_factory(region, {"ro"}, name="ro")
    assert "ro" in mount_options(m.path)
    # Reads, the listing, xattrs and the read-only control queries all answer.
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"kept" * 1000
    assert sorted(os.listdir(m.path)) == ["d", "f", "l"] and os.readlink(m.p("l")) == "f"
    assert os.getxattr(m.p("f"), "user.x") == b"1"
    assert json.loads(os.getxattr(m.p("f"), "user.pmemfs.extents"))
    writes = {
        "open O_WRONLY": lambda: os.open(m.p("f"), os.O_WRONLY),
        "open O_RDWR": lambda: os.open(m.p("f"), os.O_RDWR),
        "open O_TRUNC": lambda: os.open(m.p("f"), os.O_RDONLY | os.O_TRUNC),
        "create": lambda: os.open(m.p("new"), os.O_CREAT | os.O_WRONLY, 0o644),
        "truncate": lambda: os.truncate(m.p("f"), 0),
        "mkdir": lambda: os.mkdir(m.p("d2")),
        "rmdir": lambda: os.rmdir(m.p("d")),
        "unlink": lambda: os.unlink(m.p("f")),
        "rename": lambda: os.rename(m.p("f"), m.p("g")),
        "link": lambda: os.link(m.p("f"), m.p("g")),
        "symlink": lambda: os.symlink("f", m.p("l2")),
        "mknod": lambda: os.mkfifo(m.p("fifo")),
        "chmod": lambda: os.chmod(m.p("f"), 0o600),
        "chown": lambda: os.chown(m.p("f"), 1, 1),
        "utime": lambda: os.utime(m.p("f"), (1, 1)),
        "setxattr": lambda: os.setxattr(m.p("f"), "user.y", b"2"),
        "removexattr": lambda: os.removexattr(m.p("f"), "user.x"),
        # the control channel
        "align": lambda: os.setxattr(m.p("d"), "user.pmemfs.align", b"1G"),
        "prealloc": lambda: os.setxattr(m.p("f"), "user.pmemfs.prealloc", b"4M"),
        "carve": lambda: os.setxattr(m.p("f"), "user.pmemfs.carve",
                                     json.dumps({"src": "f", "offset": 0, "length": 2 * MiB}).encode()),
        "lease rw": lambda: os.setxattr(m.p("f"), "user.pmemfs.lease", b"rw"),
        "defrag": lambda: os.setxattr(m.path, "trusted.pmemfs.defrag", b""),
        "kernel create": lambda: os.setxattr(m.path, "trusted.pmemfs.kernel.create", json.dumps(
            {"name": "k", "type": "generic", "size": 4096}).encode()),
        "kernel freeze": lambda: os.setxattr(m.path, "trusted.pmemfs.kernel.freeze", b""),
    }
    got = {what: errno_of(fn) for what, fn in writes.items()}
    assert got == {what: errno.EROFS for what in writes}, {k: errno.errorcode.get(v, v) for k, v in got.items()}
    for args in (["prealloc", m.p("f"), "4M"], ["defrag", m.path],
                 ["kernel", "create", "--size", "4K", m.path, "k"]):
        r = pmemfs(*args)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "Read-only" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    m.unmount()
    assert region_digest(region) == before  # not one byte of the region changed


# ------------------------------------------------------------------ sync
def region_dirty_kb(pid: int, region: str) -> int:
    """Dirty pages of the daemon's mapping of the region (smaps), in KiB."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                inside = line.rstrip().endswith(" " + region)
            elif inside and head[0] in ("Shared_Dirty:", "Private_Dirty:"):
                total += int(head[1])
    return total


def test_sync_writes_the_region_back_at_fsync(tmp_path, mount_factory):
    """A region on a disk filesystem: with -o sync an fsync through the mount leaves no
    dirty page of the region behind (msync); without it the pages stay dirty."""
    region = str(tmp_path / "disk.region")  # tmp_path is on a disk filesystem, not tmpfs
    make_filesystem(region, size=64 * MiB)
    try:
        for options, want_clean in (({"sync"}, True), (set(), False)):
            m = mount_factory(region, options, name=f"m{len(options)}")
            with open(m.p("f"), "wb") as f:
                f.write(os.urandom(8 * MiB))
                dirty = region_dirty_kb(m.pid, region)
                os.fsync(f.fileno())
                after = region_dirty_kb(m.pid, region)
            assert dirty >= 8 * 1024, dirty  # the daemon's stores are dirty pages of the file
            if want_clean:
                assert after == 0, (options, dirty, after)
            else:
                assert after >= 8 * 1024, (options, dirty, after)
            m.unmount()
    finally:
        os.unlink(region)


# ------------------------------------------------------------------ prefault
def test_prefault_populates_the_data_area_at_mount(region_factory, mount_factory):
    # A region is reserved whole by mkfs (fallocate: st_blocks counts it), but nothing of
    # it is written or faulted in until used (mincore counts only that).
    size = 64 * MiB
    plain = region_factory(size=size)
    mount_factory(plain, name="plain")
    assert allocated(plain) == size and written_bytes(plain) < size // 4  # without: only what is touched
    region = region_factory(size=size)
    before = written_bytes(region)
    data_area = size - json.loads(pmemfs("info", "--json", region).stdout)["metadata_bytes"]
    m = mount_factory(region, {"prefault"}, name="pre")
    assert before < size // 4 and written_bytes(region) >= before + data_area, (before, written_bytes(region))
    with open(m.p("f"), "wb") as f:
        f.write(b"p" * (3 * MiB))
    drop_caches()
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"p" * (3 * MiB)


# ------------------------------------------------------------------ atime
def atime_changes(root: str) -> tuple[bool, bool]:
    """Whether a read, and an exec, change an old atime (older than mtime) of a file."""
    old = 10**18  # 2001
    out = []
    for what in ("read", "exec"):
        p = os.path.join(root, f"atime-{what}")
        with open(p, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(p, 0o755)
        os.utime(p, ns=(old, time.time_ns()))
        if what == "read":
            with open(p, "rb") as f:
                f.read()
        else:
            subprocess.run([p], check=True, timeout=30)
        out.append(os.stat(p).st_atime_ns != old)
    return out[0], out[1]


@pytest.mark.parametrize("options", [set(), {"noatime"}], ids=["relatime", "noatime"])
def test_atime_follows_the_mount_option_as_on_tmpfs(region, mount_factory, tmp_path, options):
    ref = str(tmp_path / "tmpfs")
    os.mkdir(ref)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=16m", *options]), "tmpfs", ref],
                   check=True, capture_output=True)
    try:
        want = atime_changes(ref)
    finally:
        subprocess.run(["umount", ref], check=True)
    m = mount_factory(region, options)
    assert options <= mount_options(m.path)
    assert want == ((False, False) if options else (True, True))  # what tmpfs does
    assert atime_changes(m.path) == want
    m.restart()  # and it is what the region holds, not a cached attribute
    assert atime_changes(m.path) == want


# ------------------------------------------------------------------ force
def dead_foreign_mount(mp: str, source: str) -> None:
    """A FUSE mount of another filesystem (the passthrough baseline), its daemon killed."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "passthroughfs.py"), source, mp],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        with open("/proc/self/mounts") as f:
            return any(ln.split()[1] == mp and ln.split()[2] == "fuse.passthroughfs" for ln in f)

    try:
        assert wait_for(up, timeout=60), "the passthrough filesystem did not mount"
    finally:
        p.kill()
        p.wait()
    assert mounting.is_stale(mp)


def test_force_clears_a_dead_mount_of_another_filesystem(region, tmp_path):
    mp = str(tmp_path / "m")
    src = str(tmp_path / "src")
    os.mkdir(mp)
    os.mkdir(src)
    try:
        dead_foreign_mount(mp, src)
        r = pmemfs("mount", region, mp)
        assert r.returncode != 0 and "another filesystem" in r.stderr and "--force" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = pmemfs("mount", "-o", "force", region, mp)  # (--force is the same option)
        assert r.returncode == 0, r.stderr
        assert "cleared a dead mount" in r.stdout
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("forced")
        # force never touches a live mount, not even its own filesystem's
        for how in (["--force"], ["-o", "force"]):
            r = pmemfs("mount", *how, region, mp)
            assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        with open(os.path.join(mp, "f")) as f:
            assert f.read() == "forced"
        u = pmemfs("umount", mp)
        assert u.returncode == 0, u.stderr
    finally:
        while mounting.pmemfs_mount_at(mp) is not None:
            pmemfs("umount", mp)
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    assert not os.path.ismount(mp)
    assert superblock_state(region) == STATE_CLEAN


# ------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_daemon_unmounts_cleanly(region, mount_factory, sig):
    m = mount_factory(region)
    with open(m.p("f"), "wb") as f:
        f.write(b"s" * (3 * MiB))
    os.kill(m.pid, sig)
    assert m.proc.wait(timeout=30) == 0, m.log()
    assert mounting.pmemfs_mount_at(m.path) is None
    assert not os.path.ismount(m.path)
    assert superblock_state(region) == STATE_CLEAN
    assert f"signal {int(sig)}: unmounting" in m.log()
    m.start()
    assert "clean=1" in m.status
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"s" * (3 * MiB)


# ------------------------------------------------------------------ --log / --debug
def test_mount_log_and_debug(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    logs = {}
    for debug in (False, True):
        log = str(tmp_path / f"log{int(debug)}")
        r = pmemfs("mount", *(["--debug"] if debug else []), "--log", log, region, mp)
        try:
            assert r.returncode == 0, r.stderr
            with open(os.path.join(mp, "f"), "wb") as f:
                f.write(b"logged")
            assert errno_of(os.stat, os.path.join(mp, "missing")) == errno.ENOENT
        finally:
            u = pmemfs("umount", mp)
        assert u.returncode == 0, u.stderr
        with open(log) as f:
            logs[debug] = f.read()
    for text in logs.values():
        assert f"serving {region} on {mp}" in text and f"unmounted {mp}; region marked clean" in text
        assert "Traceback" not in text
    # Every request and its answer, only with --debug.
    assert "lookup(1, b'missing') -> ENOENT" in logs[True], logs[True][-3000:]
    assert "write(2, 0, b'logged') -> ok" in logs[True], logs[True][-3000:]
    assert "lookup(" not in logs[False] and " DEBUG " not in logs[False]


# ------------------------------------------------------------------ hugetlbfs, 1 GiB blocks
def exercise(m, block: int, blocks: int = 2) -> None:
    """Writes in two blocks and across their boundary (or all in one), read back from the
    daemon, and after kill -9 and a new mount."""
    if blocks == 2:
        pieces = {0: os.urandom(1000), block - 3: os.urandom(4096), block + block // 2: os.urandom(MiB)}
        gap = block + 8192
    else:  # the far piece first, so that the file is never a small (packed) one
        pieces = {block - MiB: os.urandom(MiB), 0: os.urandom(1000), block // 2 - 3: os.urandom(4096)}
        gap = block // 4
    with open(m.p("f"), "wb") as f:
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    assert os.statvfs(m.path).f_bsize == block
    ext = json.loads(os.getxattr(m.p("f"), "user.pmemfs.extents"))
    assert ext and all(ro % block == 0 and n % block == 0 for _, ro, n in ext), ext
    for restart in (False, True):
        if restart:
            m.restart()
        drop_caches()
        with open(m.p("f"), "rb") as f:
            for off, data in pieces.items():
                f.seek(off)
                assert f.read(len(data)) == data, (off, restart)
            f.seek(gap)
            assert f.read(100) == bytes(100)  # between the pieces: zeros


def test_region_on_hugetlbfs_mounted_and_used(hugetlbfs_factory, mount_factory):
    huge = hugetlbfs_factory(pages=16)  # exactly the region: no page to spare
    region = os.path.join(huge, "vm.region")
    make_filesystem(region, size=32 * MiB)
    m = mount_factory(region)
    info = json.loads(pmemfs("info", "--json", region).stdout)
    assert info["backing"] == "hugetlbfs"
    with open(m.p("big"), "wb") as f:
        f.write(b"h" * (10 * MiB))
    exercise(m, 2 * MiB)
    with open(m.p("big"), "rb") as f:
        assert f.read() == b"h" * (10 * MiB)
    m.unmount()
    # fsck -n maps the metadata copy-on-write: that must not need spare huge pages.
    r = subprocess.run([os.path.join(BIN, "pmemfs-fsck"), "-n", region], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_region_with_1g_blocks(region_factory, mount_factory):
    region = region_factory(size=3 * GiB, block_size=GiB, sparse=True)
    m = mount_factory(region)
    exercise(m, GiB)
    # Overcommitted, each block the file has is reserved whole (so no store into it can
    # fault), but the gaps of new blocks are not a GiB of written zeros each: reserved
    # from holes, they read as zeros unwritten. What is written is the data and the
    # zeros of the half GiB the size grew over inside block 1 (from 1 GiB + 4093 to
    # the piece at 1.5 GiB: bytes past the end of file are zeroed when it grows).
    assert 2 * GiB <= allocated(region) < 2 * GiB + 64 * MiB, allocated(region)
    assert written_bytes(region) < GiB // 2 + 64 * MiB, written_bytes(region)


def test_region_with_1g_blocks_on_1g_hugetlbfs(hugetlbfs_factory, mount_factory):
    with open("/proc/cpuinfo") as f:
        if "pdpe1gb" not in f.read():
            pytest.skip("the CPU has no 1 GiB pages (no pdpe1gb flag)")
    # Two 1 GiB pages (each needs a free, contiguous, aligned GiB of memory): the
    # metadata block and one data block.
    huge = hugetlbfs_factory(pages=2, pagesize="1G", skip_if_unavailable=True)
    region = os.path.join(huge, "vm.region")
    make_filesystem(region, size=2 * GiB, block_size=GiB)
    m = mount_factory(region)
    exercise(m, GiB, blocks=1)
    m.unmount()

