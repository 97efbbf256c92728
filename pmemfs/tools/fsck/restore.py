"""Restoring records that fail their checksum exactly, when one explanation of the
damage predicts the whole original record (CRC-32 is affine over GF(2))."""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

from ...media import check
from ...media.format import (
    BLOB_CONT,
    BLOB_DATA,
    BLOB_SYMLINK,
    BLOB_XATTR,
    EXTENT_PACKED,
    FLAG_TRUNCATING,
    FLAGS_KNOWN,
    KIND_BLK,
    KIND_CHR,
    KIND_DIR,
    KIND_FIFO,
    KIND_KOBJ,
    KIND_REG,
    KIND_SOCK,
    KIND_SYMLINK,
    NAME_MAX,
    PACK_CHUNKS,
    ROOT_INO,
    S_IFMT_OF_KIND,
    SMALL_CHUNKS,
)
from .evidence import Evidence
from .repair import Repair

# A record whose checksum fails is not trusted as it is. But CRC-32 is affine over GF(2):
# the difference between the checksum stored and the one its bytes give (the syndrome) is
# the CRC-linear image of the bits the damage flipped. fsck tries a few explanations of the
# damage, each of which predicts the whole original record: one byte of the checksum field;
# one byte anywhere else (a table of every single-byte error's syndrome); bytes that must
# be zero (padding, reserved fields, fields the record's kind does not use); one field,
# solved for (its 8 to 32 unknown bits against the checksum's 32 equations), when the
# value found is one the rest of the metadata confirms (a live owner, the file's block
# count, the link count, the allocation bitmap). A record is restored only when exactly
# one explanation predicts it; a wrong one fits by chance with a probability of about
# 2^-32 times the number of values it admits (docs/FSCK.md).
SOLVE_FIELDS = {
    "inode": ("kind", "flags", "mode", "nlink", "size", "nblocks", "parent", "next_cookie",
              "ktype", "kstate", "kversion", "kchecksum"),
    "extent": ("owner", "count", "file_block", "start_block", "flags"),
    "dirent": ("parent", "ino", "cookie", "name_len", "kind"),
    "blob": ("owner", "next", "kind", "name_len", "value_len"),
    "pack": ("block", "used"),
}


SIZELESS = (KIND_DIR, KIND_FIFO, KIND_SOCK, KIND_CHR, KIND_BLK)
EXTENT_HEAD = struct.Struct("<IIQQI")  # an extent record but its checksum
XATTR_NAMESPACES = (b"user", b"trusted", b"security")


@functools.lru_cache(maxsize=512)
def _basis(length: int, offset: int, nbits: int) -> dict[int, tuple[int, int]]:
    """Gaussian elimination over GF(2) of the CRC columns of a field's bits: pivot bit ->
    (vector, which field bits make it)."""
    cols = check.crc_bit_columns(length)[offset * 8: offset * 8 + nbits].tolist()
    basis: dict[int, tuple[int, int]] = {}
    for i, c in enumerate(cols):
        vec, combo = int(c), 1 << i
        while vec:
            b = vec.bit_length() - 1
            if b not in basis:
                basis[b] = (vec, combo)
                break
            bv, bc = basis[b]
            vec ^= bv
            combo ^= bc
    return basis


def _solve(length: int, offset: int, nbits: int, target: int) -> int | None:
    """The field value v with lin(v) == target, or None."""
    basis = _basis(length, offset, nbits)
    v = 0
    while target:
        hit = basis.get(target.bit_length() - 1)
        if hit is None:
            return None
        target ^= hit[0]
        v ^= hit[1]
    return v


