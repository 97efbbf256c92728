"""Where a region's blocks are: free space by run size, and a map of block owners.

Read-only and lock-free, like info.describe(): allowed while the region is mounted
(a live region may change under the reader; the result is then a best-effort
snapshot, never a crash). Everything is numpy over the bitmaps and the extent table,
O(blocks / 8 + extents); no Python loop ever runs over blocks or extents.

Block classes (one per block, see classify_blocks):

  FREE    neither allocated nor bad
  FILE    in an extent of a user file
  KOBJ    in an extent of a kernel object
  META    the metadata area [0, data_start_block)
  BAD     marked in the bad-block bitmap (wins over everything)
  LEAKED  allocated in the bitmap but in no live inode's extent (fsck reclaims it)
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import numpy as np

from ..media.format import (
    BLOCK_1G,
    EXTENT_PACKED,
    KIND_FREE,
    KIND_KOBJ,
    KIND_REG,
    ROOT_INO,
    TABLE_NAMES,
    Tables,
    read_superblock,
)
from ..media.region import Region

FREE, FILE, KOBJ, META, BAD, LEAKED = range(6)
CLASS_NAMES = ("free", "file", "kernel object", "metadata", "bad", "leaked")
# When a group of blocks has no majority, ties go to the kind that matters more.
PRIORITY = (BAD, META, KOBJ, FILE, LEAKED, FREE)

# Free run lengths in blocks: [1], [2, 15], [16, 255], [256, 511], [512, inf).
RUN_EDGES = (1, 2, 16, 256, 512)
RUN_BUCKETS = ("1", "2-15", "16-255", "256-511", "512+")
# Extents per file: [1], [2, 4], [5, 16], [17, inf).
EXTENT_EDGES = (1, 2, 5, 17)
EXTENT_BUCKETS = ("1", "2-4", "5-16", "17+")

MAP_COLS = 64
MAP_ROWS = 32


@dataclass
class RegionMap:
    """What a region holds, block by block: a copy, independent of the mapping."""

    path: str
    region_size: int
    block_size: int
    block_count: int
    data_start: int
    used: np.ndarray  # bool per block: allocation bitmap bit
    bad: np.ndarray  # bool per block: bad-block bitmap bit
    ext_owner: np.ndarray  # live extents: owner inode
    ext_start: np.ndarray  # first region block
    ext_count: np.ndarray  # blocks (clipped to the region)
    ext_kind: np.ndarray  # kind of the owner inode
    names: dict[int, str]  # path of the most fragmented file, when there is one

    @property
    def blocks_per_gib(self) -> int:
        return max(1, BLOCK_1G // self.block_size)

    @property
    def free(self) -> np.ndarray:
        """bool per block: free to allocate (as the allocator sees it)."""
        f = ~(self.used | self.bad)
        f[: self.data_start] = False
        return f


def _bits(bitmap: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bitmap, count=n, bitorder="little").astype(bool)


def load(path: str) -> RegionMap:
    """Read the bitmaps and the live extents of REGION (a region path, not a mountpoint)."""
    with Region(path, writable=False, lock=False) as region:
        sb, _ = read_superblock(region.buf, region.size, allow_backup=True, fd=region.fd)
        g = sb.geometry
        t = Tables(region.buf, sb)
        hwm = {n: min(sb.hwm[n], getattr(g, f"{n}_count")) for n in TABLE_NAMES}
        n = g.block_count
        used = _bits(t.bitmap, n)
        bad = _bits(t.badmap, n)
        ext = t.extents[1: hwm["extent"]]
        owner = ext["owner"].astype(np.int64)
        start = ext["start_block"].astype(np.int64)
        count = ext["count"].astype(np.int64)
        # A packed extent is chunks of one shared pack block: it covers that one block.
        count = np.where((ext["flags"] & EXTENT_PACKED) != 0, 1, count)
        # Keep what lies in the region; a torn or damaged record must not crash a reader.
        live = (owner > 0) & (owner < g.inode_count) & (count > 0) & (start >= 0) & (start < n)
        owner, start, count = owner[live], start[live], count[live]
        count = np.minimum(count, n - start)
        kinds = t.inodes["kind"][: hwm["inode"]]
        in_table = owner < len(kinds)
        kind = np.full(len(owner), KIND_FREE, np.uint8)
        kind[in_table] = kinds[owner[in_table]]
        names: dict[int, str] = {}
        worst = _most_fragmented(owner, kind)
        if worst is not None:
            names[worst[0]] = _path_of(t, hwm["dirent"], worst[0])
        del t, ext, kinds
        return RegionMap(path, g.region_size, g.block_size, n, g.data_start_block, used, bad,
                         owner, start, count, kind, names)


def _most_fragmented(owner: np.ndarray, kind: np.ndarray) -> tuple[int, int] | None:
    """(inode, extents) of the user file with the most extents (lowest inode on ties)."""
    files = owner[kind == KIND_REG]
    if not len(files):
        return None
    inos, counts = np.unique(files, return_counts=True)
    i = int(np.argmax(counts))
    return int(inos[i]), int(counts[i])


def _path_of(t: Tables, dirent_hwm: int, ino: int) -> str:
    """A path of ino from the root (the first name found; depth-bounded against loops)."""
    d = t.dirents[1:dirent_hwm]
    parts: list[str] = []
    for _ in range(4096):
        if ino == ROOT_INO:
            return "/" + "/".join(reversed(parts))
        hit = np.flatnonzero((d["ino"] == ino) & (d["parent"] != 0))
        if not len(hit):
            break
        rec = d[int(hit[0])]
        parts.append(bytes(rec["name"])[: int(rec["name_len"])].decode(errors="replace"))
        ino = int(rec["parent"])
    return ("?/" + "/".join(reversed(parts))) if parts else "?"


def _cover(starts: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """bool per block: inside one of the runs [start, start + count)."""
    d = np.bincount(starts, minlength=n + 1)[: n + 1] - np.bincount(starts + counts, minlength=n + 1)[: n + 1]
    return np.cumsum(d[:n]) > 0


def classify_blocks(rm: RegionMap) -> np.ndarray:
    """uint8 per block: FREE, FILE, KOBJ, META, BAD or LEAKED."""
    n = rm.block_count
    cls = np.full(n, FREE, np.uint8)
    cls[rm.used] = LEAKED  # allocated: stays LEAKED unless a live inode's extent covers it
    for kind_mask, value in ((rm.ext_kind == KIND_KOBJ, KOBJ),
                             ((rm.ext_kind != KIND_KOBJ) & (rm.ext_kind != KIND_FREE), FILE)):
        cls[_cover(rm.ext_start[kind_mask], rm.ext_count[kind_mask], n)] = value
    cls[: rm.data_start] = META
    cls[rm.bad] = BAD
    return cls


# ------------------------------------------------------------------ fragmentation
def free_runs(free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the maximal runs of free blocks."""
    edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def _histogram(values: np.ndarray, edges: tuple[int, ...], weights: np.ndarray | None = None) -> np.ndarray:
    """Per bucket [edges[i], edges[i+1]) (the last one open) the count or weight sum."""
    idx = np.searchsorted(np.asarray(edges), values, side="right") - 1
    ok = idx >= 0
    return np.bincount(idx[ok], weights=None if weights is None else weights[ok],
                       minlength=len(edges)).astype(np.int64)


