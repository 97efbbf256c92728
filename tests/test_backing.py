"""The backing runs out before the region does (docs/DESIGN.md, "The backing").

A region stands for reserved memory. mkfs reserves it on tmpfs and hugetlbfs, or
refuses it with what fits; `--sparse` overcommits it, and then the daemon reserves each
block from the backing when it allocates it and gives it back when it is freed, so a
full backing is ENOSPC at the call that needs a block: never SIGBUS, never an OOM kill.
Small tmpfs and hugetlbfs mounts made here stand for a backing smaller than the region.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import assert_clean, new_region_path, wait_for

from pmemfs.fs.engine import Engine, FsError
from pmemfs.fs.placement import prealloc
from pmemfs.media.format import FEATURE_COMPAT_SPARSE, read_superblock
from pmemfs.media.journal import CrashPoints
from pmemfs.media.mkfs import make_filesystem
from pmemfs.media.region import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Region, _fallocate
from pmemfs.serve import supervisor

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BS = 2 * MiB
BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def tmpfs(where: str, size: str = "64m"):
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", where], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        for name in os.listdir(where):
            os.unlink(os.path.join(where, name))
        gc.collect()  # an engine the test used keeps its mapping until its views are garbage
        # A standby the supervisor had just started may still be looking at the region
        # when the mount is gone: it exits on its own within moments.
        if not wait_for(lambda: subprocess.run(["umount", where], capture_output=True).returncode == 0,
                        30, 0.2):
            subprocess.run(["umount", "-l", where], capture_output=True)
            pytest.fail(f"the test's tmpfs at {where} was still busy 30 s after the test")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs: the backing of regions larger than it. Request it before
    mount_factory, so that it is unmounted after every daemon using it."""
    with tmpfs(str(tmp_path / "backing")) as where:
        yield where


