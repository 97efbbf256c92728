#!/usr/bin/env python3
"""Demo 6: a real QEMU guest on pmemfs through restore, migration and a daemon restart.

The guest is the Debian kernel with a one-program initramfs (vm_guest.c) that fills
most of its RAM with a pattern and then checks and rewrites every word forever,
printing a tick line on the serial console: its tick counter, what it swept, the
mismatches it found (must stay 0), and its longest stall, measured with its own
clock. Guest RAM is a file on pmemfs (memory-backend-file, share=on), preallocated
and aligned with `pmemfs prealloc --align`. Each flow is proved by the guest itself:
its tick counter goes on where it was, its sweep finds no mismatch.

  a  cooperative restore (CPR): QMP stop, device state only (x-ignore-shared) to a
     file, quit QEMU, kill -9 the daemon (the supervisor's standby takes the
     connection over), a new QEMU -incoming, cont
  d  the same with kernel state beside guest RAM: the VM's IOMMU-like tables and its
     device state are kernel objects, preserved and frozen in the order memory,
     IOMMU, devices, and retrieved in that order before the guest resumes
  c  live migration from region A to region B (two mounts standing for two hosts):
     postcopy is tried first (the destination never runs, see the README), then precopy; A's
     blocks are freed afterwards
  b  the daemon killed, then upgraded, while the guest runs: the supervisor keeps the
     FUSE connection, so the guest only pauses; prints the guest's longest stall, then
     proves with a restore that what it wrote meanwhile is in the region
  e  a guest gives memory back: it frees part of its RAM, its kernel reports the free
     pages to QEMU's virtio-balloon (free page reporting), QEMU punches them out of the
     RAM file, and df on the mount shows the blocks free; the guest goes on

    python examples/vm_live_update.py [--ram 512M] [--flows a,d,c,b,e]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import tempfile
import time
import zlib

from _common import Demo, cli, fail, proved, step
from _iommu_tables import HUGE_PAGE, build_iommu, iommu_tables_size, walk
from _vm import (
    CprSave,
    Guest,
    Qemu,
    VMError,
    backend_size,
    cpr_restore,
    cpr_save,
    live_migrate,
    missing,
    postcopy_probe,
)

from pmemfs import direct
from pmemfs.kernel import KernelObjects, extents
from pmemfs.tools.common import human, parse_size

GiB = 1 << 30
FLOWS = "adcbe"  # the order they run in, whatever order they are asked in


def ram_alignment(ram: int) -> str:
    """1G where the size allows (a whole number of GiB), else the block size."""
    return "1G" if ram >= GiB and ram % GiB == 0 else "2M"


def region_size(ram: int) -> int:
    # Metadata sits at the start, so a 1 GiB-aligned file starts at 1 GiB at the earliest;
    # 64 MiB more for the kernel objects. pmemfs-mkfs reserves all of it on /dev/shm.
    return ram + (GiB if ram_alignment(ram) == "1G" else 0) + (64 << 20)


def prepare_ram(mp: str, ram: int) -> str:
    path = os.path.join(mp, "guest-ram")
    # backend_size: a little more than ram, for QEMU 7.2's TCG migration (see _vm.py)
    cli("pmemfs", "prealloc", path, str(backend_size(ram)), "--align", ram_alignment(ram))
    exts = extents(path)
    where = ", ".join(f"region {r:#x}+{human(n)}" for _, r, n in exts)
    print(f"  {path}: {human(ram)} preallocated, aligned {ram_alignment(ram)}, "
          f"{len(exts)} extent(s): {where}")
    return path


def restart_daemon(demo: Demo) -> float:
    """kill -9 the region's daemon (found by its lock); the supervisor's standby takes the
    connection over. Returns the ms without a daemon."""
    died = demo.kill9()
    demo.wait_for_replacement(demo.last_killed)
    return (time.monotonic() - died) * 1000


def guest_proves(vm: Qemu, after_tick: int, more: int = 3, timeout: float = 120.0) -> None:
    """The guest, now in `vm`, goes on from tick after_tick and finds no mismatch."""
    c = vm.wait_ticks(after_tick + more, timeout)
    first = c.ticks[0]
    if first.tick != after_tick + 1:
        fail(f"the guest's first tick in {vm.name} is {first.tick}, not {after_tick + 1}: "
             "it did not go on from where it was")
    if c.last.mismatches or c.mismatch_lines:
        fail(f"the guest found {c.last.mismatches} mismatches: {c.mismatch_lines[:3]}")
    proved(f"the guest went on from tick {after_tick} to {c.last.tick} in {vm.name}, "
           f"{c.last.swept_mib} MiB swept since boot, 0 mismatches (gen {c.last.gen})")


def ram_crc(path: str) -> int:
    """CRC-32 of guest RAM as it lies in the region (pmemfs.direct: no FUSE, no page cache)."""
    crc = 0
    with direct.open(path) as d:
        for _, a in d.arrays:
            crc = zlib.crc32(memoryview(a), crc)
    return crc


# ------------------------------------------------------------------ the flows
class Run:
    def __init__(self, a: argparse.Namespace, work: str, stack: contextlib.ExitStack):
        self.a = a
        self.work = work
        self.stack = stack
        self.ram = parse_size(a.ram)
        self.guest = Guest(self.ram, a.check_mib or max(16, (self.ram >> 20) * 5 // 8), a.tick_ms)
        self.vm: Qemu | None = None
        self.n = 0
        self.numbers: list[str] = []

    def qemu(self, ram_path: str, incoming: bool = False) -> Qemu:
        self.n += 1
        vm = Qemu(self.guest, ram_path, self.work, f"qemu{self.n}", incoming=incoming)
        self.stack.callback(vm.kill)  # never leave a QEMU behind
        return vm

    def boot(self, ram_path: str) -> None:
        step(f"boot the guest: {human(self.ram)} RAM on {ram_path}, TCG, the verifier takes "
             f"{self.guest.check_mib} MiB")
        started = time.monotonic()
        self.vm = self.qemu(ram_path).start()
        print("  " + " ".join(self.vm.command()))
        c = self.vm.wait_ticks(2)
        print(f"  booted and filled in {time.monotonic() - started:.1f} s: {c.text.splitlines()[-1]}")

    def cpr(self, demo: Demo) -> None:
        step("(a) cooperative restore: stop, save device state only, quit, kill -9 the daemon, "
             "mount, restore, cont")
        assert self.vm is not None
        state = os.path.join(self.work, "device-state")
        print("  QMP: stop; migrate-set-capabilities x-ignore-shared=on; "
              f"migrate exec:cat > {state}; quit")
        saved = cpr_save(self.vm, state)
        t_saved = time.monotonic()
        gap = restart_daemon(demo)
        print(f"  daemon killed and the region served again after {gap:.0f} ms: "
              f"{getattr(demo, 'last_mount_line', '')}")
        t_mounted = time.monotonic()
        print("  new QEMU -incoming defer; QMP: migrate-set-capabilities x-ignore-shared=on; "
              f"migrate-incoming exec:cat {state}; cont")
        self.vm = cpr_restore(self.guest, self.vm.ram_path, self.work, f"qemu{self.n + 1}", state)
        self.n += 1
        self.stack.callback(self.vm.kill)
        down = (time.monotonic() - saved.stopped_at) * 1000
        proved(f"device state {human(saved.state_bytes)} next to {human(self.ram)} of RAM "
               f"(RAM not in the stream; {saved.migrate_info['ram']['transferred']} bytes of "
               "RAM-like blocks: ROMs)")
        proved(f"guest downtime, stop to running: {down:.0f} ms (save+quit "
               f"{(t_saved - saved.stopped_at) * 1000:.0f}, daemon restart "
               f"{(t_mounted - t_saved) * 1000:.0f}, new QEMU+load+cont "
               f"{(time.monotonic() - t_mounted) * 1000:.0f})")
        self.numbers.append(f"CPR: device state {saved.state_bytes} B for {self.ram >> 20} MiB RAM, "
                            f"downtime {down:.0f} ms")
        guest_proves(self.vm, saved.last_tick)

    def kernel_state(self, demo: Demo) -> None:
        step("(d) kernel state beside guest RAM: preserve memory, then IOMMU, then devices; "
             "retrieve in the same order before the guest resumes")
        assert self.vm is not None
        k = KernelObjects(demo.mp)
        ram_path = self.vm.ram_path
        ram_ext = extents(ram_path)
        root_phys = self.iommu_for_ram(k, ram_ext)
        stopped = time.monotonic()
        saved, mem_crc = self.preserve_in_order(k, ram_path, ram_ext)
        gap = restart_daemon(demo)
        print(f"  kexec: daemon killed, region served again after {gap:.0f} ms")
        order = self.retrieve_in_order(k, demo, ram_path, ram_ext, mem_crc, root_phys)
        self.vm = cpr_restore(self.guest, ram_path, self.work, f"qemu{self.n + 1}", k.path("vm0-devices"))
        self.n += 1
        self.stack.callback(self.vm.kill)
        down = (time.monotonic() - stopped) * 1000
        unclaimed = k.finish()
        if unclaimed:
            fail(f"unclaimed kernel objects: {unclaimed}")
        k.remove("vm0-devices")  # consumed; the IOMMU tables stay with the guest
        proved(f"retrieved in the order {' → '.join(order)}, then the guest resumed; downtime {down:.0f} ms")
        self.numbers.append(f"CPR with kernel objects: downtime {down:.0f} ms")
        guest_proves(self.vm, saved.last_tick)

    def iommu_for_ram(self, k: KernelObjects, ram_ext: list) -> int:
        """IOMMU tables over the guest's RAM in two kernel objects; the root's region offset."""
        tables = iommu_tables_size(self.ram)
        for name in ("vm0-iommu-root", "vm0-iommu-domain", "vm0-devices"):
            if os.path.exists(k.path(name)):
                k.remove(name)
        root = k.create("vm0-iommu-root", "iommu-page-table", 4096)
        dom = k.create("vm0-iommu-domain", "iommu-page-table", tables)
        root_b, dom_b = build_iommu(ram_ext, root["phys_offset"], dom["phys_offset"], self.ram)
        for name, data in (("vm0-iommu-root", root_b), ("vm0-iommu-domain", dom_b)):
            with open(k.path(name), "r+b") as f:
                f.write(data)
        print(f"  IOMMU tables for the guest's RAM (2 MiB leaves): root at region "
              f"{root['phys_offset']:#x}, {len(dom_b) // 4096} tables at {dom['phys_offset']:#x}")
        return root["phys_offset"]

    def preserve_in_order(self, k: KernelObjects, ram_path: str, ram_ext: list) -> tuple[CprSave, int]:
        """Stop the guest; memory, then IOMMU, then device state preserved; freeze. Returns
        the save and guest RAM's crc32."""
        assert self.vm is not None
        state = os.path.join(self.work, "device-state-d")
        saved = cpr_save(self.vm, state)  # stop, device state to a file, quit
        mem_crc = ram_crc(ram_path)
        print(f"  1. memory:  guest-ram {human(self.ram)}, {len(ram_ext)} extent(s), "
              f"crc32 {mem_crc:08x} (read from the region)")
        k.preserve("vm0-iommu-root")
        k.preserve("vm0-iommu-domain")
        print("  2. IOMMU:   vm0-iommu-root, vm0-iommu-domain preserved")
        dev = k.create("vm0-devices", "device-state", saved.state_bytes)
        with open(state, "rb") as src, open(k.path("vm0-devices"), "r+b") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(state)
        k.preserve("vm0-devices")
        print(f"  3. devices: vm0-devices ({human(saved.state_bytes)} of QEMU device state, "
              f"region {dev['phys_offset']:#x}) preserved")
        k.freeze()
        for o in k.list():
            print(f"     frozen {o['name']:17} {o['type']:17} crc32 {o['checksum_value']:08x} ({o['checksum']})")
        return saved, mem_crc

    def retrieve_in_order(self, k: KernelObjects, demo: Demo, ram_path: str, ram_ext: list, mem_crc: int,
                          root_phys: int) -> list[str]:
        """After the kexec: memory checked, then the IOMMU tables retrieved and walked, then
        the device state retrieved. Returns the order it was done in."""
        order = []
        if extents(ram_path) != ram_ext:
            fail("guest RAM moved: the IOMMU tables no longer point at it")
        got = ram_crc(ram_path)
        if got != mem_crc:
            fail(f"guest RAM crc32 {got:08x} != {mem_crc:08x}")
        order.append("memory")
        print(f"  1. memory:  guest-ram at the same region offsets, crc32 {got:08x} verified")
        for name in ("vm0-iommu-root", "vm0-iommu-domain"):
            o = k.show(name)
            if (o["state"], o["checksum"]) != ("restored", "verified"):
                fail(f"{name} is {o['state']}/{o['checksum']} after the restart")
            o = k.retrieve(name)
            print(f"  2. IOMMU:   {name} restored, crc32 {o['checksum_value']:08x} verified, retrieved")
        with open(demo.region, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mem:
            want = [r + i for _, r, n in ram_ext for i in range(0, n, HUGE_PAGE)]
            for page, phys in enumerate(want[: self.ram // HUGE_PAGE]):
                if walk(mem, root_phys, page * HUGE_PAGE + 0x123) != phys + 0x123:
                    fail(f"IOMMU walk of iova {page * HUGE_PAGE:#x} does not land in guest RAM")
        order.append("IOMMU")
        print(f"     a table walk of every 2 MiB of IOVA lands on guest RAM ({self.ram // HUGE_PAGE} pages)")
        o = k.show("vm0-devices")
        if (o["state"], o["checksum"]) != ("restored", "verified"):
            fail(f"vm0-devices is {o['state']}/{o['checksum']} after the restart")
        o = k.retrieve("vm0-devices")
        order.append("devices")
        print(f"  3. devices: vm0-devices restored, crc32 {o['checksum_value']:08x} verified, retrieved; "
              "QEMU loads it")
        return order

    def migrate(self, a: Demo, b: Demo) -> None:
        step("(c) live migration from region A to region B (two mounts standing for two hosts)")
        assert self.vm is not None
        dst_ram = prepare_ram(b.mp, self.ram)
        refusal = postcopy_probe(self.guest, dst_ram, self.work)
        print(f"  postcopy into {dst_ram} (tried with a throwaway source QEMU): the destination "
              f"never runs: {refusal}")
        started = time.monotonic()
        src = self.vm
        self.vm, info = live_migrate(src, self.guest, dst_ram, self.work, f"qemu{self.n + 1}")
        self.n += 1
        self.stack.callback(self.vm.kill)
        took = time.monotonic() - started
        last = src.console().last.tick
        src.quit()
        r = info["ram"]
        proved(f"precopy: {took:.2f} s, {r['transferred'] / 1e6:.0f} MB sent for {human(self.ram)} of RAM "
               f"({r['dirty-sync-count']} passes), QEMU's downtime {info.get('downtime')} ms, "
               f"total {info.get('total-time')} ms")
        self.numbers.append(f"precopy A→B: {took:.2f} s, {r['transferred']} bytes, "
                            f"downtime {info.get('downtime')} ms")
        guest_proves(self.vm, last)

        before = json.loads(cli("pmemfs", "info", "--json", a.region).stdout)
        k = KernelObjects(a.mp)
        for o in k.list():
            k.remove(o["name"])
        os.unlink(src.ram_path)
        # QEMU's last close reaches the daemon as an asynchronous RELEASE; until then the
        # unlinked file is an open orphan and keeps its blocks.
        deadline = time.monotonic() + 30
        while True:
            after = json.loads(cli("pmemfs", "info", "--json", a.region).stdout)
            if after["used_blocks"] < before["used_blocks"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        st = os.statvfs(a.mp)
        freed = before["used_blocks"] - after["used_blocks"]
        if freed * self.block_size(a) < self.ram:
            fail(f"only {freed} blocks of A were freed")
        proved(f"A's guest RAM removed: {freed} blocks freed, A has {human(st.f_bavail * st.f_frsize)} "
               f"free (used blocks {before['used_blocks']} → {after['used_blocks']})")

    @staticmethod
    def block_size(demo: Demo) -> int:
        return json.loads(cli("pmemfs", "info", "--json", demo.region).stdout)["block_size"]

    def give_back(self, demo: Demo) -> None:
        step("(e) a guest gives memory back: free page reporting punches its RAM file")
        if self.vm is not None:  # the guest of the other flows is done: its RAM goes
            path = self.vm.ram_path
            self.vm.quit()
            self.vm = None
            if path and os.path.exists(path):
                os.unlink(path)
        give = max(8, self.guest.check_mib // 2) // 2 * 2
        guest = Guest(self.ram, self.guest.check_mib, self.a.tick_ms, balloon=True, give_back_mib=give,
                      give_back_tick=3)

        def used() -> int:
            st = os.statvfs(demo.mp)
            return (st.f_blocks - st.f_bfree) * st.f_frsize // (2 << 20)

        ram_path = prepare_ram(demo.mp, self.ram)
        preallocated = used()
        self.n += 1
        vm = Qemu(guest, ram_path, self.work, f"qemu{self.n}")
        self.stack.callback(vm.kill)
        vm.start()
        print("  -device virtio-balloon-pci,free-page-reporting=on; the guest frees "
              f"{give} MiB of its {guest.check_mib} MiB after tick 3")
        c = vm.wait_ticks(2)
        before = used()
        print(f"  df on {demo.mp}: {preallocated} blocks of 2 MiB used before the boot, {before} "
              "after it (the guest kernel reported the memory it never touched)")
        deadline = time.monotonic() + 60
        while used() > before - give // 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = used()
        if after > before - give // 4:
            fail(f"the guest freed {give} MiB but only {before - after} blocks came back")
        c = vm.wait_ticks(vm.console().last.tick + 4)
        if c.last.mismatches or c.mismatch_lines:
            fail(f"the guest found mismatches after giving memory back: {c.mismatch_lines[:3]}")
        proved(f"{before - after} blocks ({(before - after) * 2} MiB) went back to the region "
               f"(df: {before} -> {after} used) and the guest sweeps on with no mismatch")
        self.numbers.append(f"free page reporting: {(before - after) * 2} MiB of {give} MiB freed back")
        vm.quit()

    def daemon_under_guest(self, demo: Demo) -> None:
        step("(b) the daemon killed, then upgraded, while the guest runs")
        assert self.vm is not None
        before = self.vm.wait_ticks(self.vm.console().last.tick + 1)
        baseline = max(t.stall_ms for t in before.ticks[-4:])
        last = before.last.tick
        restart_daemon(demo)
        print(f"  daemon {demo.last_killed} killed; a new one serves the mount")
        try:
            c = self.vm.wait_ticks(last + max(4, 2000 // self.guest.tick_ms), timeout=60)
        except VMError as e:
            fail(f"the guest did not survive the daemon's death: {e}")
        after = [t for t in c.ticks if t.tick > last]
        if c.last.mismatches:
            fail(f"the guest found {c.last.mismatches} mismatches")
        stall = max(t.stall_ms for t in after)
        proved(f"the guest kept going through the kill: tick {last} → {c.last.tick}, 0 mismatches, "
               f"longest stall {stall:.1f} ms in the guest's clock (before: {baseline:.1f} ms)")
        self.numbers.append(f"daemon kill under a running guest: longest guest stall {stall:.1f} ms")
        self.round_trip(demo, "after the kill")
        last = self.vm.console().last.tick
        cli("pmemfs", "upgrade", demo.mp)
        c = self.vm.wait_ticks(last + 4, timeout=60)
        stall = max(t.stall_ms for t in c.ticks if t.tick > last)
        proved(f"the guest kept going through the upgrade: longest stall {stall:.1f} ms")
        self.numbers.append(f"daemon upgrade under a running guest: longest guest stall {stall:.1f} ms")
        self.round_trip(demo, "after the upgrade")

    def round_trip(self, demo: Demo, when: str) -> None:
        """Ticking is not enough: a guest can run on for a while on the page cache of a
        dead mount, whose writes never reach the region. Stop it, start a new QEMU on the
        file through the mount as it is now, and let the guest verify what it finds."""
        assert self.vm is not None
        print(f"  {when}: is the guest's memory in the region? CPR through the current mount")
        saved = cpr_save(self.vm, os.path.join(self.work, "device-state-b"))
        self.vm = cpr_restore(self.guest, self.vm.ram_path, self.work, f"qemu{self.n + 1}",
                              saved.state_path)
        self.n += 1
        self.stack.callback(self.vm.kill)
        c = self.vm.wait_ticks(0)
        if c.ticks[0].tick != saved.last_tick + 1:
            c = self.vm.wait_ticks(c.ticks[0].tick + 2)
            fail(f"the guest's memory in the region is from tick {c.ticks[0].tick - 1}, not "
                 f"{saved.last_tick}: what it wrote after the daemon died stayed in the dead "
                 f"mount's page cache ({c.last.mismatches} mismatching words found by the guest)")
        guest_proves(self.vm, saved.last_tick)


def main() -> int:
    ap = argparse.ArgumentParser(description="a real QEMU guest on pmemfs through restore and migration")
    ap.add_argument("--ram", default="512M", help="guest RAM (default 512M; a whole number of GiB is 1G-aligned)")
    ap.add_argument("--check-mib", type=int, default=0, help="RAM the guest verifies (default 5/8 of it)")
    ap.add_argument("--tick-ms", type=int, default=250, help="guest tick interval")
    ap.add_argument("--flows", default="a,d,c,b,e",
                    help="which flows, from a,b,c,d,e (default all: a,d,c,b,e)")
    ap.add_argument("--workdir", help="keep QEMU's serial logs, QMP sockets and stderr here")
    a = ap.parse_args()
    flows = {f.strip() for f in a.flows.split(",") if f.strip()}
    if not flows or flows - set(FLOWS):
        fail(f"--flows takes a comma-separated list of a, b, c, d, e, not {a.flows!r}")
    lacking = missing()
    if lacking:
        fail("this demo needs " + "; ".join(lacking) + " (./run demo-vm installs them)")
    ram = parse_size(a.ram)
    if ram % (2 << 20) or ram < 128 << 20:
        fail("--ram must be a multiple of 2 MiB, at least 128M")

    with contextlib.ExitStack() as stack:
        if a.workdir:
            os.makedirs(a.workdir, exist_ok=True)
            work = a.workdir
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="pmemfs-vm-"))
        run = Run(a, work, stack)
        A = stack.enter_context(Demo("vm-a", str(region_size(ram))))
        B = stack.enter_context(Demo("vm-b", str(region_size(ram)))) if "c" in flows else None
        run.boot(prepare_ram(A.mp, ram))
        for f in FLOWS:
            if f not in flows:
                continue
            try:
                if f == "a":
                    run.cpr(A)
                elif f == "d":
                    run.kernel_state(A)
                elif f == "c":
                    run.migrate(A, B)
                elif f == "b":
                    run.daemon_under_guest(B or A)
                elif f == "e":
                    run.give_back(A)
            except VMError as e:
                fail(str(e))
        print("numbers: " + "; ".join(run.numbers))
    print("the guest's memory survived every flow, as the guest itself verified")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