def fragmentation(rm: RegionMap) -> dict:
    """Free space by run size and files by extent count (see `pmemfs info --frag`)."""
    bs, gb = rm.block_size, rm.blocks_per_gib
    free = rm.free
    total_free = int(np.count_nonzero(free))
    ngib = rm.block_count // gb
    aligned = int(np.count_nonzero(free[: ngib * gb].reshape(ngib, gb).all(axis=1))) if ngib else 0
    starts, lengths = free_runs(free)
    run_counts = _histogram(lengths, RUN_EDGES)
    run_blocks = _histogram(lengths, RUN_EDGES, lengths)
    files = rm.ext_owner[rm.ext_kind == KIND_REG]
    inos, per_file = np.unique(files, return_counts=True)
    hist = _histogram(per_file, EXTENT_EDGES)
    worst = None
    if len(inos):
        i = int(np.argmax(per_file))
        ino = int(inos[i])
        worst = {"ino": ino, "path": rm.names.get(ino, "?"), "extents": int(per_file[i])}
    kobj = rm.ext_kind == KIND_KOBJ
    largest = int(lengths.max()) if len(lengths) else 0
    return {
        "region": rm.path,
        "block_size": bs,
        "data_blocks": rm.block_count - rm.data_start,
        "blocks_per_gib": gb,
        "free_blocks": total_free,
        "free_bytes": total_free * bs,
        "aligned_1g_runs": aligned,
        "aligned_1g_blocks": aligned * gb,
        "fragment_blocks": total_free - aligned * gb,
        "fragment_bytes": (total_free - aligned * gb) * bs,
        "free_runs": len(lengths),
        "largest_free_run_blocks": largest,
        "largest_free_run_start": int(starts[int(np.argmax(lengths))]) * bs if len(lengths) else 0,
        "free_run_histogram": {b: {"runs": int(c), "blocks": int(k)}
                               for b, c, k in zip(RUN_BUCKETS, run_counts, run_blocks, strict=True)},
        "files_with_data": len(inos),
        "file_extents": len(files),
        "file_extent_histogram": {b: int(c) for b, c in zip(EXTENT_BUCKETS, hist, strict=True)},
        "most_fragmented_file": worst,
        "kernel_objects": len(np.unique(rm.ext_owner[kobj])),
        "kernel_object_extents": int(np.count_nonzero(kobj)),
    }


