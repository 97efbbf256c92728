"""Command-line tools: `pmemfs` (mount and control) and `pmemfs-mkfs`.

Every user mistake ends in one line on stderr naming the problem and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys

import click

from ..media.region import RegionError
from .common import human, parse_size, progress_bar, run


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e.message), param, ctx)


# ------------------------------------------------------------------ mkfs
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size", "-s", type=Size(), default=None, help="Create the region file with this size (e.g. 64G).")
@click.option("--block-size", "-b", type=click.Choice(["2M", "1G"], case_sensitive=False), default="2M",
              show_default=True, help="Allocation unit.")
@click.option("--inodes", "-i", type=int, default=None, help="Inode table size (default: one per MiB).")
@click.option("--extents", type=int, default=None,
              help="Extent table size (default: data blocks + inodes, which cannot fill).")
@click.option("--dirents", type=int, default=None, help="Directory entry table size (default: the inodes).")
@click.option("--blobs", type=int, default=None,
              help="Blob table size, for xattrs and symlink targets (default: inodes + 63).")
@click.option("--packs", type=int, default=None,
              help="Pack table size, shared blocks of small files (default: min(inodes, blocks)).")
@click.option("--label", "-L", default="", help="Filesystem label (up to 64 bytes).")
@click.option("--prefault", is_flag=True, help="Populate the data area now so writes never page-fault.")
@click.option("--sparse", "--overcommit", "sparse", is_flag=True,
              help="On tmpfs or hugetlbfs, overcommit: reserve each block from the backing when it "
                   "is allocated instead of the whole region now; the region may then be larger than "
                   "its backing, and writes get ENOSPC when the backing runs out.")
@click.option("--force", "-f", is_flag=True, help="Overwrite a region that already holds a filesystem.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("region")
def mkfs_command(region, size, block_size, inodes, extents, dirents, blobs, packs, label, prefault, sparse,
                 force, as_json):
    """Make a pmemfs filesystem in REGION (a file or a /dev/dax device).

    On tmpfs or hugetlbfs the whole region is reserved from the backing now, and a region
    the backing cannot hold is refused; --sparse overcommits it instead."""
    from ..media.format import BLOCK_1G, BLOCK_2M
    from ..media.mkfs import make_filesystem

    bs = BLOCK_2M if block_size.upper() == "2M" else BLOCK_1G
    if size is not None and size <= 0:
        raise click.BadParameter("must be positive", param_hint="--size")
    if not size and not os.path.exists(region):
        raise RegionError(f"{region}: no such region (give --size to create one)")
    result = make_filesystem(region, size=size or 0, block_size=bs, inodes=inodes, label=label,
                             force=force, prefault=prefault, sparse=sparse, progress=progress_bar,
                             extents=extents, dirents=dirents, blobs=blobs, packs=packs)
    g = result.superblock.geometry
    summary = {
        "region": region, "uuid": result.superblock.uuid_str, "label": label,
        "region_size": g.region_size, "block_size": g.block_size, "data_blocks": g.data_blocks,
        "inodes": g.inode_count - 1, "metadata_bytes": g.data_start_block * g.block_size,
        "metadata_percent": round(100 * g.data_start_block / g.block_count, 3),
        "sparse": result.sparse, "reserved_bytes": result.reserved,
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{region}: pmemfs {human(g.region_size)}, {human(g.block_size)} blocks, "
               f"{g.data_blocks} data blocks, {g.inode_count - 1} inodes, uuid {summary['uuid']}")
    click.echo(f"metadata {human(summary['metadata_bytes'])} "
               f"({summary['metadata_percent']}% of the region)")
    if result.sparse:
        from ..media.region import backing_free

        free = backing_free(region)
        click.echo(f"sparse: {human(result.reserved)} reserved; blocks are reserved as they are used"
                   + (f" ({human(free)} of the backing free now)" if free is not None else ""))
    elif result.reserved:
        click.echo(f"reserved {human(result.reserved)} of the backing")


mkfs_main = run(mkfs_command, "pmemfs-mkfs")


# ------------------------------------------------------------------ pmemfs
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """pmemfs: a filesystem in a persistent memory region that outlives its daemon."""


@cli.command("mount")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground (the supervisor, or with --single the one daemon).")
@click.option("--single", is_flag=True,
              help="One process that mounts and serves, without a supervisor "
                   "(a daemon that dies leaves the mount dead; a restart is a remount).")
@click.option("-o", "options", multiple=True,
              help="Mount options (README, \"Mount options\"): ro, noatime, strictatime, nodiratime, "
                   "dev, suid, noexec, allow_other, sync, prefault, force, live=off; remount.")
@click.option("--force", is_flag=True, help="Clear a dead FUSE mount at MOUNTPOINT first.")
@click.option("--log", type=click.Path(dir_okay=False), help="Write the daemon's log here.")
@click.option("--debug", is_flag=True, help="Log every request.")
@click.option("--respawn", is_flag=True, hidden=True,
              help="The default now: a supervisor replaces a daemon that dies.")
@click.argument("region")
@click.argument("mountpoint", required=False)
def mount_command(foreground, single, options, force, log, debug, respawn, region, mountpoint):
    """Mount REGION on MOUNTPOINT (returns once the mount answers).

    With -o remount: change the options of the mount at MOUNTPOINT (REGION may be left
    out), as mount(8) -o remount does."""
    from ..serve.mounting import OptionError, check_privilege, remount, resolve_options, spawn

    words = [o.strip() for group in options for o in group.split(",") if o.strip()]
    if "remount" in words:
        target = mountpoint or region
        try:
            flags = remount(target, words)
        except OptionError as e:
            raise click.UsageError(str(e)) from None
        click.echo(f"remounted {target} ({flags})")
        return 0
    if mountpoint is None:
        raise click.UsageError("Missing argument 'MOUNTPOINT'.")
    try:
        opts = resolve_options(words)
        check_privilege(opts)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
    if force:
        opts.add("force")
    if not os.path.exists(region):
        raise RegionError(f"{region}: no such region (make one with pmemfs-mkfs)")
    if foreground:
        # Only the single daemon needs the heavy imports (numpy, pyfuse3, trio): the
        # supervisor's start is part of the gap of a `systemctl restart`.
        from ..serve.mounting import make_mountpoint, prepare_mountpoint
        from ..serve.supervisor import setup_logging
        from ..serve.systemd import inherited_fds, notify, under_systemd

        setup_logging(log, debug)
        inherited = {} if single else inherited_fds()
        if not inherited:  # else the mount is there, unserved: a stat would wait for us
            if under_systemd():
                make_mountpoint(mountpoint)  # the unit's job: MOUNTPOINT= may not exist yet
            prepare_mountpoint(region, mountpoint, "force" in opts)

        def ready(msg: str) -> None:
            click.echo(f"mounted {region} on {mountpoint} ({msg})", err=True)
            if msg.startswith("ok"):
                notify(f"READY=1\nSTATUS=serving {region} on {mountpoint}")  # Type=notify units

        if single:
            from ..serve.daemon import serve

            return serve(region, mountpoint, opts - {"force"}, ready=ready)
        from ..serve.supervisor import supervise

        return supervise(region, mountpoint, opts - {"force"}, ready, log, debug, inherited)
    m = spawn(region, mountpoint, opts, log=log, debug=debug, single=single)
    note = " (cleared a dead mount first)" if m.recovered_stale else ""
    who = "daemon" if single else "supervisor"
    click.echo(f"mounted {region} on {mountpoint}: {who} pid {m.proc.pid}, {m.status[3:]}, "
               f"{m.downtime_ms:.0f} ms{note}")
    return 0


@cli.command("umount")
@click.argument("mountpoint")
def umount_command(mountpoint):
    """Unmount MOUNTPOINT and wait until the region is marked clean."""
    from ..serve.mounting import unmount

    region = unmount(mountpoint)
    click.echo(f"unmounted {mountpoint}; {region} is clean")


@cli.command("upgrade")
@click.argument("mountpoint")
def upgrade_command(mountpoint):
    """Replace MOUNTPOINT's daemon by one running the code installed now, without
    unmounting: in-flight requests drain, clients see a pause."""
    from ..serve.mountctl import SupervisorError, ask

    answer = ask(mountpoint, {"verb": "upgrade"})
    if not answer.get("ok"):
        raise SupervisorError(f"{mountpoint}: {answer.get('error', 'upgrade failed')}")
    click.echo(f"upgraded {mountpoint}: daemon {answer['old_pid']} -> {answer['daemon_pid']}, "
               f"gap {answer['gap_ms']} ms")


@cli.command("info")
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


@cli.command("map")
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


@cli.group("kernel")
def kernel_group():
    """Kernel objects: typed, pinned, contiguous state that survives the restart (root only)."""


def _objects(mountpoint: str):
    from ..kernel import KernelObjects
    from ..serve.mounting import pmemfs_mount_at

    if pmemfs_mount_at(mountpoint) is None:
        raise RegionError(f"{mountpoint}: no pmemfs is mounted there")
    return KernelObjects(mountpoint)


def _kernel_call(what: str, fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        hint = {16: " (frozen, preserved or pinned)", 5: " (payload checksum mismatch: the object is damaged)",
                1: " (kernel objects are root's)", 61: " (kernel objects are root's)",
                28: " (no free contiguous run that large)",
                95: " (not a pmemfs mount?)"}.get(e.errno, "")
        raise click.ClickException(f"{what}: {e.strerror}{hint}") from None


def _print_objects(objs: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(objs, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "type", "size", "physical range", "pinned", "state", "checksum")
    for o in objs:
        t.add_row(o["name"], o["type"], human(o["size"]),
                  f"{o['phys_offset']:#x}-{o['phys_offset'] + o['phys_length']:#x}",
                  "yes" if o["pinned"] else "no", o["state"],
                  f"{o['checksum']} {o['checksum_value']:08x}" if o["checksum_value"] else o["checksum"])
    Console(width=None if sys.stdout.isatty() else 160).print(t)


@kernel_group.command("create")
@click.option("--type", "type_", default="generic", show_default=True,
              help="generic, iommu-page-table, dma-buffer, device-state, clock-calibration")
@click.option("--size", type=Size(), required=True)
@click.option("--version", "version", type=int, default=1, help="Payload format version.")
@click.argument("mountpoint")
@click.argument("name")
def kernel_create(type_, size, version, mountpoint, name):
    """Create kernel object NAME: SIZE bytes in one contiguous, aligned, pinned run."""
    o = _kernel_call(f"create {name}", _objects(mountpoint).create, name, type_, size, version)
    click.echo(f"{name}: {o['type']}, {human(o['size'])} at region offset {o['phys_offset']:#x}")


@kernel_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.argument("mountpoint")
def kernel_list(as_json, mountpoint):
    """List kernel objects: name, type, size, physical range, pinned, state, checksum."""
    _print_objects(_kernel_call("list", _objects(mountpoint).list), as_json)


@kernel_group.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.argument("mountpoint")
@click.argument("name")
def kernel_show(as_json, mountpoint, name):
    """Show one kernel object."""
    _print_objects([_kernel_call(f"show {name}", _objects(mountpoint).show, name)], as_json)


def _verb(verb: str, takes_name: bool, doc: str):
    if takes_name:
        @kernel_group.command(verb, help=doc)
        @click.argument("mountpoint")
        @click.argument("name")
        def cmd(mountpoint, name):
            k = _objects(mountpoint)
            fn = {"preserve": k.preserve, "unpreserve": k.unpreserve, "retrieve": k.retrieve,
                  "rm": k.remove}[verb]
            _kernel_call(f"{verb} {name}", fn, name)
            click.echo(f"{verb}: {name}")
    else:
        @kernel_group.command(verb, help=doc)
        @click.argument("mountpoint")
        def cmd(mountpoint):
            k = _objects(mountpoint)
            _kernel_call(verb, {"freeze": k.freeze, "unfreeze": k.unfreeze}[verb])
            click.echo(f"{verb}: done")


_verb("preserve", True, "Register NAME for the next restart.")
_verb("unpreserve", True, "Take NAME off the list for the next restart.")
_verb("retrieve", True, "After a restart: claim NAME (refused if its checksum did not verify).")
_verb("rm", True, "Remove NAME (refused while frozen).")
_verb("freeze", False, "Seal the checksums of all preserved objects; they are immutable until unfreeze.")
_verb("unfreeze", False, "Abort a freeze: back to preserved, nothing else changed.")


@kernel_group.command("finish")
@click.option("--reclaim", is_flag=True, help="Free the objects nobody retrieved.")
@click.argument("mountpoint")
def kernel_finish(reclaim, mountpoint):
    """End the cycle: report (and with --reclaim free) objects nobody retrieved."""
    unclaimed = _kernel_call("finish", _objects(mountpoint).finish, reclaim)
    what = "reclaimed" if reclaim else "unclaimed"
    click.echo(f"finish: {len(unclaimed)} {what}" + (f": {', '.join(unclaimed)}" if unclaimed else ""))


def _on_pmemfs(path: str) -> str:
    """The mountpoint of the pmemfs holding path (one-line error when there is none)."""
    from ..serve.mounting import mounts

    real = os.path.realpath(path)
    best = ""
    for m in mounts():
        if m.fstype == "fuse.pmemfs" and (real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")):
            best = max(best, m.mountpoint, key=len)
    if not best:
        raise RegionError(f"{path}: not on a mounted pmemfs")
    return best


def _xattr_call(what: str, fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        hint = {1: " (needs CAP_SYS_ADMIN)", 28: " (no free run that large, or free space too fragmented: try pmemfs defrag)",
                16: " (the file is pinned or mapped directly)", 39: " (the destination must be empty)",
                22: " (offset and length must be multiples of the block size, inside the file)",
                27: " (past the largest file size: see max file size in pmemfs info)"}
        raise click.ClickException(f"{what}: {e.strerror}{hint.get(e.errno, '')}") from None


@cli.command("prealloc")
@click.option("--align", type=click.Choice(["2M", "1G"], case_sensitive=False), default=None,
              help="Alignment of the space (default: the file's policy, else the block size).")
@click.argument("file")
@click.argument("size", type=Size())
def prealloc_command(align, file, size):
    """Reserve contiguous, aligned space for FILE up to SIZE (like fallocate), in one step."""
    _on_pmemfs(os.path.dirname(os.path.abspath(file)))
    os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o644))  # as fallocate(1), make it if missing
    value = f"{size}:{align.upper()}" if align else str(size)
    _xattr_call(f"prealloc {file}", os.setxattr, file, b"user.pmemfs.prealloc", value.encode())
    import json as _json

    exts = _json.loads(os.getxattr(file, b"user.pmemfs.extents"))
    click.echo(f"{file}: {human(os.stat(file).st_size)} in {len(exts)} extent(s)")


@cli.command("carve")
@click.argument("src")
@click.argument("offset", type=Size())
@click.argument("length", type=Size())
@click.argument("dst")
def carve_command(src, offset, length, dst):
    """Move LENGTH bytes at OFFSET of SRC into a new file DST without copying (SRC keeps a hole)."""
    _, rel = _path_in_fs(src)
    where = os.path.dirname(dst) or "."  # as given: the caller may not reach it from /
    _on_pmemfs(where)
    if os.stat(src).st_dev != os.stat(where).st_dev:
        raise RegionError(f"{dst}: not on the same pmemfs as {src}")
    if os.path.exists(dst):
        raise RegionError(f"{dst}: exists; carve makes a new file")
    fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        # The daemon walks src from the filesystem's root with our credentials.
        _xattr_call(f"carve {src}", os.setxattr, dst, b"user.pmemfs.carve",
                    json.dumps({"src": rel, "offset": offset, "length": length}).encode())
    except BaseException:
        os.unlink(dst)
        raise
    click.echo(f"{dst}: {human(length)} carved out of {src} at offset {offset}")


def _path_in_fs(path: str) -> tuple[str, str]:
    """(mountpoint, path from the filesystem's root) of path on a mounted pmemfs.

    Symbolic links are resolved here (the daemon follows none). A bind mount of a
    subdirectory has that directory as its root (field 4 of /proc/self/mountinfo), so
    the path is that root joined with the path below the mountpoint.
    """
    from ..serve.mounting import _unescape

    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or not right:
                continue
            root, mp = _unescape(fields[3]), _unescape(fields[4])
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
                    best is None or len(mp) >= len(best[1])):
                best = (right.split()[0], mp, root)
    if best is None or best[0] != "fuse.pmemfs":
        raise RegionError(f"{path}: not on a mounted pmemfs")
    _, mp, root = best
    below = os.path.relpath(real, mp)
    return mp, os.path.normpath(os.path.join(root, "" if below == "." else below))


@cli.command("defrag")
@click.argument("mountpoint")
def defrag_command(mountpoint):
    """Move unpinned file data to rebuild free aligned 1 GiB runs; report what it gained."""
    mp = _on_pmemfs(mountpoint)
    if os.path.realpath(mountpoint) == mp:
        mp = mountpoint  # as given: a caller may reach the mount only by a relative path
    _xattr_call("defrag", os.setxattr, mp, b"trusted.pmemfs.defrag", b"")
    r = json.loads(os.getxattr(mp, b"trusted.pmemfs.defrag"))
    click.echo(f"defrag: free aligned 1 GiB runs {r['aligned_runs_before']} -> {r['aligned_runs_after']}, "
               f"moved {r['blocks_moved']} blocks of {r['files_moved']} files "
               f"({r['skipped_pinned_or_mapped']} pinned or mapped files left in place)")


@cli.command("systemd-unit")
@click.option("--install", "do_install", is_flag=True,
              help="Write the unit to /etc/systemd/system (and the instance's conf) instead of printing.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Install under this directory (for images and tests).")
@click.option("--instance", help="Also define instance NAME: /etc/pmemfs/NAME.conf.")
@click.option("--region", help="The instance's region.")
@click.option("--mountpoint", help="The instance's mountpoint.")
@click.option("-o", "options", default="", help="The instance's mount options (pmemfs mount -o).")
@click.option("--create-size", type=Size(), default=None,
              help="Make the region at start when it is missing (a /dev/shm region after a cold boot).")
def systemd_unit_command(do_install, root, instance, region, mountpoint, options, create_size):
    """Print or install pmemfs@.service; an instance NAME mounts /etc/pmemfs/NAME.conf's region."""
    from ..serve.mounting import OptionError, resolve_options
    from ..serve.systemd import UnitError, check_instance, conf_text, install, unit_text

    try:
        conf = None
        if instance or region or mountpoint:
            if not (instance and region and mountpoint):
                raise UnitError("--instance, --region and --mountpoint go together")
            check_instance(instance)
            try:
                resolve_options(options.split(","))
            except OptionError as e:
                raise UnitError(str(e)) from None
            conf = conf_text(os.path.abspath(region), os.path.abspath(mountpoint), options,
                             str(create_size) if create_size else "")
        if not do_install:
            click.echo(unit_text(), nl=False)
            if conf:
                click.echo(f"\n# /etc/pmemfs/{instance}.conf\n" + conf, nl=False)
            return 0
        for path in install(root, instance, conf):
            click.echo(f"wrote {path}")
    except UnitError as e:
        raise click.ClickException(str(e)) from None
    name = f"pmemfs@{instance}.service" if instance else "pmemfs@NAME.service"
    click.echo(f"next: systemctl daemon-reload && systemctl enable --now {name}")
    return 0


_main = run(cli, "pmemfs")


def main(argv: list[str] | None = None) -> None:
    """`pmemfs` entry point; `pmemfs REGION MOUNTPOINT -o OPTS` (as mount.fuse3 calls it) mounts."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in cli.commands and not argv[0].startswith("-") and os.path.exists(argv[0]):
        argv = ["mount", *argv]
    _main(argv)
