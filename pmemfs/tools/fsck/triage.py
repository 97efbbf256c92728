"""Records that fail their checksum and that no explanation restores: kept only as far
as everything that refers to them agrees, revived from what refers to them when they
look free, or cleared; every file they belong to is named in the report."""

from __future__ import annotations

import numpy as np

from ...media import check
from ...media.check import Finding
from ...media.format import (
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    EXTENT_PACKED,
    FLAG_ORPHAN,
    FLAG_PINNED,
    FLAG_TRUNCATING,
    KIND_DIR,
    KIND_KOBJ,
    KIND_NAMES,
    KIND_OF_S_IFMT,
    KIND_REG,
    NAME_MAX,
    PACK_CHUNKS,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SMALL_CHUNKS,
    TABLE_NAMES,
    max_file_size,
)
from .evidence import Evidence
from .repair import Repair, namespace_ino
from .report import decode_name
from .restore import restore_records


def _suspects(r: Repair) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(records whose checksum fails, free-looking records that are not empty)."""
    bad, free = set(), set()
    for f in check.run_check("checksums", r.view()):
        for i in f.data.get("index", []):
            (bad if f.code == "checksum" else free).add((f.data["table"], int(i)))
    return bad, free


def _kind_from_names(ev: Evidence, i: int) -> set[int]:
    v = ev.v
    m = (v.d_ino == i) & v.idx_ok(v.d_parent)
    m[m] &= v.is_dir[v.d_parent[m]]
    return set(v.dirents["kind"][v.dir_used[m]].tolist())


def _revive(r: Repair, ev: Evidence, table: str, i: int) -> bool:
    """A record that looks free but is not empty: rebuild its key from what refers to it."""
    revive = _REVIVE.get(table)
    return revive is not None and revive(r, ev, i)


def _revive_inode(r: Repair, ev: Evidence, i: int) -> bool:
    """An inode: its kind, when its directory entries agree on one its mode fits."""
    t = r.t
    kinds = _kind_from_names(ev, i)
    mode = int(t.inodes["mode"][i])
    if len(kinds) == 1:
        k = kinds.pop()
        if 1 <= k <= KIND_KOBJ and S_IFMT_OF_KIND[k] == mode & 0o170000:
            r.set("inode", i, kind=k)
            r.note(i, "unverified", "its inode record failed its checksum and looked free: its kind "
                                    "was taken from its directory entries")
            return True
    return False


def _revive_extent(r: Repair, ev: Evidence, i: int) -> bool:
    """An extent: its owner, when exactly one file fits its size and block count."""
    t, v = r.t, ev.v
    e = t.extents
    n, fb, s, fl = (int(e[x][i]) for x in ("count", "file_block", "start_block", "flags"))
    g = ev.g
    cands: list[int] = []
    if fl & EXTENT_PACKED:
        c0, p = fl >> 16, ev.pack_of.get(s)
        owners = set(v.e_owner.tolist())
        if p is not None and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS and ev.pack_bits(p)[c0:c0 + n].all():
            size = ev.size.astype(np.int64)
            m = ev.live & (ev.kind == KIND_REG) & (size > (n - 1) * ev.chunk) & (size <= n * ev.chunk)
            cands = [o for o in np.flatnonzero(m).tolist() if o not in owners]
    elif not fl and n >= 1 and g.data_start_block <= s <= g.block_count - n and ev.marked(s, n) \
            and not ev.claimed(s, n, i):
        deficit = ev.nblocks.astype(np.int64) - ev.sums
        m = ev.live & np.isin(ev.kind, (KIND_REG, KIND_KOBJ)) & (deficit == n)
        cands = [o for o in np.flatnonzero(m).tolist()
                 if fb + n <= ev.need(o) and not ev.file_overlap(o, fb, n, i)]
    if len(cands) == 1:
        r.set("extent", i, owner=cands[0])
        r.note(cands[0], "unverified", f"its extent record {i} failed its checksum and looked free: "
                                       "its owner was found from the file's size and block count")
        return True
    return False


def _revive_dirent(r: Repair, ev: Evidence, i: int) -> bool:
    """An entry: its directory, for a kernel object (/.kernel) or a directory ('..')."""
    t, v = r.t, ev.v
    ino, kind = int(t.dirents["ino"][i]), int(t.dirents["kind"][i])
    space = namespace_ino(r)
    if 0 < ino < ev.n and ev.live[ino] and int(ev.kind[ino]) == KIND_KOBJ == kind and space:
        r.set("dirent", i, parent=space)  # a kernel object is named in /.kernel and nowhere else
        r.note(ino, "unverified", "its directory entry failed its checksum and looked free: put back "
                                  "in /.kernel, where kernel objects live")
        return True
    if 0 < ino < ev.n and ev.live[ino] and int(ev.kind[ino]) == KIND_DIR == kind and ev.names[ino] == 0:
        p = int(t.inodes["parent"][ino])
        if 0 < p < ev.n and v.is_dir[p]:
            r.set("dirent", i, parent=p)
            r.note(ino, "unverified", "its directory entry failed its checksum and looked free: put back "
                                      "in the directory its '..' names")
            return True
    return False


def _revive_blob(r: Repair, ev: Evidence, i: int) -> bool:
    """An xattr or symlink record: its owner, from the rest of its value."""
    t = r.t
    b = t.blobs
    kind, nxt = int(b["kind"][i]), int(b["next"][i])
    owner = 0
    if kind == BLOB_CONT and ev.linked_by[i] > 0:
        owner = int(b["owner"][ev.linked_by[i]])
    elif kind in (BLOB_XATTR, BLOB_SYMLINK) and 0 < nxt < r.hwm["blob"] and int(b["kind"][nxt]) == BLOB_CONT:
        owner = int(b["owner"][nxt])
    if 0 < owner < ev.n and ev.live[owner]:
        r.set("blob", i, owner=owner)
        r.note(owner, "unverified", f"its xattr or symlink record {i} failed its checksum and looked free: "
                                    "its owner was taken from the rest of its value")
        return True
    return False


def _revive_pack(r: Repair, ev: Evidence, i: int) -> bool:
    """A pack record: its block, when packed extents point at one block no record lists."""
    orphans = sorted(set(ev.p_block.tolist()) - set(ev.pack_of))
    if len(orphans) == 1:
        r.set("pack", i, block=orphans[0])
        return True
    return False


_REVIVE = {"inode": _revive_inode, "extent": _revive_extent, "dirent": _revive_dirent,
           "blob": _revive_blob, "pack": _revive_pack}


def _lost_free(r: Repair, table: str, i: int) -> str:
    """What a free-looking damaged record held, for the report, before it is cleared."""
    t = r.t
    if table == "blob" and int(t.blobs["kind"][i]) == BLOB_XATTR:
        nl = min(int(t.blobs["name_len"][i]), NAME_MAX)
        name = t.blobs["data"][i].tobytes()[:nl]
        return f"cleared: it held an xattr {decode_name(name)!r} whose file cannot be told (its owner was damaged)"
    if table == "dirent":
        ino = int(t.dirents["ino"][i])
        name = decode_name(bytes(t.dirents["name"][i])[:NAME_MAX])
        if 0 < ino < len(t.inodes) and int(t.inodes["kind"][ino]):
            r.note(ino, "name-removed", f"its directory entry {name!r} failed its checksum and lost the "
                                        "directory it is in: removed")
        return f"cleared: it named {name!r} (inode {ino}) in a directory that cannot be told"
    if table == "extent":
        return (f"cleared: it mapped {int(t.extents['count'][i])} block(s) for a file that cannot be told "
                "(the file's block count names it)")
    return "cleared"


def _triage(r: Repair, free_left: set[tuple[str, int]], bad_left: set[tuple[str, int]]) -> None:
    """Records that failed their checksum and that no explanation restores are trusted
    only as far as everything that refers to them agrees (docs/FSCK.md); every file
    such a record belongs to is named in the report."""
    for table, i in sorted(free_left):
        ev = Evidence(r)
        if _revive(r, ev, table, i):
            r.suspect[table].add(i)
            r.outcome[(table, i)] = "its key field was lost: rebuilt from the records that refer to it"
        else:
            r.outcome[(table, i)] = _lost_free(r, table, i)
            r.zero(table, i, keep_generation=table == "inode")
    for table, i in bad_left:
        r.suspect[table].add(i)
    ev = Evidence(r)
    for j in sorted(r.suspect["extent"]):  # (the evidence is rebuilt only after a change)
        if _triage_extent(r, ev, j):
            ev = Evidence(r)
    ev = Evidence(r)
    for i in sorted(r.suspect["inode"]):
        _triage_inode(r, ev, i)
    ev = Evidence(r)
    for k in sorted(r.suspect["dirent"]):
        if _triage_dirent(r, ev, k):
            ev = Evidence(r)
    for b in sorted(r.suspect["blob"]):
        _triage_blob(r, ev, b)
    for p in sorted(r.suspect["pack"]):
        _triage_pack(r, Evidence(r), p)
    for table in TABLE_NAMES:  # what stays is resealed: its contents were judged
        key = check.KEY_FIELD[table]
        for i in sorted(r.suspect[table]):
            if r.tables[table][key][i]:
                r.save(table, i)
                r.outcome.setdefault((table, i), "kept: it agrees with everything that refers to it")


def _triage_extent(r: Repair, ev: Evidence, j: int) -> bool:
    """Returns whether it dropped the extent."""
    e = r.t.extents
    o, n, fb, s, fl = (int(e[x][j]) for x in ("owner", "count", "file_block", "start_block", "flags"))
    if not o:
        return False
    g = ev.g
    sound = ev.b_slot[~np.isin(ev.b_slot, list(r.suspect["extent"]))]
    packed = bool(fl & EXTENT_PACKED)
    why = None
    if not ev.data_inode(o):
        why = "it names no file that can hold data"
    elif packed:
        c0, p = fl >> 16, ev.pack_of.get(s)
        others = (ev.p_block == s) & (ev.p_slot != j) & ~np.isin(ev.p_slot, list(r.suspect["extent"]))
        if not (int(ev.kind[o]) == KIND_REG and fb == 0 and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS):
            why = "its fields are invalid"
        elif p is None:
            why = "its block is not a pack block"
        elif p not in r.suspect["pack"] and not ev.pack_bits(p)[c0:c0 + n].all():
            why = "its pack block's chunk bitmap does not hold its chunks"
        elif ((ev.p_c0[others] < c0 + n) & (ev.p_c0[others] + ev.p_count[others] > c0)).any():
            why = "another file's chunks overlap it"
    elif fl:
        why = "its flags are invalid"
    elif not (n >= 1 and g.data_start_block <= s <= g.block_count - n):
        why = "it lies outside the data area"
    elif not ev.marked(s, n):
        why = "the allocation bitmap marks its blocks free"
    elif ev.claimed(s, n, j, among=sound):
        why = "another extent owns its blocks"
    elif o not in r.suspect["inode"]:
        if fb + n > ev.need(o) and not int(ev.flags[o]) & FLAG_TRUNCATING:
            why = "it maps past the file's size"
        elif ev.file_overlap(o, fb, n, j):
            why = "it overlaps another extent of the file"
        elif int(ev.sums[o]) - ev.own(o, j) + n != int(ev.nblocks[o]):
            why = "the file's block count does not count it"
    unit = "chunk" if packed else "block"
    if why:
        r.lost_hints.append((o, s, n, fb, fl))
        r.zero("extent", j)
        r.suspect["extent"].discard(j)
        r.outcome[("extent", j)] = f"dropped: {why}"
        if ev.data_inode(o):
            r.note(o, "lost-blocks", f"its extent record {j} ({n} {unit}(s) at file block {fb}) failed its "
                                     f"checksum and {why}: dropped, those bytes now read as zeros")
        return True
    r.note(o, "unverified", f"its extent record {j} failed its checksum; kept: it agrees with the "
                            "allocation bitmap and the file's size and block count")
    return False


def _is_namespace(ev: Evidence, i: int) -> bool:
    """Is inode i the /.kernel directory (root's entry named .kernel)?"""
    v = ev.v
    m = (v.d_ino == i) & (v.d_parent == ROOT_INO)
    return bool((v.dirents["name"][v.dir_used[m]] == b".kernel").any())


def _triage_inode(r: Repair, ev: Evidence, i: int) -> None:
    ino = r.t.inodes
    k, mode = int(ino["kind"][i]), int(ino["mode"][i])
    fmt = mode & 0o170000
    if not (k in S_IFMT_OF_KIND and S_IFMT_OF_KIND[k] == fmt):
        named = _kind_from_names(ev, i)
        choice = None
        if len(named) == 1:
            x = next(iter(named))
            if x in S_IFMT_OF_KIND and (S_IFMT_OF_KIND[x] == fmt or x == k):
                choice = x
        if choice is None and fmt in KIND_OF_S_IFMT and named <= {KIND_OF_S_IFMT[fmt]}:
            choice = KIND_OF_S_IFMT[fmt]
        if choice is not None and choice != KIND_KOBJ:
            r.set("inode", i, kind=choice, mode=S_IFMT_OF_KIND[choice] | (mode & 0o7777))
            k = choice
            r.note(i, "unverified", f"its kind and mode disagreed: it is a {KIND_NAMES[choice]}, as its "
                                    "directory entries and mode say")
    flags = int(ino["flags"][i])
    clear = flags & FLAG_TRUNCATING  # a damaged flag must not free the file's blocks
    if flags & FLAG_PINNED and k != KIND_KOBJ and not (k == KIND_DIR and _is_namespace(ev, i)):
        clear |= FLAG_PINNED
    if clear:
        r.set("inode", i, flags=flags & ~clear)
    # What the format fixes for the kernel namespace and its objects (KERNEL-OBJECTS.md).
    namespace = k == KIND_DIR and _is_namespace(ev, i) and int(ino["flags"][i]) & FLAG_PINNED
    if namespace and (int(ino["uid"][i]) or mode & 0o7777 != 0o700):
        r.set("inode", i, uid=0, mode=0o040700)
        r.note(i, "mode", "the kernel namespace is root's with mode 0700: set so")
    if k == KIND_KOBJ and not int(ino["flags"][i]) & FLAG_ORPHAN:
        r.set("inode", i, uid=0, flags=int(ino["flags"][i]) | FLAG_PINNED)
        run = int(ev.b_count[ev.b_owner == i].sum())
        if run and int(ino["size"][i]) > run * ev.bs:
            r.set("inode", i, size=run * ev.bs)
            r.note(i, "size", f"a kernel object's payload lies in its one run of blocks: its size "
                              f"{int(ino['size'][i])} was past it, set to {run * ev.bs}")
    if k in (KIND_REG, KIND_KOBJ):
        mine = ev.b_owner == i
        last = int((ev.b_fb[mine] + ev.b_count[mine]).max()) if mine.any() else 0
        chunks = int(ev.p_count[ev.p_owner == i].sum())
        size = int(ino["size"][i])
        new = None
        if last > ev.need(i):
            new = last * ev.bs
        elif size > max_file_size(ev.bs):
            new = max(last * ev.bs, chunks * ev.chunk)
        if new is not None:
            r.set("inode", i, size=new)
            r.note(i, "size", f"its size {size} disagreed with its blocks: set to {new} to keep them (what "
                              "lies past its true end reads as it is on the device)")
    r.note(i, "unverified", "its inode record failed its checksum; kept: its owner, permissions and "
                            "times cannot be checked against anything else")


def _triage_dirent(r: Repair, ev: Evidence, k: int) -> bool:
    """Returns whether it changed the tables."""
    d, v = r.t.dirents, ev.v
    parent, ino = int(d["parent"][k]), int(d["ino"][k])
    if not (0 < ino < ev.n and ev.live[ino] and 0 < parent < ev.n and v.is_dir[parent]):
        return False  # names nothing, or lies nowhere: the entry checks drop it and say so
    path = r.slot_path(k)
    if ino not in r.suspect["inode"]:
        if int(ev.kind[ino]) != KIND_DIR and ev.names[ino] > int(r.t.inodes["nlink"][ino]):
            r.zero("dirent", k)
            r.suspect["dirent"].discard(k)
            r.outcome[("dirent", k)] = "dropped: the file it names does not count it"
            r.note(ino, "name-removed", f"its entry {path} failed its checksum and its link count does "
                                        "not count that name: removed")
            return True
        if int(ev.kind[ino]) == KIND_DIR:
            p = int(r.t.inodes["parent"][ino])
            if p != parent:
                twins = v.dir_used[(v.d_ino == ino) & (v.d_parent == p) & (v.dir_used != k)]
                if len(twins):
                    r.zero("dirent", k)
                    r.suspect["dirent"].discard(k)
                    r.note(ino, "name-removed", f"its extra entry {path} failed its checksum: removed")
                    return True
                if 0 < p < ev.n and v.is_dir[p] and bytes(d["name"][k]) not in r.names_in(p):
                    r.set("dirent", k, parent=p)
                    r.note(ino, "moved", f"its entry {path} failed its checksum: put back in {r.was(p)}, "
                                         "the directory its '..' names")
                    return True
    r.note(ino, "unverified", f"its directory entry {path} failed its checksum; kept: a name and its "
                              "place cannot be checked against anything else")
    return False


def _triage_blob(r: Repair, ev: Evidence, b: int) -> None:
    bl = r.t.blobs
    head, steps = b, 0
    while int(bl["kind"][head]) == BLOB_CONT and ev.linked_by[head] > 0 and steps < 300:
        head, steps = int(ev.linked_by[head]), steps + 1
    owner = int(bl["owner"][head])
    if not (0 < owner < ev.n and ev.live[owner]) and head == b and int(bl["kind"][b]) in (BLOB_XATTR, BLOB_SYMLINK):
        # Its owner is gone: an orphaned continuation chain of the length its value needs
        # says whose it was (the chain's records carry their owner too).
        used = ev.v.blob_used
        strays = set(used[(bl["kind"][used] == BLOB_CONT) & (ev.linked_by[used] < 0)].tolist())
        nxt = int(bl["next"][b])
        if 0 < nxt < r.hwm["blob"] and int(bl["kind"][nxt]) == BLOB_CONT and ev.linked_by[nxt] == b:
            strays.add(nxt)  # the chain it still links
        nl = min(int(bl["name_len"][b]), BLOB_DATA)
        fits = [c for c in sorted(strays) if 0 < int(bl["owner"][c]) < ev.n and ev.live[int(bl["owner"][c])]
                and int(bl["value_len"][b]) == BLOB_DATA - nl + ev.chain_rest(c)]
        if len(fits) != 1:
            return  # the blob checks free it; its file cannot be told
        owner = int(bl["owner"][fits[0]])
        r.set("blob", b, owner=owner, next=fits[0])
        r.outcome[("blob", b)] = "its owner was damaged: taken from the rest of its value"

    if int(bl["kind"][head]) == BLOB_SYMLINK:
        what = "symlink target"
    else:
        nl = min(int(bl["name_len"][head]), NAME_MAX)
        what = f"xattr {decode_name(bl['data'][head].tobytes()[:nl])!r}"
    r.note(owner, "unverified", f"its {what} (record {b}) failed its checksum; kept as found: nothing "
                                "else records it")


def _triage_pack(r: Repair, ev: Evidence, p: int) -> None:
    blk = int(r.t.packs["block"][p])
    if blk and (ev.p_block == blk).any():
        return  # its files agree with its block; its bitmap is rebuilt from them
    orphans = sorted(set(ev.p_block.tolist()) - set(ev.pack_of))
    if len(orphans) == 1:
        r.set("pack", p, block=orphans[0])
        r.outcome[("pack", p)] = "its block was taken from the packed extents that point at it"


def fix_checksums(r: Repair, fs: list[Finding]) -> None:
    """Restore damaged records exactly where the checksum allows it, judge the rest."""
    bad, free = _suspects(r)
    left = restore_records(r, bad | free)
    r.snapshot()  # the names as the damage left them, with what was restored
    _triage(r, left & free, left - free)
