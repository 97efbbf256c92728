"""Gigantic extents, preallocation, placement policy, carve-out and defragmentation."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import drop_caches

from pmemfs.fs import placement
from pmemfs.fs.engine import Engine, FsError
from pmemfs.media import check
from pmemfs.media.journal import CrashPoints
from pmemfs.tools.fsck import check_region

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 512  # 2 MiB blocks per GiB
BIN = os.path.dirname(sys.executable)


def gib_aligned(extents) -> bool:
    """Every extent maps file GiB i, block j to region GiB k, block j (PUD-mappable)."""
    return all((pb - fb) % CHUNK == 0 for fb, pb, _ in extents)


def churn(e: Engine, rng: random.Random, n: int = 400) -> None:
    names = []
    for i in range(n):
        f = e.create(1, f"small{i}".encode(), 0o644).ino
        e.write(f, 0, b"s" * rng.randrange(1, 3 * MiB))
        names.append(f"small{i}".encode())
    for name in names:
        if rng.random() < 0.6:
            e.unlink(1, name)


@pytest.fixture
def big_engine(region_factory):
    e = Engine(region_factory(size=12 * GiB))
    yield e
    e.close()
    assert not [f for f in check_region(e.path) if f.severity == "error"]


def test_sequential_big_file_lands_in_aligned_gib_runs_after_churn(big_engine):
    e = big_engine
    churn(e, random.Random(7))
    f = e.create(1, b"guest", 0o644).ino
    chunk = os.urandom(MiB)
    for i in range(2 * 1024 + 64):
        e.write(f, i * MiB, chunk)
    ext = e.extents(f)
    assert gib_aligned(ext), ext
    assert len(ext) <= 3
    assert bytes(e.read(f, 5 * MiB, 16)) == chunk[:16]  # the early blocks were moved, not lost


def test_random_touches_of_a_big_sparse_file_stay_in_aligned_runs(big_engine):
    e = big_engine
    churn(e, random.Random(3), 200)
    f = e.create(1, b"vm", 0o644).ino
    e.truncate(f, 3 * GiB)
    blocks = list(range(3 * CHUNK))
    random.Random(5).shuffle(blocks)
    for b in blocks[:900]:
        e.write(f, b * 2 * MiB + 7, b"p")
    ext = e.extents(f)
    assert gib_aligned(ext)
    for b in blocks[:900]:  # every touch landed where it was written, nothing else did
        assert bytes(e.read(f, b * 2 * MiB + 6, 3)) == b"\0p\0", b
    assert bytes(e.read(f, blocks[900] * 2 * MiB, 2 * MiB)) == bytes(2 * MiB)  # untouched: a hole
    # The churn's survivors still hold their bytes: the big file's runs took no block of theirs.
    survivors = [n for n in e.children[1] if n.startswith(b"small")]
    assert survivors
    for n in survivors:
        ino = e.lookup(1, n)
        size = e.stat(ino).size
        assert bytes(e.read(ino, 0, size)) == b"s" * size, n


def test_prealloc_is_one_aligned_extent_of_zeros(big_engine):
    e = big_engine
    churn(e, random.Random(11), 100)
    f = e.create(1, b"ram", 0o644).ino
    e.write(f, 0, b"keep")
    ext = placement.prealloc(e, f, 2 * GiB, GiB)
    assert e.stat(f).size == 2 * GiB
    assert bytes(e.read(f, 0, 4)) == b"keep"
    assert bytes(e.read(f, GiB + 12345, 100)) == bytes(100)
    assert gib_aligned(ext)
    g = e.create(1, b"ram2", 0o644).ino
    (only,) = placement.prealloc(e, g, 3 * GiB + 1, GiB)
    assert only[1] % CHUNK == 0 and only[2] == 3 * CHUNK + 1  # one contiguous, aligned run
    with pytest.raises(FsError) as err:
        placement.prealloc(e, e.create(1, b"huge", 0o644).ino, 64 * GiB)
    assert err.value.errno == errno.ENOSPC


def test_prealloc_shorter_than_the_file_keeps_its_later_blocks(region_factory):
    """prealloc(size) smaller than a file that has blocks past size: the blocks past it
    keep their bytes, and no other file's block is written (found by tools/soak.py)."""
    e = Engine(region_factory(size=64 * MiB))
    try:
        bs = e.block_size
        f = e.create(1, b"f", 0o644).ino
        e.write(f, 0, b"a" * bs)
        g = e.create(1, b"g", 0o644).ino  # takes the block after f's first
        e.write(g, 0, b"g" * bs)
        e.write(f, bs, b"b" * (bs // 2))  # f's second block lands after g's
        before = {ino: bytes(e.read(ino, 0, e.stat(ino).size)) for ino in (f, g)}
        placement.prealloc(e, f, 1000)  # one block: [0, 1000) already has one
        assert e.stat(f).size == bs + bs // 2
        assert bytes(e.read(f, 0, e.stat(f).size)) == before[f]
        assert bytes(e.read(g, 0, bs)) == before[g]
    finally:
        e.close()
    assert not [x for x in check_region(e.path) if x.severity == "error"]


def test_align_policy_is_inherited(big_engine):
    e = big_engine
    d = e.mkdir(1, b"vms", 0o755).ino
    e.setxattr(d, b"user.pmemfs.align", b"1G")
    sub = e.mkdir(d, b"sub", 0o755).ino
    f = e.create(sub, b"disk", 0o644).ino
    assert e.getxattr(f, b"user.pmemfs.align") == b"1G"
    churn(e, random.Random(2), 100)
    e.write(f, 3 * MiB, b"x")  # not at a GiB boundary, small file: still placed as a big one
    assert gib_aligned(e.extents(f))


def test_carve_moves_blocks_without_copying(big_engine):
    e = big_engine
    src = e.create(1, b"guest", 0o644).ino
    data = os.urandom(8 * MiB)
    for off in range(0, GiB, 8 * MiB):
        e.write(src, off, data)
    before = {fb: pb for fb, pb, _ in e.extents(src)}
    dst = e.create(1, b"sidecar", 0o600).ino
    placement.carve(e, src, 512 * MiB, 256 * MiB, dst)
    assert e.stat(dst).size == 256 * MiB
    assert bytes(e.read(dst, 0, 8 * MiB)) == data
    assert bytes(e.read(src, 512 * MiB, 8 * MiB)) == bytes(8 * MiB)  # a hole now
    assert bytes(e.read(src, 768 * MiB, 8 * MiB)) == data
    assert e.stat(src).size == GiB
    (d0,) = e.extents(dst)
    assert d0[1] == before[0] + 256  # the very blocks the source had there
    for bad in ((3, 2 * MiB), (0, 3 * MiB), (GiB, 2 * MiB)):
        with pytest.raises(FsError) as err:
            placement.carve(e, src, bad[0], bad[1], e.create(1, f"x{bad[0]}".encode(), 0o600).ino)
        assert err.value.errno == errno.EINVAL


def digests(e: Engine) -> dict[bytes, str]:
    out = {}
    for name, slot in e.children[1].items():
        ino = int(e.t.dirents["ino"][slot])
        if e.kind(ino) == 1:
            out[name] = hashlib.sha256(bytes(e.read(ino, 0, e.stat(ino).size))).hexdigest()
    return out


def test_defrag_under_kill_keeps_every_file(region_factory):
    region = region_factory(size=6 * GiB)
    e = Engine(region)
    rng = random.Random(9)
    names = []
    for i in range(1500):  # one-block files (too big to be packed) spread over every GiB
        f = e.create(1, f"f{i}".encode(), 0o644).ino
        e.write(f, 0, os.urandom(rng.randrange(70_000, 100_000)))
        names.append(f"f{i}".encode())
    for name in names:
        if rng.random() < 0.85:
            e.unlink(1, name)
    obj = e.kernel.create("pinned", "dma-buffer", 4 * MiB)
    pinned_at = obj.phys_offset
    want = digests(e)
    runs_before = e.alloc.free_chunk_count()
    e.close()
    for k in [5, 17, 40, 90, 160, 300, 600, 1200, None]:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                c = Engine(region)
                c.journal.crash = CrashPoints(k, "kill") if k else None
                placement.defrag(c)
                c.close()
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, -9), code
        e = Engine(region)
        try:
            assert digests(e) == want
            assert e.kernel.info("pinned").phys_offset == pinned_at  # kernel objects never move
            assert not [f.message for f in check.structure(e.t, e.sb, e.hwm) if f.severity == "error"]
            runs_after = e.alloc.free_chunk_count()
        finally:
            e.close()
        if code == 0:
            break
    assert runs_after > runs_before


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def frag(mountpoint: str) -> dict:
    r = pmemfs("info", "--frag", "--json", mountpoint)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pmemfs(*args):
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)


