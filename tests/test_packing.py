"""Small files share pack blocks; they move to whole blocks when they outgrow them."""

from __future__ import annotations

import os

import numpy as np

from pmemfs.fs.engine import Engine
from pmemfs.media.region import Region
from pmemfs.tools import fsck as fsck_mod

KiB, MiB = 1 << 10, 1 << 20


def test_ten_thousand_small_files_fit_where_blocks_would_not(region_factory):
    region = region_factory(size=128 * MiB, inodes=12_000)
    e = Engine(region)
    try:
        data_blocks = e.geometry.data_blocks
        assert data_blocks < 10_000  # one block per file could never hold them
        for i in range(10_000):
            f = e.create(1, b"f%d" % i, 0o644).ino
            e.write(f, 0, b"%d" % i * 100)
        used_blocks = data_blocks - e.statfs()["blocks_free"]
        assert used_blocks <= -(-10_000 // 512) + 1  # 1 KiB files: 512 chunks per block
        s = e.statfs()
        assert s["fragments"] - s["fragments_free"] == 10_000  # df counts what they use
        for i in (0, 4_999, 9_999):
            f = e.lookup(1, b"f%d" % i)
            assert bytes(e.read(f, 0, 1000)) == (b"%d" % i * 100)[:1000]
            assert e.stat(f).blocks == 4 * KiB // 512
    finally:
        e.close()
    e = Engine(region)  # and all of it comes back after a restart
    try:
        assert len(e.packer.packed) == 10_000
        assert bytes(e.read(e.lookup(1, b"f1234"), 0, 4)) == b"1234"
    finally:
        e.close()


def test_grow_move_outgrow_and_release(engine):
    e = engine
    a = e.create(1, b"a", 0o644).ino
    b = e.create(1, b"b", 0o644).ino
    e.write(a, 0, b"A" * 3000)
    e.write(b, 0, b"B" * 3000)  # right after a in the same pack block
    (_, block, _, n) = e.packer.packed[a]
    assert n == 1 and e.packer.packed[b][1] == block
    e.write(a, 3000, b"a" * 10_000)  # must move: b sits in the next chunk
    assert e.packer.packed[a][3] == 4
    assert bytes(e.read(a, 0, 3000)) == b"A" * 3000 and bytes(e.read(a, 3000, 10_000)) == b"a" * 10_000
    e.write(a, 20_000, b"z")  # a gap past the old end reads as zeros
    assert bytes(e.read(a, 13_000, 7_000)) == bytes(7_000)
    free_before = e.statfs()["blocks_free"]
    e.write(a, 100 * KiB, b"big")  # past 64 KiB: a block of its own
    assert a not in e.packer.packed and len(e.extents(a)) == 1
    assert bytes(e.read(a, 0, 3000)) == b"A" * 3000 and bytes(e.read(a, 100 * KiB, 3)) == b"big"
    assert bytes(e.read(a, 20_001, 1000)) == bytes(1000)
    assert e.statfs()["blocks_free"] == free_before - 1
    e.truncate(b, 0)  # b's chunks go; the pack block, now empty, goes back
    assert b not in e.packer.packed and not e.packer.pack_of_block
    assert e.statfs()["blocks_free"] == free_before
    e.write(b, 0, b"again")
    assert bytes(e.read(b, 0, 5)) == b"again"


def test_policy_files_and_kernel_objects_are_never_packed(engine):
    e = engine
    d = e.mkdir(1, b"vms", 0o755).ino
    e.setxattr(d, b"user.pmemfs.align", b"2M")
    f = e.create(d, b"disk", 0o644).ino
    e.write(f, 0, b"x")
    assert f not in e.packer.packed and len(e.extents(f)) == 1
    o = e.kernel.create("state", "device-state", 100)
    assert o.ino not in e.packer.packed and len(e.extents(o.ino)) == 1


def test_fsck_finds_and_rebuilds_a_damaged_pack_bitmap(region_factory):
    region = region_factory()
    e = Engine(region)
    files = {}
    for i in range(20):
        f = e.create(1, b"s%d" % i, 0o644).ino
        e.write(f, 0, os.urandom(3000 + i))
        files[b"s%d" % i] = bytes(e.read(f, 0, 3000 + i))
    slot = next(iter(e.packer.pack_of_block.values()))
    off = e.geometry.offsets["pack"] + slot * 128
    e.close()
    with Region(region) as r:  # clear a chunk bit and reseal the record: only the pack check can tell
        raw = np.frombuffer(r.buf, np.uint8, 128, off)
        raw[16] &= 0xFE  # chunk 0 of the bitmap (which starts at byte 16)
        import zlib

        raw[124:128] = np.frombuffer(zlib.crc32(bytes(raw[:124])).to_bytes(4, "little"), np.uint8)
        del raw
    rep = fsck_mod.fsck(region, "n")
    assert rep.exit_code == 4 and any(f.check == "packs" for f in rep.errors)
    assert fsck_mod.fsck(region, "p").exit_code == 1
    assert fsck_mod.fsck(region, "n").exit_code == 0
    e = Engine(region)
    try:
        for name, data in files.items():
            f = e.lookup(1, name)
            assert bytes(e.read(f, 0, len(data))) == data
    finally:
        e.close()


def test_df_through_the_mount_counts_chunks(mounted):
    s0 = os.statvfs(mounted.path)
    for i in range(50):
        with open(mounted.p(f"n{i}"), "wb") as f:
            f.write(b"n" * 5000)  # two 4 KiB chunks each
    s1 = os.statvfs(mounted.path)
    assert s1.f_frsize == 4096
    assert s0.f_bfree - s1.f_bfree == 100
    assert os.stat(mounted.p("n7")).st_blocks == 2 * 4096 // 512
    with open(mounted.p("n7"), "rb") as f:
        assert f.read() == b"n" * 5000


def test_fsck_finds_two_files_in_one_chunk_and_a_pack_that_is_gone(region_factory):
    import zlib

    from pmemfs.tools.fsck import check_region

    region = region_factory()
    e = Engine(region)
    a = e.create(1, b"a", 0o644).ino
    b = e.create(1, b"b", 0o644).ino
    e.write(a, 0, b"A" * 100)
    e.write(b, 0, b"B" * 100)
    slot_a, slot_b = e.packer.packed[a][0], e.packer.packed[b][0]
    ext_off = e.geometry.offsets["extent"]
    e.close()

    def reseal(r, off, size):
        raw = np.frombuffer(r.buf, np.uint8, size, off)
        raw[size - 4:] = np.frombuffer(zlib.crc32(bytes(raw[: size - 4])).to_bytes(4, "little"), np.uint8)

    with Region(region) as r:  # b's extent now claims a's chunk
        ext = np.frombuffer(r.buf, np.uint32, 8, ext_off + slot_b * 32)
        ext[6] = ext[6] & 0xFFFF  # flags: chunk 0
        del ext
        reseal(r, ext_off + slot_b * 32, 32)
    codes = {f.code for f in check_region(region) if f.severity == "error"}
    assert "chunk-twice" in codes
    rep = fsck_mod.fsck(region, "y")
    assert rep.exit_code == 1
    assert fsck_mod.fsck(region, "n").exit_code == 0
    # Neither file silently gets the other's data: the later claim gets a copy, and the
    # report names both (docs/FSCK.md, "Two claims on one block").
    what = {c.inode: c.what for c in rep.files}
    assert "cloned" in what[b] and "shared-blocks" in what[a], what
    e = Engine(region)
    try:
        assert bytes(e.read(a, 0, 100)) == b"A" * 100  # the first owner keeps the chunk
        assert bytes(e.read(b, 0, 100)) == b"A" * 100  # b has a copy of it, in chunks of its own
        assert e.packer.packed[b][1:3] != e.packer.packed[a][1:3]
        assert e.packer.packed[b][1:3] != (e.packer.packed[a][1], 1)  # not over b's own old chunk
    finally:
        e.close()
    assert slot_a != slot_b
