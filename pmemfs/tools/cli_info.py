"""`pmemfs info` (a region or a mount, with --frag, --map, --png) and `pmemfs map` (a
file's extents): what is where, read without changing anything."""

from __future__ import annotations

import json
import os

import click

from ..media.region import RegionError
from .common import human


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--frag", is_flag=True, help="Free space by run size (free aligned 1 GiB runs, fragments) "
              "and files by extent count.")
@click.option("--map", "show_map", is_flag=True, help="Draw the region by block owner, with 1 GiB boundaries.")
@click.option("--png", type=click.Path(dir_okay=False), help="Write the map as a PNG image (needs matplotlib).")
@click.argument("region")
def info_command(as_json, frag, show_map, png, region):
    """Describe REGION (a region path, or the mountpoint of one); safe while mounted."""
    from ..serve.mounting import pmemfs_mount_at
    from .info import describe

    mountpoint = None
    if os.path.isdir(region):
        entry = pmemfs_mount_at(region)
        if entry is None:
            raise RegionError(f"{region}: a directory, and no pmemfs is mounted there")
        mountpoint, region = region, entry.source
    if frag or show_map or png:
        return _region_layout(region, as_json, frag, show_map, png)
    data = describe(region)
    if mountpoint:
        data.update(_restart_mode(mountpoint))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, int) and k.endswith(("size", "bytes")):
            v = f"{v} ({human(v)})"
        click.echo(f"{k.replace('_', ' '):<{width}}  {v}")


def _restart_mode(mountpoint: str) -> dict:
    """How a daemon restart looks to this mount's clients."""
    from ..serve.mountctl import SupervisorError, ask

    try:
        s = ask(mountpoint, {"verb": "status"}, timeout=5.0)
    except (SupervisorError, OSError, ValueError):
        return {"restart_mode": "remount (clients see ENOTCONN while the daemon restarts)"}
    return {"restart_mode": s["mode"], "supervisor_pid": s["supervisor_pid"],
            "daemon_restarts": s["restarts"], "daemon_upgrades": s["upgrades"]}


def _region_layout(region: str, as_json: bool, frag: bool, show_map: bool, png: str | None) -> None:
    """`info --frag / --map / --png`: free space by run size and the map of block owners."""
    from . import regionmap

    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--png needs matplotlib: pip install 'pmemfs[map]'") from None
    rm = regionmap.load(region)
    out: dict = {}
    if frag:
        out["frag"] = regionmap.fragmentation(rm)
    view = regionmap.map_view(rm) if show_map or png else None
    if show_map:
        out["map"] = view.as_dict()
    if png:
        regionmap.write_png(view, png)
    if as_json:
        click.echo(json.dumps(out if frag and show_map else out.get("frag", out.get("map", {})), indent=2))
    else:
        if frag:
            _print_frag(out["frag"])
        if show_map:
            from rich.console import Console

            console = Console(highlight=False, width=max(100, view.lay.cols + 20))
            if frag:
                console.print()
            for line in regionmap.render(view, color=console.color_system is not None):
                console.print(line, no_wrap=True, overflow="ignore", crop=False)
    if png:
        click.echo(f"wrote {png}", err=as_json)


def _print_frag(d: dict) -> None:
    bs, gb = d["block_size"], d["blocks_per_gib"]
    unit = f"{human(bs)} blocks"
    rows = [
        ("region", f"{d['region']} ({d['data_blocks']} data blocks of {human(bs)})"),
        ("free", f"{d['free_blocks']} {unit} ({human(d['free_bytes'])})"),
        ("free 1 GiB runs", f"{d['aligned_1g_runs']} (1 GiB-aligned, {gb} block{'s' if gb > 1 else ''} each, "
                            f"{human(d['aligned_1g_blocks'] * bs)})"),
        ("in fragments", f"{d['fragment_blocks']} {unit} ({human(d['fragment_bytes'])}) outside free 1 GiB runs"),
        ("largest free run", f"{d['largest_free_run_blocks']} blocks "
                             f"({human(d['largest_free_run_blocks'] * bs)}) at {d['largest_free_run_start']:#x}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    click.echo(f"free runs by length ({d['free_runs']} runs):")
    for bucket, h in d["free_run_histogram"].items():
        click.echo(f"  {bucket + (' block' if bucket == '1' else ' blocks'):<14}{h['runs']:>8} runs {h['blocks']:>10} blocks")
    click.echo(f"files by extent count ({d['files_with_data']} files with data, {d['file_extents']} extents):")
    for bucket, n in d["file_extent_histogram"].items():
        click.echo(f"  {bucket + (' extent' if bucket == '1' else ' extents'):<14}{n:>8} files")
    worst = d["most_fragmented_file"]
    if worst:
        click.echo(f"most extents     {worst['path']} (inode {worst['ino']}): {worst['extents']}")
    click.echo(f"kernel objects   {d['kernel_objects']} in {d['kernel_object_extents']} extents")


@click.command("map")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.argument("file")
def map_command(as_json, file):
    """Show FILE's extents (on a mounted pmemfs) like filefrag -v: offsets in the file and in the region."""
    from .regionmap import file_extents

    d = file_extents(file)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    bs = d["block_size"]
    ext = d["extents"]
    click.echo(f"File size of {file} is {d['size']} ({-(-d['size'] // bs)} blocks of {bs} bytes)")
    rows = [("ext", "file offset", "region offset (physical)", "length", "blocks", "flags")]
    for e in ext:
        where = "hidden" if e["region_offset"] is None else f"{e['region_offset']:#x}"
        rows.append((f"{e['index']}:", f"{e['file_offset']:#x}", where,
                     f"{e['length']:#x} ({human(e['length'])})", str(e["length"] // bs), ",".join(e["flags"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.rjust(w) if i < 5 else c for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                   .rstrip())
    click.echo(f"{file}: {len(ext)} extent{'' if len(ext) == 1 else 's'} found")
    if any(e["region_offset"] is None for e in ext):
        click.echo("region offsets are shown only to those who may read the region")
