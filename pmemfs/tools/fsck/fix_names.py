"""Repairs of the namespace: directory entries, names, readdir cookies, '..', and
files no longer reachable from the root (into /lost+found or /.kernel)."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import COOKIE_END, Finding
from ...media.format import KIND_KOBJ, NAME_MAX, ROOT_INO
from .repair import Repair, finding_items, namespace_ino
from .report import decode_name, display


def fix_drop_dirents(r: Repair, fs: list[Finding]) -> None:
    for slot in finding_items(fs, "index"):
        d = r.t.dirents
        if not d["parent"][slot]:
            continue
        ino = int(d["ino"][slot])
        live = 0 < ino < r.hwm["inode"] and int(r.t.inodes["kind"][ino]) != 0
        path = r.before.of_slot(slot) if r.before else None
        if live:
            r.note(ino, "name-removed", f"its entry {r.slot_path(slot)} was removed: its directory is missing")
        elif path is not None:  # a name a user could see vanishes (a garbage entry nowhere is no file)
            r.note(ino, "removed", f"its entry {display(path)} was removed: it named inode {ino}, "
                                   "which does not exist")
        r.zero("dirent", slot)


def fix_dirent_kind(r: Repair, fs: list[Finding]) -> None:
    for slot in finding_items(fs, "index"):
        r.set("dirent", slot, kind=int(r.t.inodes["kind"][int(r.t.dirents["ino"][slot])]))


def fix_cookies(r: Repair, fs: list[Finding]) -> None:
    for slot in finding_items(fs, "index"):
        parent = int(r.t.dirents["parent"][slot])
        if not parent:
            continue
        v = r.view()
        top = int(r.t.dirents["cookie"][v.dir_used[v.d_parent == parent]].max())
        cookie = max(int(r.t.inodes["next_cookie"][parent]), top + 1, 3)
        if cookie + 1 >= int(COOKIE_END):
            _renumber_cookies(r, parent)
            continue
        r.set("dirent", slot, cookie=cookie)
        r.set("inode", parent, next_cookie=cookie + 1)


def fix_next_cookie(r: Repair, fs: list[Finding]) -> None:
    for ino in finding_items(fs, "index"):
        _renumber_cookies(r, ino)


def _renumber_cookies(r: Repair, parent: int) -> None:
    """Give a directory's entries the cookies 3, 4, ... in their old order: a damaged
    counter near 2^63 would otherwise hand out offsets readdir cannot carry. Offline,
    no directory stream is open, so nothing can notice the new numbers."""
    v = r.view()
    kids = v.dir_used[v.d_parent == parent]
    order = kids[np.argsort(r.t.dirents["cookie"][kids], kind="stable")]
    for k, slot in enumerate(order.tolist()):
        r.set("dirent", slot, cookie=3 + k)
    r.set("inode", parent, next_cookie=3 + len(order))


def _sanitize(raw: bytes, nlen: int) -> bytes:
    name = raw[:min(nlen, NAME_MAX)].replace(b"/", b"_").replace(b"\0", b"_")
    return b"" if name in (b".", b"..") else name


def fix_rename(r: Repair, fs: list[Finding]) -> None:
    for slot in finding_items(fs, "index"):
        d = r.t.dirents
        parent, ino = int(d["parent"][slot]), int(d["ino"][slot])
        if not parent:
            continue
        raw = bytes(d["name"][slot].tobytes()) if hasattr(d["name"][slot], "tobytes") else bytes(d["name"][slot])
        taken = r.names_in(parent)
        name = _sanitize(raw, int(d["name_len"][slot]))
        if not name or (name in taken and name != bytes(d["name"][slot])) or name == bytes(d["name"][slot]):
            base = name[:200] if name else b""
            k = 0
            while True:
                name = base + (b"#%d" % ino if not k else b"#%d.%d" % (ino, k))
                if name not in taken:
                    break
                k += 1
        old = r.slot_path(slot)
        r.set("dirent", slot, name=name, name_len=len(name))
        r.note(ino, "renamed", f"its name {old} was invalid or taken twice: renamed {decode_name(name)!r}")


def fix_dir_names(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    up = check.dir_name_parent(v)
    for ino in finding_items(fs, "ino"):
        slots = v.dir_used[v.d_linked & (v.d_ino == ino)]
        keep = [s for s in slots.tolist() if int(r.t.dirents["parent"][s]) == up[ino]][:1] or slots[:1].tolist()
        for s in slots.tolist():
            if s not in keep:
                r.note(ino, "name-removed", f"a directory has one name: its extra entry {r.slot_path(s)} "
                                            "was removed")
                r.zero("dirent", s)


def fix_root_named(r: Repair, fs: list[Finding]) -> None:
    v = r.view()
    for s in v.dir_used[v.d_ino == ROOT_INO].tolist():
        r.note(ROOT_INO, "name-removed", f"an entry {r.slot_path(s)} named the root: removed")
        r.zero("dirent", s)


def fix_dotdot(r: Repair, fs: list[Finding]) -> None:
    up = check.dir_name_parent(r.view())
    for ino in finding_items(fs, "ino"):
        r.set("inode", ino, parent=ROOT_INO if ino == ROOT_INO else int(up[ino]))


def fix_reconnect(r: Repair, fs: list[Finding]) -> None:
    """Put the tops of unreachable subtrees (and break directory cycles) into /lost+found."""
    v = r.view()
    reached, up, _ = check.reachability(v)
    unreachable = v.live & ~reached & ~v.orphan
    names = v.names_per_inode()
    tops: list[int] = []
    done: set[int] = set()
    for d in np.flatnonzero(unreachable & v.is_dir).tolist():
        path: list[int] = []
        onpath: set[int] = set()
        x = d
        while x not in done:
            if x in onpath:
                tops.append(x)  # a cycle: detach it here
                break
            p = int(up[x])
            if p <= 0 or not unreachable[p]:
                tops.append(x)
                break
            onpath.add(x)
            path.append(x)
            x = p
        done.update(path)
        done.add(x)
    tops.extend(np.flatnonzero(unreachable & ~v.is_dir & (names == 0)).tolist())
    space = namespace_ino(r)
    if space:  # kernel objects are named in /.kernel and nowhere else: they go back there
        for ino in [i for i in tops if v.kind[i] == KIND_KOBJ]:
            tops.remove(ino)
            taken = r.names_in(space)
            name, k = b"#%d" % ino, 1
            while name in taken:
                name, k = b"#%d.%d" % (ino, k), k + 1
            r.add_dirent(space, name, ino)
            r.note(ino, "moved", f"it was not reachable from the root: now /.kernel/{decode_name(name)}")
    if not tops:
        return
    lf = r.lost_and_found()
    taken = r.names_in(lf)
    for ino in dict.fromkeys(tops):
        if ino == lf:
            continue
        if v.is_dir[ino]:
            for s in v.dir_used[v.d_ino == ino].tolist():
                r.zero("dirent", s)
        name = b"#%d" % ino
        k = 1
        while name in taken:
            name = b"#%d.%d" % (ino, k)
            k += 1
        taken.add(name)
        r.add_dirent(lf, name, ino)
        if v.is_dir[ino]:
            r.set("inode", ino, parent=lf)
        below = " (with everything under it)" if v.is_dir[ino] else ""
        r.note(ino, "moved", f"it was not reachable from the root: now /lost+found/{decode_name(name)}{below}")
