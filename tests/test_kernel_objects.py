"""Kernel objects: root only, pinned, contiguous, and a lifecycle that survives restarts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from pmemfs.fs.engine import Ctx, Engine, FsError
from pmemfs.kernel import KernelObjects, extents
from pmemfs.media.region import Region
from pmemfs.tools.fsck import check_region

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except (OSError, FsError) as e:
        return e.errno
    return 0


# ------------------------------------------------------------------ engine level
def test_create_is_contiguous_aligned_pinned(region_factory):
    region = region_factory(size=4 << 30)
    e = Engine(region)
    try:
        k = e.kernel
        e.create(1, b"filler", 0o644)
        e.write(e.lookup(1, b"filler"), 0, b"x" * (3 * MiB))  # 2 blocks taken first
        small = k.create("pt", "iommu-page-table", 12_345)
        big = k.create("buf", "dma-buffer", (1 << 30) + 1)
        for o in (small, big):
            assert len(e.extents(o.ino)) == 1  # one physically contiguous run
            assert o.phys_length >= o.size and o.pinned and o.state == "normal"
            assert o.phys_offset % e.block_size == 0
        assert big.phys_offset % (1 << 30) == 0  # 1 GiB and more: 1 GiB aligned
        assert bytes(e.read(small.ino, 0, 100)) == bytes(100)  # fresh payload reads as zeros
        ns = k.namespace()
        assert errno_of(e.unlink, ns, b"pt") == errno.EBUSY
        assert errno_of(e.truncate, small.ino, 0) == errno.EBUSY
        assert errno_of(e.write, small.ino, 12_000, b"y" * 1000) == errno.EFBIG
        assert errno_of(e.create, ns, b"file", 0o644) == errno.EPERM
        assert errno_of(e.rename, ns, b"pt", 1, b"moved") == errno.EBUSY
        assert errno_of(e.link, small.ino, 1, b"alias") == errno.EPERM
        assert errno_of(e.rmdir, 1, b".kernel") in (errno.EBUSY, errno.ENOTEMPTY)
        assert errno_of(lambda: e.setattr(small.ino, mode=0o666)) == errno.EPERM
        assert errno_of(k.create, "pt", "generic", 10) == errno.EEXIST
        assert errno_of(k.create, "x", "no-such-type", 10) == errno.EINVAL
        assert errno_of(k.create, "huge", "generic", 8 << 30) == errno.ENOSPC
        assert errno_of(lambda: k.create("u", "generic", 10, ctx=Ctx(uid=1000))) == errno.EPERM
    finally:
        e.close()


def test_lifecycle_across_restart(region_factory):
    region = region_factory(size=64 * MiB)
    e = Engine(region)
    k = e.kernel
    o = k.create("state", "device-state", 5000)
    e.write(o.ino, 0, b"device-cache" * 100)
    k.create("scratch", "generic", 100)
    k.preserve("state")
    assert k.freeze() == ["state"]
    assert k.info("state").state == "frozen" and k.info("state").checksum == "sealed"
    assert errno_of(e.write, o.ino, 0, b"z") == errno.EBUSY  # immutable while frozen
    assert errno_of(k.preserve, "scratch") == errno.EBUSY  # no new preserves while frozen
    assert errno_of(k.remove, "state") == errno.EBUSY
    k.unfreeze()  # abort: nothing else changed
    assert k.info("state").state == "preserved"
    k.freeze()
    e.close()  # the "kexec"

    e = Engine(region)
    k = e.kernel
    assert e.kernel_report == {"state": "restored"}
    info = k.info("state")
    assert (info.state, info.checksum) == ("restored", "verified")
    assert k.info("scratch").state == "normal"
    assert errno_of(e.write, o.ino, 0, b"z") == errno.EBUSY  # not yours until retrieved
    assert k.retrieve("state").state == "retrieved"
    assert bytes(e.read(o.ino, 0, 12)) == b"device-cache"
    assert k.finish() == []
    assert k.info("state").state == "normal"
    e.write(o.ino, 0, b"Z")  # the cycle can start again
    e.close()
    errors = [f.message for f in check_region(region) if f.severity == "error"]
    assert not errors, errors


def test_damage_while_down_is_detected_and_never_used(region_factory):
    region = region_factory(size=64 * MiB)
    e = Engine(region)
    o = e.kernel.create("tables", "iommu-page-table", 8192)
    e.write(o.ino, 0, b"\x01" * 8192)
    e.kernel.create("other", "generic", 100)
    e.kernel.preserve("tables")
    e.kernel.preserve("other")
    e.kernel.freeze()
    e.close()
    with Region(region) as r:  # a stray write while no daemon runs
        r.buf[o.phys_offset + 4000] ^= 0xFF
    e = Engine(region)
    try:
        assert e.kernel_report == {"tables": "damaged", "other": "restored"}
        info = e.kernel.info("tables")
        assert (info.state, info.checksum) == ("damaged", "mismatch")
        assert errno_of(e.kernel.retrieve, "tables") == errno.EIO
        assert errno_of(e.write, o.ino, 0, b"x") == errno.EBUSY
        assert e.kernel.finish(reclaim=True) == ["other", "tables"]
        assert e.kernel.list() == []
        free_after = e.statfs()["blocks_free"]
        assert free_after == e.geometry.data_blocks  # every block came back
    finally:
        e.close()


# ------------------------------------------------------------------- FUSE level
def pmemfs(*args: str, user: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=60)


def test_api_and_cli_through_the_mount_and_kill9(region_factory, mount_factory):
    m = mount_factory(region_factory(size=128 * MiB))
    k = KernelObjects(m.path)
    o = k.create("root-pt", "iommu-page-table", 4096)
    assert o["type"] == "iommu-page-table" and o["pinned"] and o["size"] == 4096
    with open(k.path("root-pt"), "r+b") as f:
        f.write(b"\xaa" * 4096)
    r = pmemfs("kernel", "create", "--type", "dma-buffer", "--size", "3M", m.path, "dma0")
    assert r.returncode == 0, r.stderr
    assert "region offset" in r.stdout
    listed = json.loads(pmemfs("kernel", "list", "--json", m.path).stdout)
    assert [x["name"] for x in listed] == ["dma0", "root-pt"]
    assert listed[0]["phys_length"] == 4 * MiB  # 3 MiB in whole 2 MiB blocks
    # The physical range is the file's one extent, as the extent map says.
    assert extents(k.path("root-pt")) == [(0, o["phys_offset"], o["phys_length"])]
    # Transitions, each followed by kill -9 of the daemon: the state is what it was.
    k.preserve("root-pt")
    m.restart()
    assert k.show("root-pt")["state"] == "preserved"
    k.freeze()
    assert errno_of(os.unlink, k.path("root-pt")) == errno.EBUSY
    r = pmemfs("kernel", "rm", m.path, "root-pt")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "busy" in r.stderr.lower()
    m.restart()  # the kexec
    o2 = k.show("root-pt")
    assert (o2["state"], o2["checksum"]) == ("restored", "verified")
    assert o2["phys_offset"] == o["phys_offset"]
    k.retrieve("root-pt")
    m.restart()
    assert k.show("root-pt")["state"] == "retrieved"
    with open(k.path("root-pt"), "rb") as f:
        assert f.read() == b"\xaa" * 4096
    assert k.finish() == []
    m.restart()
    assert k.show("root-pt")["state"] == "normal"
    k.remove("dma0")
    assert [x["name"] for x in k.list()] == ["root-pt"]


def test_root_only(region_factory, mount_factory):
    m = mount_factory(region_factory(size=64 * MiB), {"allow_other"})
    KernelObjects(m.path).create("secret", "device-state", 100)
    code = (
        "import os, errno, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "res = []\n"
        "for fn in (lambda: os.listdir(sys.argv[1] + '/.kernel'),\n"
        "           lambda: open(sys.argv[1] + '/.kernel/secret').read(),\n"
        "           lambda: os.setxattr(sys.argv[1], b'trusted.pmemfs.kernel.create', b'{}'),\n"
        "           lambda: os.getxattr(sys.argv[1] + '/.kernel/secret', b'trusted.pmemfs.kernel')):\n"
        "    try:\n"
        "        fn(); res.append(0)\n"
        "    except OSError as e:\n"
        "        res.append(e.errno)\n"
        "print(res)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, m.path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = eval(r.stdout)
    assert all(code in (errno.EACCES, errno.EPERM) for code in res), res
    names = os.listdir(m.path)
    assert ".kernel" in names
    st = os.stat(m.p(".kernel"))
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)


@pytest.mark.parametrize("cmd", [["kernel", "create", "--size", "1M"], ["kernel", "retrieve"]])
def test_cli_errors_are_one_line(region, mount_factory, cmd):
    m = mount_factory(region)
    r = pmemfs(*cmd, m.path, "nothing-here") if cmd[1] == "retrieve" else pmemfs(*cmd, "/tmp", "x")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fsck_checks_kernel_objects(region_factory):
    from pmemfs.media.format import seal
    from pmemfs.tools import fsck as fsck_mod

    region = region_factory(size=64 * MiB)
    e = Engine(region)
    o = e.kernel.create("tables", "iommu-page-table", 4096)
    e.close()
    assert fsck_mod.fsck(region, "n").exit_code == 0
    with Region(region) as r:  # unpin it behind the filesystem's back
        from pmemfs.media.format import Superblock, Tables

        t = Tables(r.buf, Superblock.decode(r.buf, r.size))
        t.inodes["flags"][o.ino] = 0
        seal(t.inodes, o.ino)
        del t
    rep = fsck_mod.fsck(region, "n")
    assert rep.exit_code == 4
    assert any(f.check == "kernel-objects" for f in rep.errors), [f.message for f in rep.errors]
    with pytest.raises(Exception, match="kernel object"):
        Engine(region)  # mount refuses it


def test_cli_lifecycle_preserve_freeze_retrieve_finish(region_factory, mount_factory):
    """The handover as an operator types it: pmemfs kernel preserve, freeze, the restart,
    retrieve, finish (with an object nobody claims, then --reclaim)."""
    m = mount_factory(region_factory(size=128 * MiB))

    def ok(*args: str) -> str:
        r = pmemfs("kernel", *args)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    def states() -> dict[str, str]:
        return {o["name"]: o["state"] for o in json.loads(ok("list", "--json", m.path))}

    k = KernelObjects(m.path)
    for name, kind in (("iommu", "iommu-page-table"), ("dma", "dma-buffer"), ("spare", "generic")):
        k.create(name, kind, 8192)
    with open(k.path("iommu"), "r+b") as f:
        f.write(b"\x5a" * 8192)
    assert ok("preserve", m.path, "iommu") == "preserve: iommu\n"
    ok("preserve", m.path, "dma")
    assert ok("freeze", m.path) == "freeze: done\n"
    assert states() == {"iommu": "frozen", "dma": "frozen", "spare": "normal"}
    r = pmemfs("kernel", "preserve", m.path, "spare")  # the namespace is frozen
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    m.restart()  # the kexec
    listed = {o["name"]: (o["state"], o["checksum"]) for o in json.loads(ok("list", "--json", m.path))}
    assert listed["iommu"] == listed["dma"] == ("restored", "verified"), listed
    assert ok("retrieve", m.path, "iommu") == "retrieve: iommu\n"
    with open(k.path("iommu"), "rb") as f:
        assert f.read() == b"\x5a" * 8192
    assert ok("finish", m.path) == "finish: 1 unclaimed: dma\n"
    assert states() == {"iommu": "normal", "dma": "restored", "spare": "normal"}
    assert ok("finish", "--reclaim", m.path) == "finish: 1 reclaimed: dma\n"
    m.restart()  # the end of the cycle is what the region holds
    assert states() == {"iommu": "normal", "spare": "normal"}
