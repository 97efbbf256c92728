"""Mount options and daemon lifecycle through a real mount: ro, sync, prefault, noatime,
force, SIGTERM/SIGINT, --log/--debug, regions on hugetlbfs and with 1 GiB blocks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest
from conftest import assert_clean, drop_caches, superblock_state, wait_for, written_bytes

from pmemfs.media.format import STATE_CLEAN
from pmemfs.media.mkfs import make_filesystem
from pmemfs.serve import mounting

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
def write_attempts(m) -> dict[str, int]:
    """Every write path and every region-changing control verb, tried on the mount m
    (which holds f, d and l from prepare_for_writes): what -> errno (0: it worked)."""
    writes = {
        "open O_WRONLY": lambda: os.close(os.open(m.p("f"), os.O_WRONLY)),
        "open O_RDWR": lambda: os.close(os.open(m.p("f"), os.O_RDWR)),
        "open O_TRUNC": lambda: os.close(os.open(m.p("f"), os.O_RDONLY | os.O_TRUNC)),
        "create": lambda: os.close(os.open(m.p("new"), os.O_CREAT | os.O_WRONLY, 0o644)),
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
        "lease ro": lambda: os.setxattr(m.p("f"), "user.pmemfs.lease", b"ro"),
        "defrag": lambda: os.setxattr(m.path, "trusted.pmemfs.defrag", b""),
        "kernel create": lambda: os.setxattr(m.path, "trusted.pmemfs.kernel.create", json.dumps(
            {"name": "k", "type": "generic", "size": 4096}).encode()),
        "kernel freeze": lambda: os.setxattr(m.path, "trusted.pmemfs.kernel.freeze", b""),
    }
    return {what: errno_of(fn) for what, fn in writes.items()}


def prepare_for_writes(root: str) -> None:
    with open(os.path.join(root, "f"), "wb") as f:
        f.write(b"kept" * 1000)
    os.mkdir(os.path.join(root, "d"))
    os.symlink("f", os.path.join(root, "l"))
    os.setxattr(os.path.join(root, "f"), "user.x", b"1")


def assert_all_erofs(got: dict[str, int]) -> None:
    assert got == {what: errno.EROFS for what in got}, {k: errno.errorcode.get(v, v) for k, v in got.items()}


def assert_reads_answer(m) -> None:
    """Reads, the listing, xattrs and the read-only control queries all answer."""
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"kept" * 1000
    assert {"d", "f", "l"} <= set(os.listdir(m.path)) and os.readlink(m.p("l")) == "f"
    assert os.getxattr(m.p("f"), "user.x") == b"1"
    assert json.loads(os.getxattr(m.p("f"), "user.pmemfs.extents"))


def test_ro_refuses_every_write_path_and_changes_no_byte(region, mount_factory):
    rw = mount_factory(region)
    prepare_for_writes(rw.path)
    rw.unmount()
    before = region_digest(region)
    m = mount_factory(region, {"ro"}, name="ro")
    assert "ro" in mount_options(m.path)
    assert_reads_answer(m)
    assert_all_erofs(write_attempts(m))
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


@contextlib.contextmanager
def tmpfs(where: str, options: Iterable[str] = ()):
    """A tmpfs at `where` mounted with these options: Linux's own answer."""
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=16m", *options]), "tmpfs", where],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


@pytest.mark.parametrize("options", [set(), {"noatime"}, {"strictatime"}, {"nodiratime"}],
                         ids=["relatime", "noatime", "strictatime", "nodiratime"])
def test_atime_follows_the_mount_option_as_on_tmpfs(region, mount_factory, tmp_path, options):
    with tmpfs(str(tmp_path / "tmpfs"), options) as ref:
        want = atime_changes(ref)
    m = mount_factory(region, options)
    flags = mount_options(m.path)
    # strictatime is shown as neither relatime nor noatime
    assert not flags & {"relatime", "noatime"} if options == {"strictatime"} else options <= flags
    assert want == ((False, False) if options == {"noatime"} else (True, True))  # what tmpfs does
    assert atime_changes(m.path) == want
    m.restart()  # and it is what the region holds, not a cached attribute
    assert atime_changes(m.path) == want


STALE, FRESH = "stale", "fresh"  # atime older than mtime; atime newer than mtime and ctime


