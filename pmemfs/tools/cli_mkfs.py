"""`pmemfs-mkfs` (and `mkfs.pmemfs`): make a filesystem in a region and say what it made."""

from __future__ import annotations

import json
import os

import click

from ..media.region import RegionError
from .cli_types import Size
from .common import human, progress_bar


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
