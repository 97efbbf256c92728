#!/usr/bin/env python3
"""Demo 4: IOMMU page tables and in-flight DMA survive the kexec.

- A "guest" has its RAM in a file on pmemfs.
- The host builds real 4-level IOMMU page tables (512 64-bit entries per 4 KiB
  table, entries holding the region offset of the next table or page, as VT-d and
  AMD-Vi tables hold physical addresses) and stores them as kernel objects: the root
  table in one object, the domain's lower tables in another.
- A "device" process is programmed with the root table's region offset and does DMA
  without stopping: it maps the region itself (not the filesystem), walks the tables
  for each I/O virtual address, and writes a checksummed record at the translated
  address in guest memory.
- The host preserves and freezes the tables, the daemon is killed with SIGKILL and a
  new one mounts the region while the device keeps writing; the tables are found
  restored with verified checksums, retrieved, compared bit for bit, and every DMA
  record the device logged is found in guest memory where the tables sent it.

    python examples/iommu_dma.py [--guest 64M] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import signal
import struct
import time
import zlib

import numpy as np
from _common import Demo, drop_caches, fail, proved, step

from pmemfs.kernel import KernelObjects, extents
from pmemfs.serve.mounting import pmemfs_mount_at

PAGE = 4096
ENTRIES = 512
PRESENT, WRITABLE = 1, 2
RECORD = struct.Struct("<QQQI4x")  # seq, iova, time ns, crc32 of the first 24 bytes


def build_tables(guest_pages: list[int], root_phys: int, domain_phys: int) -> tuple[np.ndarray, np.ndarray]:
    """4-level tables mapping IOVA page i to region offset guest_pages[i]."""
    n = len(guest_pages)
    n_l1 = -(-n // ENTRIES)
    if n_l1 > ENTRIES:
        raise SystemExit("guest too large for one L2 table in this demo")
    root = np.zeros(ENTRIES, np.uint64)  # L4
    domain = np.zeros((2 + n_l1, ENTRIES), np.uint64)  # L3, L2, then the L1 tables
    l3_phys, l2_phys = domain_phys, domain_phys + PAGE
    root[0] = l3_phys | PRESENT | WRITABLE
    domain[0, 0] = l2_phys | PRESENT | WRITABLE
    for j in range(n_l1):
        domain[1, j] = (domain_phys + (2 + j) * PAGE) | PRESENT | WRITABLE
    pages = np.asarray(guest_pages, np.uint64) | np.uint64(PRESENT | WRITABLE)
    domain[2:].reshape(-1)[:n] = pages
    return root, domain


def translate(mem: memoryview, root_phys: int, iova: int) -> int:
    """The device's page walk, done on the region mapping itself."""
    table = root_phys
    for shift in (39, 30, 21, 12):
        (entry,) = struct.unpack_from("<Q", mem, table + ((iova >> shift) & 511) * 8)
        if not entry & PRESENT:
            raise RuntimeError(f"IOMMU fault at iova {iova:#x}")
        table = entry & ~0xFFF
    return table + (iova & 0xFFF)


def device(region: str, root_phys: int, guest_bytes: int, log_path: str, stop_at: float) -> None:
    """Do DMA until told to stop (SIGTERM) or the deadline; log each record written."""
    fd = os.open(region, os.O_RDWR)
    mem = memoryview(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED))
    slots = guest_bytes // RECORD.size
    assert slots & (slots - 1) == 0, "slot count must be a power of two"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    seq = 0
    with open(log_path, "w") as log:
        while not stop and time.monotonic() < stop_at and seq < slots - 1:
            seq += 1
            iova = (seq * 2654435761 % slots) * RECORD.size  # a permutation: every slot once
            phys = translate(mem, root_phys, iova)
            body = struct.pack("<QQQ", seq, iova, time.time_ns())
            mem[phys:phys + RECORD.size] = body + struct.pack("<I4x", zlib.crc32(body))
            log.write(f"{seq} {iova} {time.time_ns()}\n")
            if seq % 256 == 0:
                log.flush()


