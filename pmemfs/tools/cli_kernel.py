"""`pmemfs kernel ...`: kernel objects (typed, pinned, contiguous state that survives the
restart) through pmemfs.kernel, with a one-line hint for each errno."""

from __future__ import annotations

import json
import sys

import click

from ..media.region import RegionError
from .cli_types import Size, call_or_say
from .common import human


@click.group("kernel")
def kernel_group():
    """Kernel objects: typed, pinned, contiguous state that survives the restart (root only)."""


def _objects(mountpoint: str):
    from ..kernel import KernelObjects
    from ..serve.mounting import pmemfs_mount_at

    if pmemfs_mount_at(mountpoint) is None:
        raise RegionError(f"{mountpoint}: no pmemfs is mounted there")
    return KernelObjects(mountpoint)


KERNEL_HINTS = {16: " (frozen, preserved or pinned)", 5: " (payload checksum mismatch: the object is damaged)",
                1: " (kernel objects are root's)", 61: " (kernel objects are root's)",
                28: " (no free contiguous run that large)",
                95: " (not a pmemfs mount?)"}


def _kernel_call(what: str, fn, *args):
    return call_or_say(what, KERNEL_HINTS, fn, *args)


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
