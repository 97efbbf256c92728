"""`pmemfs prealloc`, `carve` and `defrag`: placing file data, through the control xattrs
of a mounted pmemfs, with a one-line hint for each errno."""

from __future__ import annotations

import json
import os

import click

from ..media.region import RegionError
from .cli_types import Size, call_or_say
from .common import human


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


SPACE_HINTS = {1: " (needs CAP_SYS_ADMIN)", 28: " (no free run that large, or free space too fragmented: try pmemfs defrag)",
               16: " (the file is pinned or mapped directly)", 39: " (the destination must be empty)",
               22: " (offset and length must be multiples of the block size, inside the file)",
               27: " (past the largest file size: see max file size in pmemfs info)"}


def _xattr_call(what: str, fn, *args):
    return call_or_say(what, SPACE_HINTS, fn, *args)


@click.command("prealloc")
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


@click.command("carve")
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


@click.command("defrag")
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
