"""IOMMU-like page tables for the VM demo (vm_live_update.py): built in a kernel object,
walked as a device's IOMMU would walk them, from the region ("physical memory")."""

from __future__ import annotations

import mmap
import struct

import numpy as np
from _vm import VMError

HUGE_PAGE = 2 << 20  # the IOMMU tables map guest RAM with 2 MiB leaves
ENTRIES = 512
PRESENT, WRITABLE, PAGE_SIZE_BIT = 1, 2, 0x80


def build_iommu(ram_extents: list[tuple[int, int, int]], root_phys: int, dom_phys: int,
                ram: int) -> tuple[bytes, bytes]:
    """4-level tables (x86 layout: 512 entries of 8 bytes per 4 KiB table) mapping IOVA
    [0, ram) to guest RAM's region offsets with 2 MiB leaves; entries hold the region
    offset ("physical address") of the next table or page."""
    pages: list[int] = []
    for _, roff, length in ram_extents:
        pages += range(roff, roff + length, HUGE_PAGE)
    pages = pages[: ram // HUGE_PAGE]
    n_l2 = -(-len(pages) // ENTRIES)
    root = np.zeros(ENTRIES, np.uint64)  # L4
    domain = np.zeros((1 + n_l2, ENTRIES), np.uint64)  # L3, then the L2 tables
    root[0] = dom_phys | PRESENT | WRITABLE
    for j in range(n_l2):
        domain[0, j] = (dom_phys + (1 + j) * 4096) | PRESENT | WRITABLE
    domain[1:].reshape(-1)[: len(pages)] = np.asarray(pages, np.uint64) | np.uint64(
        PRESENT | WRITABLE | PAGE_SIZE_BIT)
    return root.tobytes(), domain.tobytes()


def iommu_tables_size(ram: int) -> int:
    return (1 + -(-(ram // HUGE_PAGE) // ENTRIES)) * 4096


def walk(mem: mmap.mmap, root_phys: int, iova: int) -> int:
    """What a device's IOMMU does: walk the tables in "physical memory" (the region)."""
    table = root_phys
    for shift in (39, 30, 21):
        (entry,) = struct.unpack_from("<Q", mem, table + ((iova >> shift) & 511) * 8)
        if not entry & PRESENT:
            raise VMError(f"IOMMU fault at iova {iova:#x}")
        if shift == 21:
            if not entry & PAGE_SIZE_BIT:
                raise VMError(f"iova {iova:#x}: not a 2 MiB leaf")
            return (entry & ~0x1FFFFF & (1 << 52) - 1) + (iova & (HUGE_PAGE - 1))
        table = entry & ~0xFFF & (1 << 52) - 1
    raise AssertionError
