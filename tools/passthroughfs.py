"""A minimal pyfuse3 + trio passthrough filesystem: the benchmark baseline.

This is the "what a user would write in an afternoon" peer that tools/bench.py
compares pmemfs against: every request is forwarded to a directory of another
filesystem (a tmpfs directory in the benchmarks) with plain os calls. It is written
to be straightforward, not clever, and not pathological either:

- inode numbers are handed out by the daemon (a dict path <-> inode), so the
  backing filesystem's own inode numbers never clash with FUSE's root inode;
- attribute and entry timeouts are left at pyfuse3's defaults (300 s);
- a directory listing is taken once per opendir and handed out by index, each
  entry stat'ed only when it is returned;
- a file handle is the backing file descriptor; no xattrs (the kernel then stops
  asking), no locks, no writeback cache.

Usage: python tools/passthroughfs.py [--debug] SOURCE_DIR MOUNTPOINT
Unmount with `fusermount3 -u MOUNTPOINT`; SIGTERM/SIGINT unmount as well.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


def _oserror(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, source: str):
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.inodes: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self.lookups: dict[int, int] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, list[str]] = {}
        self.next_dh = 1

    # ---------------------------------------------------------------- helpers
    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _ino_of(self, path: str) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.inodes[path] = ino
            self.paths[ino] = path
        return ino

    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel one more reference."""
        try:
            st = os.lstat(path)
        except OSError as e:
            raise _oserror(e) from None
        ino = self._ino_of(path)
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attrs(ino, st)

    def _forget_path(self, path: str) -> None:
        ino = self.inodes.pop(path, None)
        if ino is not None:
            self.paths.pop(ino, None)

    # ---------------------------------------------------------------- names
    async def lookup(self, parent_inode, name, ctx):
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino != pyfuse3.ROOT_INODE:
                path = self.paths.pop(ino, None)
                if path is not None and self.inodes.get(path) == ino:
                    del self.inodes[path]

    async def getattr(self, inode, ctx):
        try:
            return self._attrs(inode, os.lstat(self._path(inode)))
        except OSError as e:
            raise _oserror(e) from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            return self._attrs(inode, os.lstat(path))
        except OSError as e:
            raise _oserror(e) from None

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as e:
            raise _oserror(e) from None
        return self._entry(path)

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            os.unlink(path)
        except OSError as e:
            raise _oserror(e) from None
        self._forget_path(path)

    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            os.rmdir(path)
        except OSError as e:
            raise _oserror(e) from None
        self._forget_path(path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
        except OSError as e:
            raise _oserror(e) from None
        self._forget_path(new)
        # Move the inode of the entry, and of everything below it, to the new path.
        prefix = old + os.sep
        moved = [p for p in self.inodes if p == old or p.startswith(prefix)]
        for p in moved:
            ino = self.inodes.pop(p)
            q = new + p[len(old):]
            self.inodes[q] = ino
            self.paths[ino] = q

    # ---------------------------------------------------------------- files
    async def open(self, inode, flags, ctx):
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as e:
            raise _oserror(e) from None
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode)
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as e:
            raise _oserror(e) from None
        return pyfuse3.FileInfo(fh=fd), self._entry(path)

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise _oserror(e) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise _oserror(e) from None

    async def flush(self, fh):
        pass

    async def release(self, fh):
        try:
            os.close(fh)
        except OSError as e:
            raise _oserror(e) from None

    async def fsync(self, fh, datasync):
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            raise _oserror(e) from None

    # ---------------------------------------------------------------- directories
    async def opendir(self, inode, ctx):
        try:
            names = sorted(os.listdir(self._path(inode)))
        except OSError as e:
            raise _oserror(e) from None
        dh = self.next_dh
        self.next_dh += 1
        self.dirs[dh] = [os.fsencode(n) for n in names]
        self.dirs[-dh] = [self._path(inode)]  # the directory's path, for readdir
        return dh

    async def readdir(self, fh, start_id, token):
        names = self.dirs.get(fh, [])
        base = self.dirs.get(-fh, [""])[0]
        for i in range(start_id, len(names)):
            path = os.path.join(base, os.fsdecode(names[i]))
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone since opendir
            ino = self._ino_of(path)
            if not pyfuse3.readdir_reply(token, names[i], self._attrs(ino, st), i + 1):
                break
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)
        self.dirs.pop(-fh, None)

    async def statfs(self, ctx):
        try:
            s = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        except OSError as e:
            raise _oserror(e) from None
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(s, field))
        return out


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="passthroughfs", description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    ops = Passthrough(os.path.abspath(a.source))
    options = set(pyfuse3.default_options) | {"fsname=passthroughfs", "subtype=passthroughfs"}
    if a.debug:
        options.add("debug")
    pyfuse3.init(ops, a.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