def access_outcomes(root: str) -> dict[str, bool]:
    """Whether reading a file, listing a directory, reading a symlink and following one
    change atime, when it was stale (before mtime: relatime updates it) and when it was
    fresh (after mtime and ctime, under a day old: only strictatime updates it)."""
    made = {}
    for case in (STALE, FRESH):
        f, d, ln = (os.path.join(root, f"{what}-{case}") for what in ("file", "dir", "link"))
        with open(f, "wb") as out:
            out.write(b"a" * 100)
        os.mkdir(d)
        with open(os.path.join(d, "child"), "wb"):
            pass
        os.symlink(os.path.basename(f), ln)
        made[case] = (f, d, ln)
    drop_caches()  # every read below reaches the daemon (see docs/DESIGN.md, atime)
    out = {}
    def aged(path: str, case: str) -> int:
        at = 10**18 if case == STALE else time.time_ns() + 3600 * 10**9
        os.utime(path, ns=(at, time.time_ns()), follow_symlinks=False)  # ctime: now
        return at

    for case, (f, d, ln) in made.items():
        at = aged(f, case)
        with open(f, "rb") as fh:
            fh.read()
        out[f"read file, {case}"] = os.stat(f).st_atime_ns != at
        at = aged(d, case)
        os.listdir(d)
        out[f"list dir, {case}"] = os.stat(d).st_atime_ns != at
        at = aged(ln, case)
        os.readlink(ln)
        out[f"readlink, {case}"] = os.lstat(ln).st_atime_ns != at
        at = aged(ln, case)
        os.stat(ln)
        out[f"follow link, {case}"] = os.lstat(ln).st_atime_ns != at
    return out


def expected_outcomes(options: set[str]) -> dict[str, bool]:
    """Linux's rule (touch_atime, relatime_need_update), written out."""
    out = {}
    for case in (STALE, FRESH):
        for what in ("read file", "list dir", "readlink", "follow link"):
            if "noatime" in options or (what == "list dir" and "nodiratime" in options):
                changes = False
            else:
                changes = case == STALE or "strictatime" in options
            out[f"{what}, {case}"] = changes
    return out


@pytest.mark.parametrize("options", [set(), {"strictatime"}, {"noatime"}, {"nodiratime"},
                                     {"strictatime", "nodiratime"}],
                         ids=["relatime", "strictatime", "noatime", "nodiratime", "strictatime+nodiratime"])
def test_atime_of_files_directories_and_links_as_on_tmpfs(region, mount_factory, tmp_path, options):
    with tmpfs(str(tmp_path / "tmpfs"), options) as ref:
        want = access_outcomes(ref)
    assert want == expected_outcomes(options)  # tmpfs does what Linux says
    m = mount_factory(region, options)
    assert access_outcomes(m.path) == want


def test_atime_options_change_at_a_remount(region, mount_factory):
    m = mount_factory(region)
    steps = [  # remount with these words -> the mount's atime flags, the daemon's rule
        ("noatime", {"noatime"}, {"noatime"}),
        ("strictatime,nodiratime", {"nodiratime"}, {"strictatime", "nodiratime"}),
        ("relatime,diratime", {"relatime"}, set()),
    ]
    for i, (words, flags, options) in enumerate(steps):
        r = pmemfs("mount", "-o", "remount," + words, m.path)
        assert r.returncode == 0, r.stderr
        assert mount_options(m.path) & {"noatime", "relatime", "nodiratime"} == flags, words
        os.mkdir(m.p(f"step{i}"))
        assert access_outcomes(m.p(f"step{i}")) == expected_outcomes(options), words


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



# ------------------------------------------------------------------ remount
class Dir:
    """A directory that write_attempts can be pointed at (a tmpfs for reference)."""

    def __init__(self, path: str):
        self.path = path

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)


def remount(mp: str, words: str) -> subprocess.CompletedProcess:
    """pmemfs mount -o remount,WORDS MOUNTPOINT."""
    return pmemfs("mount", "-o", "remount," + words, mp)


