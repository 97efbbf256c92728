"""Command-line tools: `pmemfs` (mount and control) and `pmemfs-mkfs`.

Every user mistake ends in one line on stderr naming the problem and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable

import click

from .format import BLOCK_1G, BLOCK_2M, FormatError
from .region import RegionError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (use a number with K, M, G or T)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e.message), param, ctx)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(command: click.Command, prog: str, usage_status: int = 2,
        errors: tuple[type[Exception], ...] = (), error_status: int = 1) -> Callable[[], None]:
    """Entry point that turns every expected failure into one line and an exit code."""
    from .engine import MountError
    from .mounting import MountFailed

    expected = (RegionError, FormatError, MountError, MountFailed, *errors)

    def main(argv: list[str] | None = None) -> None:
        try:
            rv = command.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo(f"{prog}: aborted", err=True)
            sys.exit(usage_status)
        except click.UsageError as e:
            click.echo(f"{prog}: {e.format_message()}", err=True)
            sys.exit(usage_status)
        except click.ClickException as e:
            click.echo(f"{prog}: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except expected as e:
            click.echo(f"{prog}: {e}", err=True)
            sys.exit(error_status)
        except KeyboardInterrupt:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"{prog}: {where}{e.strerror or e}", err=True)
            sys.exit(error_status)
        sys.exit(rv if isinstance(rv, int) else 0)

    return main


def progress_bar(label: str, total: int) -> Callable[[int], None]:
    """A rich progress bar that only appears when the work takes more than a second."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    started = time.monotonic()
    state: dict = {"bar": None, "done": 0}

    def tick(n: int) -> None:
        state["done"] += n
        if state["bar"] is None and time.monotonic() - started > 1.0 and sys.stderr.isatty():
            bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                           TimeRemainingColumn(), transient=True)
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(label, total=total, completed=state["done"])
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=state["done"])
            if state["done"] >= total:
                state["bar"].stop()

    return tick


# ------------------------------------------------------------------ mkfs
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size", "-s", type=Size(), default=None, help="Create the region file with this size (e.g. 64G).")
@click.option("--block-size", "-b", type=click.Choice(["2M", "1G"], case_sensitive=False), default="2M",
              show_default=True, help="Allocation unit.")
@click.option("--inodes", "-i", type=int, default=None, help="Inode table size (default: one per MiB).")
@click.option("--label", "-L", default="", help="Filesystem label (up to 64 bytes).")
@click.option("--prefault", is_flag=True, help="Populate the data area now so writes never page-fault.")
@click.option("--force", "-f", is_flag=True, help="Overwrite a region that already holds a filesystem.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("region")
def mkfs_command(region, size, block_size, inodes, label, prefault, force, as_json):
    """Make a pmemfs filesystem in REGION (a file or a /dev/dax device)."""
    from .mkfs import make_filesystem

    bs = BLOCK_2M if block_size.upper() == "2M" else BLOCK_1G
    if size is not None and size <= 0:
        raise click.BadParameter("must be positive", param_hint="--size")
    if not size and not os.path.exists(region):
        raise RegionError(f"{region}: no such region (give --size to create one)")
    result = make_filesystem(region, size=size or 0, block_size=bs, inodes=inodes, label=label,
                             force=force, prefault=prefault, progress=progress_bar)
    g = result.superblock.geometry
    summary = {
        "region": region, "uuid": result.superblock.uuid_str, "label": label,
        "region_size": g.region_size, "block_size": g.block_size, "data_blocks": g.data_blocks,
        "inodes": g.inode_count - 1, "metadata_bytes": g.data_start_block * g.block_size,
        "metadata_percent": round(100 * g.data_start_block / g.block_count, 3),
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{region}: pmemfs {human(g.region_size)}, {human(g.block_size)} blocks, "
               f"{g.data_blocks} data blocks, {g.inode_count - 1} inodes, uuid {summary['uuid']}")
    click.echo(f"metadata {human(summary['metadata_bytes'])} "
               f"({summary['metadata_percent']}% of the region)")


mkfs_main = run(mkfs_command, "pmemfs-mkfs")


# ------------------------------------------------------------------ pmemfs
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """pmemfs: a filesystem in a persistent memory region that outlives its daemon."""


@cli.command("mount")
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground.")
@click.option("-o", "options", multiple=True, help="Mount options: allow_other, ro, sync, prefault, force.")
@click.option("--force", is_flag=True, help="Clear a dead FUSE mount at MOUNTPOINT first.")
@click.option("--log", type=click.Path(dir_okay=False), help="Write the daemon's log here.")
@click.option("--debug", is_flag=True, help="Log every request.")
@click.argument("region")
@click.argument("mountpoint")
def mount_command(foreground, options, force, log, debug, region, mountpoint):
    """Mount REGION on MOUNTPOINT (returns once the mount answers)."""
    from .daemon import MOUNT_OPTIONS_ALLOWED
    from .mounting import spawn

    opts = {o.strip() for group in options for o in group.split(",") if o.strip()}
    opts -= {"rw", "defaults", "nosuid", "nodev", "noexec", "suid", "dev", "exec", "auto", "noauto",
             "user", "nouser", "_netdev"}  # what mount(8) and fstab pass along
    unknown = {o for o in opts if o.split("=")[0] not in MOUNT_OPTIONS_ALLOWED | {"force"}}
    if unknown:
        raise click.UsageError(f"unknown mount option(s): {', '.join(sorted(unknown))}")
    if force:
        opts.add("force")
    if not os.path.exists(region):
        raise RegionError(f"{region}: no such region (make one with pmemfs-mkfs)")
    if foreground:
        from .daemon import serve, setup_logging
        from .mounting import prepare_mountpoint

        setup_logging(log, debug)
        prepare_mountpoint(region, mountpoint, "force" in opts)
        return serve(region, mountpoint, opts - {"force"},
                     ready=lambda msg: click.echo(f"mounted {region} on {mountpoint} ({msg})", err=True))
    m = spawn(region, mountpoint, opts, log=log, debug=debug)
    note = " (cleared a dead mount first)" if m.recovered_stale else ""
    click.echo(f"mounted {region} on {mountpoint}: daemon pid {m.proc.pid}, {m.status[3:]}, "
               f"{m.downtime_ms:.0f} ms{note}")
    return 0


@cli.command("umount")
@click.argument("mountpoint")
def umount_command(mountpoint):
    """Unmount MOUNTPOINT and wait until the region is marked clean."""
    from .mounting import unmount

    region = unmount(mountpoint)
    click.echo(f"unmounted {mountpoint}; {region} is clean")


@cli.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.argument("region")
def info_command(as_json, region):
    """Describe REGION (a region path, or the mountpoint of one); safe while mounted."""
    from .info import describe
    from .mounting import pmemfs_mount_at

    if os.path.isdir(region):
        entry = pmemfs_mount_at(region)
        if entry is None:
            raise RegionError(f"{region}: a directory, and no pmemfs is mounted there")
        region = entry.source
    data = describe(region)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, int) and k.endswith(("size", "bytes")):
            v = f"{v} ({human(v)})"
        click.echo(f"{k.replace('_', ' '):<{width}}  {v}")


_main = run(cli, "pmemfs")


def main(argv: list[str] | None = None) -> None:
    """`pmemfs` entry point; `pmemfs REGION MOUNTPOINT -o OPTS` (as mount.fuse3 calls it) mounts."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in cli.commands and not argv[0].startswith("-") and os.path.exists(argv[0]):
        argv = ["mount", *argv]
    _main(argv)