def free_of(path: str) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def held(path: str) -> int:
    return os.stat(path).st_blocks * 512


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, tool), *args], capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def block_runs(path: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(used, free) data block runs of a region, in bytes."""
    from pmemfs.media.allocator import BlockAllocator
    from pmemfs.media.format import Tables

    with Region(path, writable=False, lock=False) as r:
        sb, _ = read_superblock(r.buf, r.size)
        g = sb.geometry
        t = Tables(r.buf, sb)
        a = BlockAllocator(t.bitmap, t.badmap, g.offsets["bitmap"], g.block_count, g.data_start_block,
                           g.block_size)
        used = [(s * g.block_size, n * g.block_size) for s, n in zip(*(x.tolist() for x in a.used_runs()),
                                                                     strict=True)]
        free = [(s * g.block_size, n * g.block_size) for s, n in zip(*(x.tolist() for x in a.free_runs()),
                                                                     strict=True)]
        del t, a
    return used, free


def assert_backing_matches_bitmap(path: str) -> None:
    """The invariant of an overcommitted region: every used block is wholly held by the
    backing (no store or load of it can fault), and no free block holds any memory.
    Checked by doing what would change it and seeing that nothing changes: reserving the
    used blocks takes no more memory, punching the free ones gives none back. (mincore
    cannot tell: it counts only pages that were written, not fallocated ones.)"""
    used, free = block_runs(path)
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd).st_blocks * 512
        for start, length in used:
            assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, start, length) == 0
        grew = os.fstat(fd).st_blocks * 512 - before
        assert grew == 0, f"used blocks were not wholly reserved: {grew} bytes missing"
        for start, length in free:
            assert _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length) == 0
        shrank = before - os.fstat(fd).st_blocks * 512
        assert shrank == 0, f"free blocks held {shrank} bytes of memory"
    finally:
        os.close(fd)


# ------------------------------------------------------------------ mkfs
def test_mkfs_on_dev_shm_refuses_a_region_larger_than_its_free_space_in_one_line():
    path = new_region_path()
    try:
        line = one_line_error(run("pmemfs-mkfs", "--size", "1T", path), path, "does not fit in tmpfs /dev/shm",
                              "free", "fits", "--sparse")
        assert not os.path.exists(path), line
        r = run("pmemfs-mkfs", "--sparse", "--json", "--size", "1T", path)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["sparse"] and s["reserved_bytes"] == held(path) < 4 * MiB
        with Region(path, writable=False, lock=False) as reg:
            assert read_superblock(reg.buf, reg.size)[0].feature_compat & FEATURE_COMPAT_SPARSE
        info = json.loads(run("pmemfs", "info", "--json", path).stdout)
        assert info["reservation"].startswith("sparse (overcommitted")
        assert info["backing_held_bytes"] == held(path) and info["backing_free_bytes"] > 0
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_mkfs_says_what_fits_in_a_small_tmpfs(small_tmpfs):
    path = os.path.join(small_tmpfs, "r")
    before = free_of(small_tmpfs)
    line = one_line_error(run("pmemfs-mkfs", "--size", "256M", path),
                          f"does not fit in tmpfs {small_tmpfs}: 64.0 MiB free", "--size 64M fits", "--sparse")
    assert not os.path.exists(path) and free_of(small_tmpfs) == before, line
    # What it said fits, fits: the whole region is reserved, the tmpfs has nothing left.
    r = run("pmemfs-mkfs", "--json", "--size", "64M", path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["reserved_bytes"] == held(path) == 64 * MiB
    assert free_of(small_tmpfs) == 0
    # An existing file is reserved as far as it is not already (here: nothing to add).
    assert run("pmemfs-mkfs", "--force", path).returncode == 0
    info = json.loads(run("pmemfs", "info", "--json", path).stdout)
    assert info["reservation"] == "reserved" and info["backing_held_bytes"] == 64 * MiB


def test_sparse_and_prefault_exclude_each_other_and_sparse_is_for_files(small_tmpfs):
    path = os.path.join(small_tmpfs, "r")
    one_line_error(run("pmemfs-mkfs", "--sparse", "--prefault", "--size", "32M", path), "--prefault", "--sparse")
    assert not os.path.exists(path)


# ------------------------------------------------------------------ a reserved region
def test_a_reserved_region_keeps_its_memory_whatever_else_fills_the_tmpfs(small_tmpfs, mount_factory):
    region = os.path.join(small_tmpfs, "r")
    make_filesystem(region, size=32 * MiB)
    assert held(region) == 32 * MiB
    m = mount_factory(region)
    # Something else takes all the rest of the tmpfs.
    hog = os.path.join(small_tmpfs, "hog")
    with open(hog, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_of(small_tmpfs))
    assert free_of(small_tmpfs) == 0
    st = os.statvfs(m.path)
    free = st.f_bavail * st.f_frsize
    assert free >= 12 * BS  # the data blocks are the region's: statfs still promises them
    # ... and they can all be written, and given back and written again.
    data = os.urandom(free)
    for _ in range(2):
        with open(m.p("all"), "wb") as f:
            f.write(data)
        with open(m.p("all"), "rb") as f:
            assert f.read() == data
        # A punched hole frees blocks for the region's other files, not memory for the host.
        fd = os.open(m.p("all"), os.O_RDWR)
        assert _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * BS) == 0
        os.close(fd)
        assert mount_statfs_free(m.path) == 4 * BS and held(region) == 32 * MiB
        os.unlink(m.p("all"))
        assert wait_for(lambda: mount_statfs_free(m.path) == free, 10)
        assert held(region) == 32 * MiB  # a reserved region never gives memory back
    os.unlink(hog)


# ------------------------------------------------------------------ an overcommitted region
WRITER = r"""
import errno, json, os, sys
path, chunk, fill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 62  # else until an error
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
buf = bytes([fill]) * chunk
written, calls, err = 0, 0, None
while written < limit:
    try:
        n = os.write(fd, buf)
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
    written += n
    calls += 1
os.close(fd)
print(json.dumps({"written": written, "error": err, "calls": calls}))
"""

MAPPER = r"""
import errno, json, mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)  # a hole through the mount: nothing is allocated yet
m = mmap.mmap(fd, size)
for off in range(0, size, 4096):
    m[off] = 0x5A  # the stores land in the mount's page cache, which the kernel writes back
out = {}
for name, call in (("msync", m.flush), ("fsync", lambda: os.fsync(fd))):
    try:
        call()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