def mountinfo_flags(mp: str) -> tuple[set[str], set[str]]:
    """The mount's own flags and its superblock's options, from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == mp:
                found = set(left.split()[5].split(",")), set(right.split()[2].split(","))
    return found


def generation(region: str) -> int:
    from pmemfs.media.format import read_superblock
    from pmemfs.media.region import Region

    with Region(region, writable=False, lock=False) as r:
        return read_superblock(r.buf, r.size)[0].mount_generation


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


def test_remount_ro_refuses_every_write_path_as_tmpfs_and_rw_writes_again(region, mount_factory, tmp_path):
    with tmpfs(str(tmp_path / "tmpfs")) as ref:
        prepare_for_writes(ref)
        subprocess.run(["mount", "-o", "remount,ro", ref], check=True)
        want = write_attempts(Dir(ref))
    assert want == {what: errno.EROFS for what in want}  # Linux refuses each one
    m = mount_factory(region)
    prepare_for_writes(m.path)
    r = remount(m.path, "ro")
    assert r.returncode == 0 and f"remounted {m.path} (ro," in r.stdout, r.stderr
    mine, sb = mountinfo_flags(m.path)
    assert {"ro", "nosuid", "nodev"} <= mine and "ro" in sb  # the mount and its superblock
    assert superblock_state(region) == STATE_CLEAN  # as an unmount leaves it
    before = region_digest(region)
    assert_reads_answer(m)
    assert write_attempts(m) == want
    r = pmemfs("prealloc", m.p("f"), "4M")
    one_line_error(r, "Read-only")
    assert region_digest(region) == before  # not one byte changed while read-only
    r = remount(m.path, "rw")
    assert r.returncode == 0 and f"remounted {m.path} (rw," in r.stdout, r.stderr
    assert "ro" not in mountinfo_flags(m.path)[1] and superblock_state(region) != STATE_CLEAN
    os.close(os.open(m.p("new"), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(m.p("d2"))
    os.setxattr(m.p("f"), "user.y", b"2")
    assert pmemfs("prealloc", m.p("f"), "4M").returncode == 0
    m.unmount()
    assert_clean(region)


def test_remount_ro_is_refused_while_a_file_is_open_for_writing_as_on_tmpfs(region, mount_factory, tmp_path):
    with tmpfs(str(tmp_path / "tmpfs")) as ref:
        fd = os.open(os.path.join(ref, "w"), os.O_CREAT | os.O_WRONLY, 0o644)
        busy = subprocess.run(["mount", "-o", "remount,ro", ref], capture_output=True, text=True)
        os.close(fd)
        subprocess.run(["mount", "-o", "remount,ro", ref], check=True)
    assert busy.returncode != 0 and "busy" in busy.stderr
    m = mount_factory(region)
    fd = os.open(m.p("w"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        one_line_error(remount(m.path, "ro"), "busy", "open for writing")
        assert "ro" not in mount_options(m.path) and superblock_state(region) != STATE_CLEAN
        assert os.write(fd, b"still writing") == 13  # and the daemon is still read-write
    finally:
        os.close(fd)
    assert remount(m.path, "ro").returncode == 0


def test_remount_ro_is_refused_while_a_file_is_mapped_read_write_directly(region, mount_factory):
    from pmemfs import direct

    m = mount_factory(region)
    direct.create(m.p("g"), 4 * MiB)
    with direct.open(m.p("g"), writable=True) as d:
        d.view()[:4] = 7  # it writes the region past the daemon: ro cannot hold
        one_line_error(remount(m.path, "ro"), "mapped read-write directly")
        assert "ro" not in mount_options(m.path)  # the kernel was never asked
        with open(m.p("h"), "wb") as f:
            f.write(b"still read-write")
    assert remount(m.path, "ro").returncode == 0


def test_a_remount_survives_live_updates(region, mount_factory):
    m = mount_factory(region)
    with open(m.p("f"), "wb") as f:
        f.write(b"before" * 1000)
    assert remount(m.path, "ro").returncode == 0
    gen, before = generation(region), region_digest(region)
    m.crash()  # kill -9 of the daemon: the standby takes over, started before the remount
    from pmemfs.serve.mountctl import ask

    assert "ro" in ask(m.path, {"verb": "status"})["options"]
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"before" * 1000
    assert errno_of(os.mkdir, m.p("d")) == errno.EROFS
    # The new daemon is read-only: a read-write one would have marked the region dirty
    # and counted a mount.
    assert (superblock_state(region), generation(region), region_digest(region)) == (STATE_CLEAN, gen, before)
    r = pmemfs("upgrade", m.path)  # and so is the daemon an upgrade starts
    assert r.returncode == 0, r.stderr
    assert (superblock_state(region), generation(region), region_digest(region)) == (STATE_CLEAN, gen, before)
    # Back to read-write: this daemon mapped the region read-only, and opens it anew.
    assert remount(m.path, "rw").returncode == 0
    with open(m.p("g"), "wb") as f:
        f.write(b"after")
    assert superblock_state(region) != STATE_CLEAN
    m.crash()
    with open(m.p("h"), "wb") as f:  # the next daemon came up read-write
        f.write(b"again")
    m.unmount()
    assert_clean(region)
    m.start()
    assert sorted(os.listdir(m.path)) == ["f", "g", "h"]


def test_without_live_update_the_remount_after_a_death_keeps_the_flags(region, mount_factory):
    m = mount_factory(region, {"live=off", "nodiratime"})
    with open(m.p("f"), "wb") as f:
        f.write(b"kept")
    assert remount(m.path, "ro,strictatime").returncode == 0
    m.crash()  # the fallback clears the dead mount and mounts again, as the mount was
    assert wait_for(lambda: not mounting.is_stale(m.path) and os.path.ismount(m.path), 60)
    mine, sb = mountinfo_flags(m.path)
    assert {"ro", "nodiratime"} <= mine and "ro" in sb and not mine & {"relatime", "noatime"}, mine
    assert superblock_state(region) == STATE_CLEAN
    assert errno_of(os.mkdir, m.p("d")) == errno.EROFS
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"kept"


def test_kill_while_remounted_ro_leaves_the_region_clean(region, mount_factory):
    m = mount_factory(region)
    with open(m.p("f"), "wb") as f:
        f.write(b"x" * (3 * MiB))
    assert remount(m.path, "ro").returncode == 0
    m.kill()  # supervisor and daemon: as a reboot would
    assert superblock_state(region) == STATE_CLEAN
    assert_clean(region)
    m.start()
    assert "clean=1" in m.status
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"x" * (3 * MiB)


def test_read_only_mounts_share_a_region_and_only_a_lone_one_goes_read_write(region, mount_factory, tmp_path):
    prepare_for_writes(mount_factory(region, name="first").path)
    mounting.unmount(str(tmp_path / "first"))
    a = mount_factory(region, {"ro"}, name="a")
    b = mount_factory(region, {"ro"}, name="b")  # read-only mounts share the region
    os.mkdir(tmp_path / "c")
    r = pmemfs("mount", region, str(tmp_path / "c"))  # nothing may write it meanwhile
    one_line_error(r, "in use")
    one_line_error(remount(a.path, "rw"), "in use")
    assert errno_of(os.mkdir, a.p("x")) == errno.EROFS
    assert_reads_answer(a)
    b.unmount()
    assert remount(a.path, "rw").returncode == 0  # the shared lock becomes exclusive
    os.mkdir(a.p("x"))
    assert superblock_state(region) != STATE_CLEAN
    r = pmemfs("mount", "-o", "ro", region, str(tmp_path / "c"))
    one_line_error(r, "in use")
    for words in ("ro", "rw"):  # now in place: the region is mapped read-write
        assert remount(a.path, words).returncode == 0
    os.mkdir(a.p("y"))
    a.unmount()
    assert_clean(region)


def test_a_single_daemon_remounts_through_its_own_socket(region, tmp_path):
    mp = str(tmp_path / "s")
    os.mkdir(mp)
    m = mounting.spawn(region, mp, {"strictatime", "nodiratime"}, single=True, log=str(tmp_path / "log"))
    try:
        mine, _ = mountinfo_flags(mp)  # libfuse knows neither flag: the daemon sets them
        assert "nodiratime" in mine and not mine & {"relatime", "noatime"}, mine
        with open(os.path.join(mp, "f"), "wb") as f:
            f.write(b"single")
        assert remount(mp, "ro").returncode == 0
        assert errno_of(os.mkdir, os.path.join(mp, "d")) == errno.EROFS
        assert superblock_state(region) == STATE_CLEAN
        assert mountinfo_flags(mp)[0] >= {"ro", "nodiratime"}  # the atime flags stay
        assert remount(mp, "rw").returncode == 0
        os.mkdir(os.path.join(mp, "d"))
    finally:
        mounting.unmount(mp)
    assert m.proc.wait(timeout=30) == 0
    assert_clean(region)


def test_remount_errors_are_one_line(region, mount_factory, tmp_path):
    m = mount_factory(region)
    one_line_error(remount(m.path, "prefault"), "prefault", "cannot change at a remount")
    one_line_error(remount(m.path, "allow_other"), "allow_other", "cannot change at a remount")
    one_line_error(remount(m.path, "bogus"), "unknown mount option", "bogus")
    one_line_error(remount(str(tmp_path), "ro"), "no pmemfs is mounted there")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        os.path.join(BIN, "pmemfs"), "mount", "-o", "remount,ro", m.path],
                       capture_output=True, text=True, timeout=60, cwd="/")
    one_line_error(r, "remount needs root")
    assert "ro" not in mount_options(m.path)


# A mount(8) of type fuse.pmemfs runs /sbin/mount.fuse3, which runs `pmemfs` from /bin/sh's
# default PATH (README). As in test_mount_cli.py, one is put into /usr/local/bin only in
# a private mount namespace, where the whole mount's life happens; this one runs the code
# of this checkout.
NS_SCRIPT = r"""
import errno, json, os, subprocess, sys
bindir, mp, region = sys.argv[1:4]
out = {}
def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return {"rc": r.returncode, "err": r.stderr.strip(), "out": r.stdout.strip()}
def flags():
    for line in open("/proc/self/mountinfo"):
        if line.split()[4] == mp:
            return line.split()[5]