@functools.lru_cache(maxsize=8)
def _byte_errors(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Syndromes of every single-byte error in a `length`-byte message, sorted, with the
    byte's position and the XOR that undoes it; syndromes two errors share are left out."""
    cols = check.crc_bit_columns(length).reshape(length, 8)
    x = np.arange(1, 256, dtype=np.uint32)
    syn = np.zeros((length, 255), np.uint32)
    for k in range(8):
        on = ((x >> k) & 1).astype(bool)
        syn ^= np.where(on[None, :], cols[:, k:k + 1], np.uint32(0))
    flat = syn.ravel()
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    dup = np.zeros(len(s), bool)
    same = s[1:] == s[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    keep = order[~dup]
    return flat[keep], keep // 255, keep % 255 + 1


def _plausible(ev: Evidence, table: str, idx: int, f: str, c, raw: bytes) -> bool:
    """Does the record c (field f solved for) agree with the rest of the metadata?"""
    judge = _PLAUSIBLE.get(table)
    return judge is not None and judge(ev, idx, f, c, raw)


def _plausible_inode(ev: Evidence, idx: int, f: str, c, raw: bytes) -> bool:
    """An inode: kind and mode agree, flags are known, a count is what the tables count."""
    k, mode = int(c["kind"]), int(c["mode"])
    if f == "kind":
        return 1 <= k <= KIND_KOBJ and S_IFMT_OF_KIND[k] == mode & 0o170000
    if f == "mode":
        return k in S_IFMT_OF_KIND and mode & 0o170000 == S_IFMT_OF_KIND[k] and mode < 0o200000
    if f == "flags":
        return int(c["flags"]) & ~FLAGS_KNOWN == 0
    if f == "nlink":
        return int(c["nlink"]) == int(ev.expect_nlink[idx])
    if f == "nblocks":
        return int(c["nblocks"]) == int(ev.sums[idx])
    if f == "parent":
        return int(c["parent"]) == (int(ev.up[idx]) if k == KIND_DIR else 0)
    if f == "next_cookie":
        return k != KIND_DIR and int(c["next_cookie"]) == 0
    if f == "size":
        if k == KIND_SYMLINK:
            return int(c["size"]) == ev.target_len.get(idx, -1)
        return k in SIZELESS and int(c["size"]) == 0
    return k != KIND_KOBJ and int(c[f]) == 0  # kernel-object fields


def _plausible_extent(ev: Evidence, idx: int, f: str, c, raw: bytes) -> bool:
    """An extent: its file holds data; its blocks (or chunks) are marked and no one else's."""
    o, n, fb, s, fl = (int(c[x]) for x in ("owner", "count", "file_block", "start_block", "flags"))
    if not ev.data_inode(o) or fl & 0xFFFE:
        return False
    if fl & EXTENT_PACKED:
        c0 = fl >> 16
        p = ev.pack_of.get(s)
        return (int(ev.kind[o]) == KIND_REG and fb == 0 and 1 <= n <= SMALL_CHUNKS and c0 + n <= PACK_CHUNKS
                and p is not None and bool(ev.pack_bits(p)[c0:c0 + n].all()))
    g = ev.g
    return (n >= 1 and g.data_start_block <= s <= g.block_count - n
            and (fb + n <= ev.need(o) or bool(int(ev.flags[o]) & FLAG_TRUNCATING))
            and ev.marked(s, n) and not ev.claimed(s, n, idx) and not ev.file_overlap(o, fb, n, idx)
            and int(ev.sums[o]) - ev.own(o, idx) + n == int(ev.nblocks[o]))


def _plausible_dirent(ev: Evidence, idx: int, f: str, c, raw: bytes) -> bool:
    """A directory entry: a live directory names a live inode of the kind it records."""
    parent, ino, kind = int(c["parent"]), int(c["ino"]), int(c["kind"])
    if not (0 < parent < ev.n and ev.v.is_dir[parent] and 0 < ino < ev.n and ev.live[ino]
            and int(ev.kind[ino]) == kind):
        return False
    if f == "cookie":
        cookie = int(c["cookie"])
        others = ev.d_cookie[(ev.v.d_parent == parent) & (ev.v.dir_used != idx)]
        return 3 <= cookie < int(ev.v.inodes["next_cookie"][parent]) and cookie not in set(others.tolist())
    if f == "name_len":
        nl, name = int(c["name_len"]), raw[28:28 + 256]
        return 1 <= nl <= NAME_MAX and 0 not in name[:nl] and not any(name[nl:])
    return True


def _plausible_blob(ev: Evidence, idx: int, f: str, c, raw: bytes) -> bool:
    """An xattr or symlink record: a live owner, a sound chain and a well-formed value."""
    owner, kind, nxt = int(c["owner"]), int(c["kind"]), int(c["next"])
    nl, vl = int(c["name_len"]), int(c["value_len"])
    b = ev.r.t.blobs
    linker = int(ev.linked_by[idx]) if idx < len(ev.linked_by) else -1
    if not (0 < owner < ev.n and ev.live[owner]) or kind not in (BLOB_XATTR, BLOB_SYMLINK, BLOB_CONT):
        return False
    if (kind == BLOB_CONT) != (linker > 0) or (linker > 0 and int(b["owner"][linker]) != owner):
        return False
    if kind == BLOB_SYMLINK and int(ev.kind[owner]) != KIND_SYMLINK:
        return False
    if nxt and not (0 < nxt < ev.r.hwm["blob"] and int(b["kind"][nxt]) == BLOB_CONT
                    and int(b["owner"][nxt]) == owner and int(ev.linked_by[nxt]) in (-1, idx)):
        return False
    data = raw[20:20 + BLOB_DATA]
    if kind == BLOB_XATTR:
        if not (1 <= nl <= NAME_MAX and 0 not in data[:nl] and data[:nl].split(b".")[0] in XATTR_NAMESPACES):
            return False
    elif nl:
        return False
    if kind == BLOB_CONT:
        if not 1 <= vl <= BLOB_DATA:
            return False
        used = vl
    else:
        first = BLOB_DATA - nl
        if (nxt == 0 and vl > first) or (nxt and vl != first + ev.chain_rest(nxt)):
            return False
        used = nl + min(vl, first)
    return not any(data[used:])


def _plausible_pack(ev: Evidence, idx: int, f: str, c, raw: bytes) -> bool:
    """A pack record: a data block that packed extents point at, with a true chunk count."""
    blk = int(c["block"])
    if not ev.g.data_start_block <= blk < ev.g.block_count:
        return False
    if f == "block":
        return bool((ev.p_block == blk).any()) and ev.pack_of.get(blk, idx) == idx
    raw_bits = np.frombuffer(raw[16:80], np.uint8)
    return int(c["used"]) == int(np.unpackbits(raw_bits).sum())


_PLAUSIBLE = {"inode": _plausible_inode, "extent": _plausible_extent, "dirent": _plausible_dirent,
              "blob": _plausible_blob, "pack": _plausible_pack}


def _zero_known(ev: Evidence, table: str, raw: bytes) -> bytes | None:
    """The record with every byte that must be zero set to zero (None: nothing known)."""
    b = bytearray(raw)
    size = len(raw)
    spans: list[tuple[int, int]] = []
    if table == "inode":
        k = raw[0]
        spans = [(1, 2), (108, 124)]
        if k != KIND_DIR:
            spans.append((80, 96))  # parent, next_cookie
        if k != KIND_KOBJ:
            spans.append((96, 108))  # kernel-object fields
        if k in SIZELESS:
            spans.append((24, 40))  # size, nblocks
    elif table == "dirent":
        nl = int.from_bytes(raw[24:26], "little")
        if nl > NAME_MAX:
            return None
        spans = [(27, 28), (28 + nl, 284)]
    elif table == "blob":
        kind, nl = raw[12], int.from_bytes(raw[14:16], "little")
        vl = int.from_bytes(raw[16:20], "little")
        if nl > BLOB_DATA:
            return None
        used = vl if kind == BLOB_CONT else nl + min(vl, BLOB_DATA - nl)
        spans = [(13, 14), (20 + min(used, BLOB_DATA), 20 + BLOB_DATA)]
    elif table == "pack":
        spans = [(12, 16), (80, 124)]
    elif table == "extent" and int.from_bytes(raw[24:28], "little") & EXTENT_PACKED:
        spans = [(8, 16)]  # a packed extent's file block
    if not spans:
        return None
    for lo, hi in spans:
        b[lo:min(hi, size - 4)] = bytes(max(0, min(hi, size - 4) - lo))
    return bytes(b)


def _explanations(ev: Evidence, table: str, idx: int, raw: bytes) -> dict[bytes, str]:
    """Each original record some explanation of the damage predicts -> the explanation."""
    n = len(raw) - 4
    body, stored = raw[:n], int.from_bytes(raw[n:], "little")
    syn = zlib.crc32(body) ^ stored
    out: dict[bytes, str] = {}
    if sum(((syn >> (8 * k)) & 0xFF) != 0 for k in range(4)) == 1:
        out[raw] = "only its checksum was damaged"
    s, pos, val = _byte_errors(n)
    k = int(np.searchsorted(s, syn))
    if k < len(s) and int(s[k]) == syn:
        fixed = bytearray(body)
        fixed[int(pos[k])] ^= int(val[k])
        out.setdefault(bytes(fixed) + raw[n:], f"byte {int(pos[k])} was damaged")
    z = _zero_known(ev, table, raw)
    if z is not None and z != raw and zlib.crc32(z[:n]) == stored:
        out.setdefault(z, "bytes that must be zero were damaged")
    dt = ev.r.tables[table].dtype
    for f in SOLVE_FIELDS[table]:
        fdt, off = dt.fields[f][:2]
        w = fdt.itemsize
        base = bytearray(body)
        base[off:off + w] = bytes(w)
        v = _solve(n, off, min(32, 8 * w), stored ^ zlib.crc32(base))
        if v is None:
            continue
        base[off:off + w] = v.to_bytes(w, "little")
        cand = bytes(base) + raw[n:]
        if cand != raw and _plausible(ev, table, idx, f, np.frombuffer(cand, dt)[0], cand):
            out.setdefault(cand, f"its {f} field was damaged")
    for cand, how in _derived(ev, table, idx, raw):
        if cand != raw and zlib.crc32(cand[:n]) == stored:
            out.setdefault(cand, how)
    if table == "pack":  # the chunk bitmap is the union of the packed extents in its block
        blk = int.from_bytes(raw[0:8], "little")
        bits = np.zeros(PACK_CHUNKS, bool)
        for c0, cnt in zip(ev.p_c0[ev.p_block == blk].tolist(), ev.p_count[ev.p_block == blk].tolist(),
                           strict=True):
            bits[c0:c0 + cnt] = True
        cand = bytearray(raw)
        cand[8:12] = int(bits.sum()).to_bytes(4, "little")
        cand[16:80] = np.packbits(bits, bitorder="little").tobytes()
        cand = bytes(cand)
        if cand != raw and zlib.crc32(cand[:n]) == stored:
            out.setdefault(cand, "its chunk bitmap was damaged")
    return out


def _with(raw: bytes, dt: np.dtype, **values: int) -> bytes:
    b = bytearray(raw)
    for f, v in values.items():
        fdt, off = dt.fields[f][:2]
        b[off:off + fdt.itemsize] = int(v).to_bytes(fdt.itemsize, "little")
    return bytes(b)


def _derived(ev: Evidence, table: str, idx: int, raw: bytes) -> list[tuple[bytes, str]]:
    """Records that damage to several fields at once would have come from, built from
    what other records say is missing: a continuation nobody links (for an xattr head),
    a file short of blocks with a hole that size and blocks nobody owns (for an extent),
    a file short of a name (for a directory entry). Each is accepted only if the
    checksum then matches, so the guesses cost nothing when wrong."""
    dt = ev.r.tables[table].dtype
    out: list[tuple[bytes, str]] = []
    if table == "blob" and idx < len(ev.linked_by) and ev.linked_by[idx] < 0:  # a head (nobody links it)
        b, hwm = ev.r.t.blobs, ev.r.hwm["blob"]
        used = ev.v.blob_used
        strays = used[(b["kind"][used] == BLOB_CONT) & (ev.linked_by[used] < 0) & (used != idx)]
        n = len(raw) - 4
        stored = int.from_bytes(raw[n:], "little")
        for nxt in [0, *strays[:100].tolist()]:
            for kind in (BLOB_XATTR, BLOB_SYMLINK):
                # owner, next and kind damaged: the owner solved for, for each next and kind it could have
                base = _with(raw, dt, owner=0, next=nxt, kind=kind)
                o = _solve(n, 0, 32, stored ^ zlib.crc32(base[:n]))
                if not (o and o < ev.n and ev.live[o]):
                    continue
                if kind == BLOB_SYMLINK and int(ev.kind[o]) != KIND_SYMLINK:
                    continue
                if nxt and not (nxt < hwm and int(b["owner"][nxt]) == o):
                    continue
                out.append((_with(base, dt, owner=o), "its owner, next and kind fields were damaged: solved "
                                                      "for, with a continuation nobody links (or none)"))
    elif table == "extent":
        n = len(raw) - 4
        stored = int.from_bytes(raw[n:], "little")
        for o, fb, cnt in ev.short_files():
            # owner, count, file block and flags from the evidence; the start block solved for.
            base = EXTENT_HEAD.pack(o, cnt, fb, 0, 0) + raw[28:n]
            st = _solve(n, 16, 32, stored ^ zlib.crc32(base))
            if st is not None and ev.unowned(st, cnt):
                out.append((EXTENT_HEAD.pack(o, cnt, fb, st, 0) + raw[28:],
                            "several of its fields were damaged: rebuilt from the file's block count and size "
                            "and blocks no file owns"))
        for blk, c0, cnt, o in ev.orphan_chunks()[:2000]:
            out.append((EXTENT_HEAD.pack(o, cnt, 0, blk, EXTENT_PACKED | (c0 << 16)) + raw[28:],
                        "several of its fields were damaged: rebuilt from chunks no file claims and a small "
                        "file with no data"))
    elif table == "dirent":
        d = ev.r.t.dirents
        n = len(raw) - 4
        nlink = ev.v.inodes["nlink"].astype(np.int64)
        missing = ev.live & ~ev.v.is_dir & (ev.names < nlink)
        missing |= ev.v.is_dir & (ev.names == 0)
        missing[: ROOT_INO + 1] = False
        base = bytearray(raw[:n])
        base[0:16] = bytes(16)  # parent and ino unknown
        t0 = int.from_bytes(raw[n:], "little") ^ zlib.crc32(bytes(base))
        cands = np.flatnonzero(missing & (ev.kind == raw[26]))[:2000]
        for i, lin_i in zip(cands.tolist(), check.crc_of_field(n, 8, cands, 32).tolist(), strict=True):
            p = _solve(n, 0, 32, t0 ^ lin_i)
            if p is not None and 0 < p < ev.n and ev.v.is_dir[p]:
                out.append((_with(raw, dt, parent=p, ino=i), "its parent and inode fields were damaged: "
                                                             "solved for, with a file that lacks a name"))
        del d
    return out


def restore_records(r: Repair, targets: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Restore what can be restored exactly; returns the records left unexplained."""
    left = set(targets)
    for _ in range(2):  # a second round: restored records are evidence for the rest
        if not left:
            break
        ev = Evidence(r)
        done = set()
        for table, idx in sorted(left):
            found = _explanations(ev, table, idx, r.raw(table, idx))
            if len(found) == 1:
                ((cand, how),) = found.items()
                r.put(table, idx, cand)
                r.outcome[(table, idx)] = f"restored exactly from its checksum ({how})"
                done.add((table, idx))
            elif len(found) > 1:
                r.outcome[(table, idx)] = f"{len(found)} different repairs would explain the damage: none is trusted"
        left -= done
        if not done:
            break
    return left
