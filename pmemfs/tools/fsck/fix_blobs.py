"""Repairs of xattr and symlink-target records (blobs): malformed records and broken
value chains are removed, and their files named."""

from __future__ import annotations

from ...media.check import Finding
from ...media.format import BLOB_CONT, BLOB_XATTR, KIND_SYMLINK, NAME_MAX
from .repair import Repair, finding_items
from .report import decode_name


def _blob_what(r: Repair, slot: int) -> str:
    b = r.t.blobs
    if int(b["kind"][slot]) == BLOB_XATTR:
        nl = min(int(b["name_len"][slot]), NAME_MAX)
        return f"xattr {decode_name(b['data'][slot].tobytes()[:nl])!r}"
    return "symlink target" if int(b["kind"][slot]) == 2 else "xattr or symlink record"


def _blob_owner_live(r: Repair, slot: int) -> int:
    o = int(r.t.blobs["owner"][slot])
    return o if 0 < o < r.hwm["inode"] and int(r.t.inodes["kind"][o]) else 0


def fix_free_blobs(r: Repair, fs: list[Finding]) -> None:
    for slot in finding_items(fs, "index"):
        if not r.t.blobs["owner"][slot]:
            continue
        o = _blob_owner_live(r, slot)
        if o and int(r.t.blobs["kind"][slot]) != BLOB_CONT:
            r.note(o, "xattr-removed", f"its {_blob_what(r, slot)} (record {slot}) was malformed: removed")
        elif o:  # part of a value whose first record is gone: its file lost an xattr or its target
            what = "target-removed" if int(r.t.inodes["kind"][o]) == KIND_SYMLINK else "xattr-removed"
            r.note(o, what, "part of one of its xattrs or of its target lost the record that starts it: removed")
        r.zero("blob", slot)


def fix_free_chains(r: Repair, fs: list[Finding]) -> None:
    for f in fs:
        for slot in f.data.get("index", []):
            if not r.t.blobs["owner"][slot]:
                continue
            o = _blob_owner_live(r, slot)
            # A symlink record on an inode that is not a symlink is not part of any file.
            if o and f.code != "stray-target":
                what = "target-removed" if int(r.t.blobs["kind"][slot]) == 2 else "xattr-removed"
                how = {"extra-target": "a second target", "bad-xattr-name": "its name is no xattr name (damaged)",
                       "dup-xattr": "the file has another xattr of that name"}.get(f.code, "its value chain was broken")
                r.note(o, what, f"its {_blob_what(r, slot)} (record {slot}) was removed: {how}")
            r.free_chain(slot)