def mkdir(name):
    try:
        os.mkdir(os.path.join(mp, name))
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
out["bind"] = run("mount", "--bind", bindir, "/usr/local/bin")
out["mount"] = run("mount", "-t", "fuse.pmemfs", "-o", "nodev,nosuid", region, mp)
if out["mount"]["rc"] == 0:
    out["mkdir rw"] = mkdir("a")
    out["ro"] = run("mount", "-o", "remount,ro", mp)
    out["flags ro"] = flags()
    out["mkdir ro"] = mkdir("b")
    out["rw"] = run("mount", "-o", "remount,rw,noatime", mp)
    out["flags rw"] = flags()
    out["mkdir rw again"] = mkdir("c")
    out["umount"] = run("umount", mp)
out["mount defaults"] = run("mount", "-t", "fuse.pmemfs", region, mp)  # mount(8)'s defaults
if out["mount defaults"]["rc"] == 0:
    out["flags defaults"] = flags()
    out["umount defaults"] = run("umount", mp)
print(json.dumps(out))
"""


def test_remount_through_mount_8(region, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pmemfs").write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -P -c 'from pmemfs.tools.cli import main; main()' \"$@\"\n")
    (bindir / "pmemfs").chmod(0o755)
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", NS_SCRIPT,
                        str(bindir), mp, region], capture_output=True, text=True, timeout=300, cwd="/")
    try:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        for step in ("bind", "mount", "ro", "rw", "umount", "mount defaults", "umount defaults"):
            assert out[step]["rc"] == 0, (step, out)
        # mount.fuse3 asks for dev,suid unless told nodev,nosuid: mount(8)'s defaults
        assert out["flags defaults"] == "rw,relatime", out
        assert out["flags ro"] == "ro,nosuid,nodev,relatime" and out["mkdir ro"] == "EROFS", out
        assert out["flags rw"] == "rw,nosuid,nodev,noatime" and out["mkdir rw again"] == "ok", out
        assert out["mkdir rw"] == "ok"
    finally:
        holder = mounting.region_holder(region)
        if holder:  # its mount is in the namespace; killing the daemon ends both
            os.kill(holder, signal.SIGKILL)
            wait_for(lambda: mounting.region_holder(region) is None, timeout=30)
    assert superblock_state(region) == STATE_CLEAN
    assert_clean(region)


def test_a_read_only_engine_refuses_every_change(engine, region):
    """What a read-only daemon answers when a write reaches it anyway (the kernel refuses
    them first on a read-only mount, so this is the engine, without FUSE): EROFS, and
    not a byte of the region changes."""
    from pmemfs.fs.engine import Ctx, FsError
    from pmemfs.serve import control

    ctx = Ctx(0, 0, os.getpid())
    f = engine.create(1, b"f", 0o644, ctx).ino
    engine.write(f, 0, b"x" * 5000)
    d = engine.mkdir(1, b"d", 0o755, ctx).ino
    engine.symlink(1, b"l", b"f", ctx)
    engine.setxattr(f, b"user.x", b"1", 0, ctx)
    engine.remount(True)
    before = region_digest(region)
    kobj = json.dumps({"name": "k", "type": "generic", "size": 4096}).encode()
    changes = {
        "write": lambda: engine.write(f, 0, b"y"),
        "write packed": lambda: engine.write(f, 6000, b"y"),
        "create": lambda: engine.create(1, b"g", 0o644, ctx),
        "mkdir": lambda: engine.mkdir(1, b"e", 0o755, ctx),
        "mknod": lambda: engine.mknod(1, b"n", 0o10644, 0, ctx),
        "symlink": lambda: engine.symlink(1, b"m", b"f", ctx),
        "link": lambda: engine.link(f, 1, b"h", ctx),
        "unlink": lambda: engine.unlink(1, b"f", ctx),
        "rmdir": lambda: engine.rmdir(1, b"d", ctx),
        "rename": lambda: engine.rename(1, b"f", 1, b"g", 0, ctx),
        "truncate": lambda: engine.setattr(f, size=0),
        "chmod": lambda: engine.setattr(f, mode=0o600),
        "utime": lambda: engine.setattr(f, atime_ns=1, mtime_ns=1),
        "setxattr": lambda: engine.setxattr(f, b"user.y", b"2", 0, ctx),
        "removexattr": lambda: engine.removexattr(f, b"user.x", ctx),
        "prealloc": lambda: control.command(engine, f, control.PREALLOC, b"4M", ctx),
        "align": lambda: control.command(engine, d, control.ALIGN, b"1G", ctx),
        "carve": lambda: control.command(engine, f, control.CARVE, json.dumps(
            {"src": "f", "offset": 0, "length": 2 * MiB}).encode(), ctx),
        "lease ro": lambda: control.command(engine, f, control.LEASE, b"ro", ctx),
        "lease rw": lambda: control.command(engine, f, control.LEASE, b"rw", ctx),
        "defrag": lambda: control.command(engine, 1, control.DEFRAG, b"", ctx),
        "kernel create": lambda: control.command(engine, 1, control.KERNEL + b".create", kobj, ctx),
        "kernel freeze": lambda: control.command(engine, 1, control.KERNEL + b".freeze", b"", ctx),
    }
    got = {}
    for what, fn in changes.items():
        try:
            fn()
            got[what] = 0
        except FsError as e:
            got[what] = e.errno
    assert_all_erofs(got)
    engine.read(f, 0, 100)  # reads answer, and write no atime
    engine.readdir(1)
    assert region_digest(region) == before
    engine.remount(False)
    engine.write(f, 0, b"y")
    engine.mkdir(1, b"e", 0o755, ctx)


# ------------------------------------------------------------------ dev, suid, exec
def kernel_outcomes(root: str) -> dict[str, str | bool]:
    """What the kernel lets happen on a filesystem at root: open a device node (1:3, as
    /dev/null), a setuid-root binary run by nobody keeps root as its effective uid, a
    script runs."""
    os.mknod(os.path.join(root, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    shutil.copy("/usr/bin/id", os.path.join(root, "id"))
    os.chown(os.path.join(root, "id"), 0, 0)
    os.chmod(os.path.join(root, "id"), 0o4755)
    with open(os.path.join(root, "run.sh"), "w") as f:
        f.write("#!/bin/sh\necho ran\n")
    os.chmod(os.path.join(root, "run.sh"), 0o755)
    out: dict[str, str | bool] = {}
    try:
        with open(os.path.join(root, "null"), "r+b", buffering=0) as f:
            out["device"] = f"read {f.read(10)!r}, wrote {f.write(b'gone')}"
    except OSError as e:
        out["device"] = errno.errorcode[e.errno]
    # Run as nobody from inside (the way down is root's 0700 test directory).
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "./id"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    out["setuid"] = "euid=0(" in r.stdout if r.returncode == 0 else (
        "EACCES" if "Permission denied" in r.stderr else r.stderr)
    try:
        out["exec"] = subprocess.run(["./run.sh"], cwd=root, capture_output=True, text=True).stdout.strip()
    except PermissionError:
        out["exec"] = "EACCES"
    return out


@pytest.mark.parametrize(("options", "tmpfs_options", "want"), [
    (set(), ["nodev", "nosuid"], {"device": "EACCES", "setuid": False, "exec": "ran"}),
    ({"dev", "suid"}, [], {"device": "read b'', wrote 4", "setuid": True, "exec": "ran"}),
    ({"dev"}, ["nosuid"], {"device": "read b'', wrote 4", "setuid": False, "exec": "ran"}),
    ({"suid", "noexec"}, ["nodev", "noexec"], {"device": "EACCES", "setuid": "EACCES", "exec": "EACCES"}),
], ids=["default", "dev,suid", "dev", "suid,noexec"])
def test_dev_suid_and_exec_as_on_tmpfs(region, mount_factory, tmp_path, options, tmpfs_options, want):
    with tmpfs(str(tmp_path / "tmpfs"), tmpfs_options) as ref:
        assert kernel_outcomes(ref) == want  # what Linux does
        ref_flags = mountinfo_flags(ref)[0]
    m = mount_factory(region, options | {"allow_other"})  # nobody runs the setuid binary
    assert mountinfo_flags(m.path)[0] == ref_flags
    assert kernel_outcomes(m.path) == want


@pytest.mark.parametrize("options", [
    {"ro"}, {"noatime"}, {"strictatime"}, {"nodiratime"}, {"noexec", "nodiratime", "dev"},
    {"ro", "suid", "strictatime", "nodiratime"}])
def test_mount_flags_are_tmpfs_flags(region, mount_factory, tmp_path, options):
    words = sorted(options) + [w for w in ("nodev", "nosuid") if w[2:] not in options]
    with tmpfs(str(tmp_path / "tmpfs"), words) as ref:
        want = mountinfo_flags(ref)[0]
    m = mount_factory(region, options)
    assert mountinfo_flags(m.path)[0] == want


def test_dev_and_suid_are_refused_to_other_users(region, tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    for words in ("dev", "suid", "nodev,suid,ro"):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            os.path.join(BIN, "pmemfs"), "mount", "-o", words, region, str(mp)],
                           capture_output=True, text=True, timeout=60, cwd="/")
        one_line_error(r, "needs root", "nodev,nosuid")
    assert not os.path.ismount(mp) and mounting.region_holder(region) is None


# ------------------------------------------------------------------ noacl
@pytest.mark.parametrize("options, acl", [(set(), True), ({"noacl"}, False)], ids=["acl", "noacl"])
def test_noacl_spares_ls_a_request_per_file(region, mount_factory, options, acl):
    """With ACLs the kernel asks for each inode's access ACL (ls -l asks for it too);
    with -o noacl the first answer, EOPNOTSUPP, stops them all."""
    m = mount_factory(region, options, debug=True)
    for i in range(100):
        with open(m.p(f"f{i}"), "wb"):
            pass
    drop_caches()
    before = m.log().count("b'system.posix_acl_access')")
    subprocess.run(["ls", "-l", m.path], check=True, capture_output=True)
    asked = m.log().count("b'system.posix_acl_access')") - before
    r = subprocess.run(["setfacl", "-m", "u:65534:r", m.p("f0")], capture_output=True, text=True)
    if acl:
        assert asked >= 100 and r.returncode == 0, (asked, r.stderr)
    else:
        assert asked <= 2 and r.returncode != 0 and "not supported" in r.stderr, (asked, r.stderr)


def test_ls_stops_asking_for_selinux_labels(region, mount_factory):
    """On a host without SELinux a missing label is EOPNOTSUPP, so ls asks once, not
    once per file; a label that is there reads back."""
    assert not os.path.isdir("/sys/fs/selinux/booleans")  # what this test is about
    m = mount_factory(region, debug=True)
    for i in range(50):
        with open(m.p(f"f{i}"), "wb"):
            pass
    os.setxattr(m.p("f7"), "security.selinux", b"user_u:object_r:tmp_t:s0\0")
    drop_caches()
    before = m.log().count("getxattr(")
    subprocess.run(["ls", "-l", m.path], check=True, capture_output=True)
    asked = [line for line in m.log().splitlines()[-400:] if "b'security.selinux')" in line]
    assert m.log().count("getxattr(") - before <= 60, "more than one label request a file"
    assert len([a for a in asked if "getxattr(" in a]) <= 3, asked
    assert os.getxattr(m.p("f7"), "security.selinux") == b"user_u:object_r:tmp_t:s0\0"
    with pytest.raises(OSError) as e:
        os.getxattr(m.p("f8"), "security.selinux")
    assert e.value.errno == errno.EOPNOTSUPP
