"""The region: backing kinds, sizing, sparseness, locking, prefault, error messages."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
from conftest import new_region_path

from pmemfs.media.format import SB_SLOT, read_superblock
from pmemfs.media.mkfs import make_filesystem
from pmemfs.media.region import Region, RegionError, RegionLocked, probe
from pmemfs.tools.info import describe

MiB = 1 << 20
TiB = 1 << 40
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def shm_path():
    path = new_region_path()
    yield path
    if os.path.exists(path):
        os.unlink(path)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# ------------------------------------------------------------------ regular files
def test_sparse_file_region_and_mkfs_touch_almost_nothing(shm_path):
    with Region(shm_path, create_size=TiB) as r:
        assert (r.kind, r.size, r.page_size) == ("file", TiB, os.sysconf("SC_PAGE_SIZE"))
        assert r.writable and r.locked
    assert os.path.getsize(shm_path) == TiB
    assert allocated(shm_path) == 0
    # A 1 TiB region cannot be reserved on this tmpfs: refused, the file left as it was.
    with pytest.raises(RegionError, match=r"does not fit in tmpfs .*--sparse overcommits it"):
        make_filesystem(shm_path)
    assert os.path.getsize(shm_path) == TiB and allocated(shm_path) == 0
    # mkfs --sparse on the existing, still sparse file: checks for old filesystems and
    # reserves the metadata in use only, neither of which may fault in other pages.
    make_filesystem(shm_path, sparse=True)
    assert allocated(shm_path) < 4 * MiB, allocated(shm_path)
    info = describe(shm_path)
    assert info["region_size"] == TiB and info["backing"] == "file"
    assert allocated(shm_path) < 4 * MiB, allocated(shm_path)


def test_reformat_clears_old_tables_without_allocating_them(shm_path):
    make_filesystem(shm_path, size=TiB, sparse=True)
    with Region(shm_path) as r:
        sb, _ = read_superblock(r.buf, r.size)
        g = sb.geometry
        # Dirty pages in the middle of the dirent and blob tables, as a used fs has.
        marks = [g.offsets["dirent"] + 100 * 4096, g.offsets["blob"] + 7 * 4096 + 12]
        for off in marks:
            r.buf[off:off + 4] = b"junk"
    make_filesystem(shm_path, force=True, sparse=True)
    with Region(shm_path, writable=False, lock=False) as r:
        for off in marks:
            assert bytes(r.buf[off:off + 4]) == bytes(4)
    assert allocated(shm_path) < 4 * MiB, allocated(shm_path)


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_zero_keeps_the_bytes_around_the_range(shm_path, tmp_path, where):
    path = shm_path if where == "tmpfs" else str(tmp_path / "region")
    with Region(path, create_size=4 * MiB) as r:
        assert r.memory == (where == "tmpfs")
        r.buf[:] = b"\xab" * r.size
        r.zero(1000, 3 * 4096 + 500)  # partial page, two whole pages, partial page
        # On memory the pages stay the region's (stored zeros: a reserved page must not
        # go back to the backing); on a disk the whole pages were punched out (read
        # before reading them faults them in).
        expect = 4 * MiB if where == "tmpfs" else 4 * MiB - 2 * 4096
        assert allocated(path) == expect
        data = bytes(r.buf)
    end = 1000 + 3 * 4096 + 500
    assert data[:1000] == b"\xab" * 1000
    assert data[1000:end] == bytes(end - 1000)
    assert data[end:] == b"\xab" * (4 * MiB - end)


def test_a_size_too_large_for_the_system_is_an_error_not_a_crash(shm_path):
    with pytest.raises(RegionError, match="cannot size region"):
        Region(shm_path, create_size=1 << 70)


def test_missing_region_and_empty_region(shm_path):
    with pytest.raises(RegionError, match="no such region") as e:
        Region(shm_path)
    assert shm_path in str(e.value)
    open(shm_path, "wb").close()
    with pytest.raises(RegionError, match="region is empty"):
        Region(shm_path)


def test_a_size_that_is_not_a_page_multiple_is_refused(shm_path):
    with open(shm_path, "wb") as f:
        f.truncate(4 * MiB + 100)
    with pytest.raises(RegionError, match="not a multiple of the file page size"):
        Region(shm_path)


# ------------------------------------------------------------------ error cases
def test_a_directory_is_refused(tmp_path):
    with pytest.raises(RegionError, match="is a directory") as e:
        Region(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_a_path_in_a_missing_directory_is_refused(tmp_path):
    path = str(tmp_path / "nope" / "region")
    with pytest.raises(RegionError, match="does not exist") as e:
        Region(path, create_size=64 * MiB)
    assert str(tmp_path / "nope") in str(e.value)
    assert not os.path.exists(tmp_path / "nope")


def test_a_char_device_that_is_not_dax_is_refused():
    with pytest.raises(RegionError, match="not a /dev/dax device") as e:
        Region("/dev/null")
    assert "/dev/null" in str(e.value)
    with pytest.raises(RegionError, match="not a /dev/dax device"):
        probe("/dev/zero")


# ------------------------------------------------------------------ locking
HOLDER = ("import sys; from pmemfs.media.region import Region; r = Region(sys.argv[1]); "
          "print('ready', flush=True); sys.stdin.read()")


@contextlib.contextmanager
def held(path: str):
    """Another process holding the region open (and locked) until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read() if proc.poll() is not None else line
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_second_owner_is_told_the_holders_pid(region):
    with held(region) as proc:
        with pytest.raises(RegionLocked) as e:
            Region(region)
        assert e.value.holder == proc.pid
        assert f"process {proc.pid}" in str(e.value)
        # A shared (read-only, locking) open conflicts as well...
        with pytest.raises(RegionLocked):
            Region(region, writable=False)
        # ...but a read-only look without the lock works, as `pmemfs info` does.
        with Region(region, writable=False, lock=False) as r:
            assert not r.writable and not r.locked
            _, which = read_superblock(r.buf, r.size)
            assert which == "primary"
            with pytest.raises(TypeError):
                r.buf[0] = 0
    # The lock goes with the process.
    with Region(region) as r:
        assert r.locked