m.close()
os.close(fd)
print(json.dumps(out))
"""


def spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    # A negative code is a signal (SIGBUS above all): that must never happen.
    assert proc.returncode == 0, f"client exited with {proc.returncode}: {err[-2000:]}"
    return json.loads(out)


def mount_statfs_free(path: str) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def test_an_overcommitted_region_filled_from_several_processes_gets_enospc_and_its_space_back(
        small_tmpfs, mount_factory):
    region = os.path.join(small_tmpfs, "r")
    make_filesystem(region, size=256 * MiB, sparse=True)
    assert held(region) < 4 * MiB
    m = mount_factory(region)
    daemon = m.pid
    st = os.statvfs(m.path)
    # statfs promises no more than the backing has, in whole blocks, and says so in f_blocks.
    assert mount_statfs_free(m.path) <= free_of(small_tmpfs) // BS * BS
    assert mount_statfs_free(m.path) >= free_of(small_tmpfs) // BS * BS - BS
    assert st.f_blocks * st.f_frsize == mount_statfs_free(m.path)  # nothing used yet
    start_blocks = mount_statfs_free(m.path) // BS
    writers = [spawn(WRITER, m.p(f"w{i}"), 256 << 10, i + 1) for i in range(4)]
    results = [finish(w) for w in writers]
    for r in results:
        assert r["error"] == "ENOSPC", results
    total = sum(r["written"] for r in results)
    # Every block the backing had went into the files: all but each file's last block
    # are full (a file's next block is the one that could not be had).
    assert (start_blocks - 4) * BS <= total <= start_blocks * BS, (total, start_blocks, results)
    assert mount_statfs_free(m.path) < BS
    # The other calls that need a block get ENOSPC too, and nobody gets a signal.
    fd = os.open(m.p("fallocated"), os.O_RDWR | os.O_CREAT, 0o644)
    with pytest.raises(OSError) as e:
        os.posix_fallocate(fd, 0, 16 * MiB)  # fallocate(2) through FUSE: all or nothing
    assert e.value.errno == errno.ENOSPC and os.fstat(fd).st_size == 0
    os.close(fd)
    with open(m.p("prealloc"), "wb"):
        pass
    with pytest.raises(OSError) as e:
        os.setxattr(m.p("prealloc"), "user.pmemfs.prealloc", b"16M")  # `pmemfs prealloc`
    assert e.value.errno == errno.ENOSPC
    fd = os.open(m.p("small"), os.O_WRONLY | os.O_CREAT, 0o644)  # an inode slot is there
    with pytest.raises(OSError) as e:
        os.write(fd, b"a small file needs a pack block")
    assert e.value.errno == errno.ENOSPC
    os.close(fd)
    # A client storing into a shared mapping of a hole: the daemon refuses the write-back
    # with ENOSPC, which the client sees at msync (once: the error is reported once).
    mapped = finish(spawn(MAPPER, m.p("mapped"), 16 * MiB))
    assert mapped == {"msync": "ENOSPC", "fsync": "ok"}, mapped
    # The mount is alive, served by the same daemon, and every file holds what was written.
    assert m.pid == daemon and os.path.ismount(m.path)
    for i, r in enumerate(results):
        with open(m.p(f"w{i}"), "rb") as f:
            data = f.read()
        assert len(data) == r["written"] and data.count(i + 1) == len(data)
    assert os.path.getsize(m.p("fallocated")) == 0
    # Punching a hole (as QEMU does with a guest's freed memory) gives those blocks'
    # memory back to the tmpfs at once, and a write can have it.
    backing_before = free_of(small_tmpfs)
    fd = os.open(m.p("w0"), os.O_RDWR)
    assert _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * BS) == 0
    os.close(fd)
    assert free_of(small_tmpfs) >= backing_before + 4 * BS and mount_statfs_free(m.path) >= 4 * BS
    assert finish(spawn(WRITER, m.p("after-punch"), 1 << 20, 9, 4 * BS))["written"] == 4 * BS
    # Deleting gives the space back: to statfs, to the tmpfs, and to new writes.
    for name in os.listdir(m.path):
        os.unlink(m.p(name))
    assert wait_for(lambda: mount_statfs_free(m.path) >= (start_blocks - 1) * BS, 20), \
        (mount_statfs_free(m.path), start_blocks)
    assert free_of(small_tmpfs) >= (start_blocks - 1) * BS
    again = finish(spawn(WRITER, m.p("again"), 1 << 20, 7, 32 * MiB))
    assert again == {"written": 32 * MiB, "error": None, "calls": 32}
    m.unmount()
    assert_clean(region)
    assert_backing_matches_bitmap(region)


def test_statfs_follows_the_backing_when_something_else_fills_it(small_tmpfs, mount_factory):
    region = os.path.join(small_tmpfs, "r")
    make_filesystem(region, size=256 * MiB, sparse=True)
    other = os.path.join(small_tmpfs, "other")
    make_filesystem(other, size=256 * MiB, sparse=True)
    m = mount_factory(region)
    ro = mount_factory(other, {"ro"}, name="ro")
    hog = os.path.join(small_tmpfs, "hog")
    with open(hog, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 40 * MiB)
    left = free_of(small_tmpfs) // BS * BS
    assert mount_statfs_free(m.path) == left == mount_statfs_free(ro.path)
    fd = os.open(m.p("f"), os.O_WRONLY | os.O_CREAT, 0o644)
    data = bytes(left + BS)
    assert os.write(fd, data) == left  # what fits is stored, as tmpfs does: a short count
    with pytest.raises(OSError) as e:
        os.write(fd, data[left:])
    assert e.value.errno == errno.ENOSPC
    os.close(fd)
    # A read-only mount reserves nothing, and promises no more than the backing has either.
    assert mount_statfs_free(ro.path) == free_of(small_tmpfs) // BS * BS < BS
    os.unlink(hog)
    assert mount_statfs_free(m.path) >= 36 * MiB
    with open(m.p("f"), "ab") as f:
        f.write(bytes(20 * MiB))


def test_an_overcommitted_region_on_hugetlbfs_takes_huge_pages_as_it_needs_them(
        hugetlbfs_factory, mount_factory):
    mnt = hugetlbfs_factory(12)
    region = os.path.join(mnt, "r")
    make_filesystem(region, size=64 * MiB, sparse=True)  # 32 huge pages on a pool of 12
    pool = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

    def pool_free() -> int:
        with open(pool) as f:
            return int(f.read())

    m = mount_factory(region)
    before = pool_free()
    result = finish(spawn(WRITER, m.p("f"), 1 << 20, 3))
    assert result["error"] == "ENOSPC" and result["written"] >= (before - 1) * BS, (result, before)
    with open(m.p("f"), "rb") as f:
        assert f.read().count(3) == result["written"]
    os.unlink(m.p("f"))
    assert wait_for(lambda: pool_free() >= before, 20), (pool_free(), before)
    m.unmount()
    assert_clean(region)


def test_prefault_of_an_overcommitted_region_populates_only_the_blocks_in_use(small_tmpfs, mount_factory):
    region = os.path.join(small_tmpfs, "r")
    make_filesystem(region, size=256 * MiB, sparse=True)
    with contextlib.closing(Engine(region)) as e:
        ino = e.create(1, b"f", 0o100644).ino
        e.write(ino, 0, b"x" * (3 * BS))
    before = held(region)
    m = mount_factory(region, {"prefault"})
    assert held(region) == before  # the used blocks were reserved already: nothing more
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"x" * (3 * BS)


# ------------------------------------------------------------------ the engine, exactly
@pytest.mark.parametrize("sparse", [True, False])
def test_a_recycled_block_reads_as_zeros_where_nobody_wrote(region_factory, sparse):
    region = region_factory(size=64 * MiB, sparse=sparse)
    with contextlib.closing(Engine(region)) as e:
        assert e.sparse == sparse
        # Every data block holds old bytes once, so the new file can only get recycled ones.
        old = e.create(1, b"old", 0o100644).ino
        e.write(old, 0, b"\xaa" * (e.alloc.free * BS))
        assert e.alloc.free == 0
        e.unlink(1, b"old")
        new = e.create(1, b"new", 0o100644).ino
        # Past the end of every block it gets, in the middle of a block, with a hole before.
        e.write(new, 3 * BS + 12345, b"y")
        e.truncate(new, 5 * BS)
        data = bytes(e.read(new, 0, 5 * BS))
        assert data[3 * BS + 12345] == ord("y")
        assert data.count(0) == len(data) - 1
        if sparse:
            assert_backing_matches_bitmap(region)
        else:
            assert held(region) == 64 * MiB


def test_tables_grow_into_the_backing_or_get_enospc(small_tmpfs):
    region = os.path.join(small_tmpfs, "r")
    make_filesystem(region, size=256 * MiB, sparse=True)
    with contextlib.closing(Engine(region)) as e:
        big = e.create(1, b"big", 0o100644).ino
        with pytest.raises(FsError) as err:
            while True:
                e.write(big, int(e.stat(big).size), b"z" * BS)
        assert err.value.errno == errno.ENOSPC
        assert e.alloc.free > 90  # the bitmap has blocks; the backing has none
        for call in (lambda: e.kernel.create("state", "device-state", BS),
                     lambda: prealloc(e, big, 40 * BS)):
            with pytest.raises(FsError) as err:
                call()
            assert err.value.errno == errno.ENOSPC
        # The inode table's next records need memory too: the create that needs them fails.
        made = 0
        with pytest.raises(FsError) as err:
            while made < 100_000:
                e.create(1, b"n%d" % made, 0o100644)
                made += 1
        assert err.value.errno == errno.ENOSPC and made < 100_000
        for i in range(made):
            e.unlink(1, b"n%d" % i)
        e.unlink(1, b"big")
        assert e.statfs()["blocks_free"] >= 25
    assert_clean(region)
    assert_backing_matches_bitmap(region)


def _crashing_work(path: str, crash_at: int) -> None:
    e = Engine(path, crash=CrashPoints(crash_at))
    ino = e.lookup(1, b"keep")
    e.write(ino, 5 * BS + 100, b"k" * (3 * BS))  # allocates (reserves) 4 blocks
    e.unlink(1, b"drop")  # frees 6 blocks (given back after its commit)
    e.truncate(ino, BS + 7)  # frees blocks of a file still in use
    e.close()


def test_a_kill_at_any_step_leaves_no_memory_with_a_free_block(region_factory):
    """kill -9 at every journal step of allocating, unlinking and truncating: after the
    next mount every used block is reserved and no free block holds memory, whether the
    kill came before a reservation was committed or before a release was made."""
    template = region_factory(size=64 * MiB, sparse=True)
    with contextlib.closing(Engine(template)) as e:
        for name, blocks in ((b"keep", 2), (b"drop", 6)):
            ino = e.create(1, name, 0o100644).ino
            e.write(ino, 0, name[:1] * (blocks * BS))
    path = region_factory(size=64 * MiB, sparse=True)
    for step in range(1, 1000):
        os.unlink(path)
        # A copy holding exactly what the template holds (its used blocks are all written).
        subprocess.run(["cp", "--sparse=always", template, path], check=True)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                _crashing_work(path, step)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, -signal.SIGKILL), f"step {step}: the child failed with {code}"
        Engine(path).close()  # recovery; the memory of free blocks goes back
        assert_clean(path)
        assert_backing_matches_bitmap(path)
        if code == 0:
            break
    else:
        pytest.fail("the work never finished")
    assert step > 10, step


# ------------------------------------------------------------------ memory pressure
def _can_lower_oom_score_adj() -> bool:
    """Can a process here lower its oom_score_adj (CAP_SYS_RESOURCE)? Asked in a child."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if supervisor.set_oom_score_adj(-1) else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_the_supervisor_and_the_daemon_ask_the_oom_killer_to_pass_them_by(region, mount_factory):
    m = mount_factory(region)

    def adj(pid: int) -> int:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            return int(f.read())

    from conftest import children

    # The daemon, and its standby once the supervisor has started the next one.
    assert wait_for(lambda: len(children(m.proc.pid)) >= 2, 30), children(m.proc.pid)
    daemons = children(m.proc.pid)
    assert m.pid in daemons
    if _can_lower_oom_score_adj():
        assert adj(m.proc.pid) == supervisor.OOM_SCORE_ADJ_SUPERVISOR == -1000
        assert supervisor.OOM_SCORE_ADJ_DAEMON == -900
        # (a standby just started inherits -1000 until it sets its own, at once)
        assert wait_for(lambda: all(adj(p) == -900 for p in children(m.proc.pid)), 30), \
            [adj(p) for p in children(m.proc.pid)]
    else:
        # This machine withholds CAP_SYS_RESOURCE even from root (a sandbox): each
        # keeps what it inherited, and says so in the log instead of failing the mount.
        mine = adj(os.getpid())
        assert adj(m.proc.pid) == mine and all(adj(p) == mine for p in daemons)
        log = m.log()
        assert "cannot set oom_score_adj to -1000" in log and "the OOM killer may choose the supervisor" in log
        assert "cannot set oom_score_adj to -900" in log and "the OOM killer may choose the daemon" in log