# ------------------------------------------------------------------ the map
@dataclass(frozen=True)
class Layout:
    group: int  # blocks per cell
    cols: int  # cells per row
    rows: int
    cells: int  # cells holding at least one block
    cells_per_gib: int  # 0 when one cell spans more than a GiB
    separators: bool  # draw a mark inside rows at 1 GiB boundaries


def layout(block_count: int, block_size: int, max_cols: int = MAP_COLS, max_rows: int = MAP_ROWS) -> Layout:
    """Group size (a power of two, so a GiB is a whole number of cells) and grid shape."""
    gb = max(1, BLOCK_1G // block_size)
    group = 1
    while -(-block_count // group) > max_cols * max_rows:
        group *= 2
    cells = -(-block_count // group)
    cpg = gb // group if group <= gb else 0
    if 0 < cpg < max_cols and cells > cpg:
        # Several GiB per row: whole GiBs per row, each GiB a row when that fits.
        per_row = max(1, max_cols // cpg)
        if cpg >= 16 and -(-cells // cpg) <= max_rows:
            per_row = 1
        cols = min(cpg * per_row, cells)
    else:
        cols = min(max_cols, cells)
    return Layout(group, cols, -(-cells // cols), cells, cpg, 0 < cpg < cols and cpg >= 4)


def cells(classes: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of `group` blocks: (dominant class, uniform).

    The dominant class is the most frequent one in the cell (ties go to the kind
    first in PRIORITY); uniform is True when every block of the cell has that class.
    The last cell may hold fewer blocks.
    """
    n = len(classes)
    ncells = -(-n // group)
    padded = np.full(ncells * group, 255, np.uint8)
    padded[:n] = classes
    grid = padded.reshape(ncells, group)
    counts = np.stack([np.count_nonzero(grid == c, axis=1) for c in PRIORITY], axis=1)
    best = np.argmax(counts, axis=1)
    dominant = np.asarray(PRIORITY, np.uint8)[best]
    present = np.count_nonzero(grid != 255, axis=1)
    uniform = counts[np.arange(ncells), best] == present
    return dominant, uniform


COLORS = {FREE: "green", FILE: "blue", KOBJ: "magenta", META: "yellow", BAD: "bold red", LEAKED: "dark_orange"}
HEX = {FREE: "#d9f2d9", FILE: "#3465a4", KOBJ: "#a349a4", META: "#e5c100", BAD: "#cc0000", LEAKED: "#ff8c00"}
# Colour: solid cells; a mixed cell is a shade in its dominant kind's colour.
GLYPH_COLOR = {FREE: "·", FILE: "█", KOBJ: "█", META: "█", BAD: "X", LEAKED: "?"}
MIXED_COLOR = {FREE: "░", BAD: "x", LEAKED: "¿"}
# No colour (a pipe, NO_COLOR): letters, lower case for a mixed cell.
GLYPH_PLAIN = {FREE: ".", FILE: "F", KOBJ: "K", META: "M", BAD: "X", LEAKED: "?"}
MIXED_PLAIN = {FREE: ":", FILE: "f", KOBJ: "k", META: "m", BAD: "x", LEAKED: "¿"}


def glyph(cls: int, uniform: bool, color: bool) -> str:
    if color:
        return GLYPH_COLOR[cls] if uniform else MIXED_COLOR.get(cls, "▒")
    return GLYPH_PLAIN[cls] if uniform else MIXED_PLAIN[cls]


def _offset_label(offset: int) -> str:
    if offset % BLOCK_1G == 0:
        return f"{offset // BLOCK_1G}G"
    if offset % (1 << 20) == 0 and offset < BLOCK_1G:
        return f"{offset >> 20}M"
    return f"{offset / BLOCK_1G:.2f}G"


@dataclass
class MapView:
    rm: RegionMap
    lay: Layout
    classes: np.ndarray  # per block
    dominant: np.ndarray  # per cell
    uniform: np.ndarray  # per cell

    def cell_blocks(self, i: int) -> tuple[int, int]:
        """[first, end) blocks of cell i."""
        g = self.lay.group
        return i * g, min((i + 1) * g, self.rm.block_count)

    def rows(self) -> list[tuple[int, list[int]]]:
        """(region offset of the row, cell indices) per row."""
        c = self.lay.cols
        return [(r * c * self.lay.group * self.rm.block_size, list(range(r * c, min((r + 1) * c, self.lay.cells))))
                for r in range(self.lay.rows)]

    def counts(self) -> dict[str, int]:
        return {CLASS_NAMES[c]: int(v) for c, v in enumerate(np.bincount(self.classes, minlength=len(CLASS_NAMES)))}

    def as_dict(self) -> dict:
        rows = []
        for off, idx in self.rows():
            rows.append({"offset": off,
                         "cells": "".join(glyph(int(self.dominant[i]), bool(self.uniform[i]), False) for i in idx)})
        return {"region": self.rm.path, "block_size": self.rm.block_size, "block_count": self.rm.block_count,
                "group_blocks": self.lay.group, "cols": self.lay.cols, "rows": rows,
                "legend": {CLASS_NAMES[c]: GLYPH_PLAIN[c] for c in GLYPH_PLAIN},
                "blocks": self.counts()}


def map_view(rm: RegionMap, max_cols: int = MAP_COLS, max_rows: int = MAP_ROWS) -> MapView:
    lay = layout(rm.block_count, rm.block_size, max_cols, max_rows)
    classes = classify_blocks(rm)
    dominant, uniform = cells(classes, lay.group)
    return MapView(rm, lay, classes, dominant, uniform)


def render(view: MapView, color: bool = True) -> list:
    """The map as rich Text lines: rows of cells, 1 GiB marks, legend, scale."""
    from rich.text import Text

    from .common import human

    rm, lay = view.rm, view.lay
    bs = rm.block_size
    labels = [_offset_label(off) for off, _ in view.rows()]
    width = max(len(s) for s in labels)
    lines = []
    for (off, idx), label in zip(view.rows(), labels, strict=True):
        gib_row = off % BLOCK_1G == 0
        line = Text()
        line.append(f"{label:>{width}} ", style="bold" if gib_row else "dim")
        line.append("▶" if gib_row else "│", style="bold" if gib_row else "dim")
        for k, i in enumerate(idx):
            if lay.separators and k and (i * lay.group) % rm.blocks_per_gib == 0:
                line.append("┊", style="dim")
            c = int(view.dominant[i])
            line.append(glyph(c, bool(view.uniform[i]), color), style=COLORS[c] if color else "")
        lines.append(line)
    counts = np.bincount(view.classes, minlength=len(CLASS_NAMES))
    legend = Text()
    for c in (FREE, FILE, KOBJ, META, BAD, LEAKED):
        if c in (BAD, LEAKED) and not counts[c]:
            continue
        legend.append(glyph(c, True, color), style=COLORS[c] if color else "")
        legend.append(f" {CLASS_NAMES[c]} {int(counts[c])}  ")
    mixed = "░▒x" if color else ":fkm"
    legend.append(f"{mixed} mixed cell (kind of the majority)")
    g = lay.group
    cpg = lay.cells_per_gib
    if cpg and lay.cols == cpg:
        gib = "a row is 1 GiB"
    elif cpg >= lay.cols:
        gib = "▶ marks a row starting on 1 GiB"
    elif lay.separators:
        gib = "┊ marks 1 GiB boundaries"
    elif cpg:
        gib = f"1 GiB is {cpg} cell{'s' if cpg > 1 else ''}"
    else:
        gib = "a cell spans several GiB"
    scale = Text(f"one cell = {g} block{'s' if g > 1 else ''} ({human(g * bs)}), {lay.cols} cells a row "
                 f"({human(lay.cols * g * bs)}); {gib}; {rm.block_count} blocks of {human(bs)}", style="dim")
    return [*lines, Text(""), legend, scale]


def write_png(view: MapView, out: str) -> None:
    """The same map as an image; needs matplotlib (ImportError when it is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .common import human

    lay, rm = view.lay, view.rm
    rgb = np.ones((lay.rows * lay.cols, 3))
    palette = np.array([to_rgb(HEX[c]) for c in range(len(CLASS_NAMES))])
    rgb[: lay.cells] = palette[view.dominant]
    mixed = np.flatnonzero(~view.uniform)  # a mixed cell: its majority's colour and a dot
    img = rgb.reshape(lay.rows, lay.cols, 3)
    fig, ax = plt.subplots(figsize=(max(6.0, lay.cols * 0.16 + 2), max(2.5, lay.rows * 0.16 + 2)), dpi=100)
    ax.imshow(img, interpolation="nearest", aspect="equal")
    if len(mixed):
        ax.scatter(mixed % lay.cols, mixed // lay.cols, s=max(1.0, 40.0 / max(1, lay.cols // 16)),
                   c="#333333", marker="o", linewidths=0)
    ax.set_xticks([])
    rows = view.rows()
    step = max(1, len(rows) // 16)
    ax.set_yticks(range(0, len(rows), step), [_offset_label(off) for off, _ in rows[::step]], fontsize=8)
    ax.tick_params(length=0)
    cpg = lay.cells_per_gib
    if cpg >= lay.cols:
        for r, (off, _) in enumerate(rows):
            if off % BLOCK_1G == 0 and r:
                ax.axhline(r - 0.5, color="black", linewidth=1.2)
    elif cpg:  # every row starts on a GiB; some rows hold several
        for x in range(cpg, lay.cols, cpg):
            ax.axvline(x - 0.5, color="black", linewidth=1.2 if cpg > 1 else 0.4)
        for r in range(1, lay.rows):
            ax.axhline(r - 0.5, color="black", linewidth=1.2 if cpg > 1 else 0.4)
    counts = np.bincount(view.classes, minlength=len(CLASS_NAMES))
    handles = [Patch(facecolor=HEX[c], edgecolor="grey", label=f"{CLASS_NAMES[c]} ({int(counts[c])})")
               for c in (FREE, FILE, KOBJ, META, BAD, LEAKED) if c not in (BAD, LEAKED) or counts[c]]
    handles.append(Line2D([], [], color="#333333", marker="o", linestyle="", markersize=4,
                          label="mixed cell (colour of its majority)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=min(4, len(handles)),
              fontsize=8, frameon=False)
    g = lay.group
    ax.set_title(f"{rm.path}: {human(rm.region_size)}, cell = {g} x {human(rm.block_size)}; "
                 f"black lines: 1 GiB", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ------------------------------------------------------------------ one file's extents
def _mount_of(path: str):
    """The mount holding path (longest mountpoint prefix of its real path)."""
    from ..serve.mounting import mounts

    real = os.path.realpath(path)
    best = None
    for m in mounts():
        mp = m.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) >= len(best.mountpoint)):
            best = m
    return best


def file_extents(path: str) -> dict:
    """The extents of a file on a mounted pmemfs, read through user.pmemfs.extents.

    Each extent: index, file offset, region offset (the "physical address"; None when
    the caller may not read the region itself, see docs/DESIGN.md), length and flags
    ("1G-aligned": starts on a 1 GiB line and is at least 1 GiB long; "last": the last
    extent). RegionError when path is not a file on a pmemfs.
    """
    import json
    import stat as st_

    from ..media.region import RegionError
    from ..serve.control import EXTENTS

    st = os.stat(path)
    if st_.S_ISDIR(st.st_mode):
        raise RegionError(f"{path}: is a directory; pmemfs map shows a file's extents")
    if not st_.S_ISREG(st.st_mode):
        raise RegionError(f"{path}: not a regular file")
    m = _mount_of(path)
    if m is None or m.fstype != "fuse.pmemfs":
        where = f" (it is on {m.fstype} at {m.mountpoint})" if m is not None else ""
        raise RegionError(f"{path}: not on a mounted pmemfs{where}")
    try:
        raw = os.getxattr(path, EXTENTS)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise RegionError(f"{path}: the pmemfs at {m.mountpoint} does not report extents") from None
        raise
    ext = json.loads(raw)
    block_size = os.statvfs(path).f_bsize  # the allocation block (f_frsize counts pack chunks)
    out = []
    for i, (fo, ro, n) in enumerate(ext):
        flags = []
        if ro is not None and ro % BLOCK_1G == 0 and n >= BLOCK_1G:
            flags.append("1G-aligned")
        if i == len(ext) - 1:
            flags.append("last")
        out.append({"index": i, "file_offset": fo, "region_offset": ro, "length": n, "flags": flags})
    return {"file": path, "size": st.st_size, "block_size": block_size, "mountpoint": m.mountpoint,
            "region": m.source, "extents": out}