# ------------------------------------------------------------------ prefault
def test_prefault_populates_the_range(shm_path):
    with Region(shm_path, create_size=16 * MiB) as r:
        assert allocated(shm_path) == 0
        done = []
        r.prefault(2 * MiB, 8 * MiB, done.append)
        assert sum(done) >= 8 * MiB
        assert allocated(shm_path) >= 8 * MiB
        assert allocated(shm_path) < 16 * MiB
        r.prefault(0, 1 << 40)  # clamped to the region
        assert allocated(shm_path) == 16 * MiB
        assert bytes(r.buf[:SB_SLOT]) == bytes(SB_SLOT)  # populating does not write


# ------------------------------------------------------------------ hugetlbfs
def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _write_int(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _hugepages_free() -> int:
    return _read_int("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")


@contextlib.contextmanager
def hugetlbfs_mount(where: str, pages: int = 0, pagesize: str = "2M"):
    """Mount hugetlbfs at where, reserving `pages` more 2 MiB pages; undo both after.

    The reservation is given back as a difference, not by writing the old value, so a
    concurrent user of huge pages (a benchmark) keeps what it reserved meanwhile.
    """
    old = _read_int(NR_HUGEPAGES)
    os.makedirs(where, exist_ok=True)
    mounted = False
    added = 0
    try:
        if pages:
            _write_int(NR_HUGEPAGES, old + pages)
            got = _read_int(NR_HUGEPAGES)
            added = max(got - old, 0)
            if got < old + pages:
                pytest.fail(f"asked for {old + pages} huge pages, the kernel reserved only {got}")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize}", "none", where],
                       check=True, capture_output=True)
        mounted = True
        yield where
    finally:
        if mounted:
            subprocess.run(["umount", where], check=True)
        if added:
            _write_int(NR_HUGEPAGES, max(_read_int(NR_HUGEPAGES) - added, 0))


def test_hugetlbfs_region(tmp_path):
    with hugetlbfs_mount(str(tmp_path / "huge"), pages=16) as mnt:
        path = os.path.join(mnt, "region")
        make_filesystem(path, size=8 * MiB)
        assert probe(path).kind == "hugetlbfs"
        with Region(path, writable=False, lock=False) as r:
            assert (r.kind, r.page_size, r.size) == ("hugetlbfs", 2 * MiB, 8 * MiB)
            sb, _ = read_superblock(r.buf, r.size)
            assert sb.geometry.data_blocks >= 1
        info = describe(path)
        assert info["backing"] == "hugetlbfs" and info["state"] == "clean"
        # mkfs on an existing, empty 16 MiB hugetlbfs file looks for old filesystems at
        # every block boundary: that must not fault in (allocate) the huge pages.
        empty = os.path.join(mnt, "empty")
        Region(empty, create_size=16 * MiB, noreserve=True).close()
        free_before = _hugepages_free()
        sb = make_filesystem(empty, sparse=True).superblock
        # Only the huge pages of the metadata in use (superblock, journal, bitmaps, each
        # table's first records, the backup) are reserved: here 3 of the 8.
        pages = {p for off, n in sb.geometry.metadata_in_use(sb.hwm)
                 for p in range(off // (2 * MiB), -(-(off + n) // (2 * MiB)))}
        assert len(pages) < 8
        assert free_before - _hugepages_free() == len(pages)
        os.unlink(empty)
        # Not a multiple of the huge page size: refused, and nothing is left behind.
        odd = os.path.join(mnt, "odd")
        with pytest.raises(RegionError, match=r"not a multiple of the hugetlbfs page size 2097152"):
            Region(odd, create_size=3 * MiB)
        # More than the reserved pages: mkfs explains and removes what it created.
        big = os.path.join(mnt, "big")
        with pytest.raises(RegionError, match="huge pages"):
            make_filesystem(big, size=64 * MiB)
        assert not os.path.exists(big)
    assert not os.path.ismount(tmp_path / "huge")


def test_hugetlbfs_1g_pages_refuse_a_2m_multiple(tmp_path):
    """With 1 GiB huge pages a 2M-block region must still be a 1 GiB multiple."""
    if not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB"):
        pytest.fail("this machine has no 1 GiB huge page size")
    with hugetlbfs_mount(str(tmp_path / "huge1g"), pagesize="1G") as mnt:
        path = os.path.join(mnt, "region")
        with pytest.raises(RegionError, match="not a multiple of the hugetlbfs page size 1073741824"):
            make_filesystem(path, size=10 * MiB)
        assert not os.path.exists(path)