def test_the_kernel_sees_the_size_prealloc_and_carve_set(mounted):
    """prealloc grows a file and carve sizes its destination behind the kernel's back:
    the very next read must see the new size, with no stat() in between to refresh the
    kernel's cached attributes (found by tools/soak.py: a read answered EOF)."""
    path, src, dst = mounted.p("f"), mounted.p("src"), mounted.p("dst")
    with open(src, "wb") as f:
        f.write(b"S" * (4 * MiB))
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    dfd = os.open(dst, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"x" * 100, 0)
        assert os.fstat(fd).st_size == 100 and os.fstat(dfd).st_size == 0  # cached by the kernel
        os.setxattr(path, "user.pmemfs.prealloc", b"5M")
        prealloc_read = os.pread(fd, 10, 3 * MiB)
        os.setxattr(dst, "user.pmemfs.carve", json.dumps({"src": "/src", "offset": 0, "length": 2 * MiB}).encode())
        carve_read = os.pread(dfd, 4, MiB)
    finally:
        os.close(fd)
        os.close(dfd)
    assert prealloc_read == bytes(10)
    assert carve_read == b"SSSS"


def test_cli_prealloc_carve_defrag_map(region_factory, mount_factory):
    m = mount_factory(region_factory(size=4 * GiB))
    r = pmemfs("prealloc", m.p("guest"), "1G", "--align", "1G")
    assert r.returncode == 0, r.stderr
    assert json.loads(os.getxattr(m.p("guest"), b"user.pmemfs.extents"))[0][1] % GiB == 0
    with open(m.p("guest"), "r+b") as f:
        f.seek(256 * MiB)
        f.write(b"S" * (256 * MiB))
    r = pmemfs("carve", m.p("guest"), "256M", "256M", m.p("side"))
    assert r.returncode == 0, r.stderr
    with open(m.p("side"), "rb") as f:
        assert f.read(4) == b"SSSS"
    with open(m.p("guest"), "rb") as f:
        f.seek(256 * MiB)
        assert f.read(4) == bytes(4)  # the kernel's cached pages of the carved range were dropped
    # Fragment the free space: a filler takes what is left of GiB 0, so one-block files
    # land in a free GiB; the filler goes again, and the files keep that GiB from being
    # a free run while GiB 0 has room for them.
    free = frag(m.path)["free_blocks"]  # GiB 0 but its metadata, and GiB 2 and 3
    r = pmemfs("prealloc", m.p("filler"), f"{(free - 2 * CHUNK) * 2}M")
    assert r.returncode == 0, r.stderr
    keep = []
    for i in range(12):
        with open(m.p(f"f{i}"), "wb") as f:
            f.write(hashlib.sha256(b"%d" % i).digest() * 2200)  # 70,400 bytes: too big to pack
        keep.append(f"f{i}")
    os.unlink(m.p("filler"))
    want = {n: file_digest(m.p(n)) for n in [*keep, "guest", "side"]}
    runs_before = frag(m.path)["aligned_1g_runs"]
    r = pmemfs("defrag", m.path)
    assert r.returncode == 0 and "aligned 1 GiB runs" in r.stdout, r.stderr
    runs_after = frag(m.path)["aligned_1g_runs"]
    assert runs_after > runs_before, (runs_before, runs_after, r.stdout)
    assert f"{runs_before} -> {runs_after}" in r.stdout, r.stdout
    # Every byte where it was: read from the daemon (the blocks moved; drop the kernel's copies).
    drop_caches()
    assert {n: file_digest(m.p(n)) for n in want} == want
    ext = json.loads(os.getxattr(m.p("guest"), b"user.pmemfs.extents"))
    assert all((ro - fo) % GiB == 0 for fo, ro, _ in ext), ext  # the guest's runs stay GiB-aligned
    for args, word in ((["carve", m.p("guest"), "3", "5", m.p("bad")], "multiples"),
                       (["carve", m.p("guest"), "0", "2M", m.p("side")], "exists"),
                       (["prealloc", "/tmp/not-pmemfs", "1M"], "not on a mounted pmemfs"),
                       (["prealloc", m.p("x"), "99G"], "No space")):
        r = pmemfs(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
    assert not os.path.exists(m.p("bad"))


def test_a_sized_file_written_in_random_order_stays_one_extent(region_factory):
    e = Engine(region_factory(size=2 * GiB))
    try:
        churn(e, random.Random(4), 40)
        f = e.create(1, b"guest", 0o644).ino
        e.truncate(f, 300 * 2 * MiB)  # sized first, as a VMM sizes guest RAM
        blocks = list(range(300))
        random.Random(8).shuffle(blocks)
        for b in blocks:  # pages touched in random order (mmap writeback)
            e.write(f, b * 2 * MiB, b"%d" % b)
        assert len(e.extents(f)) == 1
        assert bytes(e.read(f, 77 * 2 * MiB, 2)) == b"77"
    finally:
        e.close()


def test_setfattr_align_policy_on_a_mount(region_factory, mount_factory):
    """The placement policy as a person sets it: setfattr(1) on a directory of the mount."""
    m = mount_factory(region_factory(size=4 * GiB))
    os.mkdir(m.p("vms"))

    def attr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60)

    r = attr("setfattr", "-n", "user.pmemfs.align", "-v", "1G", m.p("vms"))
    assert r.returncode == 0, r.stderr
    r = attr("getfattr", "--only-values", "-n", "user.pmemfs.align", m.p("vms"))
    assert r.returncode == 0 and r.stdout == "1G", (r.stdout, r.stderr)
    os.mkdir(m.p("vms", "sub"))
    for where in (m.p("vms", "disk"), m.p("vms", "sub", "disk")):
        with open(where, "wb") as f:  # a small file, not at a GiB boundary: placed as a big one
            f.seek(3 * MiB)
            f.write(b"x" * MiB)
        assert os.getxattr(where, "user.pmemfs.align") == b"1G"  # inherited
        ext = json.loads(os.getxattr(where, "user.pmemfs.extents"))
        assert ext and all((ro - fo) % GiB == 0 for fo, ro, _ in ext), ext
    with open(m.p("plain"), "wb") as f:  # no policy: a 2 MiB block wherever it fits
        f.write(b"y" * MiB)
    assert b"user.pmemfs.align" not in [n.encode() for n in os.listxattr(m.p("plain"))]
    r = attr("setfattr", "-n", "user.pmemfs.align", "-v", "3M", m.p("vms"))
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    r = attr("getfattr", "--only-values", "-n", "user.pmemfs.align", m.p("vms"))
    assert r.stdout == "1G"  # the bad value changed nothing