def host_tables(k: KernelObjects, guest: str, guest_bytes: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Write guest RAM, build the IOMMU tables over its pages in two kernel objects;
    returns the root table's region offset and the tables as written."""
    with open(guest, "wb") as f:
        f.write(bytes(guest_bytes))
    pages = []
    for _, region_off, length in extents(guest):  # extents come in file order
        pages += range(region_off, region_off + length, PAGE)
    pages = pages[: guest_bytes // PAGE]
    n_l1 = -(-len(pages) // ENTRIES)
    root_obj = k.create("iommu-root", "iommu-page-table", PAGE)
    dom_obj = k.create("iommu-domain0", "iommu-page-table", (2 + n_l1) * PAGE)
    root, domain = build_tables(pages, root_obj["phys_offset"], dom_obj["phys_offset"])
    for name, table in (("iommu-root", root), ("iommu-domain0", domain)):
        with open(k.path(name), "r+b") as f:
            f.write(table.tobytes())
    print(f"  IOMMU tables: root at region offset {root_obj['phys_offset']:#x}, "
          f"{2 + n_l1} domain tables at {dom_obj['phys_offset']:#x}")
    return root_obj["phys_offset"], root, domain


def check_dma(log_path: str, guest: str, down_from: int, down_to: int) -> None:
    """Every record the device logged is in guest RAM where its IOVA translates, and some
    were written while no daemon ran."""
    with open(log_path) as f:
        records = [tuple(int(x) for x in line.split()) for line in f if line.count(" ") == 2]
    os.unlink(log_path)
    during = sum(1 for _, _, t in records if down_from <= t <= down_to)
    drop_caches()
    with open(guest, "rb") as f:
        mem = f.read()
    bad = 0
    for seq, iova, _ in records:
        rec = mem[iova:iova + RECORD.size]
        got_seq, got_iova, _, crc = RECORD.unpack(rec)
        if (got_seq, got_iova) != (seq, iova) or zlib.crc32(rec[:24]) != crc:
            bad += 1
    if not records:
        fail("the device logged no DMA")
    if bad:
        fail(f"{bad} of {len(records)} DMA records are missing or misplaced in guest memory")
    proved(f"all {len(records)} DMA records the device logged are in guest memory at their "
           f"translated addresses, {during} of them written while no daemon was running")
    if not during:
        fail("the device did no DMA while the daemon was down: nothing was shown")


def main() -> int:
    from pmemfs.tools.common import parse_size

    ap = argparse.ArgumentParser(description="IOMMU tables and DMA survive kill -9 of the daemon")
    ap.add_argument("--guest", default="64M")
    ap.add_argument("--seconds", type=float, default=1.0, help="DMA time before and after the kexec")
    a = ap.parse_args()
    guest_bytes = parse_size(a.guest)
    with Demo("iommu", "256M") as demo:
        k = KernelObjects(demo.mp)
        guest = demo.p("guest-ram")
        step(f"guest RAM: {guest_bytes >> 20} MiB file on pmemfs")
        root_phys, root, domain = host_tables(k, guest, guest_bytes)

        region = pmemfs_mount_at(demo.mp).source
        log_path = f"/tmp/pmemfs-iommu-dma-{os.getpid()}.log"
        dev = multiprocessing.get_context("fork").Process(
            target=device, args=(region, root_phys, guest_bytes, log_path,
                                 time.monotonic() + 4 * a.seconds + 60))
        step("the device starts DMA through the IOMMU tables")
        dev.start()
        try:
            time.sleep(a.seconds)
            step("the host preserves and freezes the tables, then kexec: kill -9 the daemon")
            k.preserve("iommu-root")
            k.preserve("iommu-domain0")
            k.freeze()
            died = demo.kill9()
            down_from = time.time_ns()
            demo.wait_for_replacement(demo.last_killed)  # the device keeps going meanwhile
            down_to = time.time_ns()
            print(f"  the standby serves the same connection after {(time.monotonic() - died) * 1000:.0f} ms")
            for name in ("iommu-root", "iommu-domain0"):
                o = k.show(name)
                if (o["state"], o["checksum"]) != ("restored", "verified"):
                    fail(f"{name} is {o['state']} / {o['checksum']} after the restart")
                k.retrieve(name)
            proved("both table objects came back restored with verified checksums and were retrieved")
            for name, table in (("iommu-root", root), ("iommu-domain0", domain)):
                with open(k.path(name), "rb") as f:
                    if f.read() != table.tobytes():
                        fail(f"{name} differs from what the host wrote")
            proved("the tables are bit for bit what the host built")
            time.sleep(a.seconds)
        finally:
            dev.terminate()
            dev.join(timeout=30)
        if dev.exitcode not in (0, -signal.SIGTERM):
            fail(f"the device failed (exit {dev.exitcode})")
        check_dma(log_path, guest, down_from, down_to)
        k.finish()
    print("IOMMU tables and DMA survived the kexec")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
