"""The on-media format: superblock, geometry, tables, checksums, backup superblock."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from conftest import new_region_path

from pmemfs.fs.engine import Engine, MountError
from pmemfs.media import format as fmt
from pmemfs.media.format import (
    BLOCK_1G,
    BLOCK_2M,
    SB_SLOT,
    SB_STRUCT,
    SUPERBLOCK_DTYPE,
    TABLE_NAMES,
    FormatError,
    Geometry,
    Superblock,
    Tables,
    find_backup_superblock,
    read_superblock,
    record_checksums,
    seal,
)
from pmemfs.media.mkfs import make_filesystem
from pmemfs.media.region import Region

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def reseal(raw: bytes, **fields) -> bytes:
    """Set superblock fields and store a fresh checksum, so only the fields can be wrong."""
    rec = np.frombuffer(bytearray(raw[:SB_STRUCT]), SUPERBLOCK_DTYPE).copy()
    for k, v in fields.items():
        rec[k] = v
    out = bytearray(rec.tobytes())
    out[-4:] = fmt.crc(out[:-4]).to_bytes(4, "little")
    return bytes(out)


def sample_superblock() -> Superblock:
    g = Geometry.plan(256 * MiB, BLOCK_2M, inodes=5000)
    sb = Superblock.new(g, label="données-ü")
    sb.feature_compat = 0x5
    sb.state = fmt.STATE_DIRTY
    sb.mount_generation = 12345
    sb.last_mount_ns = 1_700_000_000_123_456_789
    sb.last_umount_ns = 1_700_000_000_987_654_321
    sb.version_minor = 3
    sb.hwm = {"inode": 2048, "extent": 100, "dirent": 4096, "blob": 1025, "pack": 7}
    return sb


# ------------------------------------------------------------------ superblock
def test_superblock_round_trip_keeps_every_field():
    sb = sample_superblock()
    raw = sb.encode()
    assert len(raw) == SB_STRUCT
    back = Superblock.decode(raw, sb.geometry.region_size)
    for name in ("uuid", "label", "create_time_ns", "feature_compat", "feature_incompat",
                 "feature_ro_compat", "state", "mount_generation", "last_mount_ns",
                 "last_umount_ns", "hwm", "version_major", "version_minor"):
        assert getattr(back, name) == getattr(sb, name), name
    assert back.uuid_str == sb.uuid_str
    g, h = sb.geometry, back.geometry
    for name in ("region_size", "block_size", "block_count", "inode_count", "extent_count",
                 "dirent_count", "blob_count", "journal_size", "data_start_block",
                 "backup_offset", "data_blocks", "metadata_bytes"):
        assert getattr(h, name) == getattr(g, name), name
    assert h.offsets == g.offsets
    # Encoding what was decoded gives the same bytes: nothing is lost either way.
    assert back.encode() == raw


def test_label_of_64_bytes_round_trips():
    g = Geometry.plan(64 * MiB, BLOCK_2M)
    label = "é" * 32  # 64 bytes of UTF-8
    back = Superblock.decode(Superblock.new(g, label).encode())
    assert back.label == label


@pytest.mark.parametrize("field", ["version_minor", "uuid", "label", "region_size", "inode_offset",
                                   "state", "mount_generation", "blob_hwm", "reserved"])
def test_flipped_byte_is_a_checksum_mismatch(field):
    raw = bytearray(sample_superblock().encode())
    offset = SUPERBLOCK_DTYPE.fields[field][1]
    raw[offset] ^= 0x40
    with pytest.raises(FormatError, match="checksum mismatch"):
        Superblock.decode(bytes(raw))


def test_bad_magic():
    raw = bytearray(sample_superblock().encode())
    raw[0:8] = b"EXT4SUPR"
    with pytest.raises(FormatError, match="bad magic"):
        Superblock.decode(bytes(raw))


def test_unknown_incompat_feature_is_refused():
    raw = sample_superblock().encode()
    Superblock.decode(reseal(raw))  # resealing alone changes nothing
    with pytest.raises(FormatError, match=r"unknown incompatible features 0x10000000000"):
        Superblock.decode(reseal(raw, feature_incompat=1 << 40))


def test_version_mismatch_is_refused():
    raw = sample_superblock().encode()
    with pytest.raises(FormatError, match=r"format version 2 is not supported"):
        Superblock.decode(reseal(raw, version_major=2))
    # A newer minor version is compatible by definition.
    assert Superblock.decode(reseal(raw, version_minor=9)).version_minor == 9


def test_unknown_ro_compat_feature_allows_only_read_only(region):
    with Region(region) as r:
        raw = reseal(bytes(r.buf[:SB_STRUCT]), feature_ro_compat=1 << 7)
        r.buf[:SB_STRUCT] = raw
    with pytest.raises(MountError, match="read-only"):
        Engine(region)
    e = Engine(region, readonly=True)
    try:
        assert e.sb.feature_ro_compat == 1 << 7
        assert e.readonly
    finally:
        e.close()
    # The refused read-write attempt did not mark the region as mounted.
    with Region(region, writable=False, lock=False) as r:
        sb, which = read_superblock(r.buf, r.size)
        assert (which, sb.state, sb.mount_generation) == ("primary", fmt.STATE_CLEAN, 0)


def test_decode_refuses_a_region_smaller_than_it_claims():
    sb = sample_superblock()
    with pytest.raises(FormatError, match="but it is"):
        Superblock.decode(sb.encode(), sb.geometry.region_size - BLOCK_2M)


# ------------------------------------------------------------------ geometry
GEOMETRIES = [(8 * MiB, BLOCK_2M, None), (64 * MiB, BLOCK_2M, None), (64 * MiB, BLOCK_2M, 16),
              (1 * GiB, BLOCK_2M, 100_000), (2 * GiB, BLOCK_1G, None), (TiB, BLOCK_2M, None),
              (TiB, BLOCK_1G, None), (16 * TiB, BLOCK_2M, None), (4 * GiB, BLOCK_2M, (1 << 20) + 3)]


@pytest.mark.parametrize(("size", "bs", "inodes"), GEOMETRIES)
def test_plan_tables_are_disjoint_and_inside_the_metadata_area(size, bs, inodes):
    g = Geometry.plan(size, bs, inodes)
    data_start = g.data_start_block * bs
    assert data_start % bs == 0
    assert 0 < g.data_start_block < g.block_count
    assert g.backup_offset == data_start - SB_SLOT
    assert g.metadata_bytes == data_start
    spans = sorted((g.offsets[n], g.offsets[n] + g.sizes[n], n) for n in g.offsets)
    assert spans[0][0] >= SB_SLOT  # the primary superblock slot is free
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        assert end <= start, f"{a} overlaps {b}"
    assert spans[-1][1] <= g.backup_offset
    for name, dtype in (("inode", fmt.INODE_DTYPE), ("extent", fmt.EXTENT_DTYPE),
                        ("dirent", fmt.DIRENT_DTYPE), ("blob", fmt.BLOB_DTYPE)):
        assert g.offsets[name] % fmt.TABLE_ALIGN == 0
        assert g.sizes[name] >= getattr(g, f"{name}_count") * dtype.itemsize
    assert g.sizes["bitmap"] * 8 >= g.block_count
    assert g.sizes["badmap"] * 8 >= g.block_count
    if inodes is not None:
        assert g.inode_count == inodes + 1
    # Whatever plan makes, decode must accept.
    Superblock.decode(Superblock.new(g).encode(), size)


def test_plan_refuses_a_region_too_small_for_metadata_and_one_block():
    with pytest.raises(FormatError, match="too small"):
        Geometry.plan(2 * MiB, BLOCK_2M)
    with pytest.raises(FormatError, match="too small"):
        Geometry.plan(1 * GiB, BLOCK_1G)
    # The size the message asks for is enough.
    with pytest.raises(FormatError) as e:
        Geometry.plan(4 * MiB, BLOCK_2M)
    need = int(str(e.value).split("need ")[1].split()[0])
    Geometry.plan(need, BLOCK_2M)


@pytest.mark.parametrize(("size", "bs"), [(64 * MiB + 4096, BLOCK_2M), (3 * MiB, BLOCK_2M),
                                          (3 * GiB + BLOCK_2M, BLOCK_1G)])
def test_plan_refuses_a_size_that_is_not_a_multiple_of_the_block_size(size, bs):
    with pytest.raises(FormatError, match="not a multiple of the block size"):
        Geometry.plan(size, bs)


@pytest.mark.parametrize("bs", [4096, 4 * MiB, 0])
def test_plan_refuses_other_block_sizes(bs):
    with pytest.raises(FormatError, match="not 2M or 1G"):
        Geometry.plan(64 * MiB, bs)


@pytest.mark.parametrize("inodes", [0, 15, 1 << 32])
def test_plan_refuses_inode_counts_out_of_range(inodes):
    with pytest.raises(FormatError, match="inode count"):
        Geometry.plan(64 * MiB, BLOCK_2M, inodes)


@pytest.mark.parametrize("bs", [BLOCK_2M, BLOCK_1G])
def test_metadata_of_a_1tib_region_is_below_a_tenth_of_a_percent(bs):
    g = Geometry.plan(TiB, bs)
    assert g.metadata_bytes / TiB < 0.001
    path = new_region_path()
    try:
        make_filesystem(path, size=TiB, block_size=bs, sparse=True)
        st = os.stat(path)
        assert st.st_size == TiB
        # Sparse: mkfs wrote a few pages of the metadata area, never the tables or data.
        assert st.st_blocks * 512 < 4 * MiB, st.st_blocks * 512
    finally:
        os.unlink(path)


# ------------------------------------------------------------------ tables
def _fill(rec: np.void, rng: np.random.Generator) -> None:
    """Random bytes in every field but the checksum."""
    dt = rec.dtype
    for name in dt.names:
        if name == "checksum":
            continue
        sub = dt.fields[name][0]
        rec[name] = np.frombuffer(rng.bytes(sub.itemsize), sub)[0]


def test_every_table_round_trips_through_the_region(region):
    rng = np.random.default_rng(7)
    picks = {"inodes": 5, "extents": 3, "dirents": 7, "blobs": 2}
    written = {}
    with Region(region) as r:
        sb, _ = read_superblock(r.buf, r.size)
        t = Tables(r.buf, sb)
        for name, index in picks.items():
            table = getattr(t, name)
            _fill(table[index], rng)
            seal(table, index)
            written[name] = table[index].tobytes()
        t.bitmap[-1] |= 0x80
        t.badmap[0] = 0x5A
        r.sync()
        del t, table
    with Region(region, writable=False, lock=False) as r:
        sb, _ = read_superblock(r.buf, r.size)
        t = Tables(r.buf, sb)
        for name, index in picks.items():
            table = getattr(t, name)
            assert table[index].tobytes() == written[name], name
            assert table[index - 1].tobytes() == bytes(table.dtype.itemsize), name
            sums = record_checksums(table, np.array([index]))
            assert int(sums[0]) == int(table["checksum"][index])
        assert t.bitmap[-1] & 0x80 and t.badmap[0] == 0x5A
        assert len(t.inodes) == sb.geometry.inode_count
        assert len(t.extents) == sb.geometry.extent_count
        del t, table


@pytest.mark.parametrize("table_name", ["inodes", "extents", "dirents", "blobs"])
def test_record_checksum_detects_a_change(table_name):
    g = Geometry.plan(64 * MiB, BLOCK_2M, inodes=64)
    buf = memoryview(bytearray(g.metadata_bytes))
    t = Tables(buf, Superblock.new(g))
    table = getattr(t, table_name)
    rng = np.random.default_rng(1)
    idx = np.array([1, 2, 9])
    for i in idx:
        _fill(table[i], rng)
        seal(table, int(i))
    assert (record_checksums(table, idx) == table["checksum"][idx]).all()
    first_field = table.dtype.names[0]
    table[first_field][2] = table[first_field][2] ^ 1
    ok = record_checksums(table, idx) == table["checksum"][idx]
    assert ok.tolist() == [True, False, True]
    seal(table, 2)
    assert (record_checksums(table, idx) == table["checksum"][idx]).all()


# ------------------------------------------------------------------ backup superblock
@pytest.mark.parametrize(("size", "bs"), [(64 * MiB, BLOCK_2M), (2 * GiB, BLOCK_1G)])
def test_backup_superblock_is_found_when_the_primary_is_gone(region_factory, size, bs):
    path = region_factory(size, block_size=bs)
    with Region(path) as r:
        primary, _ = read_superblock(r.buf, r.size)
        r.buf[:SB_SLOT] = bytes(SB_SLOT)
        with pytest.raises(FormatError, match="bad magic"):
            read_superblock(r.buf, r.size)
        for fd in (None, r.fd):
            found = find_backup_superblock(r.buf, r.size, fd=fd)
            assert found is not None
            assert found.uuid == primary.uuid
            assert found.geometry.backup_offset == primary.geometry.backup_offset
            sb, which = read_superblock(r.buf, r.size, allow_backup=True, fd=fd)
            assert which == "backup"
            assert sb.uuid == primary.uuid and sb.geometry.block_size == bs
        # With the backup gone as well, the error says both.
        off = primary.geometry.backup_offset
        r.buf[off:off + SB_SLOT] = bytes(SB_SLOT)
        assert find_backup_superblock(r.buf, r.size, fd=r.fd) is None
        with pytest.raises(FormatError, match="no valid backup superblock"):
            read_superblock(r.buf, r.size, allow_backup=True)


def test_backup_search_in_a_sparse_1tib_region_allocates_nothing():
    """Probing every 2M boundary through the mapping would fault in 2 GiB of tmpfs."""
    path = new_region_path()
    try:
        make_filesystem(path, size=TiB, sparse=True)
        with Region(path) as r:
            r.buf[:SB_SLOT] = bytes(SB_SLOT)
            before = os.stat(path).st_blocks
            sb, which = read_superblock(r.buf, r.size, allow_backup=True, fd=r.fd)
            assert which == "backup" and sb.geometry.region_size == TiB
            grown = (os.stat(path).st_blocks - before) * 512
            assert grown < MiB, grown
    finally:
        os.unlink(path)


def test_hwm_is_capped_at_the_table_size():
    g = Geometry.plan(64 * MiB, BLOCK_2M, inodes=16)
    sb = Superblock.new(g)
    sb.hwm = dict.fromkeys(TABLE_NAMES, 1 << 40)
    back = Superblock.decode(sb.encode())
    assert back.hwm == {n: getattr(g, f"{n}_count") for n in TABLE_NAMES}
