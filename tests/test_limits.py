"""Limits the format implies: the largest file size (s_maxbytes) and the time range.

Every boundary is tried in the engine and through a real mount; after each, the region
must pass fsck and mount again. Where Linux defines the outcome, tmpfs is asked too: its
own limit is 2^63 - 1 (where a crossing write overflows loff_t and is EINVAL), so its
*shape* at a limit is measured with RLIMIT_FSIZE, which the kernel enforces in the same
function (generic_write_check_limits) and the same way as s_maxbytes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import assert_clean

from pmemfs.fs import placement
from pmemfs.fs.engine import Engine, FsError, MountError
from pmemfs.media.format import (
    BLOCK_1G,
    BLOCK_2M,
    BLOCK_SIZES,
    LOFF_MAX,
    TIME_MAX_S,
    TIME_MIN_S,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    max_file_blocks,
    max_file_size,
    seal,
)
from pmemfs.media.region import Region
from pmemfs.tools.fsck import check_region, fsck

BIN = os.path.dirname(sys.executable)
M2 = 2**63 - 2**21  # s_maxbytes with 2 MiB blocks
M1G = 2**63 - 2**30  # with 1 GiB blocks
BS = BLOCK_2M


def err(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except FsError as e:
        return e.errno
    except OSError as e:
        return e.errno
    return 0


@contextmanager
def tables(path: str):
    with Region(path) as r:
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        yield t, sb
        del t


def set_fields(path: str, table: str, idx: int, **kw) -> None:
    with tables(path) as (t, _):
        arr = getattr(t, table + "s")
        for k, v in kw.items():
            arr[k][idx] = v
        seal(arr, idx)


def extent_slots(path: str, owner: int) -> list[int]:
    with tables(path) as (t, sb):
        used = t.extents["owner"][: sb.hwm["extent"]]
        return [int(i) for i in np.flatnonzero(used == owner)]


def errors(path: str) -> list[str]:
    return [f.message for f in check_region(path) if f.severity == "error"]


def mount_refusal(path: str) -> str:
    with pytest.raises(MountError) as exc:
        Engine(path)
    return str(exc.value)


# ------------------------------------------------------------------ the numbers
def test_max_file_size_is_derived_from_the_fields():
    assert max_file_size(BLOCK_2M) == M2 == 9_223_372_036_852_678_656
    assert max_file_size(BLOCK_1G) == M1G == 9_223_372_035_781_033_984
    for bs in BLOCK_SIZES:
        n = max_file_blocks(bs)
        # The end of every block a file can own is a valid loff_t; one more block's would not.
        assert n * bs <= LOFF_MAX < (n + 1) * bs
        assert max_file_size(bs) == n * bs
        assert n < 2**64  # extent.file_block (u64) holds every file block
    assert Geometry.plan(64 << 20, BS).max_file_size == M2


def test_extent_length_cannot_overflow_its_u32():
    """extent.count is a u32: the extent table (u32 indices, a record per block) keeps a
    region below 2^32 blocks, so no run of blocks, and no merged extent, can exceed it."""
    limit_blocks = 2**32 - 4096 - 2
    Geometry.plan(limit_blocks * BS, BS, inodes=4096)  # the largest region that fits: fine
    with pytest.raises(FormatError, match="too large"):
        Geometry.plan((limit_blocks + 1) * BS, BS, inodes=4096)
    with pytest.raises(FormatError, match="too large"):
        Geometry.plan(2**32 * BS, BS)


# -------------------------------------------------------------- engine, no FUSE
def test_engine_last_byte_and_one_past(region_factory):
    path = region_factory()
    e = Engine(path)
    ino = e.create(1, b"f", 0o644).ino
    assert e.max_file_size == M2
    assert e.write(ino, M2 - 1, b"x") == 1  # the last valid byte
    assert bytes(e.read(ino, M2 - 2, 10)) == b"\0x"
    st = e.stat(ino)
    assert st.size == M2 and st.blocks == BS // 512
    assert e.extents(ino)[0][0] == max_file_blocks(BS) - 1  # the last file block
    assert e.write(ino, M2 - 1, b"yz") == 1  # crosses the limit: short, as the kernel does
    for off in (M2, M2 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64, 2**64 + 5, 2**70):
        assert err(e.write, ino, off, b"x") == errno.EFBIG, off  # no OverflowError anywhere
    assert e.write(ino, 2**70, b"") == 0  # an empty write is 0, as write(2) with count 0
    assert e.stat(ino).size == M2
    e.close()
    assert errors(path) == []
    e = Engine(path)  # remounts, and the byte is there
    assert bytes(e.read(ino, M2 - 1, 1)) == b"y"
    e.truncate(ino, 0)
    e.close()
    assert_clean(path)


def test_engine_truncate_and_setattr_at_the_limit(region_factory):
    path = region_factory()
    e = Engine(path)
    ino = e.create(1, b"f", 0o644).ino
    free = e.alloc.free
    e.truncate(ino, M2)  # sparse: allocates nothing
    assert e.stat(ino).size == M2 and e.stat(ino).blocks == 0 and e.alloc.free == free
    for size in (M2 + 1, 2**63 - 1, 2**63, 2**64, 2**80):
        assert err(e.truncate, ino, size) == errno.EFBIG, size
        assert err(e.setattr, ino, size=size) == errno.EFBIG, size
    assert e.stat(ino).size == M2
    assert err(e.truncate, ino, -1) == errno.EINVAL
    e.setattr(ino, size=M2 - 1)
    assert e.stat(ino).size == M2 - 1
    # A packed small file grown to the limit stays sparse too.
    small = e.create(1, b"small", 0o644).ino
    e.write(small, 0, b"abc")
    e.truncate(small, M2)
    assert bytes(e.read(small, 0, 4)) == b"abc\0" and e.stat(small).size == M2
    assert e.write(small, M2 - 1, b"!") == 1  # moves it to whole blocks, at the far end
    assert bytes(e.read(small, 0, 3)) == b"abc" and bytes(e.read(small, M2 - 1, 5)) == b"!"
    e.close()
    assert_clean(path)
    Engine(path).close()


def test_prealloc_and_kernel_objects_refuse_past_the_limit(region_factory):
    path = region_factory()
    e = Engine(path)
    ino = e.create(1, b"f", 0o644).ino
    assert err(placement.prealloc, e, ino, M2 + 1) == errno.EFBIG
    assert err(placement.prealloc, e, ino, 2**64) == errno.EFBIG
    assert err(placement.prealloc, e, ino, M2) == errno.ENOSPC  # a valid size, just no room
    assert err(e.kernel.create, "big", "dma-buffer", M2 + 1) == errno.EFBIG
    assert err(e.kernel.create, "big", "dma-buffer", M2) == errno.ENOSPC
    e.close()
    assert_clean(path)


def test_one_gib_blocks_limit(region_factory):
    path = region_factory(size=3 << 30, block_size=BLOCK_1G)
    e = Engine(path)
    ino = e.create(1, b"f", 0o644).ino
    assert e.max_file_size == M1G
    e.truncate(ino, M1G)
    assert e.stat(ino).blocks == 0
    assert err(e.truncate, ino, M1G + 1) == errno.EFBIG
    assert err(e.write, ino, M1G, b"x") == errno.EFBIG
    assert err(e.write, ino, M2, b"x") == errno.EFBIG  # fine at 2 MiB blocks, not here
    e.close()
    assert_clean(path)


# ------------------------------------------------- fsck and mount agree on validity
@pytest.fixture
def far_file(region_factory):
    """A region whose file f holds one byte at the last valid offset."""
    path = region_factory()
    e = Engine(path)
    ino = e.create(1, b"f", 0o644).ino
    e.write(ino, M2 - 1, b"x")
    e.close()
    return path, ino


def test_a_file_at_the_limit_is_valid_for_both(far_file):
    path, ino = far_file
    assert errors(path) == [] and fsck(path, "n").exit_code == 0
    e = Engine(path)
    assert bytes(e.read(ino, M2 - 1, 1)) == b"x"
    e.close()


def agree_and_repair(path: str, code: str) -> str:
    """Mount refuses with the first error fsck reports; fsck -y repairs; both accept."""
    found = [f for f in fsck(path, "n").findings if f.severity == "error"]
    assert code in {f.code for f in found}, [f.as_dict() for f in found]
    refusal = mount_refusal(path)
    assert found[0].message in refusal, (refusal, found[0].message)
    assert fsck(path, "y").exit_code == 1
    assert fsck(path, "n").exit_code == 0 and errors(path) == []
    Engine(path).close()
    return found[0].message


def test_size_past_the_limit_rejected_by_both(far_file):
    path, ino = far_file
    set_fields(path, "inode", ino, size=M2 + 1)
    msg = agree_and_repair(path, "size-too-big")
    assert f"size {M2 + 1}, past the largest file size {M2}" in msg
    e = Engine(path)
    assert e.stat(ino).size == M2 and bytes(e.read(ino, M2 - 1, 1)) == b"x"  # the repair keeps the data
    e.close()


@pytest.mark.parametrize("size", [2**63, 2**64 - 1])
def test_size_not_a_loff_t_rejected_by_both(far_file, size):
    path, ino = far_file
    set_fields(path, "inode", ino, size=size)
    agree_and_repair(path, "size-too-big")


@pytest.mark.parametrize("file_block", [
    max_file_blocks(BS),  # one block past the limit
    2**63 - 1,  # would wrap a signed sum
    2**64 - 1,  # the u64 maximum
])
def test_extent_file_offset_past_the_limit_rejected_by_both(far_file, file_block):
    path, ino = far_file
    (slot,) = extent_slots(path, ino)
    set_fields(path, "extent", slot, file_block=file_block)
    set_fields(path, "inode", ino, size=M2)  # the size alone stays valid
    msg = agree_and_repair(path, "bad-extent")
    assert f"file block {file_block}" in msg


@pytest.mark.parametrize("start_block", [2**63 - 1, 2**64 - 1, 2**63])
def test_block_number_overflow_rejected_by_both(far_file, start_block):
    """A region block number near 2^63 or 2^64 must not wrap past the bounds check."""
    path, ino = far_file
    (slot,) = extent_slots(path, ino)
    set_fields(path, "extent", slot, start_block=start_block)
    agree_and_repair(path, "bad-extent")


@pytest.mark.parametrize("count", [0, 2**32 - 1])
def test_extent_length_field_rejected_by_both(far_file, count):
    path, ino = far_file
    (slot,) = extent_slots(path, ino)
    set_fields(path, "extent", slot, count=count)
    agree_and_repair(path, "bad-extent")


# ------------------------------------------------------------ through a real mount
def _fsize_shape(path: str, limit: int) -> dict:
    """What writes and truncates do at `limit` on `path`'s filesystem, measured in a
    child with RLIMIT_FSIZE = limit (or no rlimit when limit is that fs's s_maxbytes)."""
    code = f"""
import json, os, resource, signal, sys
limit, use_rlimit = {limit}, {int(limit < 2**40)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if use_rlimit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o644)
out = {{}}
def run(name, fn):
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = os.strerror(e.errno)
run("last", lambda: os.pwrite(fd, b"x", limit - 1))
run("cross", lambda: os.pwrite(fd, b"yz", limit - 1))
run("at", lambda: os.pwrite(fd, b"x", limit))
run("past", lambda: os.pwrite(fd, b"x", limit + 4096))
run("truncate_at", lambda: os.ftruncate(fd, limit) or 0)
run("truncate_past", lambda: os.ftruncate(fd, limit + 1) or 0)
run("size", lambda: os.fstat(fd).st_size)
run("read_back", lambda: os.pread(fd, 4, limit - 1).decode())
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_mount_limit_behaves_as_the_kernel_limit_on_tmpfs(mounted):
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="pmemfs-test-") as tf:
        tmpfs = _fsize_shape(tf.name, 1 << 30)
    ours = _fsize_shape(mounted.p("f"), M2)
    expected = {"last": 1, "cross": 1, "at": "File too large", "past": "File too large",
                "truncate_at": 0, "truncate_past": "File too large", "read_back": "y"}
    assert {k: tmpfs[k] for k in expected} == expected, tmpfs
    assert {k: ours[k] for k in expected} == expected, ours
    assert tmpfs["size"] == 1 << 30 and ours["size"] == M2


def test_mount_write_at_the_largest_offsets(mounted):
    """The issue's pwrite(fd, b"x", 2**63 - 2) is EFBIG and leaves the region sound."""
    fd = os.open(mounted.p("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert err(os.pwrite, fd, b"x", 2**63 - 2) == errno.EFBIG
        assert err(os.pwrite, fd, b"x", M2) == errno.EFBIG
        assert os.fstat(fd).st_size == 0
        assert os.pwrite(fd, b"x", M2 - 1) == 1
        assert os.pread(fd, 2, M2 - 2) == b"\0x"
        st = os.fstat(fd)
        assert st.st_size == M2 and st.st_blocks == BS // 512
        assert err(os.pwrite, fd, b"x", 2**63 - 1) == errno.EINVAL  # loff_t overflow: the VFS says so
    finally:
        os.close(fd)
    open(mounted.p("g"), "w").close()
    os.truncate(mounted.p("g"), M2)
    assert os.stat(mounted.p("g")).st_blocks == 0
    assert err(os.truncate, mounted.p("g"), M2 + 1) == errno.EFBIG
    mounted.unmount()
    assert_clean(mounted.region)
    assert fsck(mounted.region, "n").exit_code == 0
    mounted.start()
    with open(mounted.p("f"), "rb") as f:
        f.seek(M2 - 1)
        assert f.read() == b"x"
    assert os.stat(mounted.p("g")).st_size == M2


def test_prealloc_cli_past_the_limit(mounted):
    r = subprocess.run([os.path.join(BIN, "pmemfs"), "prealloc", mounted.p("f"), str(M2 + 1)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.stat(mounted.p("f")).st_size == 0


def test_info_reports_the_limit(region):
    r = subprocess.run([os.path.join(BIN, "pmemfs"), "info", "--json", region],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_file_size"] == M2


def test_rlimit_is_enforced_by_the_kernel_not_us(mounted):
    """RLIMIT_FSIZE is the kernel's business on FUSE too (checked before the request)."""
    shape = _fsize_shape(mounted.p("r"), 1 << 20)
    assert shape["cross"] == 1 and shape["at"] == "File too large" and shape["size"] == 1 << 20



# ------------------------------------------------------------------- timestamps
TMAX = TIME_MAX_S * 10**9  # 2262-04-11 23:47:16 UTC
TMIN = TIME_MIN_S * 10**9  # 1677-09-21 00:12:44 UTC
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
CLAMPS = [
    # (given, stored): inside the range a time is kept to the nanosecond; at or past
    # either end it is that end's whole second, as the kernel's timestamp_truncate does.
    (0, 0), (-1, -1), (1, 1),
    (TMAX - 1, TMAX - 1), (TMAX, TMAX), (2**63 - 1, TMAX), (2**63, TMAX), (2**70, TMAX),
    ((2**63 - 1) * 10**9, TMAX),
    (TMIN + 10**9 + 5, TMIN + 10**9 + 5), (TMIN + 1, TMIN), (TMIN, TMIN), (-2**63, TMIN),
    (-2**63 - 1, TMIN), (-2**70, TMIN), (-(2**63) * 10**9, TMIN),
]


def test_time_range_constants():
    assert (TIME_MIN_S, TIME_MAX_S) == (-9_223_372_036, 9_223_372_036)
    assert TMIN >= -2**63 and TMAX <= 2**63 - 1  # both ends fit the i64 field
    assert TMAX + 10**9 > 2**63 - 1 and TMIN - 10**9 < -2**63  # one more second would not


@pytest.mark.parametrize(("given", "stored"), CLAMPS)
def test_engine_clamps_times(engine, given, stored):
    ino = engine.create(1, b"f", 0o644).ino
    st = engine.setattr(ino, atime_ns=given, mtime_ns=given, ctime_ns=given)
    assert (st.atime_ns, st.mtime_ns, st.ctime_ns) == (stored, stored, stored)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if _libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def test_mount_clamps_times_where_tmpfs_keeps_them(mounted):
    """tmpfs keeps 64-bit seconds; pmemfs stores 64-bit nanoseconds and clamps, with no
    error and nothing in the daemon's log (the finalizer checks there is no traceback)."""
    ours = mounted.p("f")
    open(ours, "w").close()
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="pmemfs-test-") as tf:
        for given, stored in CLAMPS:
            os.utime(ours, ns=(given, given))
            st = os.stat(ours)
            assert (st.st_atime_ns, st.st_mtime_ns) == (stored, stored), given
            os.utime(tf.name, ns=(given, given))
            assert os.stat(tf.name).st_mtime_ns == given  # tmpfs: any 64-bit seconds
        for sec in (2**63 - 1, -(2**63)):  # time_t's own ends, straight to utimensat
            utimensat(ours, (sec, 0), (sec, 999_999_999))
            st = os.stat(ours)
            assert st.st_atime_ns == st.st_mtime_ns == (TMAX if sec > 0 else TMIN)
    # What the daemon stored is what a new mount serves.
    mounted.restart()
    assert os.stat(ours).st_mtime_ns == TMIN


@pytest.mark.parametrize(("date", "stored"), [
    ("3000-01-01 00:00:00 UTC", TMAX), ("2262-04-11 23:47:16 UTC", TMAX),
    ("2262-04-11 23:47:15.5 UTC", TMAX - 500_000_000), ("2262-04-11 23:47:17 UTC", TMAX),
    ("1000-01-01 00:00:00 UTC", TMIN), ("1677-09-21 00:12:43 UTC", TMIN),
    ("1677-09-21 00:12:44 UTC", TMIN), ("1677-09-21 00:12:45 UTC", TMIN + 10**9),
])
def test_touch_d_extreme_dates(mounted, date, stored):
    path = mounted.p("f")
    r = subprocess.run(["touch", "-d", date, path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    st = os.stat(path)
    assert st.st_mtime_ns == stored and st.st_atime_ns == stored


def test_utime_now_and_omit(mounted):
    path = mounted.p("f")
    open(path, "w").close()
    os.utime(path, ns=(2**70, -2**70))
    before = time.time_ns()
    utimensat(path, (0, UTIME_NOW), (2**62, UTIME_OMIT))  # atime now, mtime untouched
    st = os.stat(path)
    assert before - 10**9 <= st.st_atime_ns <= time.time_ns() + 10**9
    assert st.st_mtime_ns == TMIN
    utimensat(path, (2**62, UTIME_OMIT), (-(2**62), 0))  # atime untouched, mtime clamped
    st2 = os.stat(path)
    assert st2.st_atime_ns == st.st_atime_ns and st2.st_mtime_ns == TMIN
    utimensat(path, (2**62, 0), (0, UTIME_NOW))
    st3 = os.stat(path)
    assert st3.st_atime_ns == TMAX and abs(st3.st_mtime_ns - before) < 10**9  # the kernel's coarse clock
    assert err(utimensat, path, (0, 10**9), (0, 0)) == errno.EINVAL  # the kernel's check
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="pmemfs-test-") as tf:
        assert err(utimensat, tf.name, (0, 10**9), (0, 0)) == errno.EINVAL


def test_directories_and_symlinks_clamp_too(mounted):
    os.mkdir(mounted.p("d"))
    os.symlink("d", mounted.p("s"))
    os.utime(mounted.p("d"), ns=(2**70, -2**70))
    os.utime(mounted.p("s"), ns=(-2**70, 2**70), follow_symlinks=False)
    assert os.stat(mounted.p("d")).st_mtime_ns == TMIN
    st = os.lstat(mounted.p("s"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (TMIN, TMAX)
    mounted.unmount()
    assert_clean(mounted.region)
    mounted.start()
    assert os.lstat(mounted.p("s")).st_mtime_ns == TMAX


def test_info_reports_the_time_range(region):
    r = subprocess.run([os.path.join(BIN, "pmemfs"), "info", "--json", region],
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["time_range"] == "1677-09-21 00:12:44 UTC .. 2262-04-11 23:47:16 UTC"
