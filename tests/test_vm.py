"""A real QEMU guest whose RAM is a file on pmemfs (TCG, the Debian kernel, vm_guest.c as /init).

The guest proves each flow itself: it fills most of its RAM with a pattern and then
checks and rewrites every word forever, printing a tick counter that lives in its own
memory. After a restore or a migration the tick counter must go on from where it was
and the sweep must find no mismatch. ./run test installs QEMU and a kernel; nothing
here is skipped.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys

import pytest
from conftest import assert_clean, wait_for

from pmemfs.serve import mounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import _vm  # noqa: E402

BIN = os.path.dirname(sys.executable)
RAM = 256 << 20  # the limit for the suite
CHECK_MIB = 160  # what the guest's verifier takes and sweeps
REGION = RAM + (64 << 20)


def pmemfs(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def fsck_clean(region: str) -> None:
    r = subprocess.run([os.path.join(BIN, "pmemfs-fsck"), "-n", region], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def guest() -> _vm.Guest:
    assert not _vm.missing(), "the VM tests need " + "; ".join(_vm.missing()) + " (./run test installs them)"
    return _vm.Guest(RAM, CHECK_MIB, tick_ms=200)


@pytest.fixture
def qemus(mount_factory, tmp_path):
    """Start QEMUs; every one is killed before the mounts are taken down."""
    made: list[_vm.Qemu] = []

    def make(guest: _vm.Guest, ram_path: str | None, name: str, **kw) -> _vm.Qemu:
        vm = _vm.Qemu(guest, ram_path, str(tmp_path), name, **kw)
        made.append(vm)
        return vm

    make.made = made
    yield make
    for vm in made:
        vm.kill()


def guest_ram(mp: str) -> str:
    path = os.path.join(mp, "guest-ram")
    out = pmemfs("prealloc", path, str(_vm.backend_size(RAM)), "--align", "2M").stdout
    assert "1 extent" in out, out
    return path


def assert_went_on(vm: _vm.Qemu, last_tick: int, more: int = 3) -> _vm.Console:
    """The guest in vm continues at last_tick + 1 and finds nothing wrong."""
    c = vm.wait_ticks(last_tick + more, timeout=180)
    assert c.ticks[0].tick == last_tick + 1, (c.ticks[0], last_tick, c.text[-800:])
    assert c.last.mismatches == 0 and not c.mismatch_lines, c.mismatch_lines
    assert c.last.swept_mib > c.ticks[0].swept_mib  # it is still sweeping
    return c


def test_cpr_restore_across_daemon_kill(guest, region_factory, mount_factory, qemus, tmp_path):
    region = region_factory(REGION)
    m = mount_factory(region)
    ram = guest_ram(m.path)
    vm = qemus(guest, ram, "src").start()
    before = vm.wait_ticks(2, timeout=180)
    assert before.ready and before.last.mismatches == 0

    saved = _vm.cpr_save(vm, str(tmp_path / "device-state"))
    assert not vm.alive()
    # x-ignore-shared: guest RAM is not in the stream, only device state (and ROMs).
    assert saved.state_bytes < 4 << 20, saved.state_bytes
    assert saved.migrate_info["ram"]["transferred"] < RAM // 64, saved.migrate_info["ram"]
    assert saved.last_tick >= 2

    assert mounting.region_holder(region) == m.pid  # how a person finds the daemon to kill
    m.restart()  # kill -9, then pmemfs mount again (it clears the dead mountpoint)
    assert mounting.region_holder(region) == m.pid

    vm2 = qemus(guest, ram, "dst", incoming=True)
    vm2.start()
    vm2.set_capabilities(x_ignore_shared=True)
    vm2.qmp.cmd("migrate-incoming", uri=f"exec:cat {saved.state_path}")
    assert vm2.wait_status({"paused", "running"}) == "paused"  # the source was stopped
    vm2.qmp.cmd("cont")
    c = assert_went_on(vm2, saved.last_tick)
    assert c.ticks[0].gen >= before.last.gen  # its pattern generation went on too

    vm2.quit()
    m.unmount()
    fsck_clean(region)


def test_live_migration_between_two_mounts(guest, region_factory, mount_factory, qemus):
    a = mount_factory(region_factory(REGION), name="host-a")
    b = mount_factory(region_factory(REGION), name="host-b")
    src = qemus(guest, guest_ram(a.path), "host-a").start()
    src.wait_ticks(2, timeout=180)
    dst_ram = guest_ram(b.path)

    dst, info = _vm.live_migrate(src, guest, dst_ram, os.path.dirname(src.serial), "host-b")
    qemus.made.append(dst)
    assert info["status"] == "completed"
    assert info["ram"]["transferred"] >= CHECK_MIB << 20  # the RAM itself went over
    assert src.status() == "postmigrate"
    last = src.console().last.tick
    src.quit()
    assert_went_on(dst, last)

    # Host A gives its memory back: the file goes and its blocks are free.
    st0 = os.statvfs(a.path)
    used0 = json.loads(pmemfs("info", "--json", a.region).stdout)["used_blocks"]
    os.unlink(os.path.join(a.path, "guest-ram"))
    # QEMU's last close reaches the daemon as an asynchronous RELEASE: until then the
    # unlinked file is an open orphan and keeps its blocks.
    assert wait_for(lambda: (os.statvfs(a.path).f_bfree - st0.f_bfree) * st0.f_frsize >= RAM, 30)
    used1 = json.loads(pmemfs("info", "--json", a.region).stdout)["used_blocks"]
    assert (used0 - used1) * (2 << 20) == -(-_vm.backend_size(RAM) // (2 << 20)) * (2 << 20)

    dst.quit()
    a.unmount()
    b.unmount()
    fsck_clean(a.region)
    fsck_clean(b.region)
    assert_clean(b.region)


def used_blocks(mp: str) -> int:
    st = os.statvfs(mp)  # what df shows
    return (st.f_blocks - st.f_bfree) * st.f_frsize // (2 << 20)


def test_memory_a_guest_frees_goes_back_to_the_region(region_factory, mount_factory, qemus):
    """Free page reporting: the guest unmaps 64 MiB; its kernel reports the free 2 MiB
    pages to QEMU's virtio-balloon, QEMU punches them out of the RAM file
    (fallocate PUNCH_HOLE), and the blocks are free in the region (df, pmemfs info);
    the guest sweeps the rest of its memory on and finds nothing wrong."""
    m = mount_factory(region_factory(REGION))
    g = _vm.Guest(RAM, CHECK_MIB, tick_ms=200, balloon=True, give_back_mib=64, give_back_tick=3)
    ram = guest_ram(m.path)
    preallocated = used_blocks(m.path)
    assert preallocated >= RAM // (2 << 20)
    vm = qemus(g, ram, "balloon").start()
    assert wait_for(lambda: "vmcheck: gave back 64 MiB" in vm.console().text, 120), vm.console().text[-1000:]
    # The guest kernel reports free pages 2 s after they are freed, in whole 2 MiB pages.
    before = used_blocks(m.path)
    assert wait_for(lambda: used_blocks(m.path) <= before - 24, 60), (used_blocks(m.path), before,
                                                                    vm.console().text[-1000:])
    info = json.loads(pmemfs("info", "--json", m.region).stdout)
    assert info["used_blocks"] <= before - 24
    c = vm.wait_ticks(vm.console().last.tick + 4, timeout=120)
    assert c.last.mismatches == 0 and not c.mismatch_lines, c.mismatch_lines
    vm.quit()
    m.unmount()
    fsck_clean(m.region)


def test_postcopy_does_not_work_into_a_pmemfs_destination(guest, region_factory, mount_factory, tmp_path):
    """What the README says: QEMU's destination discards its RAM file (fallocate
    PUNCH_HOLE, which pmemfs now serves) and then never runs, since it cannot fault
    pages in through userfaultfd on a FUSE mapping (the next test)."""
    m = mount_factory(region_factory(REGION))
    refusal = _vm.postcopy_probe(guest, guest_ram(m.path), str(tmp_path))
    assert "still 'prelaunch'" in refusal, refusal


def test_userfaultfd_cannot_register_a_pmemfs_mapping(mounted):
    """Postcopy's other half: the kernel refuses userfaultfd on a FUSE shared mapping
    (it supports anonymous memory, shmem and hugetlbfs), so even with PUNCH_HOLE pmemfs
    could not serve a postcopy destination. Checked against a /dev/shm file."""
    libc = ctypes.CDLL(None, use_errno=True)
    UFFDIO_API, UFFDIO_REGISTER = 0xC018AA3F, 0xC020AA00  # _IOWR(0xAA, 0x3F / 0x00, ...)
    MODE_MISSING = 1

    def register(path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 2 << 20)
            mm = mmap.mmap(fd, 2 << 20, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        uffd = libc.syscall(323, os.O_CLOEXEC)  # SYS_userfaultfd on x86-64
        assert uffd >= 0, os.strerror(ctypes.get_errno())
        try:
            fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
            buf = ctypes.c_char.from_buffer(mm)
            try:
                fcntl.ioctl(uffd, UFFDIO_REGISTER,
                            bytearray(struct.pack("QQQQ", ctypes.addressof(buf), 2 << 20, MODE_MISSING, 0)))
                return 0
            except OSError as e:
                return e.errno
            finally:
                del buf
        finally:
            os.close(uffd)
            mm.close()

    shm = f"/dev/shm/pmemfs-test-uffd-{os.getpid()}"
    try:
        assert register(shm) == 0  # the method works where the kernel supports it
    finally:
        os.unlink(shm)
    assert register(mounted.p("ram")) == 22  # EINVAL


def test_running_guest_survives_a_daemon_kill_and_an_upgrade(guest, region_factory, qemus, tmp_path):
    """Flow b of the demo: kill -9 the daemon under a running guest, then upgrade it.
    The supervisor keeps the FUSE connection, so the guest keeps making progress,
    stalling no longer than the service gap, and its memory is in the region afterwards:
    a restore through the mount finds it current (not as it was at the kill)."""
    region = region_factory(REGION)
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    sup = mounting.spawn(region, mp, set(), log=mp + ".log").proc
    try:
        vm = qemus(guest, guest_ram(mp), "live").start()
        last = vm.wait_ticks(2, timeout=180).last.tick
        daemon = mounting.region_holder(region)
        assert daemon and daemon != sup.pid
        os.kill(daemon, 9)
        assert wait_for(lambda: mounting.region_holder(region) not in (None, daemon), 30)
        c = vm.wait_ticks(last + 8, timeout=120)  # two seconds of guest time after the kill
        after = [t for t in c.ticks if t.tick > last]
        stall = max(t.stall_ms for t in after)
        print(f"longest stall in the guest across the kill: {stall:.1f} ms")
        assert c.last.mismatches == 0
        assert stall < 2000
        r = subprocess.run([os.path.join(BIN, "pmemfs"), "upgrade", mp], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        last = c.last.tick
        c = vm.wait_ticks(last + 4, timeout=120)
        assert c.last.mismatches == 0
        print(f"longest stall across the upgrade: {max(t.stall_ms for t in c.ticks if t.tick > last):.1f} ms")
        saved = _vm.cpr_save(vm, str(tmp_path / "state"))
        vm2 = qemus(guest, vm.ram_path, "after", incoming=True).start()
        vm2.set_capabilities(x_ignore_shared=True)
        vm2.qmp.cmd("migrate-incoming", uri=f"exec:cat {saved.state_path}")
        vm2.wait_status({"paused"})
        vm2.qmp.cmd("cont")
        assert_went_on(vm2, saved.last_tick)
        vm2.quit()
    finally:
        for vm in qemus.made:
            vm.kill()
        r = subprocess.run([os.path.join(BIN, "pmemfs"), "umount", mp], capture_output=True, text=True)
        try:
            sup.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        assert r.returncode == 0, r.stderr
    with open(mp + ".log") as f:
        assert "Traceback" not in f.read()
    fsck_clean(region)
