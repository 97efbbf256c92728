"""`pmemfs info --frag / --map / --png` and `pmemfs map FILE` on regions of known layout.

Layouts are built through the Engine (no FUSE) and first checked block by block, so a
change of allocation policy fails here with a clear message rather than with wrong
numbers. The vectorised computations are also compared with a plain Python reference
on a scrambled layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pmemfs.fs.engine import Engine
from pmemfs.media.format import Superblock, Tables, read_superblock
from pmemfs.media.region import Region
from pmemfs.tools import regionmap
from pmemfs.tools.regionmap import BAD, FILE, FREE, KOBJ, LEAKED, META

MB2 = 2 << 20
GiB = 1 << 30
BIN = os.path.dirname(sys.executable)


def pmemfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pmemfs: "), r.stderr
    return lines[0]


def small_file(e: Engine, name: bytes, parent: int = 1) -> int:
    """A one-block file: one byte past the small-file threshold (64 KiB at 2 MiB blocks),
    so it is not packed with others but gets a block of its own."""
    ino = e.create(parent, name, 0o644).ino
    assert e.write(ino, e.packer.limit, b"p") == 1
    return ino


def block_of(e: Engine, ino: int) -> list[int]:
    """Region blocks of a file, in file order."""
    return [pb + i for _, pb, n in e.extents(ino) for i in range(n)]

def png_rgb(path: str) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def png_row_cells(img: np.ndarray, anchor: int) -> list[tuple[int, int]]:
    """The grid row through the topmost patch of colour `anchor`, as (class, cells) runs.

    Pixels are matched to the map's palette exactly (anti-aliased edges match nothing and
    are skipped); run widths are divided by the anchor cell's width.
    """
    from matplotlib.colors import to_rgb

    palette = {c: tuple(round(v * 255) for v in to_rgb(regionmap.HEX[c])) for c in regionmap.HEX}
    ys, _ = np.nonzero((img == palette[anchor]).all(-1))
    assert len(ys), "no pixel of the anchor colour"
    top = ys.min()
    height = int(np.argmax(~np.isin(np.arange(top, img.shape[0]), ys)))
    row = img[top + height // 2]
    runs: list[list[int]] = []
    for pixel in map(tuple, row):
        cls = next((c for c, rgb in palette.items() if rgb == pixel), None)
        if cls is None:
            continue
        if runs and runs[-1][0] == cls:
            runs[-1][1] += 1
        else:
            runs.append([cls, 1])
    cell = next(n for c, n in runs if c == anchor)
    return [(c, round(n / cell)) for c, n in runs]



# ------------------------------------------------------------------ a known layout
class Layout:
    """A 4 GiB region of 2 MiB blocks (2048 blocks, metadata in [0, ds)):

    x, y   6 blocks each, written alternately: x at ds+0,2,..,10 (6 extents), y between
    dir/w  sparse: file blocks 0, 2, .., 32 at ds+12..ds+28: 17 extents
    z      3 blocks alternating with one-block files g0, g1: 3 extents
    p<b>   one-block files at every block from ds+34 up to 520 (past the first GiB)
    pt     a 4 KiB kernel object at block 520
    empty  a file with no data
    No file is written sequentially to 16 blocks (those move to an aligned GiB run).
    Then y is deleted (6 one-block holes) and the p files at 100-109, 300-301,
    400-419 and 515-516: holes of 10, 2, 20 and 2 blocks. Free: those and [521, 2048),
    so GiB 2 and 3 are free aligned runs and GiB 1 is not.
    """

    def __init__(self, path: str):
        self.path = path
        e = Engine(path)
        try:
            self.ds = ds = e.geometry.data_start_block
            assert e.block_size == MB2 and e.geometry.block_count == 2048
            x = e.create(1, b"x", 0o644).ino
            y = e.create(1, b"y", 0o644).ino
            for i in range(6):
                for ino in (x, y):
                    assert e.write(ino, i * MB2, b"x" * MB2) == MB2
            d = e.mkdir(1, b"dir", 0o755).ino
            w = e.create(d, b"w", 0o644).ino
            for i in range(17):
                assert e.write(w, 2 * i * MB2, b"w" * MB2) == MB2
            z = e.create(1, b"z", 0o644).ino
            for i in range(3):
                assert e.write(z, i * MB2, b"z" * MB2) == MB2
                if i < 2:
                    small_file(e, b"g%d" % i)
            p = {b: small_file(e, b"p%d" % b) for b in range(ds + 34, 520)}
            pt = e.kernel.create("pt", "iommu-page-table", 4096)
            e.create(1, b"empty", 0o644)
            # The layout is what the docstring says (or the allocator changed policy).
            assert block_of(e, x) == [ds + 2 * i for i in range(6)]
            assert block_of(e, y) == [ds + 1 + 2 * i for i in range(6)]
            assert block_of(e, w) == list(range(ds + 12, ds + 29))
            assert len(e.extents(w)) == 17
            assert block_of(e, z) == [ds + 29, ds + 31, ds + 33]
            assert all(block_of(e, ino) == [b] for b, ino in p.items())
            assert block_of(e, pt.ino) == [520]
            e.unlink(1, b"y")
            self.holes = [*range(100, 110), 300, 301, *range(400, 420), 515, 516]
            for b in self.holes:
                e.unlink(1, b"p%d" % b)
            self.x, self.w, self.z, self.pt = x, w, z, pt.ino
            self.n_p = len(p) - len(self.holes)
            self.extents = {ino: e.extents(ino) for ino in (x, w, z, pt.ino)}
        finally:
            e.close()


@pytest.fixture
def layout(region_factory) -> Layout:
    return Layout(region_factory(size=4 * GiB))


def test_frag_numbers(layout):
    d = regionmap.fragmentation(regionmap.load(layout.path))
    ds = layout.ds
    assert d["block_size"] == MB2 and d["blocks_per_gib"] == 512
    assert d["data_blocks"] == 2048 - ds
    free = 6 + 10 + 2 + 20 + 2 + (2048 - 521)
    assert d["free_blocks"] == free and d["free_bytes"] == free * MB2
    assert d["aligned_1g_runs"] == 2  # GiB 2 and 3; GiB 1 holds p512-p520 and pt
    assert d["aligned_1g_blocks"] == 1024
    assert d["fragment_blocks"] == free - 1024
    assert d["free_runs"] == 6 + 4 + 1
    assert d["largest_free_run_blocks"] == 2048 - 521
    assert d["largest_free_run_start"] == 521 * MB2
    assert d["free_run_histogram"] == {
        "1": {"runs": 6, "blocks": 6},
        "2-15": {"runs": 3, "blocks": 14},
        "16-255": {"runs": 1, "blocks": 20},
        "256-511": {"runs": 0, "blocks": 0},
        "512+": {"runs": 1, "blocks": 2048 - 521},
    }
    ones = 2 + layout.n_p  # g*, p*
    assert d["files_with_data"] == ones + 3
    assert d["file_extents"] == ones + 6 + 17 + 3
    assert d["file_extent_histogram"] == {"1": ones, "2-4": 1, "5-16": 1, "17+": 1}
    assert d["most_fragmented_file"] == {"ino": layout.w, "path": "/dir/w", "extents": 17}
    assert d["kernel_objects"] == 1 and d["kernel_object_extents"] == 1


def test_frag_cli_text_and_json(layout):
    r = pmemfs("info", "--frag", "--json", layout.path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d == regionmap.fragmentation(regionmap.load(layout.path))
    r = pmemfs("info", "--frag", layout.path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "free 1 GiB runs   2 " in out
    assert f"in fragments      {d['fragment_blocks']} " in out
    assert f"largest free run  {2048 - 521} blocks" in out
    assert "  16-255 blocks        1 runs         20 blocks" in out
    assert "  17+ extents          1 files" in out
    assert "most extents     /dir/w (inode" in out and "): 17" in out
    both = json.loads(pmemfs("info", "--frag", "--map", "--json", layout.path).stdout)
    assert set(both) == {"frag", "map"} and both["frag"] == d


def test_block_classes_exact(layout):
    rm = regionmap.load(layout.path)
    cls = regionmap.classify_blocks(rm)
    ds = layout.ds
    want = np.full(2048, FREE, np.uint8)
    want[:ds] = META
    want[[ds + 2 * i for i in range(6)]] = FILE  # x; y's blocks between are free
    want[ds + 12: ds + 34] = FILE  # w, z, g*
    want[ds + 34: 520] = FILE  # p*
    want[layout.holes] = FREE
    want[520] = KOBJ
    assert np.array_equal(cls, want), np.flatnonzero(cls != want)[:20]


def test_bad_and_leaked_blocks(layout):
    """A bad block is never free and is shown as bad; an allocated block no extent holds is leaked."""
    with Region(layout.path) as region:
        sb, _ = read_superblock(region.buf, region.size)
        t = Tables(region.buf, sb)
        t.badmap[1500 // 8] |= 1 << (1500 % 8)  # in GiB 2
        t.bitmap[1800 // 8] |= 1 << (1800 % 8)  # in GiB 3
        del t
    rm = regionmap.load(layout.path)
    cls = regionmap.classify_blocks(rm)
    assert cls[1500] == BAD and cls[1800] == LEAKED and cls[1499] == FREE
    d = regionmap.fragmentation(rm)
    assert d["aligned_1g_runs"] == 0
    assert d["free_blocks"] == 6 + 10 + 2 + 20 + 2 + (2048 - 521) - 2
    assert d["fragment_blocks"] == d["free_blocks"]
    assert d["largest_free_run_blocks"] == 1500 - 521
    view = regionmap.map_view(rm)
    lines = [t.plain for t in regionmap.render(view, color=False)]
    legend = next(s for s in lines if "free" in s and "metadata" in s)
    assert "X bad 1" in legend and "? leaked 1" in legend


def test_cells_dominant_and_uniform():
    c = np.array([META, META, FILE, FREE,  # mixed, metadata the majority
                  FREE, FREE, FREE, FREE,  # uniform free
                  FILE, KOBJ, FREE, BAD,  # four-way tie: BAD wins (priority)
                  KOBJ, KOBJ, FREE, FREE,  # tie KOBJ/FREE: KOBJ wins
                  FILE, FILE],  # a short last cell, uniform
                 np.uint8)
    dom, uni = regionmap.cells(c, 4)
    assert dom.tolist() == [META, FREE, BAD, KOBJ, FILE]
    assert uni.tolist() == [False, True, False, False, True]
    dom1, uni1 = regionmap.cells(c, 1)
    assert np.array_equal(dom1, c) and uni1.all()


def test_layout_shapes():
    L = regionmap.layout
    # Small: a cell per block, one row.
    assert L(32, MB2) == regionmap.Layout(1, 32, 1, 32, 512, False)
    # 4 GiB: a cell per block, 64 a row, 8 rows a GiB.
    assert L(2048, MB2) == regionmap.Layout(1, 64, 32, 2048, 512, False)
    # 20 GiB: 8 blocks a cell, a row per GiB.
    assert L(10240, MB2) == regionmap.Layout(8, 64, 20, 1280, 64, False)
    # 40 GiB: 16 blocks a cell, two GiB a row with a mark between.
    assert L(20480, MB2) == regionmap.Layout(16, 64, 20, 1280, 32, True)
    # 1 TiB: 256 blocks a cell, two cells a GiB.
    assert L(524288, MB2) == regionmap.Layout(256, 64, 32, 2048, 2, False)
    # 1 GiB blocks: a cell per GiB; more than 2048 GiB: a cell spans several.
    assert L(16, GiB) == regionmap.Layout(1, 16, 1, 16, 1, False)
    assert L(3000, GiB) == regionmap.Layout(2, 64, 24, 1500, 0, False)
    for bc, bs in ((32, MB2), (2048, MB2), (20480, MB2), (524288, MB2), (1 << 25, MB2), (3000, GiB)):
        lay = L(bc, bs)
        assert lay.cols <= 64 and lay.rows <= 32 and lay.rows * lay.cols >= lay.cells
        assert lay.cells * lay.group >= bc > (lay.cells - 1) * lay.group


def test_map_render_plain_and_colour(layout):
    view = regionmap.map_view(regionmap.load(layout.path))
    ds = layout.ds
    assert (view.lay.group, view.lay.cols, view.lay.rows) == (1, 64, 32)
    lines = [t.plain for t in regionmap.render(view, color=False)]
    assert lines[0] == "   0G ▶" + "M" * ds + "F." * 6 + "F" * (64 - ds - 12)
    assert lines[1].startswith(" 128M │") and lines[1][7 + 100 - 64] == "."  # hole at 100
    assert lines[8] == "   1G ▶FFF..FFFK" + "." * 55  # p512-514, hole 515-516, p517-519, pt
    assert lines[16] == "   2G ▶" + "." * 64
    legend = lines[33]
    assert legend.startswith(". free ") and "F file " in legend and "K kernel object 1 " in legend
    assert f"M metadata {ds} " in legend and "mixed" in legend and "bad" not in legend
    assert "one cell = 1 block (2.0 MiB)" in lines[34] and "▶ marks a row starting on 1 GiB" in lines[34]
    # In colour: the kernel object's cell is a magenta block, a free cell a green dot.
    row8 = regionmap.render(view, color=True)[8]
    spans = {row8.plain[s.start:s.end]: str(s.style) for s in row8.spans if s.end - s.start == 1}
    assert row8.plain == "   1G ▶███··████" + "·" * 55
    styles = [next(str(s.style) for s in row8.spans if s.start <= i < s.end) for i in range(7, 16)]
    assert styles == ["blue"] * 3 + ["green"] * 2 + ["blue"] * 3 + ["magenta"]
    assert spans["▶"] == "bold"


def test_map_grouped_cells(layout):
    """With 16 blocks a cell, a cell shows its majority and is marked mixed."""
    view = regionmap.map_view(regionmap.load(layout.path), max_cols=16, max_rows=8)
    assert (view.lay.group, view.lay.cols, view.lay.rows) == (16, 16, 8)
    dom, uni = view.dominant, view.uniform
    # Cell 0 = blocks 0-15: metadata 2, x 6 + w 2, y's 6 holes.
    assert (dom[0], uni[0]) == (FILE, False)
    # Cell 6 = blocks 96-111: hole 100-109 (10) beats p* (6).
    assert (dom[6], uni[6]) == (FREE, False)
    # Cell 5 = blocks 80-95: all p*.
    assert (dom[5], uni[5]) == (FILE, True)
    # Cell 32 = blocks 512-527: 6 p*, 2 + 7 free, pt.
    assert (dom[32], uni[32]) == (FREE, False)
    assert dom[33:].tolist() == [FREE] * (128 - 33) and uni[33:].all()
    plain = [t.plain for t in regionmap.render(view, color=False)]
    assert plain[0] == "   0G ▶f" + "F" * 5 + ":" + "F" * 9
    # Rows of 256 blocks: a GiB is two rows. Cells 18 (holes 300-301), 25 (400-415,
    # all free) and 26 (416-419 free, 12 p*).
    assert plain[1] == " 512M │FFf" + "F" * 6 + ".f" + "F" * 5
    assert plain[2] == "   1G ▶:" + "." * 15
    assert plain[4] == "   2G ▶" + "." * 16
    d = view.as_dict()
    assert d["group_blocks"] == 16 and d["rows"][0]["cells"] == "f" + "F" * 5 + ":" + "F" * 9
    assert d["blocks"]["kernel object"] == 1


def test_map_cli(layout, tmp_path):
    r = pmemfs("info", "--map", layout.path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[8].rstrip() == "   1G ▶FFF..FFFK" + "." * 55
    assert "kernel object 1" in r.stdout and "one cell = 1 block" in r.stdout
    d = json.loads(pmemfs("info", "--map", "--json", layout.path).stdout)
    assert d["rows"][16] == {"offset": 2 * GiB, "cells": "." * 64}
    png = str(tmp_path / "map.png")
    r = pmemfs("info", "--png", png, layout.path)
    assert r.returncode == 0, r.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = png_rgb(png)
    # 64 columns and 32 rows of cells: figsize (64 * 0.16 + 2) x (32 * 0.16 + 2) inches at 100 dpi
    assert img.shape == (712, 1224, 3)
    # The row at 1 GiB, as the text map draws it "FFF..FFFK" and 55 free: found by the one
    # kernel-object cell (the topmost patch of its colour; the legend's is below the grid).
    assert png_row_cells(img, KOBJ) == [(FILE, 3), (FREE, 2), (FILE, 3), (KOBJ, 1), (FREE, 55)]
    # Without matplotlib, --png is a one-line error naming what to install, and writes nothing.
    code = ("import sys; sys.modules['matplotlib'] = None; from pmemfs.tools.cli import main; "
            "sys.argv = ['pmemfs'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "info", "--png", str(tmp_path / "m2.png"), layout.path],
                       capture_output=True, text=True, timeout=120)
    assert "pip install" in one_line_error(r) and not os.path.exists(tmp_path / "m2.png")
    line = one_line_error(pmemfs("info", "--png", str(tmp_path / "no" / "such" / "m.png"), layout.path))
    assert "No such file or directory" in line


# ------------------------------------------------------------------ against a reference
def reference(path: str) -> dict:
    """The same numbers, the slow obvious way: a Python loop over every block."""
    with Region(path, writable=False, lock=False) as region:
        sb = Superblock.decode(region.buf[:512], region.size)
        g = sb.geometry
        t = Tables(region.buf, sb)
        used = [bool(t.bitmap[b // 8] >> (b % 8) & 1) or bool(t.badmap[b // 8] >> (b % 8) & 1)
                for b in range(g.block_count)]
        owners = [int(o) for o in t.extents["owner"][1:sb.hwm["extent"]] if o]
        kinds = {o: int(t.inodes["kind"][o]) for o in owners}
        del t
    free = [not u and b >= g.data_start_block for b, u in enumerate(used)]
    runs, b = [], 0
    while b < len(free):
        if free[b]:
            s = b
            while b < len(free) and free[b]:
                b += 1
            runs.append(b - s)
        else:
            b += 1
    per_gib = GiB // g.block_size
    aligned = sum(all(free[k * per_gib:(k + 1) * per_gib]) for k in range(g.block_count // per_gib))
    per_file: dict[int, int] = {}
    for o in owners:
        if kinds[o] == 1:
            per_file[o] = per_file.get(o, 0) + 1
    counts = list(per_file.values())
    return {"free": sum(free), "aligned": aligned, "runs": sorted(runs),
            "hist": [sum(c == 1 for c in counts), sum(2 <= c <= 4 for c in counts),
                     sum(5 <= c <= 16 for c in counts), sum(c >= 17 for c in counts)],
            "worst": max(counts) if counts else 0}


def test_matches_reference_on_scrambled_layout(region_factory):
    path = region_factory(size=2 * GiB)
    rng = np.random.default_rng(7)
    e = Engine(path)
    try:
        inos = [e.create(1, b"s%d" % i, 0o644).ino for i in range(40)]
        for _ in range(300):  # files grow in random order: many extents, holes when deleted
            ino = inos[int(rng.integers(len(inos)))]
            size = e.stat(ino).size
            e.write(ino, size - size % MB2 + MB2 if size else 0, b"s")
        for i in rng.choice(40, 15, replace=False).tolist():
            e.unlink(1, b"s%d" % i)
    finally:
        e.close()
    d = regionmap.fragmentation(regionmap.load(path))
    ref = reference(path)
    assert d["free_blocks"] == ref["free"]
    assert d["aligned_1g_runs"] == ref["aligned"]
    assert d["fragment_blocks"] == ref["free"] - ref["aligned"] * 512
    assert d["free_runs"] == len(ref["runs"]) and d["largest_free_run_blocks"] == max(ref["runs"])
    assert sum(h["blocks"] for h in d["free_run_histogram"].values()) == ref["free"]
    assert d["free_run_histogram"]["1"]["runs"] == ref["runs"].count(1)
    assert list(d["file_extent_histogram"].values()) == ref["hist"]
    assert d["most_fragmented_file"]["extents"] == ref["worst"] > 1


# ------------------------------------------------------------------ 1 GiB blocks
def test_gigantic_blocks(region_factory):
    path = region_factory(size=3 * GiB, block_size=GiB)
    e = Engine(path)
    try:
        small_file(e, b"g")
        assert e.extents(e.lookup(1, b"g")) == [(0, 1, 1)]
    finally:
        e.close()
    d = regionmap.fragmentation(regionmap.load(path))
    assert (d["blocks_per_gib"], d["free_blocks"], d["aligned_1g_runs"], d["fragment_blocks"]) == (1, 1, 1, 0)
    assert d["free_run_histogram"]["1"] == {"runs": 1, "blocks": 1}
    lines = [t.plain for t in regionmap.render(regionmap.map_view(regionmap.load(path)), color=False)]
    assert lines[0] == "0G ▶MF."
    assert "1 GiB is 1 cell" in lines[-1]


# ------------------------------------------------------------------ pmemfs map FILE, mounted
def test_map_file_on_mount(layout, mount_factory, tmp_path):
    m = mount_factory(layout.path)
    for name, ino in (("x", layout.x), ("dir/w", layout.w), ("z", layout.z), (".kernel/pt", layout.pt)):
        r = pmemfs("map", "--json", m.p(name))
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        want = [[fb * MB2, pb * MB2, n * MB2] for fb, pb, n in layout.extents[ino]]
        assert [[x["file_offset"], x["region_offset"], x["length"]] for x in d["extents"]] == want
        assert [x["index"] for x in d["extents"]] == list(range(len(want)))
        assert d["extents"][-1]["flags"] == ["last"] and all(not x["flags"] for x in d["extents"][:-1])
        assert d["block_size"] == MB2 and d["region"] == layout.path
    r = pmemfs("map", m.p("x"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"File size of {m.p('x')} is {6 * MB2} (6 blocks of {MB2} bytes)"
    assert lines[1].split() == ["ext", "file", "offset", "region", "offset", "(physical)", "length", "blocks", "flags"]
    ds = layout.ds
    assert lines[2].split() == ["0:", "0x0", hex(ds * MB2), "0x200000", "(2.0", "MiB)", "1"]
    assert lines[7].split() == ["5:", hex(5 * MB2), hex((ds + 10) * MB2), "0x200000", "(2.0", "MiB)", "1", "last"]
    assert lines[8] == f"{m.p('x')}: 6 extents found"
    # info --frag through the mountpoint reads the same region, live.
    live = json.loads(pmemfs("info", "--frag", "--json", m.path).stdout)
    assert live["aligned_1g_runs"] == 2 and live["region"] == layout.path
    # Errors: one line each.
    assert "is a directory" in one_line_error(pmemfs("map", m.p("dir")))
    assert "No such file or directory" in one_line_error(pmemfs("map", m.p("nope")))
    elsewhere = tmp_path / "plain.txt"
    elsewhere.write_text("x")
    assert "not on a mounted pmemfs" in one_line_error(pmemfs("map", str(elsewhere)))


def test_map_gigantic_extent_flag(region_factory, mount_factory):
    path = region_factory(size=3 * GiB, block_size=GiB)
    e = Engine(path)
    try:
        small_file(e, b"g")
    finally:
        e.close()
    m = mount_factory(path)
    d = json.loads(pmemfs("map", "--json", m.p("g")).stdout)
    assert d["extents"] == [{"index": 0, "file_offset": 0, "region_offset": GiB, "length": GiB,
                             "flags": ["1G-aligned", "last"]}]
    r = pmemfs("map", m.p("g"))
    assert r.stdout.splitlines()[2].split()[-1] == "1G-aligned,last"


# ------------------------------------------------------------------ errors
def test_cli_errors_are_one_line(tmp_path):
    missing = f"/dev/shm/pmemfs-test-missing-{os.getpid()}.region"
    assert "no such region" in one_line_error(pmemfs("info", "--frag", missing))
    junk = tmp_path / "junk.region"
    junk.write_bytes(b"\0" * (1 << 20))
    assert "bad magic" in one_line_error(pmemfs("info", "--map", str(junk)))
    assert "no pmemfs is mounted there" in one_line_error(pmemfs("info", "--frag", str(tmp_path)))
    assert "not on a mounted pmemfs" in one_line_error(pmemfs("map", str(junk)))
    assert "No such file" in one_line_error(pmemfs("map", str(tmp_path / "none")))
