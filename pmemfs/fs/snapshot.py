"""A logical picture of a filesystem, for comparing states across crashes and restarts.

It walks the tree through the engine and records what a user can observe, except
timestamps: kind, mode, owner, size, link count, a digest of the contents, symlink
targets, xattrs and chattr flags, plus the free block and inode counts.
"""

from __future__ import annotations

import hashlib

from ..media.format import KIND_DIR, KIND_KOBJ, KIND_REG, KIND_SYMLINK, ROOT_INO
from .engine import Engine


def snapshot(engine: Engine) -> dict:
    tree: dict[bytes, tuple] = {}
    stack = [(b"", ROOT_INO)]
    while stack:
        path, ino = stack.pop()
        for _, name, child in engine.readdir(ino):
            if name in (b".", b".."):
                continue
            st = engine.stat(child)
            p = path + b"/" + name
            content = None
            if st.kind in (KIND_REG, KIND_KOBJ):
                h = hashlib.sha256()
                pos = 0
                while pos < st.size:
                    chunk = engine.read(child, pos, 8 << 20)
                    h.update(chunk)
                    pos += len(chunk)
                content = h.hexdigest()
            elif st.kind == KIND_SYMLINK:
                content = engine.readlink(child)
            xattrs = tuple(sorted((n, engine.getxattr(child, n)) for n in engine.listxattr(child)))
            kobj = (int(engine.I["ktype"][child]), int(engine.I["kstate"][child]),
                    int(engine.I["kchecksum"][child]), st.flags) if st.kind == KIND_KOBJ else None
            tree[p] = (st.kind, st.mode, st.uid, st.gid, st.size, st.nlink, st.blocks, st.rdev, content, xattrs,
                       kobj, engine.attr_flags(child))
            if st.kind == KIND_DIR:
                stack.append((p, child))
    fs = engine.statfs()
    return {"tree": tree, "blocks_free": fs["blocks_free"], "files_free": fs["files_free"],
            "kernel_frozen": engine.kernel.frozen()}
