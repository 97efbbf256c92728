"""fallocate(2) modes and SEEK_DATA/SEEK_HOLE, through a real mount and on the engine.

pyfuse3 has neither handler; pmemfs installs them into libfuse's session
(pmemfs.serve.session.install_operations). Where Linux defines the outcome, the file on
pmemfs is compared with the same file on tmpfs (/dev/shm) after the same calls: the
results (value or errno), the size and every byte. Hole positions are not compared
(tmpfs has 4 KiB pages, pmemfs 2 MiB blocks); what SEEK_DATA/SEEK_HOLE answer is
checked against the bytes instead: nothing skipped over holds data.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from conftest import assert_clean
from hypothesis import HealthCheck, given, settings

from pmemfs.fs import holes
from pmemfs.fs.engine import Engine, FsError

MiB = 1 << 20
BS = 2 * MiB
KEEP, PUNCH, ZERO, COLLAPSE = 0x01, 0x02, 0x10, 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def used_blocks(mp: str) -> int:
    st_ = os.statvfs(mp)
    return (st_.f_blocks - st_.f_bfree) * st_.f_frsize // BS


def check_seek(fd: int, data: bytes, offsets: list[int]) -> None:
    """SEEK_DATA and SEEK_HOLE answers agree with the bytes (holes read as zeros)."""
    size = len(data)
    for off in offsets:
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            try:
                got = os.lseek(fd, off, whence)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                assert off >= size or (whence == os.SEEK_DATA and not any(data[off:])), (off, whence)
                continue
            assert off < size and off <= got <= size, (off, whence, got, size)
            if whence == os.SEEK_DATA:
                assert not any(data[off:got]), f"SEEK_DATA({off}) = {got} skipped data"
            else:
                nxt = size
                try:
                    nxt = os.lseek(fd, got, os.SEEK_DATA) if got < size else size
                except OSError:
                    pass
                assert not any(data[got:nxt]), f"SEEK_HOLE({off}) = {got}: a 'hole' holds data"


offsets = st.sampled_from([0, 1, 4095, 4096, BS - 1, BS, BS + 4096, 2 * BS - 1, 2 * BS, 3 * BS + 5]) | \
    st.integers(0, 4 * BS)
lengths = st.sampled_from([1, 4096, BS - 4096, BS, BS + 1, 2 * BS]) | st.integers(1, 2 * BS)
op = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 64 << 10), st.integers(0, 255)),
    st.tuples(st.just("falloc"), offsets, lengths, st.sampled_from([0, KEEP, PUNCH | KEEP])),
    st.tuples(st.just("truncate"), offsets),
)


@pytest.fixture
def side_by_side(mounted):
    tmp = tempfile.mkdtemp(dir="/dev/shm", prefix="pmemfs-test-tmpfs-")
    yield mounted, tmp
    shutil.rmtree(tmp)


def test_modes_match_tmpfs(side_by_side):
    m, tmp = side_by_side

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(op, min_size=1, max_size=12))
    def run(ops):
        fds = [os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for d in (m.path, tmp)]
        try:
            for o in ops:
                results = []
                for fd in fds:
                    if o[0] == "write":
                        results.append(os.pwrite(fd, bytes([o[3]]) * o[2], o[1]))
                    elif o[0] == "falloc":
                        results.append(fallocate(fd, o[3], o[1], o[2]))
                    else:
                        os.ftruncate(fd, o[1])
                        results.append(None)
                assert results[0] == results[1], (o, results)
                sizes = [os.fstat(fd).st_size for fd in fds]
                assert sizes[0] == sizes[1], (o, sizes)
            data = [os.pread(fd, sizes[0] + 1, 0) for fd in fds]
            assert data[0] == data[1], "contents differ"
            check_seek(fds[0], data[0], sorted({0, 1, BS - 1, BS, BS + 1, 3 * BS, sizes[0] // 2,
                                                max(0, sizes[0] - 1), sizes[0]}))
        finally:
            for fd in fds:
                os.close(fd)
            os.unlink(os.path.join(m.path, "f"))
            os.unlink(os.path.join(tmp, "f"))

    run()


def test_punch_gives_blocks_back_and_a_mapping_sees_zeros(mounted):
    mp = mounted.path
    before = used_blocks(mp)
    fd = os.open(os.path.join(mp, "ram"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert fallocate(fd, 0, 0, 4 * BS) == 0  # as QEMU preallocates guest RAM
        assert os.fstat(fd).st_size == 4 * BS and used_blocks(mp) == before + 4
        with mmap.mmap(fd, 4 * BS, mmap.MAP_SHARED) as ram:
            for i in range(4 * BS // 4096):
                ram[i * 4096:i * 4096 + 8] = i.to_bytes(8, "little")
            ram.flush()
            # The guest gives back two blocks and a page: QEMU punches the RAM file.
            assert fallocate(fd, PUNCH | KEEP, BS, 2 * BS + 4096) == 0
            assert used_blocks(mp) == before + 2  # whole blocks went back; the page is zeroed
            assert os.fstat(fd).st_size == 4 * BS and os.fstat(fd).st_blocks == 2 * BS // 512
            for i in range(4 * BS // 4096):
                want = bytes(8) if BS <= i * 4096 < 3 * BS + 4096 else i.to_bytes(8, "little")
                assert ram[i * 4096:i * 4096 + 8] == want, i
            assert os.lseek(fd, 0, os.SEEK_HOLE) == BS and os.lseek(fd, BS, os.SEEK_DATA) == 3 * BS
            ram[BS:BS + 5] = b"again"  # touching freed memory allocates it again
            ram.flush()
        assert used_blocks(mp) == before + 3
        assert os.pread(fd, 5, BS) == b"again" and os.pread(fd, 8, BS + 4096) == bytes(8)
    finally:
        os.close(fd)
    mounted.unmount()
    assert_clean(mounted.region)


def test_allocation_is_all_or_nothing_and_keep_size_allocates_past_the_end(mounted):
    mp = mounted.path
    fd = os.open(os.path.join(mp, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 100, 0)
        free = os.statvfs(mp).f_bfree
        assert fallocate(fd, 0, 0, 1 << 40) == errno.ENOSPC
        assert os.fstat(fd).st_size == 100 and os.statvfs(mp).f_bfree == free  # nothing done
        assert fallocate(fd, KEEP, BS, 2 * BS) == 0
        assert os.fstat(fd).st_size == 100 and os.fstat(fd).st_blocks >= 2 * BS // 512
        os.ftruncate(fd, 3 * BS)  # the allocated blocks read as zeros once inside the size
        assert os.pread(fd, 3 * BS, 0) == b"x" * 100 + bytes(3 * BS - 100)
        assert fallocate(fd, ZERO, 50, 10) == 0  # ZERO_RANGE, which tmpfs lacks
        assert os.pread(fd, 100, 0) == b"x" * 50 + bytes(10) + b"x" * 40
        assert fallocate(fd, ZERO, 3 * BS, 4096) == 0 and os.fstat(fd).st_size == 3 * BS + 4096
        assert fallocate(fd, PUNCH, 0, 10) == errno.EOPNOTSUPP  # PUNCH_HOLE needs KEEP_SIZE
        assert fallocate(fd, COLLAPSE, 0, BS) == errno.EOPNOTSUPP
        assert fallocate(fd, 0, -1, 10) == errno.EINVAL and fallocate(fd, 0, 0, 0) == errno.EINVAL
    finally:
        os.close(fd)
    ro = os.open(os.path.join(mp, "f"), os.O_RDONLY)
    try:
        assert fallocate(ro, 0, 0, 10) == errno.EBADF  # the kernel checks the open mode
    finally:
        os.close(ro)


def test_handlers_survive_a_daemon_kill(mounted):
    fd = os.open(os.path.join(mounted.path, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert fallocate(fd, 0, 0, 2 * BS) == 0
        mounted.crash()  # the standby takes the connection over and installs them again
        assert fallocate(fd, PUNCH | KEEP, 0, BS) == 0
        assert os.lseek(fd, 0, os.SEEK_DATA) == BS
    finally:
        os.close(fd)


def test_small_packed_files(mounted):
    """A small file lives in pack chunks: allocation keeps it there, punching zeroes."""
    fd = os.open(os.path.join(mounted.path, "small"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * 10000, 0)
        assert fallocate(fd, 0, 0, 20000) == 0 and os.fstat(fd).st_size == 20000
        assert fallocate(fd, PUNCH | KEEP, 100, 5000) == 0
        assert os.pread(fd, 20001, 0) == b"a" * 100 + bytes(5000) + b"a" * 4900 + bytes(10000)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 20000  # chunks count as data
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the engine
def test_engine_punch_splits_extents_and_stays_consistent(region):
    e = Engine(region)
    try:
        ino = e.create(1, b"f", 0o644).ino
        holes.fallocate(e, ino, 0, 0, 10 * BS)
        assert len(e.extents(ino)) == 1
        holes.fallocate(e, ino, PUNCH | KEEP, 3 * BS, 2 * BS)  # the middle of one extent
        assert [(f, n) for f, _, n in e.extents(ino)] == [(0, 3), (5, 5)]
        holes.fallocate(e, ino, PUNCH | KEEP, 0, BS)  # the front
        holes.fallocate(e, ino, PUNCH | KEEP, 9 * BS, 5 * BS)  # the back, past the end too
        assert [(f, n) for f, _, n in e.extents(ino)] == [(1, 2), (5, 4)]
        assert int(e.I["nblocks"][ino]) == 6
        assert holes.seek(e, ino, 0, os.SEEK_DATA) == BS and holes.seek(e, ino, BS, os.SEEK_HOLE) == 3 * BS
        with pytest.raises(FsError) as err:
            holes.seek(e, ino, 10 * BS, os.SEEK_DATA)
        assert err.value.errno == errno.ENXIO
        holes.fallocate(e, ino, 0, 0, 10 * BS)  # fills the holes again
        assert int(e.I["nblocks"][ino]) == 10
    finally:
        e.close()
    assert_clean(region)


def test_engine_punch_needs_an_extent_slot_to_split(region_factory):
    region = region_factory(128 << 20, extents=8)
    e = Engine(region)
    try:
        ino = e.create(1, b"f", 0o644).ino
        holes.fallocate(e, ino, 0, 0, 40 * BS)
        slots = e.geometry.extent_count - 1  # slot 0 is never used
        with pytest.raises(FsError) as err:
            for n in range(slots + 1):  # each punch in the middle of the last extent splits it
                holes.fallocate(e, ino, PUNCH | KEEP, (2 * n + 1) * BS, BS)
        assert err.value.errno == errno.ENOSPC
        extents = e.extents(ino)
        assert len(extents) == n + 1 <= slots
        f, _, count = extents[-1]
        holes.fallocate(e, ino, PUNCH | KEEP, f * BS, count * BS)  # a whole extent: no slot needed
        assert len(e.extents(ino)) == len(extents) - 1
    finally:
        e.close()
    assert_clean(region)


def test_engine_finds_every_hole_between_extents(engine):
    """The engine's own list of unmapped runs, which write, prealloc and fallocate
    allocate from: with two gaps and three extents in the range (it once reported
    everything after the first gap as unmapped, so a range over several extents
    would have been given blocks it already had)."""
    ino = engine.create(1, b"f", 0o644).ino
    for fb in (0, 2, 5):
        engine.write(ino, fb * BS, b"x")
    fm = engine.maps[ino]
    assert [(f, n) for f, _, n in engine.extents(ino)] == [(0, 1), (2, 1), (5, 1)]
    assert engine._unmapped(fm, 0, 8) == [(1, 1), (3, 2), (6, 2)]
    assert engine._unmapped(fm, 1, 6) == [(1, 1), (3, 2)]
    assert engine._unmapped(fm, 2, 3) == [] and engine._unmapped(fm, 4, 5) == [(4, 1)]
    assert engine._unmapped(fm, 6, 9) == [(6, 3)]
