"""Command-line tools: `pmemfs` (mount and control) and `pmemfs-mkfs`.

Every user mistake ends in one line on stderr naming the problem and a non-zero
exit, never a traceback.

The commands live by group in the cli_* modules; this one makes the `pmemfs` group of
them and the console entry points (pyproject.toml: pmemfs.tools.cli:main, :mkfs_main).
"""

from __future__ import annotations

import os
import sys

import click

from .cli_info import info_command, map_command
from .cli_kernel import kernel_group
from .cli_mkfs import mkfs_command
from .cli_mount import mount_command, systemd_unit_command, umount_command, upgrade_command
from .cli_space import carve_command, defrag_command, prealloc_command
from .cli_types import Size
from .common import run

__all__ = [
    "Size", "carve_command", "cli", "defrag_command", "info_command", "kernel_group", "main",
    "map_command", "mkfs_command", "mkfs_main", "mount_command", "prealloc_command",
    "systemd_unit_command", "umount_command", "upgrade_command",
]

mkfs_main = run(mkfs_command, "pmemfs-mkfs")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """pmemfs: a filesystem in a persistent memory region that outlives its daemon."""


for _command in (mount_command, umount_command, upgrade_command, info_command, map_command,
                 kernel_group, prealloc_command, carve_command, defrag_command,
                 systemd_unit_command):
    cli.add_command(_command)

_main = run(cli, "pmemfs")


def main(argv: list[str] | None = None) -> None:
    """`pmemfs` entry point; `pmemfs REGION MOUNTPOINT -o OPTS` (as mount.fuse3 calls it) mounts."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in cli.commands and not argv[0].startswith("-") and os.path.exists(argv[0]):
        argv = ["mount", *argv]
    _main(argv)
